"""Import a llama.cpp GGUF file as an MLX model folder that `mlx_lm.load` reads.

Block-quantized matrices stay quantized as MLX affine triples (`.weight` uint32, `.scales`,
`.biases`; groups of 32): exactly where the block math is affine per 32 values, re-quantized
where it is not (see gguf_quants). Float matrices may be quantized with `quantize_bits`.
The tokenizer is rebuilt from `tokenizer.ggml.*`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config import check_bits
from ..errors import ModelError
from ..files import atomic_folder, check_output, open_gguf
from .gguf_arch import ARCHS, arch_config, hf_name
from .gguf_quants import GROUP_SIZE, read_tensor
from .gguf_tokenizer import build_tokenizer

# HF config key -> GGUF metadata key, after the "{arch}." prefix.
HPARAMS = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
}


def unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's Q/K permutation: `w_hf = w_gguf[order]`.

    llama.cpp stores each head's rows as (head_dim/2, 2) where HF has (2, head_dim/2).
    """
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(rows)


def convert_gguf(gguf_path, out_dir, force: bool = False, quantize_bits: int | None = None,
                 flag: str | None = None, keep_float: bool = True) -> Path:
    """Write the MLX folder (config.json, model.safetensors, tokenizer files) for a GGUF file.

    Supports the general.architecture values in gguf_arch.ARCHS. `quantize_bits` (2-8) re-quantizes
    weights that come out as float (group size 32). `keep_float` (default) imports the types
    with no exact MLX form (Q2_K, Q3_K, Q6_K) as float16; False re-quantizes them to MLX groups
    (smaller, but llama.cpp's own logits then drift further: up to ~1 nat seen on SmolLM2 Q6_K). Raises ModelError for a missing,
    truncated or unsupported file, and when `out_dir` is not empty and `force` is False;
    ConfigError for a bad `quantize_bits`.
    Returns `out_dir`. Writes into a temporary sibling folder and renames it at the end.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if quantize_bits is not None:
        check_bits(quantize_bits, "quantize_bits")
    check_output(out_dir, force=force, error=ModelError, flag=flag)
    reader, meta = open_gguf(gguf_path, ModelError, check_data=True)
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ModelError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHS)})")
    config = _hparams(gguf_path, meta, arch)
    weights, quant, rope = _load_weights(gguf_path, reader, arch, config, quantize_bits, keep_float)
    _complete_config(config, meta, weights, quant)
    if "rope_freqs" in rope:
        config["rope_scaling"] = llama3_rope_scaling(np.array(rope["rope_freqs"], dtype=np.float64), config)
    if "rope_factors_long" in rope:  # phi3's LongRoPE (128k context models)
        config["rope_scaling"] = {"type": "longrope", **{
            f"{k}_factor": [_f32(x) for x in np.array(rope[f"rope_factors_{k}"]).tolist()]
            for k in ("long", "short")}}
    tokenizer, tokenizer_config = build_tokenizer(meta)

    with atomic_folder(out_dir, force=force, error=ModelError, flag=flag) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir


ROPE_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")


def _read_tensors(reader, arch: str, keep_float: bool) -> tuple[dict, dict]:
    """GGUF name -> mx.array (MLX's `.weight`/`.scales`/`.biases` for quantized matrices), and
    GGUF module -> (group size, bits) for the tensors kept quantized."""
    arrays, specs = {}, {}
    offset = ARCHS[arch].norm_offset
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dim first
        stem, _, suffix = t.name.rpartition(".")
        matrix = suffix == "weight" and len(shape) >= 2 and stem not in ROPE_TENSORS
        if stem.endswith("ffn_gate_inp_shexp") and len(shape) == 1:
            shape, matrix = (1, *shape), False  # HF's Linear(hidden, 1); a float vector in GGUF
        parts, spec = read_tensor(t.name, t.tensor_type.name, t.data, shape, quantize=matrix,
                                  keep_float=keep_float)
        if offset and t.name.endswith("norm.weight"):  # llama.cpp stored gemma's 1 + w
            parts["weight"] = parts["weight"] - offset
        arrays.update({f"{stem}.{part}" if part != "weight" else t.name: a for part, a in parts.items()})
        if spec is not None:
            specs[stem] = spec
    return arrays, specs


def _load_weights(path: Path, reader, arch: str, config: dict, quantize_bits: int | None,
                  keep_float: bool):
    """mlx-lm weights; HF module -> (group_size, bits) or None (float matrix); rope tensors."""
    try:
        arrays, specs = _read_tensors(reader, arch, keep_float)
    except ModelError as e:  # a tensor type with no import: name the file too
        raise ModelError(f"{path.name}: {e}") from None
    rope = {k: arrays.pop(f"{k}.weight") for k in ROPE_TENSORS if f"{k}.weight" in arrays}
    unknown = sorted(n for n in arrays if hf_name(n, arch) is None)
    if unknown:
        raise ModelError(f"{path.name}: tensors with no mlx-lm name for GGUF architecture {arch}: "
                         f"{', '.join(unknown)}")
    permuted = ARCHS[arch].permuted_qk
    weights, quant = {}, {}
    for name, a in arrays.items():
        hf = hf_name(name, arch)
        module = hf.rpartition(".")[0]
        if permuted and module.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"]
            a = a[mx.array(unpermute_rows(a.shape[0], heads))]
        weights[hf] = a
        stem = name.rpartition(".")[0]
        if stem in specs:
            quant[module] = specs[stem]
        elif hf.endswith(".weight") and a.ndim >= 2 and not module.endswith("shared_expert_gate"):
            quant[module] = None
    if quantize_bits:
        for module, spec in quant.items():
            w = weights[f"{module}.weight"]
            if spec is None and w.shape[-1] % GROUP_SIZE == 0:
                q = mx.quantize(w, group_size=GROUP_SIZE, bits=quantize_bits)
                weights.update(zip([f"{module}.{p}" for p in ("weight", "scales", "biases")], q))
                quant[module] = (GROUP_SIZE, quantize_bits)
    return weights, quant, rope


def llama3_rope_scaling(rope_freqs: np.ndarray, config: dict) -> dict:
    """HF `rope_scaling` (llama3) for llama.cpp's `rope_freqs` tensor (head_dim/2 divisors).

    The factor is its largest entry; low/high frequency factors and the original context
    are Meta's values for Llama 3.1-3.3, checked by recomputing the whole tensor.
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor = float(rope_freqs.max())
    scaling = {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    wavelen = 2 * np.pi * config["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = np.clip((8192 / wavelen - 1.0) / (4.0 - 1.0), 0.0, 1.0)  # 0: scaled fully, 1: kept
    expected = 1 / ((1 - smooth) / factor + smooth)
    if rope_freqs.shape != expected.shape or not np.allclose(rope_freqs, expected, rtol=1e-3):
        raise ModelError("GGUF tensor rope_freqs does not match Llama 3 rope scaling "
                         f"(factor {factor:g}); this rope scaling is not supported")
    return scaling


def _quantization(quant: dict) -> dict | None:
    """mlx-lm's `quantization` entry: the commonest (group, bits[, mode]), plus per-module exceptions."""
    counts = Counter(spec for spec in quant.values() if spec is not None)
    if not counts:
        return None
    common = counts.most_common(1)[0][0]
    out = _spec_dict(common)
    for module, spec in sorted(quant.items()):
        if spec != common:  # float matrices: False; other widths or modes: their own params
            out[module] = False if spec is None else _spec_dict(spec, with_mode=len(common) > 2)
    return out


def _spec_dict(spec: tuple, with_mode: bool = False) -> dict:
    """(group, bits[, mode]) -> mlx-lm's dict; the mode written when it is not affine, or when
    the file-wide default it overrides is not (`with_mode`)."""
    out = {"group_size": spec[0], "bits": spec[1]}
    mode = spec[2] if len(spec) > 2 else "affine"
    return dict(out, mode=mode) if with_mode or mode != "affine" else out


def _hparams(path: Path, meta: dict, arch: str) -> dict:
    """The config.json entries that come from `{arch}.*` metadata (flat `rope_theta`)."""
    info = ARCHS[arch]
    config = {"model_type": info.model_type, "architectures": list(info.architectures)}
    for key, gguf_key in HPARAMS.items():
        value = meta.get(f"{arch}.{gguf_key}")
        if value is not None:
            config[key] = value
    if "intermediate_size" not in config and f"{arch}.expert_feed_forward_length" in meta:
        config["intermediate_size"] = meta[f"{arch}.expert_feed_forward_length"]  # MoE only
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                           "num_attention_heads", "rms_norm_eps") if k not in config]
    if missing:
        raise ModelError(f"{path.name}: GGUF metadata lacks "
                         f"{', '.join(f'{arch}.{HPARAMS[k]}' for k in missing)}; re-export the file")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("rope_theta", info.rope_theta)
    for key in ("rms_norm_eps", "rope_theta"):  # GGUF floats are float32: 9.99999974e-06 -> 1e-05
        config[key] = _f32(config[key])
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim and head_dim != config["hidden_size"] // config["num_attention_heads"]:
        config["head_dim"] = head_dim
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"type": scaling, "rope_type": scaling,
                                  "factor": _f32(meta[f"{arch}.rope.scaling.factor"])}
        if scaling == "yarn":
            config["rope_scaling"]["original_max_position_embeddings"] = meta.get(
                f"{arch}.rope.scaling.original_context_length", config.get("max_position_embeddings"))
            for beta in ("beta_fast", "beta_slow"):  # else mlx-lm's YaRN defaults (32, 1)
                if (value := meta.get(f"{arch}.rope.scaling.yarn_{beta}")) is not None:
                    config["rope_scaling"][beta] = _f32(value)
    arch_config(arch, meta, config)
    return config


def _complete_config(config: dict, meta: dict, weights: dict, quant: dict) -> None:
    """Add what the tensors tell: vocab size, tying, biases, quantization; and token ids."""
    config["vocab_size"] = weights["model.embed_tokens.weight"].shape[0]
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    if config["model_type"] == "llama" and "model.layers.0.self_attn.q_proj.bias" in weights:
        config["attention_bias"] = True
    if config["model_type"] == "llama" and "model.layers.0.mlp.up_proj.bias" in weights:
        config["mlp_bias"] = True
    for key in ("bos", "eos", "pad"):
        token_id = meta.get(f"tokenizer.ggml.{'padding' if key == 'pad' else key}_token_id")
        if token_id is not None:
            config[f"{key}_token_id"] = token_id
    if (quantization := _quantization(quant)) is not None:
        config["quantization"] = config["quantization_config"] = quantization


def _f32(x: float) -> float:
    """The shortest decimal of a float32 value (GGUF stores float32)."""
    return float(str(np.float32(x)))
