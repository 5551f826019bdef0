"""The memory warning at the start of a run: the planner's predicted peak against this machine's memory."""

from __future__ import annotations

from ..config import TrainConfig
from ..errors import ModelError
from ..lora.quant import on_cpu
from ..models import Base
from ..plan import human, plan_training


def memory_warning(cfg: TrainConfig, base: Base, seq_len: int) -> str | None:
    """A one-line warning when mlxlora.plan predicts a peak above this machine's memory, naming the flags
    that lower it; None when it fits or the planner cannot tell (an architecture it does not know)."""
    grpo = cfg.preference.method == "grpo"
    if grpo:  # seq_len is the longest prompt; its completions come on top
        seq_len = _group_length(cfg, seq_len)
    try:
        plan = plan_training(str(base.path), cfg.lora, batch_size=cfg.batch_size, max_seq_length=seq_len,
                             grad_checkpoint=cfg.grad_checkpoint, **_plan_kwargs(cfg, base))
    except Exception:  # the planner is advice: never a reason not to train
        return None
    if plan.fits is not False:
        return None
    fixes = [] if cfg.grad_checkpoint else ["--grad-checkpoint"]
    if grpo:  # one group at a time: the batch of prompts does not matter
        fixes.append(f"a smaller --group-size (now {cfg.grpo.group_size}) or --max-completion-length (now "
                     f"{cfg.grpo.max_completion_length})")
    else:
        if cfg.batch_size > 1:
            fixes.append(f"a smaller --batch-size (now {cfg.batch_size}; --grad-accum keeps the effective batch)")
        fixes.append(f"a smaller --max-seq-length (longest batch now {seq_len} tokens)")
    if not (base.config.get("quantization") or cfg.quantize):
        fixes.append("--quantize 4")
    return (f"warning: predicted peak memory {human(plan.peak_bytes)} exceeds the {human(plan.memory_bytes)} "
            f"available ({plan.memory_source}); training may run out of memory. Try: {', '.join(fixes)} "
            "(mlxlora plan shows the estimate)")


def _plan_kwargs(cfg: TrainConfig, base: Base) -> dict:
    pre_quantized = bool(base.config.get("quantization"))
    return dict(quantize=None if pre_quantized else cfg.quantize, group_size=cfg.q_group_size,
                grad_accum=cfg.grad_accum, compute_dtype=cfg.dtype or ("float32" if on_cpu() else None),
                method=cfg.preference.method, grpo=cfg.grpo)


def auto_fit(cfg: TrainConfig, base: Base) -> tuple[TrainConfig, str]:
    """--auto-fit: cfg with the planner's largest --batch-size, --grad-checkpoint when needed and, when not
    even a batch of 1 fits, the longest --max-seq-length that does, for the memory the run may use
    (--memory-limit, else the machine's). --grad-accum grows so the effective batch stays at least the
    one asked for. Returns (new cfg, a line saying what was chosen)."""
    from dataclasses import replace

    from ..plan import suggest_fit

    memory = int(cfg.memory_limit * 2**30) if cfg.memory_limit else None
    fit = suggest_fit(str(base.path), cfg.lora, memory_bytes=memory, max_seq_length=cfg.max_seq_length,
                      batch_size=cfg.batch_size, **_plan_kwargs(cfg, base))
    if fit.batch_size == 0:
        raise ModelError(f"--auto-fit: not even a batch of 1 x 64 tokens fits in {human(fit.plan.memory_bytes)}; "
                         "add --quantize 4 or adapt fewer layers (--target, --layers)")
    accum = max(cfg.grad_accum, -(-cfg.batch_size * cfg.grad_accum // fit.batch_size))
    new = replace(cfg, batch_size=fit.batch_size, grad_checkpoint=fit.grad_checkpoint or cfg.grad_checkpoint,
                  max_seq_length=fit.max_seq_length, grad_accum=accum)
    line = (f"auto-fit: --batch-size {new.batch_size} --grad-accum {new.grad_accum}"
            f"{' --grad-checkpoint' if new.grad_checkpoint else ''} --max-seq-length {new.max_seq_length} "
            f"(predicted peak {human(fit.plan.peak_bytes)} of {human(fit.plan.memory_bytes)})")
    return new, line


class MemoryGuard:
    """Stops a run before MLX's memory passes `limit_bytes`. After every step it reads MLX's peak and keeps
    the peak above the memory held before training per token of the largest micro-batch so far; before a
    step it predicts that step's peak from it (activations grow with B x L). `check` returns why to stop, or
    None. MLX's peak is process-wide, so it is reset when the guard starts: an earlier run or load in the
    same process (the Python API, a test session) must not count as this run's (a benchmark reading the
    peak after the run gets this run's)."""

    def __init__(self, limit_bytes: int):
        import mlx.core as mx

        mx.reset_peak_memory()
        self.limit, self.static = limit_bytes, mx.get_active_memory()
        self.per_token, self.max_tokens = 0.0, 0

    def check(self, shapes: list[tuple[int, int]], after: bool) -> str | None:
        """shapes: (rows, tokens) of each micro-batch of the step (batch_shapes)."""
        import mlx.core as mx

        tokens = max(b * n for b, n in shapes)
        if after:
            peak = mx.get_peak_memory()
            self.max_tokens = max(self.max_tokens, tokens)
            self.per_token = (peak - self.static) / self.max_tokens
            if peak > self.limit:
                return f"the peak memory {human(peak)} passed --memory-limit {human(self.limit)}"
            return None
        predicted = self.static + self.per_token * tokens
        if predicted > self.limit:
            text = " + ".join(f"{b} x {n}" for b, n in shapes)
            return (f"the next batch ({text} tokens) is predicted to peak at {human(predicted)}, "
                    f"over --memory-limit {human(self.limit)}")
        return None


def batch_shapes(cfg: TrainConfig, batches) -> list[tuple[int, int]]:
    """(rows, tokens) of each micro-batch a step trains: the (x, y, mask) batches' shapes; for GRPO, whose
    batches are prompt rows, one group per prompt: group_size rows of the prompt and the longest completion."""
    if cfg.preference.method == "grpo":
        return [(cfg.grpo.group_size, _group_length(cfg, len(r.ids))) for r in batches]
    return [tuple(b[0].shape[:2]) for b in batches]


def _group_length(cfg: TrainConfig, prompt_len: int) -> int:
    """The longest sequence of a GRPO group: its prompt and a whole completion, within --max-seq-length."""
    return min(cfg.max_seq_length, prompt_len + cfg.grpo.max_completion_length)


def resume_hint(cfg: TrainConfig, run_dir) -> str:
    """The one command that resumes a run stopped by the memory guard at half the batch (same effective batch);
    GRPO trains one group at a time whatever the batch: checkpointing, then shorter completions."""
    if cfg.preference.method == "grpo":
        if not cfg.grad_checkpoint:
            return f"mlxlora train --resume {run_dir} --grad-checkpoint"
        return (f"mlxlora train --resume {run_dir} --max-completion-length "
                f"{max(1, cfg.grpo.max_completion_length // 2)}")
    if cfg.batch_size > 1:
        return (f"mlxlora train --resume {run_dir} --batch-size {cfg.batch_size // 2} "
                f"--grad-accum {cfg.grad_accum * 2}")
    flags = "" if cfg.grad_checkpoint else " --grad-checkpoint"
    return f"mlxlora train --resume {run_dir}{flags or f' --max-seq-length {max(64, cfg.max_seq_length // 2)}'}"
