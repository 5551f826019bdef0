"""Benchmark: mlxlora vs mlx-lm's own trainer, same model/data/settings/machine, in one run.

    .venv/bin/python scripts/bench.py [--repeats 2] [--steps 4] [--out bench]

Cases: (a) the real SmolLM2-135M 4-bit (from its GGUF) on the demo data; (b) a float32 base
of the same shape on fixed-length text; (c) a variable-length chat set (48 chats, ~50-1000 tokens);
(d) a large-vocabulary shape (scripts/bench_vocab.py): peak memory at 4 x 1024, the chunked loss's
throughput cost, and the longest sequence each trainer fits at batch 1 within each of --budgets-gib.
Each run is its own process. mlxlora runs as the `mlxlora` command would (OpenBLAS preloaded
on Linux); the anchor is mlx-lm as a user gets it (`mlx-lm`), and also mlx-lm with the same
OpenBLAS preloaded (`mlx-lm+blas`) so the table separates what the BLAS gives from what our
code gives. Runs alternate (mlxlora, anchors, mlxlora, ...), warm-up steps are excluded, and
the median over repeats is reported. Ratios, not absolute times, are the result: timings on
shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxlora.blas import fast_blas_env  # noqa: E402


def _env(blas: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXLORA_BLAS_ACTIVE")}
    env["MLXLORA_FAST_BLAS"] = "1" if blas else "0"
    if blas:
        env.update(fast_blas_env(env) or {})
    return env


def run(spec: dict, blas: bool) -> dict:
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_worker.py"), json.dumps(spec)],
                         env=_env(blas), capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"worker failed ({spec['trainer']}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def float_model(src: Path, out: Path) -> Path:
    """A float32 copy of the 4-bit demo model (same shapes) for case (b)."""
    if (out / "config.json").is_file():
        return out
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load, save_config
    from mlx.utils import tree_flatten

    model, _, config = load(str(src), return_config=True)
    model = dequantize_model(model)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    save_config(config, out / "config.json")
    for f in src.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def fixed_length_text(model_dir: Path, out: Path, n: int = 64, length: int = 128) -> Path:
    """Rows of exactly `length` tokens cut from the demo completions (no padding for anyone to save)."""
    from mlx_lm.tokenizer_utils import load as load_tok

    tok = load_tok(model_dir)
    text = " ".join(json.loads(line)["completion"] for line in (ROOT / "examples/devil/train.jsonl").open())
    ids = tok.encode(text)
    rows, i = [], 0
    while len(rows) < n and i + length < len(ids):
        piece = tok.decode(ids[i:i + length])
        if len(tok.encode(piece)) == length:
            rows.append({"text": piece})
        i += length
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def chat_set(out: Path, n: int = 48, seed: int = 0) -> Path:
    """Multi-turn chats from the demo data; turn counts drawn so lengths spread ~50-1000 tokens."""
    rows = [json.loads(line) for line in (ROOT / "examples/devil/train.jsonl").open()]
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        turns = max(1, int(round(2 ** rng.uniform(-1, 3.8))))  # 1..14 question/answer pairs
        msgs = []
        for r in rng.sample(rows, turns):
            msgs += [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        if turns == 1 and rng.random() < 0.5:
            msgs[1]["content"] = msgs[1]["content"].split(".")[0] + "."  # a few very short ones
        chats.append({"messages": msgs})
    out.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    return out


def median_of(runs: list[dict]) -> dict:
    keys = ("tokens_per_s", "peak_memory", "gflops", "sgemm_peak")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["pad_fraction"] = runs[0]["pad_fraction"]
    if "plan_ratio" in runs[0]:
        out["plan_ratio"] = statistics.median(r["plan_ratio"] for r in runs)
    out["packed"] = runs[0].get("packed")
    out["runs"] = runs
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cases", default="a,b,c")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-length", type=int, default=256, help="cases a and b; case c uses 4x this")
    ap.add_argument("--anchors", default="mlx-lm,mlx-lm+blas")
    ap.add_argument("--out", default=str(ROOT / "bench"))
    ap.add_argument("--budgets-gib", default="2,3,4", help="case d: memory budgets of the longest-sequence search")
    ap.add_argument("--max-len", type=int, default=16384, help="case d: the longest sequence tried")
    args = ap.parse_args()
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)

    from mlxlora.models.demo import ensure_demo_model

    q4 = ensure_demo_model()
    f32 = float_model(q4, work / "smollm2-f32")
    common = dict(rank=8, targets="all-linear", warmup=args.warmup, steps=args.steps, seed=0,
                  batch_size=args.batch_size)
    epoch_steps = -(-48 // args.batch_size)  # case c: the 48 chats of chat_set
    cases = {
        "a": ("SmolLM2-135M 4-bit, demo data", dict(model=str(q4), train_file=str(ROOT / "examples/devil/train.jsonl"),
                                                     batch_size=args.batch_size, max_seq_length=args.max_seq_length)),
        "b": ("SmolLM2-135M float32, fixed-length text", dict(model=str(f32), batch_size=args.batch_size,
                                                               max_seq_length=args.max_seq_length,
                                                               train_file=str(fixed_length_text(q4, work / "fixed.jsonl")))),
        # One whole epoch (48 chats) so both trainers meet the longest batch: comparable peaks.
        "c": (f"SmolLM2-135M float32, chats up to 1024 tokens (one epoch: 1 + {epoch_steps - 1} steps)",
              dict(model=str(f32), batch_size=args.batch_size, max_seq_length=4 * args.max_seq_length,
                   train_file=str(chat_set(work / "chat.jsonl")), warmup=1, steps=epoch_steps - 1)),
    }
    anchors = [a for a in args.anchors.split(",") if a]
    results = {}
    for key in args.cases.split(","):
        if key == "d":  # scripts/bench_vocab.py: its own layout of runs
            from bench_vocab import case_d

            results["d"] = case_d(run, q4, work, common, [float(b) for b in args.budgets_gib.split(",")],
                                  args.max_len, args.repeats)
            (out / "vocab.json").write_text(json.dumps(results["d"], indent=1))
            continue
        title, spec = cases[key]
        runs = {"mlxlora": [], **{a: [] for a in anchors}}
        for rep in range(args.repeats):
            for who in ["mlxlora", *anchors]:
                s = dict(common, **spec, trainer="mlxlora" if who == "mlxlora" else "mlx-lm")
                r = run(s, blas=(who != "mlx-lm"))
                runs[who].append(r)
                print(f"[{key}] rep {rep + 1} {who:12s} {r['tokens_per_s']:9.1f} tok/s  peak {r['peak_memory'] / 1e9:.2f} GB",
                      flush=True)
        results[key] = {"title": title, **{who: median_of(rs) for who, rs in runs.items()}}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "cpu": _cpu_name(), "settings": common, "repeats": args.repeats}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = markdown(meta, {k: v for k, v in results.items() if k != "d"}, anchors)
    if "d" in results:
        from bench_vocab import markdown_d

        table += "\n" + markdown_d(results["d"], args.max_len)
    (out / "results.md").write_text(table)
    print(table)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(meta: dict, results: dict, anchors: list[str]) -> str:
    lines = [f"Measured {meta['date']} on {meta['cpu']} ({meta['machine']}); rank {meta['settings']['rank']} "
             f"all-linear, batch {meta['settings']['batch_size']}, median of {meta['repeats']} runs of {meta['settings']['steps']} steps after "
             f"{meta['settings']['warmup']} warm-up.", "",
             "| case | mlxlora tok/s | " + " | ".join(f"{a} tok/s | ratio vs {a}" for a in anchors)
             + " | peak mem mlxlora / mlx-lm | planned / measured peak | padding mlxlora / mlx-lm"
             " | mlxlora GFLOP/s (of sgemm peak) |",
             "|---" * (6 + 2 * len(anchors)) + "|"]
    for r in results.values():
        m = r["mlxlora"]
        cells = [r["title"], f"{m['tokens_per_s']:.0f}"]
        for a in anchors:
            cells += [f"{r[a]['tokens_per_s']:.1f}", f"**{m['tokens_per_s'] / r[a]['tokens_per_s']:.1f}×**"]
        ref = r[anchors[0]]
        cells += [f"{m['peak_memory'] / 1e9:.2f} / {ref['peak_memory'] / 1e9:.2f} GB",
                  f"{m['plan_ratio']:.2f}" if "plan_ratio" in m else "–",
                  f"{100 * m['pad_fraction']:.0f}%{' (packed)' if m.get('packed') else ''} / {100 * ref['pad_fraction']:.0f}%",
                  f"{m['gflops']:.0f} ({100 * m['gflops'] / m['sgemm_peak']:.0f}% of {m['sgemm_peak']:.0f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
