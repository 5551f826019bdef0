"""GRPO on the demo model (SmolLM2-135M-Instruct, 4-bit) with a verifiable reward: two-number additions.

Prints the held-out exact-match accuracy (greedy) and the mean sampled reward before and after a short
GRPO run with the built-in `exact` reward. Prompts are generated from a fixed seed, so a rerun sees the
same sets. Usage: python scripts/grpo_arith.py [--steps 20] [--group-size 4] [--lr 5e-4]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm.sample_utils import make_sampler

from mlxlora.config import LoraConfig
from mlxlora.config.grpo import GRPOConfig
from mlxlora.data.prompts import load_prompts
from mlxlora.lora.surgery import get_lora_model
from mlxlora.models import load_base
from mlxlora.models.demo import ensure_demo_model
from mlxlora.train.grpo import GRPOStepper, sample_group
from mlxlora.train.rewards import final_answer, parse_rewards, same_answer


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 60), rng.randint(10, 60)
        rows.append({"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)})
    return rows


def accuracy(model, tok, rows, max_tokens: int) -> float:
    """Greedy exact-match accuracy on rows."""
    greedy = make_sampler(0.0)
    hits = 0
    for r in rows:
        ids = sample_group(model, r.ids, 1, max_tokens, greedy, set(tok.eos_token_ids))[0]
        hits += same_answer(final_answer(tok.decode(ids, skip_special_tokens=True)), r.answer)
    return hits / len(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-completion-length", type=int, default=12)
    args = ap.parse_args()
    base = load_base(str(ensure_demo_model()))
    tok = base.tokenizer
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(64, 0)))
        (Path(d) / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(32, 1)))
        train, test = load_prompts(Path(d) / "train.jsonl", tok), load_prompts(Path(d) / "test.jsonl", tok)
    get_lora_model(base.model, LoraConfig(r=8, target_modules="all-linear"))
    cfg = GRPOConfig(group_size=args.group_size, max_completion_length=args.max_completion_length,
                     rewards=("exact",))
    stepper = GRPOStepper(base.model, optim.Adam(learning_rate=args.lr), tok, cfg, parse_rewards(cfg), beta=0.0,
                          loss_type="dapo")
    before = accuracy(base.model, tok, test, args.max_completion_length)
    print(f"held-out greedy accuracy before: {before:.3f} ({len(test)} prompts)", flush=True)
    t0, rewards = time.perf_counter(), []
    for step in range(args.steps):
        mx.random.seed(step)
        rows = [train[(step * args.batch_size + i) % len(train)] for i in range(args.batch_size)]
        s = stepper.grpo_step(rows)
        rewards.append(s.reward)
        print(f"step {step + 1}: reward {s.reward:.3f} ± {s.reward_std:.3f} · length {s.completion_length:.1f} · "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    base.model.eval()
    after = accuracy(base.model, tok, test, args.max_completion_length)
    k = max(1, args.steps // 4)
    print(f"mean sampled reward, first {k} steps {np.mean(rewards[:k]):.3f} → last {k} {np.mean(rewards[-k:]):.3f}")
    print(f"held-out greedy accuracy: {before:.3f} → {after:.3f} · {args.steps} steps in "
          f"{time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
