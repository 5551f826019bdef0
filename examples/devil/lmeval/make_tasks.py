"""Writes devil_mc.jsonl from ../test.jsonl: for each held-out word, its definition and three others
drawn from the same split (seeded), in a seeded order. Run from this folder: python make_tasks.py"""

import json
import random
import re
from pathlib import Path

here = Path(__file__).resolve().parent
rows = [json.loads(line) for line in (here.parent / "test.jsonl").read_text().splitlines() if line.strip()]
rng = random.Random(0)
out = []
for i, row in enumerate(rows):
    word = re.search(r'"(.+?)"', row["prompt"]).group(1)
    others = rng.sample([r["completion"] for j, r in enumerate(rows) if j != i], 3)
    choices = [row["completion"], *others]
    rng.shuffle(choices)
    out.append({"word": word, "choices": choices, "answer": choices.index(row["completion"])})
(here / "devil_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
print(f"devil_mc.jsonl: {len(out)} questions")
