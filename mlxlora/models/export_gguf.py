"""Export a plain mlx-lm model as one llama.cpp GGUF file (what llama.cpp, Ollama and LM Studio load).

Written through gguf-py's GGUFWriter, laid out as llama.cpp's convert_hf_to_gguf.py lays it out:
    tensor names     gguf-py's own HF -> GGUF table (get_tensor_name_map) for the architecture
    llama / mistral  Q/K rows permuted per head (formats.gguf_lora.permute_rows), biases too
    hparams          HPARAMS below into `{arch}.*`; Llama 3 rope scaling as the `rope_freqs` tensor
    tokenizer        export_gguf_vocab.add_tokenizer (vocab, merges, pre-tokenizer, chat template)
    tensor types     1-D tensors (norms, biases) stay F32; matrices in the chosen type (WRITTEN);
                     q4_0 keeps token_embd/output in Q8_0, as they hurt most when coarse.
K-quants (K_QUANTS) are made by llama.cpp's own `llama-quantize` from an F16 file written first.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..cache import cache_dir
from ..errors import ModelError
from ..files import atomic_folder
from ..formats.gguf_lora import permute_rows
from ..lora.surgery import adapter_layers
from .export_gguf_vocab import add_tokenizer
from .hf_export import hf_weights
from .modelfile import modelfile

# mlx-lm model_type -> (llama.cpp architecture, Q/K rows permuted)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
         "qwen3": ("qwen3", False)}
# config.json key -> (GGUF key after "{arch}.", kind)
HPARAMS = {
    "max_position_embeddings": ("context_length", int),
    "hidden_size": ("embedding_length", int),
    "num_hidden_layers": ("block_count", int),
    "intermediate_size": ("feed_forward_length", int),
    "num_attention_heads": ("attention.head_count", int),
    "num_key_value_heads": ("attention.head_count_kv", int),
    "rope_theta": ("rope.freq_base", float),
    "rms_norm_eps": ("attention.layer_norm_rms_epsilon", float),
    "vocab_size": ("vocab_size", int),
}
# --gguf-type -> (GGMLQuantizationType name for matrices, LlamaFileType name) for what gguf-py writes
WRITTEN = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
           "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
K_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}  # --gguf-type -> llama-quantize's name
QUANTIZE_TOOL = "llama-quantize"
BLOCK = 32  # Q8_0 / Q4_0 block length: rows whose length it does not divide stay F16


def check_gguf_exportable(model_type: str | None, gguf_type: str) -> None:
    """Raise ModelError (one line, with the fix) unless `model_type` can be written as `gguf_type`."""
    if model_type not in ARCHS:
        raise ModelError(f"export to GGUF: architecture (model_type) {model_type!r} is not supported yet "
                         f"(supported: {', '.join(ARCHS)})")
    if gguf_type in K_QUANTS and find_quantize_tool() is None:
        raise ModelError(f"--gguf-type {gguf_type} needs llama.cpp's {QUANTIZE_TOOL}, which is not on PATH "
                         f"(brew install llama.cpp, or build it: scripts/llama_cpp); or use --gguf-type q8_0 or "
                         "q4_0, which mlxlora writes itself")
    if gguf_type not in K_QUANTS and gguf_type not in WRITTEN:
        raise ModelError(f"--gguf-type must be one of {', '.join([*WRITTEN, *K_QUANTS])}, got {gguf_type!r}")


def find_quantize_tool() -> Path | None:
    """`llama-quantize` on PATH, else the newest one scripts/llama_cpp built into the mlxlora cache."""
    found = shutil.which(QUANTIZE_TOOL)
    if found:
        return Path(found)
    built = sorted((cache_dir() / "llama.cpp").glob(f"*/bin/{QUANTIZE_TOOL}"))
    return next((p for p in reversed(built) if os.access(p, os.X_OK)), None)


def gguf_tensors(model, config: dict) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 array (HF shape)} of a plain mlx-lm model, Q/K permuted for llama."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch, permuted = ARCHS[config.get("model_type")]
    names = get_tensor_name_map({v: k for k, v in MODEL_ARCH_NAMES.items()}[arch], config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    out, unknown = {}, []
    for hf, value in hf_weights(model, config.get("model_type"), mx.float32).items():
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(hf)
            continue
        a = np.array(value, dtype=np.float32)
        module = hf.rsplit(".", 2)[-2]
        if permuted and module in heads:
            a = a[permute_rows(a.shape[0], heads[module])]
        out[name] = a
    if unknown:
        raise ModelError(f"export to GGUF: llama.cpp's {arch} has no tensor for {', '.join(sorted(unknown))}")
    return out


def _rope(writer, arch: str, config: dict, head_dim: int) -> np.ndarray | None:
    """Write the rope scaling keys; returns Llama 3's `rope_freqs` tensor (head_dim/2 divisors) or None."""
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if not kind or kind == "default":
        return None
    if kind == "linear":
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", float(scaling["factor"]))
        return None
    if kind != "llama3":
        raise ModelError(f"export to GGUF: rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
    # Meta's Llama 3.1 rule: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi * config["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1.0 - smooth) / factor + smooth)).astype(np.float32)


def _add_hparams(writer, arch: str, config: dict, n_vocab: int) -> int:
    """The `{arch}.*` keys; returns head_dim."""
    values = {**config, "vocab_size": n_vocab}
    values.setdefault("num_key_value_heads", config["num_attention_heads"])
    for key, (gguf_key, kind) in HPARAMS.items():
        if values.get(key) is not None:
            (writer.add_uint32 if kind is int else writer.add_float32)(f"{arch}.{gguf_key}", kind(values[key]))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    return head_dim


def _typed(name: str, a: np.ndarray, gguf_type: str):
    """(data, raw_dtype or None) of tensor `name` in `gguf_type` (WRITTEN's rules)."""
    from gguf import GGMLQuantizationType, quants

    kind = WRITTEN[gguf_type][0]
    if a.ndim < 2 or kind == "F32":
        return a, None
    if kind == "Q4_0" and name.split(".")[0] in ("token_embd", "output"):
        kind = "Q8_0"
    if kind in ("Q8_0", "Q4_0") and a.shape[-1] % BLOCK:
        kind = "F16"
    if kind == "F16":
        return a.astype(np.float16), None
    qtype = GGMLQuantizationType[kind]
    return quants.quantize(a, qtype), qtype


def write_gguf(model, config: dict, tokenizer_dir, out_file, gguf_type: str = "f16", name: str | None = None):
    """Write `model` (plain mlx-lm, `config` its config.json) as GGUF `out_file` in a WRITTEN type.

    Not atomic (export_gguf stages it). Returns the VocabInfo of the tokenizer written.
    """
    from gguf import GGUFWriter, LlamaFileType

    arch = ARCHS[config["model_type"]][0]
    tensors = gguf_tensors(model, config)
    writer = GGUFWriter(str(out_file), arch)
    if name:
        writer.add_name(name)
    writer.add_file_type(LlamaFileType[WRITTEN[gguf_type][1]])
    writer.add_quantization_version(2)
    n_vocab = tensors["token_embd.weight"].shape[0]
    head_dim = _add_hparams(writer, arch, config, n_vocab)
    rope_freqs = _rope(writer, arch, config, head_dim)
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs
    vocab = add_tokenizer(writer, Path(tokenizer_dir), n_vocab)
    for tensor_name, a in tensors.items():
        data, raw = _typed(tensor_name, a, gguf_type)
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vocab


def llama_quantize(src: Path, dst: Path, gguf_type: str) -> None:
    """Run llama.cpp's llama-quantize src -> dst in K_QUANTS[gguf_type]; ModelError with its last line."""
    tool = find_quantize_tool()
    if tool is None:
        check_gguf_exportable("llama", gguf_type)  # raises the one-line "not on PATH" error
    done = subprocess.run([str(tool), str(src), str(dst), K_QUANTS[gguf_type], str(os.cpu_count() or 1)],
                          capture_output=True, text=True)
    if done.returncode != 0 or not dst.is_file():
        last = ([line for line in (done.stderr + done.stdout).splitlines() if line.strip()] or ["no output"])[-1]
        raise ModelError(f"{tool} failed ({done.returncode}) making {K_QUANTS[gguf_type]}: {last.strip()}")


def gguf_file_name(out_dir, gguf_type: str) -> str:
    """The GGUF file's name inside the export folder: `<folder name>-<type>.gguf`."""
    return f"{Path(out_dir).name}-{gguf_type}.gguf"


def export_gguf(model, config: dict, tokenizer_dir, out_dir, gguf_type: str = "f16", *, force: bool = False,
                extra_files: dict[str, str] | None = None, flag: str | None = None) -> Path:
    """Write folder `out_dir`: `<name>-<gguf_type>.gguf`, an Ollama `Modelfile`, and `extra_files`.

    model: a plain mlx-lm model (quantized layers are dequantized); config: its config.json dict;
    tokenizer_dir: the folder holding tokenizer.json. Atomic; an existing non-empty `out_dir` is
    replaced only with `force`. Raises ModelError (architecture, tokenizer, adapters still present,
    K-quant without llama-quantize). Returns `out_dir`.
    """
    check_gguf_exportable(config.get("model_type"), gguf_type)
    if adapter_layers(model):
        raise ModelError("export to GGUF: the model still has adapters; fuse them first (mlxlora fuse)")
    file_name = gguf_file_name(out_dir, gguf_type)
    with atomic_folder(out_dir, force=force, error=ModelError, flag=flag) as tmp:
        if gguf_type in K_QUANTS:
            staged = tmp / f".{Path(out_dir).name}-f16.gguf"
            vocab = write_gguf(model, config, tokenizer_dir, staged, "f16", name=Path(out_dir).name)
            llama_quantize(staged, tmp / file_name, gguf_type)
            staged.unlink()
        else:
            vocab = write_gguf(model, config, tokenizer_dir, tmp / file_name, gguf_type, name=Path(out_dir).name)
        (tmp / "Modelfile").write_text(modelfile(file_name, vocab.chat_template, vocab.eos))
        for extra, text in (extra_files or {}).items():
            (tmp / extra).write_text(text)
    return Path(out_dir)


__all__ = ["ARCHS", "HPARAMS", "WRITTEN", "K_QUANTS", "check_gguf_exportable", "find_quantize_tool", "gguf_tensors",
           "write_gguf", "llama_quantize", "gguf_file_name", "export_gguf"]
