"""--data through `datasets`: a local parquet folder, a save_to_disk folder, a fake Hub cache read with
HF_HUB_OFFLINE=1; the Alpaca / ShareGPT / OpenAI shapes and --columns become mlxlora's rows with the same
masking as the same rows written by hand; mixtures with a recorded seed; one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from mlxlora.data import load_split
from mlxlora.data.sources import mix, prepare_data
from mlxlora.errors import ConfigError, DataError
from mlxlora.models import load_base

datasets = pytest.importorskip("datasets", reason="the datasets extra (pip install 'mlxlora[datasets]')")

ALPACA = [{"instruction": f"Define word {i}.", "input": "Be brief." if i % 2 else "", "output": f"Word {i} means {i}."}
          for i in range(6)]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": f"Hi {i}"},
                               {"from": "gpt", "value": f"Hello {i}!"}]} for i in range(4)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _same_samples(a, b, tok):
    sa, sb = load_split(a, tok, 256), load_split(b, tok, 256)
    assert [(s.ids, s.mask) for s in sa.samples] == [(s.ids, s.mask) for s in sb.samples]
    assert any(not m for s in sa.samples for m in s.mask)  # the prompts carry no loss


@pytest.fixture(scope="module")
def tok(tiny_dirs):
    return load_base(str(tiny_dirs["llama"])).tokenizer


def test_local_parquet_folder_in_alpaca_shape(tmp_path, tok):
    src = tmp_path / "alpaca"
    src.mkdir()
    datasets.Dataset.from_list(ALPACA).to_parquet(str(src / "train.parquet"))
    datasets.Dataset.from_list(ALPACA[:2]).to_parquet(str(src / "test.parquet"))
    out = Path(prepare_data(str(src), root=tmp_path / "prepared"))
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert rows[1] == {"prompt": "Define word 1.\n\nBe brief.", "completion": "Word 1 means 1."}
    assert rows[0] == {"prompt": "Define word 0.", "completion": "Word 0 means 0."}
    assert (out / "test.jsonl").is_file() and not (out / "valid.jsonl").exists()
    by_hand = _jsonl(tmp_path / "hand.jsonl", [{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""),
                                                "completion": r["output"]} for r in ALPACA])
    _same_samples(out / "train.jsonl", by_hand, tok)
    record = json.loads((out / "sources.json").read_text())
    assert record["sources"][0]["splits"]["train"]["shape"].startswith("alpaca")
    assert prepare_data(str(src), root=tmp_path / "prepared") == str(out)  # prepared once


def test_save_to_disk_sharegpt_with_a_validation_split(tmp_path, tok):
    src = tmp_path / "disk"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SHAREGPT),
                          "validation": datasets.Dataset.from_list(SHAREGPT[:2])}).save_to_disk(str(src))
    out = Path(prepare_data(str(src), root=tmp_path / "prepared"))
    assert (out / "valid.jsonl").is_file()
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert rows[0]["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi 0"},
                                   {"role": "assistant", "content": "Hello 0!"}]
    by_hand = _jsonl(tmp_path / "hand.jsonl", rows)
    _same_samples(out / "train.jsonl", by_hand, tok)
    # --split-map names a split the dataset does not have: one line listing those it has
    with pytest.raises(DataError, match=r"has no split 'dev' \(splits: train, validation\)"):
        prepare_data(str(src), split_map="valid=dev", root=tmp_path / "prepared")


def test_columns_map_and_missing_column(tmp_path, tok, cli, tiny_dirs):
    src = tmp_path / "qa"
    src.mkdir()
    datasets.Dataset.from_list([{"question": "q?", "answer": "a.", "id": 1}]).to_parquet(str(src / "train.parquet"))
    out = Path(prepare_data(str(src), columns="prompt=question,completion=answer", root=tmp_path / "p"))
    assert json.loads((out / "train.jsonl").read_text()) == {"prompt": "q?", "completion": "a."}
    with pytest.raises(DataError, match=r"--columns: .* split 'train' has no column 'instruction' \(columns: question"):
        prepare_data(str(src), columns="prompt=instruction,completion=answer", root=tmp_path / "p")
    with pytest.raises(ConfigError, match="'question' is not a field"):
        prepare_data(str(src), columns="question=prompt", root=tmp_path / "p")
    tiny.one_line_error(cli("data", "inspect", "--model", tiny_dirs["llama"], "--data", src, "--columns",
                            "prompt=instruction,completion=output"), "has no column 'instruction'")


def test_mixture_weights_and_seed(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(70)])
    b = tmp_path / "b"
    b.mkdir()
    _jsonl(b / "train.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)])
    out = Path(prepare_data([f"{a}:0.7", f"{b}:0.3"], seed=5, root=tmp_path / "mix"))
    record = json.loads((out / "sources.json").read_text())
    # b's 10 rows are 30%: the mixture has 33 rows, 23 from a (round(0.7 * 33.3)) and all 10 of b
    assert record["seed"] == 5 and record["mixture"]["train"] == {f"{a}:0.7": 23, f"{b}:0.3": 10}
    rows = (out / "train.jsonl").read_text().splitlines()
    assert len(rows) == 33 and len(set(rows)) == 33
    again = Path(prepare_data([f"{a}:0.7", f"{b}:0.3"], seed=6, root=tmp_path / "mix"))
    assert again != out and (again / "train.jsonl").read_text() != (out / "train.jsonl").read_text()
    assert mix([[1, 2, 3, 4], [5, 6]], [1, 1], seed=0)[1] == [2, 2]
    with pytest.raises(ConfigError, match="give each a weight"):
        prepare_data([str(a), str(b)], root=tmp_path / "mix")


def _fake_hub_cache(root: Path, rows) -> Path:
    """A datasets cache holding `org/name` as if downloaded once: what load_dataset reads offline."""
    build = root / "build"
    datasets.Dataset.from_list(rows).to_parquet(str(root / "train.parquet"))
    b = datasets.load_dataset_builder("parquet", data_files={"train": str(root / "train.parquet")},
                                      cache_dir=str(build))
    b.download_and_prepare()
    dst = root / "hf-datasets" / "org___name" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(b.cache_dir, dst)
    for f in dst.glob("parquet-*"):
        f.rename(f.with_name(f.name.replace("parquet-", "name-")))
    return root / "hf-datasets"


def test_hub_id_from_the_cache_offline(tmp_path, tiny_dirs):
    cache = _fake_hub_cache(tmp_path, [{"messages": [{"role": "user", "content": f"u{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]} for i in range(3)])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(cache),
               MLXLORA_CACHE=str(tmp_path / "mlxlora-cache"))
    cmd = [sys.executable, "-m", "mlxlora", "data", "inspect", "--model", str(tiny_dirs["llama"]), "--data"]
    res = subprocess.run([*cmd, "org/name", "-n", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "org/name [train -> train]: 3 rows, messages: chat rows" in res.stdout
    assert "3 rows -> 3 samples" in res.stdout and "]a|0|<|im_end|>" in res.stdout  # the answer carries the loss
    res = subprocess.run([*cmd, "org/missing"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1 and "HF_HUB_OFFLINE is set" in res.stderr, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr


def test_eval_perplexity_reads_a_datasets_folder_like_its_rows_written_by_hand(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setenv("MLXLORA_CACHE", str(tmp_path / "cache"))
    src, hand = tmp_path / "alpaca", tmp_path / "hand"
    src.mkdir()
    hand.mkdir()
    datasets.Dataset.from_list(ALPACA).to_parquet(str(src / "test.parquet"))
    _jsonl(hand / "test.jsonl", [{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""),
                                  "completion": r["output"]} for r in ALPACA])
    out = [tiny.run_cli("eval", "--model", tiny_dirs["llama"], "--data", d) for d in (src, hand)]
    assert all(r.exit_code == 0 for r in out), [r.output for r in out]
    lines = [[x for x in r.output.splitlines() if x.startswith("loss ")] for r in out]
    assert lines[0] == lines[1] and len(lines[0]) == 1, lines
