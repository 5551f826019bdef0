"""How much of a fine-tune survives fusing into the 4-bit demo model, per strategy, measured in one run.

    python scripts/fuse_study.py                       # trains the demo adapter first if --adapter is not given
    python scripts/fuse_study.py --adapter runs/devil  # an adapter trained on the demo model + examples/devil

Prints one row per strategy: the share of the held-out loss improvement the fused model keeps,
(base - fused) / (base - adapter), the held-out loss, the delta cosines (weight space, and output
space on held-out activations), and the fused size against the naive fuse measured in the same run.
Run it with OpenBLAS preloaded: eval "$(python -m mlxlora.blas)"; on a busy machine also
OPENBLAS_NUM_THREADS=1 (spinning BLAS threads slow every process down).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROWS = [  # (label, FuseConfig fields, other fuse_model arguments)
    ("naive", {"strategy": "naive"}, {}),
    ("grid", {"strategy": "grid"}, {}),
    ("gptq", {"strategy": "gptq"}, {}),
    ("refit", {"strategy": "refit"}, {}),
    ("auto+5%", {"size_budget": 1.05}, {}),
    ("auto (default)", {}, {}),
    ("auto, random tokens", {}, {"calibration": "random"}),
    ("8-bit", {"bits": 8, "strategy": "gptq"}, {}),
]


def train_demo_adapter(model_dir: Path, out: Path) -> Path:
    """The adapter the issue specifies: r=16, alpha=32, all-linear, 200 steps of batch 8 on examples/devil."""
    from mlxlora.config import LoraConfig, TrainConfig
    from mlxlora.train import train

    train(TrainConfig(model=str(model_dir), data="examples/devil", adapter_path=str(out), iters=200, batch_size=8,
                      lr=5e-4, max_seq_length=256, lora=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")))
    return out


def share_calibration(fuse_module) -> None:
    """Calibration statistics and the base/adapter losses do not depend on the strategy: compute them once."""
    fuse_module.collect_hessians = _memo(fuse_module.collect_hessians)
    before = fuse_module.losses_before
    cache = {}

    def losses_before(model, layers, valid, tokenizer):
        key = valid.stats.path
        if key not in cache:
            cache[key] = before(model, layers, valid, tokenizer)
        return dict(cache[key])

    fuse_module.losses_before = losses_before


def _memo(collect):
    cache = {}

    def wrapped(model, paths, samples):
        key = (tuple(paths), tuple(tuple(s) for s in samples))
        if key not in cache:
            cache[key] = collect(model, paths, samples)
        return cache[key]

    return wrapped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", help="adapter folder trained on the demo model (default: train one)")
    ap.add_argument("--model", help="base model folder (default: the demo SmolLM2-135M 4-bit)")
    ap.add_argument("--only", help="comma-separated row labels to run, e.g. naive,auto (default: all)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)

    import mlxlora.fuse.core as F  # the module whose names fuse_model calls
    from mlxlora.models.demo import ensure_demo_model
    from mlxlora.models import load_base

    model_dir = Path(args.model) if args.model else ensure_demo_model()
    tmp = tempfile.TemporaryDirectory(prefix="fuse-study-")
    adapter = Path(args.adapter) if args.adapter else train_demo_adapter(model_dir, Path(tmp.name) / "adapter")
    share_calibration(F)
    rows = [r for r in ROWS if not args.only or r[0].split()[0].rstrip(",") in args.only.split(",")]
    results = []
    for label, opts, kwargs in rows:
        t0 = time.perf_counter()
        base = load_base(str(model_dir))
        _, _, rep = F.fuse_model(base, adapter, options=F.FuseConfig(**opts), **kwargs)
        s, loss, size = rep["summary"], rep["loss"] or {}, rep["size"]
        results.append({"strategy": label, "kept": loss.get("fraction_kept"), "loss": loss.get("fused"),
                        "base_loss": loss.get("base"), "adapter_loss": loss.get("adapter"),
                        "mean_cos": s.get("mean_cosine"), "min_cos": s.get("min_cosine"),
                        "mean_out_cos": s.get("mean_out_cosine"), "min_out_cos": s.get("min_out_cosine"),
                        "mb": size["fused_bytes"] / 1e6, "naive_mb": size["naive_bytes"] / 1e6,
                        "seconds": time.perf_counter() - t0})
        print(f"  {label}: done in {results[-1]['seconds']:.0f}s", file=sys.stderr, flush=True)
        if args.json:  # after every row: a long run that dies still leaves what it measured
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    naive = next((r for r in results if r["strategy"] == "naive"), None)
    r0 = results[0]
    print(f"held-out loss: base {r0['base_loss']:.4f} · base+adapter (unfused) {r0['adapter_loss']:.4f}")
    print(f"{'strategy':<22} {'kept':>7} {'loss':>8} {'cos mean':>9} {'cos min':>8} {'out-cos mean':>13} "
          f"{'out-cos min':>12} {'MB':>7} {'x naive':>8}")
    for r in results:
        ratio = r["mb"] / naive["mb"] if naive else r["mb"] / r["naive_mb"]
        print(f"{r['strategy']:<22} {_pct(r['kept']):>7} {_f(r['loss']):>8} {_f(r['mean_cos']):>9} "
              f"{_f(r['min_cos']):>8} {_f(r['mean_out_cos']):>13} {_f(r['min_out_cos']):>12} {r['mb']:>7.1f} "
              f"{ratio:>8.3f}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
