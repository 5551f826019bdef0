"""Predict the parameters and memory of a LoRA run without loading any weight: `mlxlora plan`.

The model is read from config.json and the JSON headers of its .safetensors files (names,
shapes, dtypes), or from GGUF metadata, or from a config alone (llama-like layouts). Targets are
matched by `mlxlora.surgery.find_targets` on a skeleton of empty modules, so the rules are the
training rules. Memory = base weights + adapter + gradients + AdamW moments + activations.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import LoraConfig, TrainConfig
from .errors import ConfigError, ModelError

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
         "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOATS = {"F64", "F32", "F16", "BF16"}  # what load_base casts to the compute dtype
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# mlx-lm's ModelArgs default for tie_word_embeddings when config.json does not say.
TIED_BY_DEFAULT = {"llama": True, "mistral": True, "qwen2": True, "qwen3": True, "gemma": True,
                   "gemma2": True, "phi3": False}
_EMBEDDING = re.compile(r"(^|_)(embed\w*|embeddings?|wte|wpe)$")


@dataclass
class Matrix:
    """One Linear/Embedding weight: logical float shape (rows, cols) = (out, in) or (num, dims)."""

    path: str
    kind: str  # "linear" | "embedding"
    rows: int
    cols: int
    dtype: str  # float dtype of the weight, or of the scales when quantized
    bits: int | None = None
    group_size: int | None = None
    biases: bool = True  # affine quantization stores a bias per group


@dataclass
class ModelShapes:
    """What the planner knows about a model: its config and every parameter's shape."""

    config: dict
    matrices: list[Matrix]
    others: list[tuple[str, int, str]]  # (name, elements, dtype): norms, biases
    source: str


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


# -- reading a model --------------------------------------------------------------------------
def read_model(spec: str | dict) -> ModelShapes:
    """Shapes of `spec`: a config dict, a config.json file, a model folder, a .gguf file or a hub id.

    Reads headers and metadata only. Raises ModelError naming what is missing.
    """
    if isinstance(spec, dict):
        return ModelShapes(spec, *config_matrices(spec), "config")
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        return _read_gguf(p)
    if p.suffix == ".json":
        config = _read_json(p)
        return ModelShapes(config, *config_matrices(config), f"{p.name}")
    if p.is_dir():
        config = _read_json(p / "config.json")
        files = sorted(p.glob("model*.safetensors"))
        if not files:
            return ModelShapes(config, *config_matrices(config), "config.json (no weights)")
        headers = {}
        for f in files:
            headers.update(read_safetensors_header(f))
        return ModelShapes(config, *header_matrices(headers, config), f"{len(files)} safetensors header(s)")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(f"--model: {spec} does not exist (give a model folder, config.json, .gguf file or hub id)")
    return _read_hub(spec)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """{name: {"dtype", "shape"}} from the JSON header of a .safetensors file (no tensor data read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size) if 0 < size < 100_000_000 else b""
    try:
        header = json.loads(raw)
    except ValueError:
        raise ModelError(f"{path}: not a safetensors file (bad header); re-download it") from None
    header.pop("__metadata__", None)
    return header


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"--model: {path} does not exist (a model folder needs config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None


def _read_hub(repo: str) -> ModelShapes:
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        config = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
        meta = get_safetensors_metadata(repo)
    except Exception as e:  # offline, unknown repo, auth
        raise ModelError(f"--model: could not read {repo!r} from the hub ({type(e).__name__}); pass a local "
                         "folder or its config.json") from None
    headers = {n: {"dtype": t.dtype, "shape": t.shape}
               for fm in meta.files_metadata.values() for n, t in fm.tensors.items()}
    return ModelShapes(config, *header_matrices(headers, config), "hub safetensors headers")


def _dims(config: dict) -> dict:
    """hidden D, layers N, intermediate I, heads H, kv heads, head_dim, vocab V of a llama-like config."""
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        raise ModelError(f"config lacks {', '.join(missing)}; the planner needs a llama-like config.json")
    d = {k: int(config[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                     "num_attention_heads", "vocab_size")}
    d["num_key_value_heads"] = int(config.get("num_key_value_heads") or d["num_attention_heads"])
    head_dim = config.get("head_dim") if config.get("model_type") != "qwen2" else None  # mlx-lm's qwen2 ignores it
    d["head_dim"] = int(head_dim or d["hidden_size"] // d["num_attention_heads"])
    return d


def _tied(config: dict) -> bool:
    mt = config.get("model_type", "llama")
    return mt.startswith("gemma") or bool(config.get("tie_word_embeddings", TIED_BY_DEFAULT.get(mt, True)))


def config_matrices(config: dict) -> tuple[list[Matrix], list]:
    """Parameter shapes of a llama-like model from its config (llama, mistral, qwen2/3, gemma/2, phi3)."""
    d, mt = _dims(config), config.get("model_type", "llama")
    D, I, V = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    q, kv = d["num_attention_heads"] * d["head_dim"], d["num_key_value_heads"] * d["head_dim"]
    dtype = DTYPE_CODES.get(str(config.get("torch_dtype") or config.get("dtype")), "BF16")
    mats = [Matrix("model.embed_tokens", "embedding", V, D, dtype)]
    others = [("model.norm.weight", D, dtype)]
    attn_bias = mt == "qwen2" or config.get("attention_bias", False)
    for i in range(d["num_hidden_layers"]):
        b = f"model.layers.{i}."
        if mt == "phi3":  # fused projections
            lin = [("self_attn.qkv_proj", D, q + 2 * kv), ("self_attn.o_proj", q, D),
                   ("mlp.gate_up_proj", D, 2 * I), ("mlp.down_proj", I, D)]
        else:
            lin = [("self_attn.q_proj", D, q), ("self_attn.k_proj", D, kv), ("self_attn.v_proj", D, kv),
                   ("self_attn.o_proj", q, D), ("mlp.gate_proj", D, I), ("mlp.up_proj", D, I),
                   ("mlp.down_proj", I, D)]
        mats += [Matrix(b + name, "linear", out, inp, dtype) for name, inp, out in lin]
        norms = ["input_layernorm", "post_attention_layernorm"]
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if mt == "gemma2" else []
        others += [(f"{b}{n}.weight", D, dtype) for n in norms]
        if mt == "qwen3":
            others += [(f"{b}self_attn.{n}.weight", d["head_dim"], dtype) for n in ("q_norm", "k_norm")]
        if attn_bias:
            sizes = {"q_proj": q, "k_proj": kv, "v_proj": kv} | ({} if mt == "qwen2" else {"o_proj": D})
            others += [(f"{b}self_attn.{n}.bias", s, dtype) for n, s in sizes.items()]
        if config.get("mlp_bias", False):
            others += [(f"{b}mlp.{n}.bias", s, dtype) for n, s in (("gate_proj", I), ("up_proj", I), ("down_proj", D))]
    if not _tied(config):
        mats.append(Matrix("lm_head", "linear", V, D, dtype))
    _quantize_from_config(mats, config)
    return mats, others


def _quantize_from_config(mats: list[Matrix], config: dict) -> None:
    """Mark the matrices an mlx-lm `quantization` entry says are quantized (global + per-module)."""
    q = config.get("quantization")
    if not q:
        return
    for m in mats:
        spec = q.get(m.path, q)
        if spec is not False and m.cols % spec["group_size"] == 0:
            m.bits, m.group_size = spec["bits"], spec["group_size"]
            m.biases = spec.get("mode", "affine") == "affine"


def header_matrices(headers: dict[str, dict], config: dict) -> tuple[list[Matrix], list]:
    """Matrices and other tensors from safetensors headers; packed uint32 weights with .scales are
    quantized (bits and group from config["quantization"]) and get their logical shape back."""
    if _tied(config):
        headers = {k: v for k, v in headers.items() if k != "lm_head.weight"}  # mlx-lm drops it
    quant = config.get("quantization") or {}
    mats, others = [], []
    for name, h in sorted(headers.items()):
        module, _, part = name.rpartition(".")
        shape = [int(s) for s in h["shape"]]
        if "rotary_emb.inv_freq" in name or part in ("scales", "biases") and f"{module}.weight" in headers:
            continue
        if part != "weight" or len(shape) != 2:
            others.append((name, math.prod(shape), h["dtype"]))
            continue
        kind = "embedding" if _EMBEDDING.search(module.rpartition(".")[2]) else "linear"
        scales = headers.get(f"{module}.scales")
        if scales is None:
            mats.append(Matrix(module, kind, shape[0], shape[1], h["dtype"]))
            continue
        spec = quant.get(module, quant)
        if not spec or "bits" not in spec:
            raise ModelError(f"{name} is quantized but config.json has no quantization bits for it")
        mats.append(Matrix(module, kind, shape[0], shape[1] * 32 // spec["bits"], scales["dtype"],
                           spec["bits"], spec["group_size"], f"{module}.biases" in headers))
    return mats, others


def _read_gguf(path: Path) -> ModelShapes:
    """Shapes from GGUF metadata, as `mlxlora.convert.gguf` would import the file (no tensor data read)."""
    from .convert.gguf import ARCHS, GROUP_SIZE, HPARAMS, MX_QUANTIZED, hf_name

    if not path.is_file():
        raise ModelError(f"--model: GGUF file {path} does not exist")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception as e:
        raise ModelError(f"{path.name}: not a readable GGUF file ({e})") from None
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in ARCHS:
        raise ModelError(f"{path.name}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    config = {"model_type": ARCHS[arch]["model_type"]}
    for key, gkey in HPARAMS.items():
        if f"{arch}.{gkey}" in reader.fields:
            config[key] = reader.fields[f"{arch}.{gkey}"].contents()
    mats, others = [], []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        shape = [int(s) for s in reversed(t.shape)]
        kind = t.tensor_type.name
        bits = MX_QUANTIZED.get(kind)
        if len(shape) == 2 and name.endswith(".weight"):
            module = name.rpartition(".")[0]
            mats.append(Matrix(module, "embedding" if "embed" in module else "linear", *shape,
                               "F16" if bits or kind not in ("F32", "BF16") else kind,
                               bits, GROUP_SIZE if bits else None))
        else:
            others.append((name, math.prod(shape), "F32" if kind == "F32" else "F16"))
    config["vocab_size"] = next(m.rows for m in mats if m.kind == "embedding")
    config["tie_word_embeddings"] = not any(m.path == "lm_head" for m in mats)
    return ModelShapes(config, mats, others, "GGUF metadata")


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


def activation_terms(shapes: ModelShapes, adapted: list[tuple[Matrix, int]], batch_size: int, seq_len: int,
                     grad_checkpoint: bool = False, act_bytes: int = 4, dora: bool = False,
                     cpu_dequant: bool = False) -> dict[str, int]:
    """Bytes of activation memory at the peak of one micro-batch (forward + backward), term by term.

    A decoder-only block (RMSNorm, attention, SwiGLU MLP) at the worst case: every sample padded to
    `seq_len`. Blocks below the lowest adapted one keep nothing (no gradient reaches them).
    `cpu_dequant`: quantized layers run mlxlora's CPU dequantize+matmul path.
    """
    d = _dims(shapes.config)
    B, L, T = batch_size, seq_len, batch_size * seq_len
    D, I, H, N = d["hidden_size"], d["intermediate_size"], d["num_attention_heads"], d["num_hidden_layers"]
    q, kv = H * d["head_dim"], d["num_key_value_heads"] * d["head_dim"]
    V = next((m.rows for m in shapes.matrices if m.kind == "embedding"), d["vocab_size"])
    roles, extra, outs, first = _blocks(adapted, N, dora)

    def kept(i: int) -> int:
        """Elements block i keeps for its backward."""
        got = roles.get(i, set())
        e = (T * D                   # block input: the first RMSNorm's backward
             + T * D                 # residual after attention: the second RMSNorm's backward
             + T * q                 # queries after RoPE and scaling: backward of Q·Kᵀ
             + 2 * T * kv            # keys and values after RoPE: backward of Q·Kᵀ and P·V
             + B * H * L * L         # softmax probabilities P (mlx trains with the unfused SDPA)
             + 4 * T * I)            # SwiGLU: gate, sigmoid(gate), silu(gate), up
        xd, xi, xp = BLOCK_EXTRA.get(shapes.config.get("model_type"), (0, 0, 0))
        e += int(xd * T * D + xi * T * I + xp * B * H * L * L)
        e += T * D if "attn_in" in got else 0    # normed block input: the q/k/v adapters' input
        e += T * q if "attn_out" in got else 0   # attention output: the o_proj adapter's input
        e += T * D if "mlp_in" in got else 0     # normed residual: the gate/up adapters' input
        e += T * I if "mlp_out" in got else 0    # SwiGLU output: the down_proj adapter's input
        return e + T * extra.get(i, 0)           # x·lora_a per adapter (lora_b's gradient); DoRA: the
                                                 # output before the magnitude scale (m's gradient)
    reached = range(first, N)
    mlp = {i for i, r in roles.items() if r & {"mlp_in", "mlp_out"}}
    # The backward of one block holds gradients and temporaries next to what is kept. Measured with
    # mlx 0.32 (CPU) on llama-like blocks: ~17.5 (T, D) buffers (residual-stream and projection
    # gradients, RoPE/transposes), 3 (T, I) (+3 with MLP adapters), 2 P-sized (softmax backward),
    # 4 (T, kv) (GQA key/value gradients before the head sum); DoRA: 2 (T, out) per adapter.
    work = int((17.5 * T * D + (6 if mlp else 3) * T * I + 2 * B * H * L * L + 4 * T * kv
                + (2 * T * max(outs.values()) if dora else 0)) * act_bytes) if reached else 0
    # Logits (B, L, V) in float32 for the loss, kept for logsumexp's backward, then softmax and the
    # logits' gradient, plus one temporary of the same size (measured: 3.8-3.95 copies).
    logits = 4 * T * V * 4 + (T * V * act_bytes if act_bytes != 4 else 0)
    if shapes.config.get("final_logit_softcapping"):  # tanh(logits / c) * c keeps its tanh (not measured)
        logits += T * V * 4
    if not grad_checkpoint:  # everything kept is alive when the backward starts
        terms = {"kept for backward": sum(kept(i) for i in reached) * act_bytes,
                 "backward working set": work, "logits and their gradient": logits}
    else:
        # mx.checkpoint keeps each block's input: measured (mlx 0.32) ~3 (T, D) buffers per block. Two
        # phases: the loss's backward (logits alive), then blocks recomputed one at a time, when each
        # block with MLP adapters holds two (T, I) more (measured). The peak is the larger phase.
        inputs = len(reached) * 3 * T * D * act_bytes
        more = sum(2 * T * I for i in reached if i in mlp) * act_bytes
        block = max((kept(i) for i in reached), default=0) * act_bytes
        if more + block > logits:
            terms = {"block inputs (checkpointed)": inputs + more, "one recomputed block": block}
        else:
            terms = {"block inputs (checkpointed)": inputs, "logits and their gradient": logits}
        terms["backward working set"] = work
    if cpu_dequant or dora:
        terms.update(_dequantized(shapes, adapted, reached, grad_checkpoint, cpu_dequant, act_bytes))
    return terms


def _dequantized(shapes, adapted, reached, grad_checkpoint, cpu_dequant, act_bytes) -> dict[str, int]:
    """The float copy of a quantized weight stays alive from a block's forward to its backward:
    measured on the CPU dequantize+matmul path (every quantized layer, and the output head); DoRA's
    forward needs it on any backend (its adapted layers)."""
    from .surgery import block_index

    dora_mats = [a for a, _ in adapted]
    per_block = [sum(m.rows * m.cols for m in shapes.matrices if m.bits and block_index(m.path) == i
                     and (cpu_dequant or any(a is m for a in dora_mats))) for i in reached]
    n = max(per_block, default=0) if grad_checkpoint else sum(per_block)
    if cpu_dequant:
        n += max((m.rows * m.cols for m in shapes.matrices if m.bits and block_index(m.path) is None), default=0)
    return {"dequantized weights": n * act_bytes} if n else {}


# -- the plan ---------------------------------------------------------------------------------
def plan_training(model_spec: str | dict | ModelShapes, lora: LoraConfig, *, quantize: int | None = None,
                  group_size: int = TrainConfig.q_group_size, batch_size: int = TrainConfig.batch_size,
                  max_seq_length: int = TrainConfig.max_seq_length, grad_checkpoint: bool = False,
                  compute_dtype: str | None = "float32", memory_bytes: int | None = None,
                  grad_accum: int = TrainConfig.grad_accum, backend: str | None = None) -> Plan:
    """Parameters and predicted peak memory of training `lora` on `model_spec`, without loading weights.

    compute_dtype: what float weights and activations are computed in (float32 on CPU; None keeps the
    checkpoint's dtype, as on Metal). backend "cpu" | "gpu" (default: this machine's mlx device) picks
    the CPU dequantize+matmul path for quantized layers. memory_bytes: the budget (default: this
    machine's, see `machine_memory`). Raises ModelError, or ConfigError when no layer matches (as training).
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
                             BYTES[DTYPE_CODES[compute_dtype]], lora.use_dora, backend == "cpu")
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
