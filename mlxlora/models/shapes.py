"""Read a model's parameter shapes without loading any weight: the input of `mlxlora plan`.

Sources: a config dict or config.json (llama-like layouts), the JSON headers of a folder's
.safetensors files (names, shapes, dtypes), GGUF metadata, or the same headers on the hub.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..files import open_gguf, read_json, tensor_headers
from ..lora.quant import unpacked_cols
from .gguf import HPARAMS
from .gguf_arch import ARCHS, hf_name
from .gguf_quants import import_spec
from .moe_shapes import moe_block, moe_layers, stack_per_expert

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
    """One Linear/Embedding weight: logical float shape (rows, cols) = (out, in) or (num, dims); MoE experts
    (a SwitchLinear, kind "experts") hold `experts` such matrices."""

    path: str
    kind: str  # "linear" | "embedding" | "experts"
    rows: int
    cols: int
    dtype: str  # float dtype of the weight, or of the scales when quantized
    bits: int | None = None
    group_size: int | None = None
    biases: bool = True  # affine quantization stores a bias per group
    experts: int = 0  # E for a switch layer (E, out, in), else 0

    @property
    def size(self) -> int:
        """Weights in the matrix (all experts)."""
        return self.rows * self.cols * max(self.experts, 1)


@dataclass
class ModelShapes:
    """What the planner knows about a model: its config and every parameter's shape."""

    config: dict
    matrices: list[Matrix]
    others: list[tuple[str, int, str]]  # (name, elements, dtype): norms, biases
    source: str


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
    return tensor_headers(path, ModelError, whole=False)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"--model: {path} does not exist (a model folder needs config.json)")
    return read_json(path, ModelError)


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


def dims(config: dict) -> dict:
    """Sizes of a llama-like config: hidden D, layers N, intermediate I, heads H, kv heads, head_dim,
    vocab V. Raises ModelError listing the missing keys."""
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
    """Parameter shapes of a llama-like model from its config (llama, mistral, qwen2/3, gemma/2, phi3, and the
    MoE qwen3_moe / mixtral: router + experts in place of the MLP)."""
    d, mt = dims(config), config.get("model_type", "llama")
    D, I, V = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    q, kv = d["num_attention_heads"] * d["head_dim"], d["num_key_value_heads"] * d["head_dim"]
    dtype = DTYPE_CODES.get(str(config.get("torch_dtype") or config.get("dtype")), "BF16")
    mats = [Matrix("model.embed_tokens", "embedding", V, D, dtype)]
    others = [("model.norm.weight", D, dtype)]
    attn_bias = mt == "qwen2" or config.get("attention_bias", False)
    moe = moe_layers(config)
    for i in range(d["num_hidden_layers"]):
        b = f"model.layers.{i}."
        if mt == "phi3":  # fused projections
            lin = [("self_attn.qkv_proj", D, q + 2 * kv), ("self_attn.o_proj", q, D),
                   ("mlp.gate_up_proj", D, 2 * I), ("mlp.down_proj", I, D)]
        else:
            lin = [("self_attn.q_proj", D, q), ("self_attn.k_proj", D, kv), ("self_attn.v_proj", D, kv),
                   ("self_attn.o_proj", q, D), ("mlp.gate_proj", D, I), ("mlp.up_proj", D, I),
                   ("mlp.down_proj", I, D)]
        if moe is not None and i in moe["sparse"]:  # the MLP is a router and E experts per projection
            lin = [(n, inp, out, 0) for n, inp, out in lin[:4]] + moe_block(moe, D)
        else:
            lin = [(n, inp, out, 0) for n, inp, out in lin]
        mats += [Matrix(b + name, "experts" if e else "linear", out, inp, dtype, experts=e) for name, inp, out, e in lin]
        norms = ["input_layernorm", "post_attention_layernorm"]
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if mt == "gemma2" else []
        others += [(f"{b}{n}.weight", D, dtype) for n in norms]
        if mt in ("qwen3", "qwen3_moe"):
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
    headers = stack_per_expert(headers)
    moe = any(config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    mats, others = [], []
    for name, h in sorted(headers.items()):
        module, _, part = name.rpartition(".")
        shape = [int(s) for s in h["shape"]]
        if "rotary_emb.inv_freq" in name or part in ("scales", "biases") and f"{module}.weight" in headers:
            continue
        experts = shape[0] if part == "weight" and len(shape) == 3 and moe else 0  # a SwitchLinear (E, out, in)
        shape = shape[1:] if experts else shape
        if part != "weight" or len(shape) != 2:
            others.append((name, math.prod(shape), h["dtype"]))
            continue
        kind = "experts" if experts else "embedding" if _EMBEDDING.search(module.rpartition(".")[2]) else "linear"
        scales = headers.get(f"{module}.scales")
        if scales is None:
            mats.append(Matrix(module, kind, shape[0], shape[1], h["dtype"], experts=experts))
            continue
        spec = quant.get(module, quant)
        if not spec or "bits" not in spec:
            raise ModelError(f"{name} is quantized but config.json has no quantization bits for it")
        mats.append(Matrix(module, kind, shape[0], unpacked_cols(shape[1], spec["bits"]), scales["dtype"],
                           spec["bits"], spec["group_size"], f"{module}.biases" in headers, experts))
    return mats, others


def _read_gguf(path: Path) -> ModelShapes:
    """Shapes from GGUF metadata, as `mlxlora.convert.gguf` would import the file (no tensor data read)."""
    if not path.is_file():
        raise ModelError(f"--model: GGUF file {path} does not exist")
    reader, meta = open_gguf(path, ModelError)
    arch = str(meta.get("general.architecture"))
    if arch not in ARCHS:
        raise ModelError(f"{path.name}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    config = {"model_type": ARCHS[arch].model_type}
    for key, gkey in HPARAMS.items():
        if f"{arch}.{gkey}" in meta:
            config[key] = meta[f"{arch}.{gkey}"]
    mats, others = [], []
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name is None:
            continue
        shape = [int(s) for s in reversed(t.shape)]
        kind = t.tensor_type.name
        spec = import_spec(kind, keep_float=True)  # as convert_gguf imports by default
        if len(shape) == 2 and name.endswith(".weight"):
            module = name.rpartition(".")[0]
            mats.append(Matrix(module, "embedding" if "embed" in module else "linear", *shape,
                               "F16" if spec or kind not in ("F32", "BF16") else kind,
                               spec and spec[1], spec and spec[0]))
        else:
            others.append((name, math.prod(shape), "F32" if kind == "F32" else "F16"))
    config["vocab_size"] = next(m.rows for m in mats if m.kind == "embedding")
    config["tie_word_embeddings"] = not any(m.path == "lm_head" for m in mats)
    return ModelShapes(config, mats, others, "GGUF metadata")


__all__ = ["BYTES", "FLOATS", "DTYPE_CODES", "TIED_BY_DEFAULT", "Matrix", "ModelShapes", "read_model",
           "read_safetensors_header", "dims", "config_matrices", "header_matrices"]
