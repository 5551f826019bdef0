#!/usr/bin/env python3
"""Measure a DPO adapter on the held-out pairs (valid.jsonl): preference accuracy, DPO reward accuracy, generations.

For each held-out pair and each model -- the base (SmolLM2-135M-Instruct 4-bit), the SFT adapter (the
reference) and the DPO adapter -- the summed log-probability of Bierce's definition (chosen) and of the
base model's own (rejected) are computed. "prefers chosen" is the share of pairs where chosen gets the
higher log-probability; "reward accuracy" is DPO's: the share where the implicit reward
beta * (logp - logp_SFT) of chosen exceeds that of rejected (0 for the SFT adapter itself: every reward is 0).
Then two greedy generations per adapter.

usage: python examples/preference/evaluate.py --sft runs/demo --dpo runs/devil-dpo [--beta 0.1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main():
    from mlxlora.config import GenerateConfig
    from mlxlora.data import load_preference_split
    from mlxlora.data.batches import pad_id
    from mlxlora.inference import generate_text, load_with_adapter
    from mlxlora.lora.surgery import adapter_parameters
    from mlxlora.models.demo import ensure_demo_model
    from mlxlora.train.preference import reference_logps

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True)
    ap.add_argument("--dpo", required=True)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=60)
    a = ap.parse_args()
    model = str(ensure_demo_model())
    logps, gens = {}, {}
    prompts = [json.loads(x)["prompt"] for x in (HERE / "valid.jsonl").read_text().splitlines()[:2]]
    for name, adapter in (("base", None), ("sft", a.sft), ("dpo", a.dpo)):
        base = load_with_adapter(model, adapter)
        split = load_preference_split(HERE / "valid.jsonl", base.tokenizer, 512)
        tensors = adapter_parameters(base.model) if adapter else None
        values = reference_logps(base.model, split, 4, 8, pad_id(base.tokenizer), tensors=tensors)
        n = len(split.items)
        logps[name] = (values[:n], values[n:])
        if adapter:
            gens[name] = [generate_text(base, p, GenerateConfig(max_tokens=a.max_tokens)).strip() for p in prompts]
    out = {"pairs": n}
    for name, (c, r) in logps.items():
        out[name] = {"prefers_chosen": float(np.mean(c > r)), "mean_margin_logp": float(np.mean(c - r))}
    sc, sr = logps["sft"]
    for name in ("sft", "dpo"):
        c, r = logps[name]
        rc, rr = a.beta * (c - sc), a.beta * (r - sr)
        out[name]["reward_accuracy"] = float(np.mean(rc > rr))
        out[name]["reward_margin"] = float(np.mean(rc - rr))
    out["generations"] = [{"prompt": p, "sft": gens["sft"][i], "dpo": gens["dpo"][i]} for i, p in enumerate(prompts)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
