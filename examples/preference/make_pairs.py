#!/usr/bin/env python3
"""Build the Devil's Dictionary preference set: chosen = Bierce's definition, rejected = the demo base model's own.

For each prompt of examples/devil (the first --train rows of train.jsonl, and the first --valid rows of
test.jsonl as the held-out set), the base model SmolLM2-135M-Instruct (4-bit, `mlxlora.models.demo`, no adapter) writes its own
definition once, greedily, through its chat template (as `mlxlora generate` does). Rows whose generation is
empty or equal to Bierce's text are skipped. Writes train.jsonl and valid.jsonl here with rows
{"prompt", "chosen", "rejected"}; the committed files were made with --train 32 --valid 12 --max-tokens 32.

usage: python examples/preference/make_pairs.py [--train 64] [--valid 24] [--max-tokens 48] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEVIL = HERE.parent / "devil"


def rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (DEVIL / name).read_text().splitlines() if x.strip()]


def main():
    from mlxlora.config import GenerateConfig
    from mlxlora.inference import generate_text, load_with_adapter
    from mlxlora.models.demo import ensure_demo_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=64, help="pairs from the first N rows of devil/train.jsonl")
    ap.add_argument("--valid", type=int, default=24, help="held-out pairs from the first N rows of devil/test.jsonl")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(HERE))
    a = ap.parse_args()
    base = load_with_adapter(str(ensure_demo_model()))
    cfg = GenerateConfig(max_tokens=a.max_tokens, temp=0.0)
    out = Path(a.out)
    t0 = time.perf_counter()
    for split, source in (("train", rows("train.jsonl")[:a.train]), ("valid", rows("test.jsonl")[:a.valid])):
        written = []
        for r in source:
            own = generate_text(base, r["prompt"], cfg).strip()
            if own and own != r["completion"].strip():
                written.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": own})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(w) + "\n" for w in written))
        print(f"{split}: {len(written)} pairs of {len(source)} prompts ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
