"""Export a plain mlx-lm model as a Hugging Face transformers folder.

What mlx-lm's `sanitize` changed on load is undone per architecture (EXPORT_TABLE): for
the architectures below it only drops `rotary_emb.inv_freq` (transformers recomputes it)
and the tied `lm_head.weight` (transformers re-ties it from `tie_word_embeddings`), so
nothing needs adding back. Quantized layers are dequantized; `config.json` loses its
`quantization` key.

Above `max_shard_size` the weights are split the way transformers' `save_pretrained` does
(names in sorted order, a new shard when the next tensor would pass the limit, a tensor over
the limit alone), into `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import check_dtype, parse_size
from ..errors import ModelError
from ..files import atomic_folder
from ..formats.names import mlx_to_hf
from ..lora.quant import QUANTIZED_TYPES, dequantize_weight
from ..lora.surgery import adapter_layers
from .load import MX_DTYPES

# model_type -> a function (hf weights, config) -> hf weights that undoes mlx-lm's sanitize, or None.
EXPORT_TABLE: dict[str, Callable[[dict, dict], dict] | None] = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "gemma": None,
    "gemma2": None,
    "phi3": None,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_DROP_CONFIG_KEYS = ("quantization", "quantization_config")
INDEX_FILE = "model.safetensors.index.json"
# config.json keys that transformers copies into a generation_config.json it makes itself.
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_weights(model: nn.Module, model_type: str | None, dtype=mx.float32) -> dict[str, mx.array]:
    """{HF parameter name: array} of a plain mlx-lm model; quantized layers dequantized, floats cast to `dtype`."""
    weights = dict(tree_flatten(model.parameters()))
    for path, module in model.named_modules():
        if isinstance(module, QUANTIZED_TYPES):
            prefix = f"{path}." if path else ""
            weights[prefix + "weight"] = dequantize_weight(module)
            for name in ("scales", "biases"):
                weights.pop(prefix + name, None)
    return {mlx_to_hf(k, model_type): v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()}


def check_exportable(model_type: str | None) -> None:
    """Raise ModelError (naming the architecture and why) unless `model_type` can be exported."""
    if model_type not in EXPORT_TABLE:
        raise ModelError(f"export to transformers: architecture (model_type) {model_type!r} is not supported yet: "
                         "mlxlora has no rule in convert/hf.py EXPORT_TABLE to undo what mlx-lm changed in its "
                         "weights, so transformers could load wrong values; "
                         f"supported: {', '.join(sorted(EXPORT_TABLE))}")


def shard_names(weights: dict[str, mx.array], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, split as transformers' save_pretrained does (see the module docstring)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in sorted(weights):
        n = weights[name].nbytes
        if n > max_bytes:
            shards.append([name])
            continue
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


def save_weights(weights: dict[str, mx.array], folder: Path, max_shard_size: int | str | None = None) -> list[str]:
    """Write `weights` into `folder` as transformers names its files; returns the file names written.

    One `model.safetensors` when everything fits (or no limit); otherwise the shards and the
    index ({"metadata": {"total_parameters", "total_size"}, "weight_map": {name: file}}).
    """
    shards = shard_names(weights, parse_size(max_shard_size)) if max_shard_size is not None else [sorted(weights)]
    if len(shards) <= 1:
        mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / file), {k: weights[k] for k in names}, metadata={"format": "pt"})
        weight_map.update((k, file) for k in names)
        files.append(file)
    index = {"metadata": {"total_parameters": sum(v.size for v in weights.values()),
                          "total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX_FILE]


def generation_config(config: dict) -> dict | None:
    """What transformers would put in generation_config.json from `config` (bos/eos/pad ids), or None."""
    known = {k: config[k] for k in _GENERATION_KEYS if config.get(k) is not None}
    if "eos_token_id" not in known and "bos_token_id" not in known:
        return None
    return {"_from_model_config": True, **known}


def export_hf(model: nn.Module, config: dict, tokenizer_dir, out_dir, dtype: str = "float32", *,
              force: bool = False, max_shard_size: int | str | None = None,
              extra_files: dict[str, str] | None = None, flag: str | None = None) -> Path:
    """Write `model` (a plain mlx-lm model, `config` its config.json dict) as a transformers folder.

    Writes model.safetensors (HF names, `dtype`; sharded with an index above `max_shard_size`),
    config.json (no quantization key; `torch_dtype`/`dtype` = `dtype`), the tokenizer files found in
    `tokenizer_dir`, generation_config.json (copied, or made from the config's bos/eos ids when
    known) and `extra_files` ({name: text}, e.g. a README.md card). Atomic; an existing non-empty
    `out_dir` is replaced only with `force`. Raises ModelError for an unsupported architecture,
    a model that still has adapters, an unknown dtype or a bad shard size.
    """
    model_type = config.get("model_type")
    check_exportable(model_type)
    if max_shard_size is not None:
        parse_size(max_shard_size)  # a bad value fails before any work
    check_dtype(dtype)
    if adapter_layers(model):
        raise ModelError("export to transformers: the model still has adapters; fuse them first (mlxlora fuse)")
    weights = hf_weights(model, model_type, MX_DTYPES[dtype])
    undo = EXPORT_TABLE[model_type]
    if undo is not None:
        weights = undo(weights, config)
    hf_config = {k: v for k, v in config.items() if k not in _DROP_CONFIG_KEYS}
    hf_config["torch_dtype"] = dtype  # transformers 4 reads this key,
    hf_config["dtype"] = dtype  # transformers 5 this one
    tok_dir = Path(tokenizer_dir)
    with atomic_folder(out_dir, force=force, error=ModelError, flag=flag) as tmp:
        save_weights(weights, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
        gen = generation_config(hf_config)
        if gen is not None and not (tmp / "generation_config.json").exists():
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


__all__ = ["EXPORT_TABLE", "TOKENIZER_FILES", "INDEX_FILE", "hf_weights", "export_hf", "check_exportable",
           "shard_names", "save_weights", "generation_config"]
