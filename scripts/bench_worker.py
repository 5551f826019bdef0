"""One timed training run for scripts/bench.py (a separate process per run, so each gets its own BLAS).

usage: python scripts/bench_worker.py JSON_SPEC  ->  prints one JSON line on stdout
spec: {"trainer": "mlxlora"|"mlx-lm", "model", "train_file", "rank", "targets", "batch_size",
       "max_seq_length", "warmup", "steps", "seed", "pack": null|bool, "chunk": 0 (mlxlora's plain loss)}
Tokens are non-padding input tokens (sum over samples of len(ids) - 1), the same count for both.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx


def sgemm_peak(n: int = 1024, reps: int = 5) -> float:
    """Measured float32 matmul GFLOP/s of this process (its BLAS, its threads)."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def run_mlxlora(spec: dict, out: Path) -> dict:
    from mlxlora import LoraConfig, TrainConfig
    from mlxlora.models import load_base
    from mlxlora.train import Trainer

    marks = []
    total = spec["warmup"] + spec["steps"]
    cfg = TrainConfig(model=spec["model"], train_file=spec["train_file"], adapter_path=str(out / "a"),
                      iters=total, batch_size=spec["batch_size"], max_seq_length=spec["max_seq_length"],
                      lr=1e-4, save_every=10 ** 6, report_every=10 ** 6, seed=spec["seed"], pack=spec.get("pack"),
                      lora=LoraConfig(r=spec["rank"], lora_alpha=2.0 * spec["rank"], target_modules=spec["targets"]))
    if spec.get("chunk") == 0:  # the plain loss over full logits, to time what chunking costs
        import mlxlora.train.loop as loop

        loop.model_chunk_rows = lambda *a, **k: 0
    base = load_base(spec["model"])
    n_params = sum(v.size for _, v in _float_sizes(base.model))
    trainer = Trainer(cfg, base=base, callbacks=[lambda st: marks.append((time.perf_counter(), st.tokens,
                                                                          time.process_time()))])
    shapes = _record_batches(trainer.batches)
    mx.reset_peak_memory()
    trainer.run()
    plan = trainer.batches.plan(0)
    lengths = [len(s.ids) - 1 for s in trainer.train_split.samples]
    from mlxlora.data.packing import padding_fraction

    pad = padding_fraction(lengths, plan, trainer.batches.pack, cfg.pad_multiple)
    out = _summary(marks, spec["warmup"], mx.get_peak_memory(), pad, n_params, packed=trainer.batches.pack)
    return dict(out, **_planned(cfg, base, shapes, out["peak_memory"]))


def _record_batches(batches) -> list:
    """Wrap BatchPlan.next to record (B, L, loss tokens) of every micro-batch trained."""
    seen, inner = [], batches.next

    def next_(st):
        micro, real = inner(st)
        seen.extend((b[0].shape[0], b[0].shape[1], int(b[2].sum().item())) for b in micro)
        return micro, real

    batches.next = next_
    return seen


def _planned(cfg, base, shapes: list, measured: int) -> dict:
    """mlxlora.plan's predicted peak for the largest batch trained, against the measured peak."""
    from mlxlora.plan import plan_training

    B, L, n_loss = max(shapes, key=lambda s: (s[0] * s[1], s[2]))
    pre_quantized = bool(base.config.get("quantization"))
    plan = plan_training(str(base.path), cfg.lora, quantize=None if pre_quantized else cfg.quantize,
                         batch_size=B, max_seq_length=L, loss_fraction=n_loss / (B * L))
    return {"planned_peak": plan.peak_bytes, "plan_ratio": plan.peak_bytes / measured, "largest_batch": [B, L, n_loss]}


def _float_sizes(model):
    """(name, array-like with .size = logical float parameter count) for FLOP estimates."""
    import mlx.nn as nn

    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            out.append((name, mx.zeros((m.weight.size * 32 // m.bits,), dtype=mx.uint8)))
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            out.append((name, m.weight))
    return out


def run_mlx_lm(spec: dict, out: Path) -> dict:
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner import trainer as T
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from types import SimpleNamespace

    mx.random.seed(spec["seed"])
    model, tok = load(spec["model"])
    n_params = sum(v.size for _, v in _float_sizes(model))
    model.freeze()
    keys = None if spec["targets"] == "all-linear" else list(spec["targets"])
    linear_to_lora_layers(model, len(model.layers), {"rank": spec["rank"], "scale": 2.0, "dropout": 0.0,
                                                     **({"keys": keys} if keys else {})})
    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines() if line.strip()]
    # mlx-lm masks prompts only for prompt/completion and chat rows; text rows train on every token.
    data = CacheDataset(create_dataset(rows, tok, SimpleNamespace(mask_prompt="text" not in rows[0])))
    tokens_per_batch, area, marks = [], [], []

    def counting_batches(**kw):
        for batch, lengths in T.iterate_batches(**kw):
            tokens_per_batch.append(int(mx.minimum(lengths[:, 1], kw["max_seq_length"]).sum().item()) - batch.shape[0])
            area.append(batch.shape[0] * (batch.shape[1] - 1))  # mlx-lm trains on batch[:, :-1]
            yield batch, lengths

    class Marks(TrainingCallback):
        def on_train_loss_report(self, info):
            marks.append((time.perf_counter(), sum(tokens_per_batch[:info["iteration"]]), time.process_time()))

    total = spec["warmup"] + spec["steps"]
    args = T.TrainingArgs(batch_size=spec["batch_size"], iters=total, steps_per_report=1, steps_per_eval=10 ** 6,
                          steps_per_save=10 ** 6, max_seq_length=spec["max_seq_length"],
                          adapter_file=str(out / "adapters.safetensors"))
    mx.reset_peak_memory()
    T.train(model, optim.AdamW(learning_rate=1e-4), data, None, args=args, iterate_batches=counting_batches,
            training_callback=Marks())
    pad = 1 - sum(tokens_per_batch[:total]) / max(sum(area[:total]), 1)
    return _summary(marks, spec["warmup"], mx.get_peak_memory(), pad, n_params)


def _summary(marks, warmup, peak, pad, n_params, packed=False) -> dict:
    (t0, k0, c0), (t1, k1, c1) = marks[warmup - 1], marks[-1]
    tps = (k1 - k0) / (t1 - t0)
    # LoRA training FLOPs per token ~ 4 x (float-equivalent base parameters): forward 2N, backward
    # through the frozen weights 2N (no weight gradients); the adapter and attention add a little.
    # CPU seconds of this process (all its threads): on a shared machine, wall time also counts the
    # time other jobs held the cores; CPU time does not.
    return {"tokens_per_s": tps, "tokens": k1 - k0, "seconds": t1 - t0, "peak_memory": peak,
            "tokens_per_cpu_s": (k1 - k0) / max(c1 - c0, 1e-9), "cpu_seconds": c1 - c0,
            "pad_fraction": pad, "packed": packed, "gflops": 4 * n_params * tps / 1e9, "sgemm_peak": sgemm_peak()}


def main():
    spec = json.loads(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_mlxlora if spec["trainer"] == "mlxlora" else run_mlx_lm
        print(json.dumps(fn(spec, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
