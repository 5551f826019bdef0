"""The plan of a LoRA run: parameters, adapter size and predicted peak memory, and the largest batch that fits.

The model's shapes come from `mlxlora.models.shapes` (config.json, safetensors headers, GGUF metadata or a
config alone; no tensor data). Targets are matched by `mlxlora.lora.surgery.find_targets` on a skeleton of
empty modules, so the rules are the training rules. Memory = base weights + adapter + gradients + AdamW
moments + activations (activations.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from ..config import GRPOConfig, LoraConfig, PreferenceConfig, TrainConfig
from ..errors import ConfigError, ModelError
from ..lora.surgery import find_targets
from ..models.moe_shapes import per_token
from ..models.shapes import BYTES, DTYPE_CODES, FLOATS, Matrix, ModelShapes, read_model
from .activations import activation_terms
from .machine import default_backend, human, machine_memory


@dataclass
class Plan:
    """Every number of a plan; sizes in bytes, counts in parameters."""

    model: str
    source: str
    total_params: int
    trainable_params: int
    trainable_percent: float
    adapted_layers: int
    adapter_bytes_fp32: int
    adapter_bytes_fp16: int
    active_params: int
    expert_layers: int
    expert_adapter_bytes_fp32: int
    base_bytes: int
    adapter_param_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    peak_bytes: int
    memory_bytes: int | None
    memory_source: str
    fits: bool | None
    settings: dict = field(default_factory=dict)
    activation_terms: dict = field(default_factory=dict)


# -- parameters -------------------------------------------------------------------------------
def find_adapted(shapes: ModelShapes, lora: LoraConfig) -> list[tuple[Matrix, int]]:
    """(matrix, rank) of every layer `lora` adapts: surgery.find_targets on a weightless skeleton."""
    root, by_path = nn.Module(), {}
    for m in shapes.matrices:
        node, parts = root, m.path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, nn.Module())
        cls = SwitchLinear if m.kind == "experts" else nn.Embedding if m.kind == "embedding" else nn.Linear
        leaf = cls.__new__(cls)
        nn.Module.__init__(leaf)  # a module of the right type whose weight is never computed (lazy)
        leaf.weight = mx.zeros((m.experts, m.rows, m.cols) if m.experts else (m.rows, m.cols), mx.uint8)
        node[parts[-1]] = leaf
        by_path[m.path] = m
    return [(by_path[p], lora.rank_alpha_for(p)[0]) for p, _ in find_targets(root, lora)]


def count_params(shapes: ModelShapes) -> int:
    """Base parameters as `surgery.count_parameters` counts them (quantized weights at logical size)."""
    return sum(m.size for m in shapes.matrices) + sum(n for _, n, _ in shapes.others)


def active_params(shapes: ModelShapes) -> int:
    """Parameters one token computes with: every expert layer counts only the k experts it is routed to."""
    k = per_token(shapes.config) or 0
    return count_params(shapes) - sum(m.rows * m.cols * (m.experts - min(k, m.experts))
                                      for m in shapes.matrices if m.experts)


def adapter_params(adapted: list[tuple[Matrix, int]], dora: bool = False) -> int:
    """Σ r·(in + out) over adapted layers (lora_a (in, r), lora_b (r, out)), times E for experts (one pair
    each); DoRA adds m (out,)."""
    return sum(max(m.experts, 1) * r * (m.rows + m.cols) + (m.rows if dora else 0) for m, r in adapted)


def quantized(shapes: ModelShapes, bits: int, group_size: int) -> ModelShapes:
    """`shapes` after load_base's --quantize: every Linear/Embedding whose width divides by the group."""
    if any(m.bits for m in shapes.matrices):
        raise ModelError(f"--quantize {bits}: the model is already quantized; drop --quantize")
    return replace(shapes, matrices=[replace(m, bits=bits, group_size=group_size, biases=True)
                                     if m.cols % group_size == 0 else m for m in shapes.matrices])


def base_bytes(shapes: ModelShapes, compute_dtype: str | None) -> int:
    """Bytes of the base weights in memory as load_base leaves them.

    Float tensors are cast to `compute_dtype` (None: kept as stored). A quantized matrix holds bits/8
    bytes per weight (packed in uint32) plus, per group of G weights of a row, one scale and one bias
    in the scales' dtype (float tensors too, so the compute dtype: float32 on CPU, float16 normally).
    """
    code = DTYPE_CODES[compute_dtype] if compute_dtype else None

    def size(dtype: str) -> int:
        return BYTES[code] if code and dtype in FLOATS else BYTES[dtype]

    total = sum(n * size(dt) for _, n, dt in shapes.others)
    for m in shapes.matrices:
        e = max(m.experts, 1)
        if m.bits is None:
            total += m.size * size(m.dtype)
        else:
            total += m.size * m.bits // 8 + e * m.rows * (m.cols // m.group_size) * (1 + m.biases) * size(m.dtype)
    return total


                                               # output before the magnitude scale (m's gradient)


# -- the plan ---------------------------------------------------------------------------------
def plan_training(model_spec: str | dict | ModelShapes, lora: LoraConfig, *, quantize: int | None = None,
                  group_size: int = TrainConfig.q_group_size, batch_size: int = TrainConfig.batch_size,
                  max_seq_length: int = TrainConfig.max_seq_length, grad_checkpoint: bool = False,
                  compute_dtype: str | None = "float32", memory_bytes: int | None = None,
                  grad_accum: int = TrainConfig.grad_accum, backend: str | None = None,
                  loss_fraction: float = 1.0, method: str = PreferenceConfig.method,
                  grpo: GRPOConfig | None = None) -> Plan:
    """Parameters and predicted peak memory of training `lora` on `model_spec`, without loading weights.

    compute_dtype: what float weights and activations are computed in (float32 on CPU; None keeps the
    checkpoint's dtype, as on Metal). backend "cpu" | "gpu" (default: this machine's mlx device) picks
    the CPU dequantize+matmul path for quantized layers. memory_bytes: the budget (default: this
    machine's, see `machine_memory`). loss_fraction: share of tokens that carry loss (default 1.0,
    the worst case; the head projects only those). method: --method; dpo/orpo/simpo run chosen and
    rejected of each pair in one batch (kto: each completion and its KL completion), so a step holds
    2 x batch_size rows; dpo/kto add their reference: no weights (the base with the adapter off), a
    float32 copy of the adapter (the --init-adapter case, counted always) and a forward-only pass before
    training, which stays below a training step's peak. grpo (--method grpo; default GRPOConfig()): a step
    takes one group at a time (group_size sequences of at most max_seq_length tokens, the head projecting
    only the completion positions, whole logits: no chunked loss) and sums the groups' gradients when
    batch_size > 1; the sampling before it (a KV cache, no gradients) stays below that. Raises ModelError,
    or ConfigError when no layer matches (as training).
    """
    pref = PreferenceConfig(method=method)
    rows = 2 if pref.pairs or method == "kto" else 1
    micro, chunked, summed = batch_size, True, grad_accum > 1
    if method == "grpo":
        grpo = grpo or GRPOConfig()
        rows, micro, chunked = grpo.group_size, 1, False
        loss_fraction = min(loss_fraction, grpo.max_completion_length / max_seq_length)
        summed = summed or batch_size > 1  # the groups' gradients are summed, as micro-batches' are
    if compute_dtype not in (None, *DTYPE_CODES):
        raise ConfigError(f"compute_dtype must be one of {', '.join(DTYPE_CODES)} or None, got {compute_dtype!r}")
    shapes = model_spec if isinstance(model_spec, ModelShapes) else read_model(model_spec)
    if quantize:
        shapes = quantized(shapes, quantize, group_size)
    adapted = find_adapted(shapes, lora)
    if lora.use_dora and any(m.kind == "embedding" for m, _ in adapted):
        raise ConfigError("use_dora: DoRA on an embedding is not supported; drop it from --target")
    if lora.use_dora and any(m.experts for m, _ in adapted):
        raise ConfigError(f"use_dora: DoRA on MoE experts ({next(m.path for m, _ in adapted if m.experts)}) is not "
                          "supported; drop --dora or target dense layers only")
    trainable = adapter_params(adapted, lora.use_dora)
    expert_trainable = adapter_params([(m, r) for m, r in adapted if m.experts])
    base = base_bytes(shapes, compute_dtype)  # None: every tensor as stored (load_base off the CPU)
    compute_dtype = compute_dtype or {v: k for k, v in DTYPE_CODES.items()}.get(_float_dtype(shapes), "float16")
    backend = backend or default_backend()
    if memory_bytes is None:
        memory_bytes, memory_source = machine_memory()
    else:
        memory_source = "given"
    terms = activation_terms(shapes, adapted, rows * micro, max_seq_length, grad_checkpoint,
                             BYTES[DTYPE_CODES[compute_dtype]], lora.use_dora, backend == "cpu", loss_fraction,
                             memory_bytes, chunked)
    params, moments = 4 * trainable, 8 * trainable  # adapters train in float32; AdamW: m and v
    grads = params * (2 if summed else 1)  # + the running sum when accumulating
    reference = params if pref.needs_reference else 0  # the frozen --init-adapter tensors
    static = base + params + moments + reference
    # The update holds the gradients, their clipped copy and the new parameters and moments next to
    # the old ones: measured 4.3x the adapter's float32 size on top of the static state (mlx 0.32).
    peak = max(static + grads + sum(terms.values()), static + grads - params + int(4.3 * params))
    name = shapes.config.get("model_type", "config") if isinstance(model_spec, (dict, ModelShapes)) else str(model_spec)
    return Plan(
        model=name, source=shapes.source, total_params=count_params(shapes) + trainable,
        trainable_params=trainable, trainable_percent=100 * trainable / max(count_params(shapes) + trainable, 1),
        adapted_layers=len(adapted), adapter_bytes_fp32=4 * trainable, adapter_bytes_fp16=2 * trainable,
        active_params=active_params(shapes) + trainable - expert_trainable + _active_adapter(adapted, shapes),
        expert_layers=sum(1 for m, _ in adapted if m.experts), expert_adapter_bytes_fp32=4 * expert_trainable,
        base_bytes=base, adapter_param_bytes=params, gradient_bytes=grads, optimizer_bytes=moments,
        activation_bytes=sum(terms.values()), peak_bytes=peak, memory_bytes=memory_bytes,
        memory_source=memory_source, fits=None if memory_bytes is None else peak <= memory_bytes,
        settings=dict(rank=lora.r, target=lora.target_modules, dora=lora.use_dora, quantize=quantize,
                      group_size=group_size if quantize else None, batch_size=batch_size,
                      max_seq_length=max_seq_length, grad_checkpoint=grad_checkpoint, grad_accum=grad_accum,
                      compute_dtype=compute_dtype, backend=backend, method=method, rows_per_item=rows,
                      reference_bytes=reference, reference=pref.needs_reference),
        activation_terms=terms)


def _active_adapter(adapted, shapes: ModelShapes) -> int:
    """Adapter parameters of the k experts a token is routed to."""
    k = per_token(shapes.config) or 0
    return sum(min(k, m.experts) * r * (m.rows + m.cols) for m, r in adapted if m.experts)


def _float_dtype(shapes: ModelShapes) -> str:
    codes = [m.dtype for m in shapes.matrices if m.dtype in FLOATS] or ["F16"]
    return max(set(codes), key=codes.count)


@dataclass
class Fit:
    """The largest batch that fits, whether it needs --grad-checkpoint, and the --max-seq-length it is
    planned at (the one asked for, or the longest that fits at batch 1 when not even that fits;
    batch_size 0: nothing fits, not even 1 x 64 tokens)."""

    batch_size: int
    grad_checkpoint: bool
    plan: Plan
    max_seq_length: int = TrainConfig.max_seq_length


def _largest(fits, top: int) -> int:
    """The largest n in 1..top with fits(n) (fits grows false with n): double, then bisect; 0 if none."""
    lo, hi = 0, 1
    while hi <= top and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, top + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


MIN_FIT_LENGTH = 64  # --fit never proposes sequences shorter than this


def suggest_fit(model_spec, lora: LoraConfig, *, memory_bytes: int | None = None, max_batch: int = 4096,
                **kwargs) -> Fit:
    """The largest batch size whose predicted peak fits in `memory_bytes` (default: this machine's).

    Without --grad-checkpoint when a batch of 1 fits that way, else with it; when not even a batch of
    1 fits with it, the longest --max-seq-length (a multiple of 64) that does. kwargs: as plan_training.
    method "grpo" trains one group at a time whatever the batch of prompts, so kwargs' batch_size is kept (at
    most); the fit is in checkpointing and length.
    """
    shapes = model_spec if isinstance(model_spec, ModelShapes) else read_model(model_spec)
    if kwargs.get("method") == "grpo" and kwargs.get("batch_size"):
        max_batch = min(max_batch, kwargs["batch_size"])
    kwargs = {k: v for k, v in kwargs.items() if k not in ("batch_size", "grad_checkpoint")}
    length = kwargs.pop("max_seq_length", TrainConfig.max_seq_length)
    memory_bytes = memory_bytes or machine_memory()[0]
    if memory_bytes is None:
        raise ModelError("cannot tell this machine's memory; pass --memory-gb")

    def at(batch: int, ckpt: bool, seq: int = length) -> Plan:
        return plan_training(shapes, lora, batch_size=batch, grad_checkpoint=ckpt, memory_bytes=memory_bytes,
                             max_seq_length=seq, **kwargs)

    for ckpt in (False, True):
        best = _largest(lambda b: at(b, ckpt).fits, max_batch)
        if best:
            return Fit(best, ckpt, at(best, ckpt), length)
    units = _largest(lambda n: at(1, True, n * MIN_FIT_LENGTH).fits, length // MIN_FIT_LENGTH)
    if units:
        return Fit(1, True, at(1, True, units * MIN_FIT_LENGTH), units * MIN_FIT_LENGTH)
    return Fit(0, True, at(1, True), length)


def format_plan(plan: Plan) -> str:
    """The plan as a plain-text table."""
    s = plan.settings
    q = f"{s['quantize']}-bit (group {s['group_size']})" if s["quantize"] else "as stored"
    rows = [
        ("model", f"{plan.model}  [{plan.source}]"),
        ("parameters", f"{plan.total_params:,} total, {plan.trainable_params:,} trainable "
                       f"({plan.trainable_percent:.4f}%) in {plan.adapted_layers} layers"),
        ("adapter file", f"{human(plan.adapter_bytes_fp32)} fp32, {human(plan.adapter_bytes_fp16)} fp16"),
    ]
    if plan.active_params != plan.total_params:  # MoE: what one token uses, and the experts' share
        rows += [("active per token", f"{plan.active_params:,} parameters ({plan.active_params / plan.total_params:.1%})"),
                 ("expert adapters", f"{plan.expert_layers} expert layers, {human(plan.expert_adapter_bytes_fp32)} fp32"
                                     " (one pair per expert)")]
    rows += [
        ("run", f"rank {s['rank']}, target {_targets(s['target'])}, batch {_batch(s)} x "
                f"{s['max_seq_length']} tokens, {s['compute_dtype']} on {s['backend']}, base {q}"
                + (", grad checkpoint" if s["grad_checkpoint"] else "")),
        ("base weights", human(plan.base_bytes)),
        ("adapter + gradients", f"{human(plan.adapter_param_bytes)} + {human(plan.gradient_bytes)}"),
        ("AdamW moments", human(plan.optimizer_bytes)),
        *([("reference", f"the base with the adapter off (no second model) + {human(s['reference_bytes'])} "
                         "for a frozen --init-adapter; log-probs precomputed once")] if s.get("reference") else []),
        ("activations", human(plan.activation_bytes)),
    ]
    rows += [(f"  {k}", human(v)) for k, v in plan.activation_terms.items()]
    rows.append(("predicted peak", human(plan.peak_bytes)))
    if plan.memory_bytes is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        rows.append(("memory", f"{human(plan.memory_bytes)} ({plan.memory_source}): {verdict}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _batch(s: dict) -> str:
    if s.get("rows_per_item", 1) == 1:
        return str(s["batch_size"])
    if s["method"] == "grpo":
        return (f"{s['batch_size']} prompts x {s['rows_per_item']} completions, one group of "
                f"{s['rows_per_item']} sequences at a time (grpo)")
    what = "rows (+ KL rows)" if s["method"] == "kto" else "pairs"
    return f"{s['batch_size']} {what} = {s['rows_per_item'] * s['batch_size']} sequences ({s['method']})"


def _targets(t) -> str:
    return ",".join(t) if isinstance(t, list) else str(t)


__all__ = ["Plan", "Fit", "plan_training", "suggest_fit", "find_adapted", "count_params", "active_params", "adapter_params",
           "quantized", "base_bytes", "format_plan"]
