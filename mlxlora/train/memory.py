"""The memory warning at the start of a run: the planner's predicted peak against this machine's memory."""

from __future__ import annotations

from ..config import TrainConfig
from ..lora.quant import on_cpu
from ..models import Base
from ..plan import human, plan_training


def memory_warning(cfg: TrainConfig, base: Base, seq_len: int) -> str | None:
    """A one-line warning when mlxlora.plan predicts a peak above this machine's memory, naming the flags
    that lower it; None when it fits or the planner cannot tell (an architecture it does not know)."""
    try:
        pre_quantized = bool(base.config.get("quantization"))
        plan = plan_training(str(base.path), cfg.lora, quantize=None if pre_quantized else cfg.quantize,
                             group_size=cfg.q_group_size, batch_size=cfg.batch_size, max_seq_length=seq_len,
                             grad_checkpoint=cfg.grad_checkpoint, grad_accum=cfg.grad_accum,
                             compute_dtype=cfg.dtype or ("float32" if on_cpu() else None),
                             method=cfg.preference.method)
    except Exception:  # the planner is advice: never a reason not to train
        return None
    if plan.fits is not False:
        return None
    fixes = [] if cfg.grad_checkpoint else ["--grad-checkpoint"]
    if cfg.batch_size > 1:
        fixes.append(f"a smaller --batch-size (now {cfg.batch_size}; --grad-accum keeps the effective batch)")
    fixes.append(f"a smaller --max-seq-length (longest batch now {seq_len} tokens)")
    if not (pre_quantized or cfg.quantize):
        fixes.append("--quantize 4")
    return (f"warning: predicted peak memory {human(plan.peak_bytes)} exceeds the {human(plan.memory_bytes)} "
            f"available ({plan.memory_source}); training may run out of memory. Try: {', '.join(fixes)} "
            "(mlxlora plan shows the estimate)")
