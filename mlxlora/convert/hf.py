"""Export a plain mlx-lm model as a Hugging Face transformers folder.

What mlx-lm's `sanitize` changed on load is undone per architecture (EXPORT_TABLE): for
the architectures below it only drops `rotary_emb.inv_freq` (transformers recomputes it)
and the tied `lm_head.weight` (transformers re-ties it from `tie_word_embeddings`), so
nothing needs adding back. Quantized layers are dequantized; `config.json` loses its
`quantization` key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ModelError
from ..quant import dequantize_weight
from .names import mlx_to_hf

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
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_DROP_CONFIG_KEYS = ("quantization", "quantization_config")


def hf_weights(model: nn.Module, model_type: str | None, dtype=mx.float32) -> dict[str, mx.array]:
    """{HF parameter name: array} of a plain mlx-lm model; quantized layers dequantized, floats cast to `dtype`."""
    weights = dict(tree_flatten(model.parameters()))
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            prefix = f"{path}." if path else ""
            weights[prefix + "weight"] = dequantize_weight(module)
            for name in ("scales", "biases"):
                weights.pop(prefix + name, None)
    return {mlx_to_hf(k, model_type): v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()}


def export_hf(model: nn.Module, config: dict, tokenizer_dir, out_dir, dtype: str = "float32", *,
              force: bool = False) -> Path:
    """Write `model` (a plain mlx-lm model, `config` its config.json dict) as a transformers folder.

    Writes model.safetensors (HF names, `dtype`), config.json (no quantization key) and the
    tokenizer files found in `tokenizer_dir`. Atomic; an existing non-empty `out_dir` is replaced
    only with `force`. Raises ModelError for an unsupported architecture, a model that still has
    adapters, or an unknown dtype.
    """
    from ..adapters import atomic_folder
    from ..surgery import adapter_layers

    model_type = config.get("model_type")
    if model_type not in EXPORT_TABLE:
        raise ModelError(f"export to transformers: model_type {model_type!r} is not supported yet; "
                         f"supported: {', '.join(sorted(EXPORT_TABLE))}")
    if dtype not in DTYPES:
        raise ModelError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if adapter_layers(model):
        raise ModelError("export to transformers: the model still has adapters; fuse them first (mlxlora fuse)")
    weights = hf_weights(model, model_type, DTYPES[dtype])
    undo = EXPORT_TABLE[model_type]
    if undo is not None:
        weights = undo(weights, config)
    hf_config = {k: v for k, v in config.items() if k not in _DROP_CONFIG_KEYS}
    hf_config["torch_dtype"] = dtype
    tok_dir = Path(tokenizer_dir)
    with atomic_folder(out_dir, force=force, error=ModelError) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
    return Path(out_dir)


__all__ = ["EXPORT_TABLE", "TOKENIZER_FILES", "hf_weights", "export_hf"]
