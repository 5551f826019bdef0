"""DPO memory: mlxlora's reference (the base with the adapter off, log-probs precomputed) against the same run
holding a separate reference model copy, as trainers that load a second model do. Same model, data and steps.

Each variant runs in its own process (peak memory is per process), on the demo model (SmolLM2-135M-Instruct,
4-bit) with the demo's LoRA recipe and pairs from examples/preference (or examples/devil: chosen = a row's
definition, rejected = the next row's). Prints one line per variant and the ratio.

usage: python scripts/bench_preference.py [--steps 4] [--batch-size 2] [--max-seq-length 192]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pairs_file(tmp: Path) -> Path:
    own = ROOT / "examples" / "preference" / "train.jsonl"
    if own.is_file():
        return own
    rows = [json.loads(x) for x in (ROOT / "examples" / "devil" / "train.jsonl").read_text().splitlines() if x.strip()]
    out = tmp / "pairs.jsonl"
    out.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["completion"],
                                       "rejected": rows[(i + 1) % len(rows)]["completion"]}) + "\n"
                           for i, r in enumerate(rows)))
    return out


def worker(mode: str, data: str, steps: int, batch_size: int, max_seq_length: int) -> dict:
    import mlx.core as mx

    from mlxlora.config import PreferenceConfig, TrainConfig
    from mlxlora.data import load_preference_split
    from mlxlora.data.batches import pad_id
    from mlxlora.demo import DEMO_LORA
    from mlxlora.loss.preference import sequence_logps
    from mlxlora.lora.surgery import get_lora_model
    from mlxlora.models import load_base
    from mlxlora.models.demo import ensure_demo_model
    from mlxlora.train import preference as P
    from mlxlora.train.step import Stepper, make_optimizer

    t0 = time.perf_counter()
    folder = str(ensure_demo_model())
    base = load_base(folder)
    ref_model = load_base(folder).model if mode == "copy" else None  # the second copy peers hold
    model, pid = base.model, pad_id(base.tokenizer)
    get_lora_model(model, DEMO_LORA)
    cfg = TrainConfig(batch_size=batch_size, lr=1e-4, max_seq_length=max_seq_length,
                      preference=PreferenceConfig(method="dpo"))
    split = load_preference_split(data, base.tokenizer, max_seq_length)
    split.items = split.items[:steps * batch_size]
    split.__dict__.pop("samples", None)
    ref = P.reference_logps(model, split, batch_size, 8, pid) if mode == "ours" else None
    opt = make_optimizer(cfg, steps)
    opt.init(model.trainable_parameters())
    stepper = Stepper(model, opt, 1.0, loss_fn=P.loss_fn(cfg))
    model.train()
    tokens = 0
    for step in range(steps):
        idxs = list(range(step * batch_size, (step + 1) * batch_size))
        batch = P.collate_items(split, idxs, 8, pid, ref)
        if ref_model is not None:  # the reference forward every step, on the second model
            logps, _ = sequence_logps(ref_model, *batch[:4])
            batch = batch[:5] + (mx.stop_gradient(logps),) + batch[6:]
        loss, _, _ = stepper.step([batch])
        mx.eval(loss, model.state, opt.state)
        tokens += int(sum(len(split.samples[i].ids) for i in idxs + [len(split.items) + i for i in idxs]))
    return {"mode": mode, "peak_bytes": mx.get_peak_memory(), "max_rss_bytes": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": time.perf_counter() - t0, "tokens": tokens,
            "loss": loss.item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-seq-length", type=int, default=192)
    ap.add_argument("--worker", choices=["ours", "copy"])
    ap.add_argument("--data")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.data, a.steps, a.batch_size, a.max_seq_length)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = pairs_file(Path(tmp))
        results = {}
        for mode in ("copy", "ours"):
            cmd = [sys.executable, __file__, "--worker", mode, "--data", str(data), "--steps", str(a.steps),
                   "--batch-size", str(a.batch_size), "--max-seq-length", str(a.max_seq_length)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    names = {"copy": "separate reference model copy", "ours": "mlxlora (adapter off, precomputed)"}
    for mode, r in results.items():
        print(f"dpo {names[mode]:<36} peak {r['peak_bytes'] / 2**20:8.1f} MiB  max RSS {r['max_rss_bytes'] / 2**20:8.1f} "
              f"MiB  {r['seconds']:6.1f} s  loss {r['loss']:.4f}")
    c, o = results["copy"], results["ours"]
    print(f"ratio ours/copy: peak {o['peak_bytes'] / c['peak_bytes']:.3f}, max RSS {o['max_rss_bytes'] / c['max_rss_bytes']:.3f}, "
          f"time {o['seconds'] / c['seconds']:.3f}  ({a.steps} steps x {a.batch_size} pairs, "
          f"max {a.max_seq_length} tokens, SmolLM2-135M 4-bit, demo LoRA)")


if __name__ == "__main__":
    main()
