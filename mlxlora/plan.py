"""Predict the parameters and memory of a LoRA run without loading any weight: `mlxlora plan`.

The model's shapes come from `mlxlora.shapes` (config.json, safetensors headers, GGUF metadata or
a config alone; no tensor data). Targets are matched by `mlxlora.surgery.find_targets` on a
skeleton of empty modules, so the rules are the training rules. Memory = base weights + adapter +
gradients + AdamW moments + activations.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import LoraConfig, TrainConfig
from .errors import ConfigError, ModelError
from .attention import score_elements
from .head import padded_rows
# Reading a model lives in shapes.py; its public names stay importable from here.
from .shapes import (BYTES, DTYPE_CODES, FLOATS, Matrix, ModelShapes, config_matrices,
                     dims, header_matrices, read_model, read_safetensors_header)


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
    import mlx.nn as nn

    from .surgery import find_targets

    root, by_path = nn.Module(), {}
    for m in shapes.matrices:
        node, parts = root, m.path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, nn.Module())
        cls = nn.Embedding if m.kind == "embedding" else nn.Linear
        leaf = cls.__new__(cls)
        nn.Module.__init__(leaf)  # a module of the right type and no arrays
        node[parts[-1]] = leaf
        by_path[m.path] = m
    return [(by_path[p], lora.rank_alpha_for(p)[0]) for p, _ in find_targets(root, lora)]


def count_params(shapes: ModelShapes) -> int:
    """Base parameters as `surgery.count_parameters` counts them (quantized weights at logical size)."""
    return sum(m.rows * m.cols for m in shapes.matrices) + sum(n for _, n, _ in shapes.others)


def adapter_params(adapted: list[tuple[Matrix, int]], dora: bool = False) -> int:
    """Σ r·(in + out) over adapted layers (lora_a (in, r), lora_b (r, out)); DoRA adds m (out,)."""
    return sum(r * (m.rows + m.cols) + (m.rows if dora else 0) for m, r in adapted)


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
        if m.bits is None:
            total += m.rows * m.cols * size(m.dtype)
        else:
            total += m.rows * m.cols * m.bits // 8 + m.rows * (m.cols // m.group_size) * (1 + m.biases) * size(m.dtype)
    return total


# -- activations ------------------------------------------------------------------------------
# Which tensor an adapter in each projection makes autodiff keep (lora_a's gradient needs its input).
ROLES = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
         "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
         "down_proj": "mlp_out"}
# What a block keeps beyond a llama block, in (T, D), (T, I) and P-sized tensors, measured (mlx 0.32):
# gemma2 has two more RMSNorms, tanh soft-capping of the attention scores and a GELU (tanh) MLP.
BLOCK_EXTRA = {"gemma2": (2.5, 2, 1)}


def _blocks(adapted: list[tuple[Matrix, int]], n_blocks: int, dora: bool):
    """Per block: roles of its adapters, Σ rank (+ Σ out with DoRA), Σ out; and the lowest block
    the backward reaches (0 with an adapted embedding, n_blocks when none)."""
    from .surgery import block_index

    roles: dict[int, set] = {}
    extra: dict[int, int] = {}
    outs: dict[int, int] = {}
    first = n_blocks
    for m, r in adapted:
        i = block_index(m.path)
        if i is None:
            first = 0 if m.kind == "embedding" else first
            continue
        first = min(first, i)
        roles.setdefault(i, set()).add(ROLES.get(m.path.rpartition(".")[2], "attn_in"))
        extra[i] = extra.get(i, 0) + r + (m.rows if dora else 0)
        outs[i] = outs.get(i, 0) + m.rows
    return roles, extra, outs, first


def _kept(d: dict, model_type: str | None, B: int, L: int, roles: set, extra: int, P: int) -> int:
    """Elements one block keeps for its backward at batch B, length L. roles: its adapters' ROLES;
    extra: Σ rank (+ Σ out with DoRA) over its adapters; P: attention scores per head (all blocks)."""
    T, D, I, H = B * L, d["hidden_size"], d["intermediate_size"], d["num_attention_heads"]
    q, kv = H * d["head_dim"], d["num_key_value_heads"] * d["head_dim"]
    e = (T * D                   # block input: the first RMSNorm's backward
         + T * D                 # residual after attention: the second RMSNorm's backward
         + T * q                 # queries after RoPE and scaling: backward of Q·Kᵀ
         + 2 * T * kv            # keys and values after RoPE: backward of Q·Kᵀ and P·V
         + B * H * P             # softmax probabilities (mlx trains with the unfused SDPA)
         + 4 * T * I)            # SwiGLU: gate, sigmoid(gate), silu(gate), up
    xd, xi, xp = BLOCK_EXTRA.get(model_type, (0, 0, 0))
    e += int(xd * T * D + xi * T * I + xp * B * H * P)
    e += T * D if "attn_in" in roles else 0    # normed block input: the q/k/v adapters' input
    e += T * q if "attn_out" in roles else 0   # attention output: the o_proj adapter's input
    e += T * D if "mlp_in" in roles else 0     # normed residual: the gate/up adapters' input
    e += T * I if "mlp_out" in roles else 0    # SwiGLU output: the down_proj adapter's input
    return e + T * extra                       # x·lora_a per adapter (lora_b's gradient); DoRA: the
                                               # output before the magnitude scale (m's gradient)


def _working_set(d: dict, B: int, L: int, mlp: bool, outs: dict[int, int], dora: bool, P: int) -> float:
    """Elements the backward of one block holds next to what is kept: gradients and temporaries.

    Measured with mlx 0.32 (CPU) on llama-like blocks: ~17.5 (T, D) buffers (residual-stream and
    projection gradients, RoPE/transposes), 3 (T, I) (+3 with MLP adapters), 2 P-sized (softmax
    backward; P: scores per head of the largest attention block), 4 (T, kv) (GQA key/value gradients
    before the head sum); DoRA: 2 (T, out) per adapter.
    """
    T, D, I, H = B * L, d["hidden_size"], d["intermediate_size"], d["num_attention_heads"]
    kv = d["num_key_value_heads"] * d["head_dim"]
    return (17.5 * T * D + (6 if mlp else 3) * T * I + 2 * B * H * P + 4 * T * kv
            + (2 * T * max(outs.values()) if dora else 0))


UNBLOCKED = {"gemma2"}  # model types whose attention does not go through scaled_dot_product_attention


def _logits_bytes(T: int, V: int, act_bytes: int, config: dict) -> int:
    """Logits (T, V) in float32 for the loss, kept for logsumexp's backward, then softmax and the
    logits' gradient, plus one temporary of the same size (measured: 3.8-3.95 copies). T: the rows
    the head projects (head.py: only the target tokens, rounded up to a level)."""
    logits = 4 * T * V * 4 + (T * V * act_bytes if act_bytes != 4 else 0)
    if config.get("final_logit_softcapping"):  # tanh(logits / c) * c keeps its tanh (not measured)
        logits += T * V * 4
    return logits


def activation_terms(shapes: ModelShapes, adapted: list[tuple[Matrix, int]], batch_size: int, seq_len: int,
                     grad_checkpoint: bool = False, act_bytes: int = 4, dora: bool = False,
                     cpu_dequant: bool = False, loss_fraction: float = 1.0) -> dict[str, int]:
    """Bytes of activation memory at the peak of one micro-batch (forward + backward), term by term.

    A decoder-only block (RMSNorm, attention, SwiGLU MLP) at the worst case: every sample padded to
    `seq_len`. Blocks below the lowest adapted one keep nothing (no gradient reaches them).
    `cpu_dequant`: the CPU backend (quantized layers run dequantize+matmul; attention is blocked). `loss_fraction`: the
    share of the batch's tokens that carry loss (1.0, the worst case, unless known).
    """
    d = dims(shapes.config)
    B, L, T = batch_size, seq_len, batch_size * seq_len
    D, I, N = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    V = next((m.rows for m in shapes.matrices if m.kind == "embedding"), d["vocab_size"])
    roles, extra, outs, first = _blocks(adapted, N, dora)
    reached = range(first, N)
    model_type = shapes.config.get("model_type")
    # attention.py blocks causal attention on CPU; gemma2 computes its own soft-capped scores
    p_all, p_block = score_elements(L, blocked=cpu_dequant and model_type not in UNBLOCKED)
    kept = {i: _kept(d, model_type, B, L, roles.get(i, set()), extra.get(i, 0), p_all) for i in reached}
    mlp = {i for i, r in roles.items() if r & {"mlp_in", "mlp_out"}}
    work = int(_working_set(d, B, L, bool(mlp), outs, dora, p_block) * act_bytes) if reached else 0
    logits = _logits_bytes(padded_rows(math.ceil(T * loss_fraction), T), V, act_bytes, shapes.config)
    if not grad_checkpoint:  # everything kept is alive when the backward starts
        terms = {"kept for backward": sum(kept.values()) * act_bytes,
                 "backward working set": work, "logits and their gradient": logits}
    else:
        # mx.checkpoint keeps each block's input: measured (mlx 0.32) ~3 (T, D) buffers per block. Two
        # phases: the loss's backward (logits alive), then blocks recomputed one at a time, when each
        # block with MLP adapters holds two (T, I) more (measured). The peak is the larger phase.
        inputs = len(reached) * 3 * T * D * act_bytes
        more = sum(2 * T * I for i in reached if i in mlp) * act_bytes
        block = max(kept.values(), default=0) * act_bytes
        if more + block > logits:
            terms = {"block inputs (checkpointed)": inputs + more, "one recomputed block": block}
        else:
            terms = {"block inputs (checkpointed)": inputs, "logits and their gradient": logits}
        terms["backward working set"] = work
    if cpu_dequant or dora:
        terms.update(_dequantized(shapes, adapted, reached, grad_checkpoint, cpu_dequant, dora, act_bytes))
    return terms


def _dequantized(shapes, adapted, reached, grad_checkpoint, cpu_dequant, dora, act_bytes) -> dict[str, int]:
    """Float copies of quantized weights. DoRA's forward needs its adapted layers' float weight on any
    backend, kept from a block's forward to its backward. The CPU dequantize+matmul path (quant.py)
    dequantizes again in the backward, a slice of at most CHUNK_ELEMENTS weights at a time; mx.dequantize
    holds twice its output while it runs (measured, mlx 0.32 CPU)."""
    from .quant import CHUNK_ELEMENTS
    from .surgery import block_index

    dora_mats = [a for a, _ in adapted] if dora else []
    per_block = [sum(m.rows * m.cols for m in shapes.matrices if m.bits and block_index(m.path) == i
                     and any(a is m for a in dora_mats)) for i in reached]
    n = max(per_block, default=0) if grad_checkpoint else sum(per_block)
    if cpu_dequant:
        n += 2 * min(CHUNK_ELEMENTS, max((m.rows * m.cols for m in shapes.matrices if m.bits), default=0))
    return {"dequantized weights": n * act_bytes} if n else {}


# -- the plan ---------------------------------------------------------------------------------
def plan_training(model_spec: str | dict | ModelShapes, lora: LoraConfig, *, quantize: int | None = None,
                  group_size: int = TrainConfig.q_group_size, batch_size: int = TrainConfig.batch_size,
                  max_seq_length: int = TrainConfig.max_seq_length, grad_checkpoint: bool = False,
                  compute_dtype: str | None = "float32", memory_bytes: int | None = None,
                  grad_accum: int = TrainConfig.grad_accum, backend: str | None = None,
                  loss_fraction: float = 1.0) -> Plan:
    """Parameters and predicted peak memory of training `lora` on `model_spec`, without loading weights.

    compute_dtype: what float weights and activations are computed in (float32 on CPU; None keeps the
    checkpoint's dtype, as on Metal). backend "cpu" | "gpu" (default: this machine's mlx device) picks
    the CPU dequantize+matmul path for quantized layers. memory_bytes: the budget (default: this
    machine's, see `machine_memory`). loss_fraction: share of tokens that carry loss (default 1.0,
    the worst case; the head projects only those). Raises ModelError, or ConfigError when no layer matches (as training).
    """
    if compute_dtype not in (None, *DTYPE_CODES):
        raise ConfigError(f"compute_dtype must be one of {', '.join(DTYPE_CODES)} or None, got {compute_dtype!r}")
    shapes = model_spec if isinstance(model_spec, ModelShapes) else read_model(model_spec)
    if quantize:
        shapes = quantized(shapes, quantize, group_size)
    adapted = find_adapted(shapes, lora)
    if lora.use_dora and any(m.kind == "embedding" for m, _ in adapted):
        raise ConfigError("use_dora: DoRA on an embedding is not supported; drop it from --target")
    trainable = adapter_params(adapted, lora.use_dora)
    base = base_bytes(shapes, compute_dtype)  # None: every tensor as stored (load_base off the CPU)
    compute_dtype = compute_dtype or {v: k for k, v in DTYPE_CODES.items()}.get(_float_dtype(shapes), "float16")
    backend = backend or default_backend()
    terms = activation_terms(shapes, adapted, batch_size, max_seq_length, grad_checkpoint,
                             BYTES[DTYPE_CODES[compute_dtype]], lora.use_dora, backend == "cpu", loss_fraction)
    params, moments = 4 * trainable, 8 * trainable  # adapters train in float32; AdamW: m and v
    grads = params * (2 if grad_accum > 1 else 1)  # + the running sum when accumulating
    static = base + params + moments
    # The update holds the gradients, their clipped copy and the new parameters and moments next to
    # the old ones: measured 4.3x the adapter's float32 size on top of the static state (mlx 0.32).
    peak = max(static + grads + sum(terms.values()), static + grads - params + int(4.3 * params))
    if memory_bytes is None:
        memory_bytes, memory_source = machine_memory()
    else:
        memory_source = "given"
    name = shapes.config.get("model_type", "config") if isinstance(model_spec, (dict, ModelShapes)) else str(model_spec)
    return Plan(
        model=name, source=shapes.source, total_params=count_params(shapes) + trainable,
        trainable_params=trainable, trainable_percent=100 * trainable / max(count_params(shapes) + trainable, 1),
        adapted_layers=len(adapted), adapter_bytes_fp32=4 * trainable, adapter_bytes_fp16=2 * trainable,
        base_bytes=base, adapter_param_bytes=params, gradient_bytes=grads, optimizer_bytes=moments,
        activation_bytes=sum(terms.values()), peak_bytes=peak, memory_bytes=memory_bytes,
        memory_source=memory_source, fits=None if memory_bytes is None else peak <= memory_bytes,
        settings=dict(rank=lora.r, target=lora.target_modules, dora=lora.use_dora, quantize=quantize,
                      group_size=group_size if quantize else None, batch_size=batch_size,
                      max_seq_length=max_seq_length, grad_checkpoint=grad_checkpoint, grad_accum=grad_accum,
                      compute_dtype=compute_dtype, backend=backend),
        activation_terms=terms)


def _float_dtype(shapes: ModelShapes) -> str:
    codes = [m.dtype for m in shapes.matrices if m.dtype in FLOATS] or ["F16"]
    return max(set(codes), key=codes.count)


def default_backend() -> str:
    import mlx.core as mx

    return "cpu" if mx.default_device().type == mx.DeviceType.cpu else "gpu"


@dataclass
class Fit:
    """The largest batch that fits, and whether it needs --grad-checkpoint (batch_size 0: nothing fits)."""

    batch_size: int
    grad_checkpoint: bool
    plan: Plan


def suggest_fit(model_spec, lora: LoraConfig, *, memory_bytes: int | None = None, max_batch: int = 4096,
                **kwargs) -> Fit:
    """The largest batch size whose predicted peak fits in `memory_bytes` (default: this machine's).

    Without --grad-checkpoint when a batch of 1 fits that way, else with it. kwargs: as plan_training.
    """
    shapes = model_spec if isinstance(model_spec, ModelShapes) else read_model(model_spec)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("batch_size", "grad_checkpoint")}
    memory_bytes = memory_bytes or machine_memory()[0]
    if memory_bytes is None:
        raise ModelError("cannot tell this machine's memory; pass --memory-gb")

    def at(batch: int, ckpt: bool) -> Plan:
        return plan_training(shapes, lora, batch_size=batch, grad_checkpoint=ckpt, memory_bytes=memory_bytes, **kwargs)

    for ckpt in (False, True):
        lo, hi = 0, 1  # the peak grows with the batch: double, then bisect
        while hi <= max_batch and at(hi, ckpt).fits:
            lo, hi = hi, hi * 2
        hi = min(hi, max_batch + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if at(mid, ckpt).fits else (lo, mid)
        if lo:
            return Fit(lo, ckpt, at(lo, ckpt))
    return Fit(0, True, at(1, True))


def machine_memory() -> tuple[int | None, str]:
    """(bytes a run may use on this machine, where the number comes from).

    macOS: Metal's recommended working set (else 0.75 × hw.memsize); Linux: MemTotal of /proc/meminfo.
    """
    if sys.platform == "darwin":
        try:
            import mlx.core as mx

            if mx.metal.is_available():
                info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
                return int(info["max_recommended_working_set_size"]), "Metal recommended working set"
        except (ImportError, AttributeError, KeyError, RuntimeError):
            pass
        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, check=True)
            return int(out.stdout.strip()) * 3 // 4, "0.75 × hw.memsize"
        except (OSError, ValueError, subprocess.CalledProcessError):
            return None, "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, "MemTotal (/proc/meminfo)"
    except OSError:
        pass
    return None, "unknown"


def human(n: float) -> str:
    """Bytes as B/KiB/MiB/GiB/TiB with three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TiB"


def format_plan(plan: Plan) -> str:
    """The plan as a plain-text table."""
    s = plan.settings
    q = f"{s['quantize']}-bit (group {s['group_size']})" if s["quantize"] else "as stored"
    rows = [
        ("model", f"{plan.model}  [{plan.source}]"),
        ("parameters", f"{plan.total_params:,} total, {plan.trainable_params:,} trainable "
                       f"({plan.trainable_percent:.4f}%) in {plan.adapted_layers} layers"),
        ("adapter file", f"{human(plan.adapter_bytes_fp32)} fp32, {human(plan.adapter_bytes_fp16)} fp16"),
        ("run", f"rank {s['rank']}, target {_targets(s['target'])}, batch {s['batch_size']} x "
                f"{s['max_seq_length']} tokens, {s['compute_dtype']} on {s['backend']}, base {q}"
                + (", grad checkpoint" if s["grad_checkpoint"] else "")),
        ("base weights", human(plan.base_bytes)),
        ("adapter + gradients", f"{human(plan.adapter_param_bytes)} + {human(plan.gradient_bytes)}"),
        ("AdamW moments", human(plan.optimizer_bytes)),
        ("activations", human(plan.activation_bytes)),
    ]
    rows += [(f"  {k}", human(v)) for k, v in plan.activation_terms.items()]
    rows.append(("predicted peak", human(plan.peak_bytes)))
    if plan.memory_bytes is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        rows.append(("memory", f"{human(plan.memory_bytes)} ({plan.memory_source}): {verdict}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _targets(t) -> str:
    return ",".join(t) if isinstance(t, list) else str(t)


__all__ = ["Plan", "Fit", "plan_training", "suggest_fit", "find_adapted", "count_params", "adapter_params",
           "quantized", "base_bytes", "activation_terms", "default_backend", "machine_memory", "human",
           "format_plan", "ROLES", "BLOCK_EXTRA",
           # re-exported from mlxlora.shapes
           "BYTES", "DTYPE_CODES", "FLOATS", "Matrix", "ModelShapes", "read_model", "read_safetensors_header",
           "config_matrices", "header_matrices", "dims"]
