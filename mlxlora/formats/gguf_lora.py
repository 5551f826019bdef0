"""Export an adapter as a llama.cpp LoRA GGUF file (what `llama-cli --lora` / `llama-server --lora` load).

The layout follows llama.cpp's convert_lora_to_gguf.py and src/llama-adapter.cpp:
    general.architecture  the base's llama.cpp architecture (llama.cpp refuses a mismatch)
    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (float32)
    <base tensor name>.lora_a / .lora_b, e.g. blk.3.attn_q.weight.lora_a; numpy shapes (GGUFWriter
    stores them reversed as ggml's ne; GGUFReader reverses back):
        linear      lora_a (r, in),        lora_b (out, r)     PEFT's lora_A / lora_B = our lora_a.T / lora_b.T
        token_embd  lora_a (n_vocab, r),   lora_b (n_embd, r)  our lora_a / lora_b.T
llama.cpp adds (alpha / r) * lora_b @ lora_a, r being lora_b's last numpy dim, so alpha = scale * r.
One alpha serves every layer: a layer whose scale * r differs has the ratio folded into its lora_b.
For the "llama" architecture llama.cpp stores Q/K rows permuted per head (convert_hf_to_gguf.py
LlamaModel.permute); the same row permutation is applied to lora_b of q_proj (n_head) and k_proj (n_kv_head).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import AdapterError, ModelError, choice_error, exists_error
from ..files import atomic_file, open_gguf, read_json, tensor_headers
from .names import mlx_to_hf
from .record import AdapterRecord

# mlx-lm / HF model_type -> llama.cpp architecture (convert_hf_to_gguf.py registers Mistral as LlamaModel)
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_QK = {"llama"}  # architectures whose Q/K rows llama.cpp permutes
DTYPES = {"float32": np.float32, "float16": np.float16}


def permute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's Q/K permutation: `w_gguf = w_hf[order]`.

    Each head's rows go from HF's (2, head_dim/2) halves to (head_dim/2, 2) interleaved pairs.
    """
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


@dataclass
class BaseInfo:
    """What the export needs to know about the base model."""

    arch: str                    # llama.cpp architecture
    n_head: int | None = None
    n_kv_head: int | None = None
    tied: bool | None = None     # output head is the token embedding; None: unknown


def base_info_for(model_type: str | None) -> BaseInfo:
    """Only the architecture, from an adapter's recorded model_type (no head counts: no Q/K permutation)."""
    if model_type not in ARCHS:
        raise AdapterError("export to GGUF: the adapter does not say its architecture; give --model (the base)")
    return BaseInfo(ARCHS[model_type])


def base_info_from_folder(folder: Path) -> BaseInfo:
    """BaseInfo of a model folder: config.json, and the weight names for tying. Raises ModelError / AdapterError."""
    config = read_json(folder / "config.json", ModelError)
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise AdapterError(f"export to GGUF: model_type {mt!r} is not supported (supported: {', '.join(ARCHS)})")
    heads = config.get("num_attention_heads")
    return BaseInfo(ARCHS[mt], heads, config.get("num_key_value_heads") or heads, _ties(folder, config))


def _ties(folder: Path, config: dict) -> bool:
    """Whether the output head is the embedding: the weights hold no lm_head.weight."""
    names = set()
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = set(read_json(index, ModelError).get("weight_map", {}))
    else:
        for f in folder.glob("model*.safetensors"):
            names |= set(tensor_headers(f, ModelError))
    if names:
        return "lm_head.weight" not in names
    return bool(config.get("tie_word_embeddings", False))


def base_info_from_gguf(path: Path) -> BaseInfo:
    """BaseInfo of a .gguf base from its metadata. Raises ModelError / AdapterError."""
    reader, meta = open_gguf(Path(path), ModelError)
    arch = meta.get("general.architecture")
    if arch not in set(ARCHS.values()):
        raise AdapterError(f"{Path(path).name}: GGUF architecture {arch!r} is not supported "
                           f"(supported: {', '.join(sorted(set(ARCHS.values())))})")
    heads = meta.get(f"{arch}.attention.head_count")
    return BaseInfo(arch, heads, meta.get(f"{arch}.attention.head_count_kv") or heads,
                    "output.weight" not in {t.name for t in reader.tensors})


def write(src: AdapterRecord, out_file, info: BaseInfo, force: bool = False, dtype: str = "float32") -> Path:
    """Write `src` as a llama.cpp LoRA GGUF file (atomic; an existing file only with `force`).

    info: the base's architecture and head counts (needed for the Q/K permutation of llama-family
    models) and whether its head is tied to the embedding. dtype: "float32" or "float16" tensors.
    Raises AdapterError for DoRA (llama.cpp has none), an embedding adapter on a tied head (llama.cpp
    adapts only the input lookup), a module llama.cpp has no tensor for, or an existing file without force.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    out = Path(out_file)
    if out.exists() and not force:
        raise exists_error(out, what="file name", cls=AdapterError)
    if dtype not in DTYPES:
        raise choice_error("dtype", dtype, DTYPES, AdapterError)
    if src.config.use_dora:
        raise AdapterError(f"{src.path}: llama.cpp has no DoRA; fuse the adapter into the model instead "
                           "(mlxlora fuse) and convert that")
    experts = [p for p in src.module_paths if src.layers[p].experts]
    if experts:
        raise AdapterError(f"{src.path}: {experts[0]} adapts MoE experts, which this GGUF LoRA export does not write; "
                           "fuse the adapter into the model instead (mlxlora fuse) and convert that")
    paths = src.module_paths
    names = get_tensor_name_map({v: k for k, v in MODEL_ARCH_NAMES.items()}[info.arch],
                                1 + max((int(t) for p in paths for t in p.split(".") if t.isdigit()), default=0))
    ranks = {p: src.layers[p].rank for p in paths}
    scales = {p: src.layers[p].scale for p in paths}
    r0, s0 = Counter((ranks[p], scales[p]) for p in paths).most_common(1)[0][0]
    alpha = s0 * r0
    tensors, unknown = {}, []
    for p in paths:
        name = names.get_name(mlx_to_hf(p, src.model_type) + ".weight", try_suffixes=(".weight",))
        if name is None:
            unknown.append(p)
            continue
        a = np.array(src.layers[p].lora_a.astype(mx.float32))
        # llama.cpp scales each layer by alpha / its rank
        b = np.array(src.layers[p].lora_b_for(alpha / ranks[p]).astype(mx.float32)).T  # (out, r)
        if p in src.embeddings:
            _check_embedding(p, info, src.tied_head)
            tensors[name + ".lora_a"], tensors[name + ".lora_b"] = a, b  # (n_vocab, r), (n_embd, r)
            continue
        if info.arch in PERMUTED_QK and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = info.n_head if name.split(".")[-2] == "attn_q" else info.n_kv_head
            if heads is None:
                raise AdapterError(f"export to GGUF: {p} needs llama.cpp's Q/K row permutation; give --model "
                                   "(the base) for its head counts")
            b = b[permute_rows(b.shape[0], heads)]
        tensors[name + ".lora_a"], tensors[name + ".lora_b"] = a.T, b  # (r, in), (out, r)
    if unknown:
        raise AdapterError(f"export to GGUF: llama.cpp's {info.arch} has no tensor for {', '.join(unknown)}")
    _write(out, info.arch, alpha, {k: np.ascontiguousarray(v, DTYPES[dtype]) for k, v in tensors.items()},
           src.base_model, force)
    return out


def _check_embedding(path: str, info: BaseInfo, tied_in_file: bool | None) -> None:
    tied = info.tied if info.tied is not None else tied_in_file
    if tied is None:
        raise AdapterError(f"export to GGUF: {path} has an adapter; give --model (the base) to tell whether its "
                           "output head is tied to the embedding")
    if tied:
        raise AdapterError(f"export to GGUF: {path} is tied to the output head; llama.cpp applies a token_embd "
                           "adapter to the input lookup only, mlxlora to both, so outputs would differ. "
                           "Train without the embedding, or fuse (mlxlora fuse) and convert the model")


def _write(out: Path, arch: str, alpha: float, tensors: dict[str, np.ndarray], base_model: str | None,
           force: bool) -> None:
    """GGUFWriter into a temporary sibling, renamed into place when complete."""
    from gguf import GGUFType, GGUFWriter, Keys

    with atomic_file(out, force=force, flag="OUT") as tmp:
        w = GGUFWriter(str(tmp), arch)
        w.add_type(GGUFType.ADAPTER)
        w.add_string(Keys.Adapter.TYPE, "lora")
        w.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
        if base_model:
            w.add_name(f"{Path(str(base_model)).name} LoRA")
        for name, value in tensors.items():
            w.add_tensor(name, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


__all__ = ["ARCHS", "PERMUTED_QK", "BaseInfo", "base_info_for", "base_info_from_folder", "base_info_from_gguf",
           "permute_rows", "write"]
