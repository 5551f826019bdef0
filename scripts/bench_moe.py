"""Benchmark: LoRA on MoE experts, mlxlora vs mlx-lm's own LoRASwitchLinear training, in one run.

    .venv/bin/python scripts/bench_moe.py [--repeats 2] [--steps 6] [--out bench-moe]

A small random Qwen3-MoE (4 blocks, 16 experts, 2 per token), float32 and 4-bit (QLoRA: the experts
are QuantizedSwitchLinear), trained on fixed-length text with the same adapted layers for both
trainers: the attention projections and the experts' gate/up/down (named explicitly: mlx-lm's
default keys would also adapt the router, mlxlora's all-linear does not). Each run is its own
process (scripts/bench_worker.py), both with the fast BLAS preloaded; runs alternate, warm-up steps
are excluded, the median over repeats is reported with the mlxlora / mlx-lm ratio of tokens/s, of
tokens per CPU-second (the process's CPU time, all threads: on a shared machine wall time also counts
the time other jobs held the cores) and of peak memory. The ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from bench import run  # noqa: E402  (one worker process per run, BLAS env as the CLI sets it)

TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"]
SHAPE = dict(hidden_size=128, num_hidden_layers=4, moe_intermediate_size=128, intermediate_size=256, num_experts=16,
             num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def make_models(out: Path) -> dict[str, Path]:
    import tiny

    return {"float32": tiny.make_model(out / "moe-f32", "qwen3_moe", **SHAPE),
            "4-bit": tiny.make_model(out / "moe-q4", "qwen3_moe", quantize=4, **SHAPE)}


def make_data(out: Path, rows: int = 64, length: int = 127) -> Path:
    rng = random.Random(0)
    words = ["the", "expert", "router", "token", "gate", "mixture", "sparse", "layer", "rank", "adapter"]
    lines = []
    for _ in range(rows):
        text = " ".join(rng.choice(words) for _ in range(length))[:length]  # byte tokenizer: 1 token per char
        lines.append(json.dumps({"text": text}))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    return out / "train.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="bench-moe")
    ap.add_argument("--blas-threads", type=int, help="OpenBLAS threads of both trainers (default: as the CLI sets "
                    "them); 1 keeps BLAS threads of one run from spinning against other jobs on a shared machine")
    args = ap.parse_args()
    if args.blas_threads:
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    out = Path(args.out)
    models, train = make_models(out), make_data(out / "data")
    results = {}
    for case, model in models.items():
        spec = dict(model=str(model), train_file=str(train), rank=8, targets=TARGETS, batch_size=4,
                    max_seq_length=128, warmup=args.warmup, steps=args.steps, seed=0, pack=False)
        runs = {"mlxlora": [], "mlx-lm": []}
        for _ in range(args.repeats):
            for trainer in runs:  # alternate, so drift on the machine hits both
                runs[trainer].append(run(dict(spec, trainer=trainer), blas=True))
        med = {t: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "tokens_per_cpu_s", "peak_memory")}
               for t, rs in runs.items()}
        med["mlxlora"]["plan_ratio"] = statistics.median(r["plan_ratio"] for r in runs["mlxlora"])
        results[case] = med
        ours, theirs = med["mlxlora"], med["mlx-lm"]
        print(f"{case:8s} mlxlora {ours['tokens_per_s']:6.0f} tok/s ({ours['tokens_per_cpu_s']:6.0f} per CPU-s) "
              f"{ours['peak_memory'] / 2**20:6.1f} MiB | mlx-lm {theirs['tokens_per_s']:6.0f} tok/s "
              f"({theirs['tokens_per_cpu_s']:6.0f} per CPU-s) {theirs['peak_memory'] / 2**20:6.1f} MiB | ratio tok/s "
              f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, per CPU-s "
              f"{ours['tokens_per_cpu_s'] / theirs['tokens_per_cpu_s']:.2f}x, peak "
              f"{ours['peak_memory'] / theirs['peak_memory']:.2f}x; planned/measured peak {ours['plan_ratio']:.2f}",
              flush=True)
    info = {"machine": f"{platform.system()} {platform.machine()}", "blas_threads": args.blas_threads,
            "shape": SHAPE, "targets": TARGETS,
            "rank": 8, "batch": [4, 128], "steps": args.steps, "repeats": args.repeats, "results": results}
    (out / "bench_moe.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
