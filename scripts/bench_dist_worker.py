"""One rank of a timed data-parallel training run for scripts/bench_dist.py.

usage: python scripts/bench_dist_worker.py JSON_SPEC   (alone: 1 rank; under mlx.launch: every rank)
spec: {"model", "train_file", "rank", "batch_size", "max_seq_length", "warmup", "steps", "seed",
       "comm_reps"}
Prints one line "BENCH_DIST {json}" per rank on stdout. The loop is the Trainer's step (BatchPlan
slices the global batch, Stepper sums gradients with one all_sum) without validation/checkpoints.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import mlx.core as mx


def build(spec: dict, group):
    """(model, BatchPlan, Stepper) for this rank; the adapter starts identical on every rank."""
    from mlxlora import LoraConfig, TrainConfig
    from mlxlora import data as D
    from mlxlora.train.batches import BatchPlan
    from mlxlora.models import load_base
    from mlxlora.train.step import Stepper, make_optimizer
    from mlxlora.lora.surgery import get_lora_model
    from mlxlora.data.batches import pad_id as _pad_id

    total = spec["warmup"] + spec["steps"]
    cfg = TrainConfig(model=spec["model"], train_file=spec["train_file"], adapter_path=tempfile.mkdtemp(),
                      iters=total, batch_size=spec["batch_size"], max_seq_length=spec["max_seq_length"],
                      lr=1e-4, seed=spec["seed"], pack=False,
                      lora=LoraConfig(r=spec["rank"], lora_alpha=2.0 * spec["rank"], target_modules="all-linear"))
    base = load_base(cfg.model)
    split = D.load_split(cfg.train_file, base.tokenizer, cfg.max_seq_length)
    plan = BatchPlan(cfg, split, base.config.get("model_type"), _pad_id(base.tokenizer), group.rank(), group.size())
    mx.random.seed(cfg.seed)
    get_lora_model(base.model, cfg.lora)
    optimizer = make_optimizer(cfg, total)
    optimizer.init(base.model.trainable_parameters())
    stepper = Stepper(base.model, optimizer, cfg.clip_grad, group=group)
    stepper.time_comm = True
    return base.model, plan, stepper, optimizer


def isolated_all_sum(n_floats: int, group, reps: int) -> float | None:
    """Median seconds of one all_sum of n_floats float32 values, the ranks aligned by a barrier first."""
    if group.size() == 1:
        return None
    buf = mx.ones((n_floats,), dtype=mx.float32)
    mx.eval(buf)
    times = []
    for _ in range(reps):
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))  # barrier: both ranks start together
        t0 = time.perf_counter()
        mx.eval(mx.distributed.all_sum(buf, group=group))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(spec: dict) -> dict:
    from mlxlora.train.checkpoint import TrainerState
    from mlxlora.lora.surgery import adapter_parameters

    group = mx.distributed.init()
    model, plan, stepper, optimizer = build(spec, group)
    adapter_floats = sum(v.size for v in adapter_parameters(model).values())
    st, step_times, tokens = TrainerState(), [], 0
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:  # warm-up steps compile the graph; count only what follows
            stepper.comm_seconds, stepper.comm_bytes, stepper.comm_calls = 0.0, 0, 0
        t0 = time.perf_counter()
        batches, real = plan.next(st)
        loss, ntok, norm = stepper.step(batches)
        mx.eval(loss, ntok, norm, model.state, optimizer.state)
        loss_v = loss.item()
        if i >= spec["warmup"]:
            step_times.append(time.perf_counter() - t0)
            tokens += real  # GLOBAL non-padding tokens of this step
    n, calls = group.size(), max(stepper.comm_calls, 1)
    buffer_floats = adapter_floats + 2  # adapter gradients + loss sum + token count
    return {"rank": group.rank(), "world": n, "steps": len(step_times), "seconds": sum(step_times),
            "step_seconds": step_times,
            "global_tokens": tokens, "last_loss": loss_v,
            "comm_seconds_per_step": stepper.comm_seconds / calls if n > 1 else 0.0,
            "comm_isolated_seconds": isolated_all_sum(buffer_floats, group, spec["comm_reps"]),
            "buffer_bytes": 4 * buffer_floats, "measured_buffer_bytes": stepper.comm_bytes // calls,
            "adapter_bytes": 4 * adapter_floats, "adapter_params": adapter_floats}


if __name__ == "__main__":
    print("BENCH_DIST " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
