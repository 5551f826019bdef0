"""Import a llama.cpp GGUF file as an MLX model folder that `mlx_lm.load` reads.

Block-quantized matrices stay quantized as MLX affine triples (`.weight` uint32, `.scales`,
`.biases`; groups of 32): exactly where the block math is affine per 32 values, re-quantized
where it is not (see gguf_quants). Float matrices may be quantized with `quantize_bits`.
The tokenizer is rebuilt from `tokenizer.ggml.*`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config import check_bits
from ..errors import ModelError
from ..files import atomic_folder, check_output, open_gguf
from .gguf_quants import GROUP_SIZE, import_spec, read_tensor
from .gguf_tokenizer import build_tokenizer

# general.architecture -> HF config identity and default rope_theta; llama.cpp permutes
# the Q/K rows of "llama" only (convert_hf_to_gguf.py LlamaModel), never qwen2's.
ARCHS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], permuted_qk=True,
                  rope_theta=10000.0),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], permuted_qk=False,
                  rope_theta=1000000.0),
}

# GGUF module name -> mlx-lm/HF module name. The suffix (.weight, .bias, and MLX's
# .scales/.biases) is carried over, so qwen2's attn_q/k/v.bias map through the same rows.
TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{n}.attn_norm": "model.layers.{n}.input_layernorm",
    "blk.{n}.attn_q": "model.layers.{n}.self_attn.q_proj",
    "blk.{n}.attn_k": "model.layers.{n}.self_attn.k_proj",
    "blk.{n}.attn_v": "model.layers.{n}.self_attn.v_proj",
    "blk.{n}.attn_output": "model.layers.{n}.self_attn.o_proj",
    "blk.{n}.ffn_norm": "model.layers.{n}.post_attention_layernorm",
    "blk.{n}.ffn_gate": "model.layers.{n}.mlp.gate_proj",
    "blk.{n}.ffn_up": "model.layers.{n}.mlp.up_proj",
    "blk.{n}.ffn_down": "model.layers.{n}.mlp.down_proj",
}

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


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unmapped."""
    module, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", module)
    key = f"blk.{{n}}.{m[2]}" if m else module
    hf = TENSOR_NAMES.get(key)
    return None if hf is None else f"{hf.format(n=m[1] if m else '')}.{suffix}"


def unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's Q/K permutation: `w_hf = w_gguf[order]`.

    llama.cpp stores each head's rows as (head_dim/2, 2) where HF has (2, head_dim/2).
    """
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(rows)


def convert_gguf(gguf_path, out_dir, force: bool = False, quantize_bits: int | None = None,
                 flag: str | None = None, keep_float: bool = False) -> Path:
    """Write the MLX folder (config.json, model.safetensors, tokenizer files) for a GGUF file.

    Supports general.architecture llama and qwen2. `quantize_bits` (2-8) re-quantizes
    weights that come out as float (group size 32). `keep_float` imports the types with no
    exact MLX form (Q2_K, Q3_K, Q6_K) as float16 instead of re-quantizing them. Raises ModelError for a missing,
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
    weights, quant, rope_freqs = _load_weights(gguf_path, reader, config, quantize_bits, keep_float)
    _complete_config(config, meta, weights, quant)
    if rope_freqs is not None:
        config["rope_scaling"] = llama3_rope_scaling(np.array(rope_freqs, dtype=np.float64), config)
    tokenizer, tokenizer_config = build_tokenizer(meta)

    with atomic_folder(out_dir, force=force, error=ModelError, flag=flag) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir


def _read_tensors(reader, keep_float: bool) -> tuple[dict, dict]:
    """GGUF name -> mx.array (MLX's `.weight`/`.scales`/`.biases` for quantized matrices), and
    GGUF module -> (group size, bits) for the tensors kept quantized."""
    arrays, specs = {}, {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dim first
        stem, _, suffix = t.name.rpartition(".")
        matrix = suffix == "weight" and len(shape) >= 2
        parts, spec = read_tensor(t.name, t.tensor_type.name, t.data, shape, quantize=matrix,
                                  keep_float=keep_float)
        arrays.update({f"{stem}.{part}" if part != "weight" else t.name: a for part, a in parts.items()})
        if spec is not None:
            specs[stem] = spec
    return arrays, specs


def _load_weights(path: Path, reader, config: dict, quantize_bits: int | None, keep_float: bool):
    """mlx-lm weights; HF module -> (group_size, bits) or None (float matrix); rope_freqs."""
    arrays, specs = _read_tensors(reader, keep_float)
    rope_freqs = arrays.pop("rope_freqs.weight", None)  # Llama 3.1+ rope scaling, see below
    unknown = sorted(n for n in arrays if hf_name(n) is None)
    if unknown:
        raise ModelError(f"{path.name}: tensors with no mlx-lm name: {', '.join(unknown)}")
    permuted = ARCHS[config["model_type"]]["permuted_qk"]
    weights, quant = {}, {}
    for name, a in arrays.items():
        hf = hf_name(name)
        module = hf.rpartition(".")[0]
        if permuted and module.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"]
            a = a[mx.array(unpermute_rows(a.shape[0], heads))]
        weights[hf] = a
        stem = name.rpartition(".")[0]
        if stem in specs:
            quant[module] = specs[stem]
        elif hf.endswith(".weight") and a.ndim == 2:
            quant[module] = None
    if quantize_bits:
        for module, spec in quant.items():
            w = weights[f"{module}.weight"]
            if spec is None and w.shape[-1] % GROUP_SIZE == 0:
                q = mx.quantize(w, group_size=GROUP_SIZE, bits=quantize_bits)
                weights.update(zip([f"{module}.{p}" for p in ("weight", "scales", "biases")], q))
                quant[module] = (GROUP_SIZE, quantize_bits)
    return weights, quant, rope_freqs


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
    """mlx-lm's `quantization` entry: the commonest (group, bits), plus per-module exceptions."""
    counts = Counter(spec for spec in quant.values() if spec is not None)
    if not counts:
        return None
    group, bits = counts.most_common(1)[0][0]
    out = {"group_size": group, "bits": bits}
    for module, spec in sorted(quant.items()):
        if spec != (group, bits):  # float matrices: False; other widths: their own params
            out[module] = False if spec is None else {"group_size": spec[0], "bits": spec[1]}
    return out


def _hparams(path: Path, meta: dict, arch: str) -> dict:
    """The config.json entries that come from `{arch}.*` metadata (flat `rope_theta`)."""
    info = ARCHS[arch]
    config = {"model_type": info["model_type"], "architectures": info["architectures"]}
    for key, gguf_key in HPARAMS.items():
        value = meta.get(f"{arch}.{gguf_key}")
        if value is not None:
            config[key] = value
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                           "num_attention_heads", "rms_norm_eps") if k not in config]
    if missing:
        raise ModelError(f"{path.name}: GGUF metadata lacks "
                         f"{', '.join(f'{arch}.{HPARAMS[k]}' for k in missing)}; re-export the file")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("rope_theta", info["rope_theta"])
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
