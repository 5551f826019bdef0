"""examples/devil/lmeval: the README's benchmark task. Its questions are the held-out test split's (each word's
own definition among four, the others from the same split, four distinct), make_tasks.py writes the committed
file byte for byte, and the question text is the training prompt word for word (so --apply-chat-template scores
the reply to the very user turn the adapter was trained on)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

DEVIL = Path(__file__).parent.parent / "examples" / "devil"


def test_questions_are_the_test_split():
    rows = [json.loads(line) for line in (DEVIL / "test.jsonl").read_text().splitlines() if line.strip()]
    questions = [json.loads(line) for line in (DEVIL / "lmeval" / "devil_mc.jsonl").read_text().splitlines()]
    assert len(questions) == len(rows) == 42
    completions = {r["completion"] for r in rows}
    task = yaml.safe_load((DEVIL / "lmeval" / "devil_mc.yaml").read_text())
    for row, q in zip(rows, questions):
        assert re.search(r'"(.+?)"', row["prompt"]).group(1) == q["word"]
        assert q["choices"][q["answer"]] == row["completion"]
        assert len(set(q["choices"])) == 4 and set(q["choices"]) <= completions
        assert task["doc_to_text"].replace("{{word}}", q["word"]) == row["prompt"]


def test_make_tasks_reproduces_the_file(tmp_path):
    folder = tmp_path / "devil"
    (folder / "lmeval").mkdir(parents=True)
    (folder / "test.jsonl").write_bytes((DEVIL / "test.jsonl").read_bytes())
    (folder / "lmeval" / "make_tasks.py").write_bytes((DEVIL / "lmeval" / "make_tasks.py").read_bytes())
    subprocess.run([sys.executable, str(folder / "lmeval" / "make_tasks.py")], check=True, capture_output=True)
    assert (folder / "lmeval" / "devil_mc.jsonl").read_bytes() == (DEVIL / "lmeval" / "devil_mc.jsonl").read_bytes()
