"""Benchmark: data-parallel training, 1 rank vs N ranks on this machine (mlx.launch, ring backend, 127.0.0.1).

    .venv/bin/python scripts/bench_dist.py [--ranks 2] [--steps 8] [--warmup 2] [--repeats 1] [--out bench/dist]

Same tiny llama (hidden 256, intermediate 512, 4 layers, float32), LoRA rank 8 on all linear layers,
the same batch PER RANK (so N ranks train a global batch N times larger) on rows of equal length.
Reported per case: global tokens/s, seconds per step (the slowest rank's), the time a step spends
in the gradient all_sum (measured in the step: gradients evaluated before, summed gradients
evaluated after; the min over ranks is ~ the transfer, the max adds waiting for the slower peer),
the same all_sum timed alone after a barrier, and the bytes the all-reduce moves. The all_sum
buffer is the flattened float32 adapter gradients plus two scalars (B bytes); a ring all-reduce
over n ranks sends 2*(n-1)/n * B bytes per rank per step (reduce-scatter then all-gather, each
(n-1)/n * B), and receives as much.

All ranks share this machine's cores, so expect little or no speed-up here: the ratio says what
communication and core sharing cost, not what N machines would give. Each rank gets
cores/N BLAS threads (OPENBLAS_NUM_THREADS), the 1-rank case all cores (--threads sets one
number for every case). s/step is the median over all measured steps of all repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WORKER = ROOT / "scripts" / "bench_dist_worker.py"


def _env(threads: int) -> dict:
    from mlxlora.blas import fast_blas_env

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXLORA_BLAS_ACTIVE")}
    env.update(fast_blas_env(env) or {})
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def make_inputs(root: Path, rows: int, length: int) -> tuple[Path, Path]:
    """The benchmark model folder and a train.jsonl of `rows` texts of `length` bytes (= tokens here)."""
    import tiny

    model = tiny.make_model(root / "model", "llama", hidden_size=256, intermediate_size=512,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    words = "the quick brown fox jumps over a lazy dog while seven tired owls watch from the old oak".split()
    lines = []
    for i in range(rows):
        text, j = "", i
        while len(text) < length:
            text += words[j % len(words)] + " "
            j += 3
        lines.append(json.dumps({"text": text[:length]}))
    train = root / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    return model, train


def run_case(spec: dict, ranks: int, port: int, threads: int) -> list[dict]:
    cmd = [sys.executable, str(WORKER), json.dumps(spec)]
    if ranks > 1:
        launch = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
        if launch is None:
            raise SystemExit("mlx.launch not found; install mlx (it ships the launcher) in this environment")
        cmd = [launch, "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1",
               "--starting-port", str(port), "--", *cmd]
    res = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, timeout=1800)
    out = [json.loads(line.split(" ", 1)[1]) for line in res.stdout.splitlines() if line.startswith("BENCH_DIST ")]
    if res.returncode != 0 or len(out) != ranks:
        raise SystemExit(f"{ranks}-rank run failed (exit {res.returncode}): {res.stderr[-2000:]}")
    return sorted(out, key=lambda r: r["rank"])


def summarize(runs: list[list[dict]], ranks: int) -> dict:
    """Medians over all measured steps of all repeats (robust to bursts of load from other jobs).

    A step's time is the slowest rank's: a step ends when every rank is done.
    """
    def med(f):
        return statistics.median(f(run) for run in runs)

    sec = statistics.median(max(per_rank) for run in runs for per_rank in zip(*(r["step_seconds"] for r in run)))
    tok = med(lambda run: run[0]["global_tokens"] / run[0]["steps"])
    first = runs[0][0]
    buf = first["buffer_bytes"]
    iso = [r["comm_isolated_seconds"] for run in runs for r in run if r["comm_isolated_seconds"] is not None]
    return {"ranks": ranks, "tokens_per_step": tok, "seconds_per_step": sec, "tokens_per_second": tok / sec,
            # The rank that reaches the all_sum last waits least: its time is ~ the transfer; the
            # other rank's time also holds the wait for its peer (load imbalance, shared cores).
            "comm_seconds_per_step": med(lambda run: min(r["comm_seconds_per_step"] for r in run)),
            "comm_wait_seconds_per_step": med(lambda run: max(r["comm_seconds_per_step"] for r in run)),
            "comm_isolated_seconds": statistics.median(iso) if iso else 0.0,
            "buffer_bytes": buf, "measured_buffer_bytes": first["measured_buffer_bytes"],
            "sent_bytes_per_rank_per_step": int(2 * (ranks - 1) / ranks * buf),
            "adapter_bytes": first["adapter_bytes"], "adapter_params": first["adapter_params"],
            "last_loss": [r["last_loss"] for r in runs[-1]], "repeats": runs}


def table(cases: list[dict]) -> str:
    one = cases[0]
    rows = ["| ranks | global batch tok/step | s/step | tokens/s (global) | vs 1 rank | all_sum/step in step, "
            "min / max rank | all_sum alone | comm share (min) | all_sum buffer B | sent/rank/step 2(n-1)/n·B | adapter bytes |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        share = c["comm_seconds_per_step"] / c["seconds_per_step"]
        rows.append(f"| {c['ranks']} | {c['tokens_per_step']:.0f} | {c['seconds_per_step']:.3f} | "
                    f"{c['tokens_per_second']:.0f} | {c['tokens_per_second'] / one['tokens_per_second']:.2f}x | "
                    f"{c['comm_seconds_per_step'] * 1e3:.1f} / {c['comm_wait_seconds_per_step'] * 1e3:.1f} ms | {c['comm_isolated_seconds'] * 1e3:.2f} ms | "
                    f"{100 * share:.1f}% | {c['buffer_bytes']:,} | {c['sent_bytes_per_rank_per_step']:,} | "
                    f"{c['adapter_bytes']:,} |")
    return "\n".join(rows)


def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="per rank")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="BLAS threads per rank (0: cores / ranks)")
    ap.add_argument("--port", type=int, default=35400)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "dist")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        model, train = make_inputs(Path(tmp), rows=args.batch_size * args.ranks * 4, length=args.seq)
        spec = {"model": str(model), "train_file": str(train), "rank": args.rank, "batch_size": args.batch_size,
                "max_seq_length": args.seq + 8, "warmup": args.warmup, "steps": args.steps, "seed": 0,
                "comm_reps": 9}
        runs = {1: [], args.ranks: []}
        for rep in range(args.repeats):  # alternate the cases so machine load hits both alike
            for n in runs:
                threads = args.threads or max(1, cores // n)
                runs[n].append(run_case(spec, n, args.port + 10 * rep, threads))
                print(f"repeat {rep + 1}/{args.repeats}: {n} rank(s) done", file=sys.stderr, flush=True)
    cases = [summarize(runs[n], n) for n in runs]
    md = table(cases)
    info = machine()
    print(f"{info['date']} — {info['cpu']}, {info['cores']} cores; per-rank batch {args.batch_size} × "
          f"{args.seq} tokens, LoRA r={args.rank} all-linear, {args.steps} steps after {args.warmup} warm-up, "
          f"{args.repeats} repeat(s), BLAS threads/rank: {args.threads or 'cores / ranks'}\n")
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_dist.json").write_text(json.dumps(
        {"machine": info, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "formula": "sent bytes per rank per step = 2*(n-1)/n * B, B = 4 * (adapter params + 2)",
         "cases": cases}, indent=1))
    (args.out / "bench_dist.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
