"""How a fused model is stored: the base's float dtypes per parameter (read from its safetensors headers),
float layers for a float fuse, and the `quantization` entry of config.json (per-layer widths included)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..files import tensor_headers
from ..lora.quant import QUANTIZED_TYPES
from ..lora.switch import QuantizedSwitchLinear, plain_switch, switch_weight


_FILE_DTYPES = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}


def storage_dtypes(path) -> dict:
    """{parameter name: float dtype} as stored in a model folder's safetensors files (headers only)."""
    out = {}
    for f in sorted(Path(path).glob("model*.safetensors")) if path is not None else []:
        out.update({k: _FILE_DTYPES[v["dtype"]] for k, v in tensor_headers(f).items() if v.get("dtype") in _FILE_DTYPES})
    return out


def default_dtype(dtypes: dict):
    """The most common stored float dtype (for parameters whose stored name differs), or None."""
    names = [str(d) for d in dtypes.values()]
    return next((d for d in dtypes.values() if str(d) == max(set(names), key=names.count)), None)


def cast_to_storage(model, dtypes: dict) -> None:
    """Floating parameters back to the dtype the base stored them in (load_base computes in float32 on CPU)."""
    default = default_dtype(dtypes)
    if default is None:
        return
    model.update(tree_unflatten([(k, v.astype(dtypes.get(k, default))) for k, v in tree_flatten(model.parameters())
                                 if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtypes.get(k, default)]))


def dequantize_all(model, dtypes: dict) -> None:
    """Every quantized layer left (the untouched ones) as a float layer in its scales' stored dtype."""
    new = []
    for path, m in model.named_modules():
        if isinstance(m, QuantizedSwitchLinear):  # MoE experts: one float SwitchLinear
            new.append((path, plain_switch(switch_weight(m).astype(dtypes.get(f"{path}.scales", m.scales.dtype)),
                                           m.get("bias"))))
        elif isinstance(m, QUANTIZED_TYPES):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode)
            w = w.astype(dtypes.get(f"{path}.scales", m.scales.dtype))
            if isinstance(m, nn.QuantizedEmbedding):
                layer = nn.Embedding(*w.shape)
            else:
                layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
                if "bias" in m:
                    layer.bias = m.bias
            layer.weight = w
            new.append((path, layer))
    if new:
        model.update_modules(tree_unflatten(new))


def quantization_config(model, base_quantization: dict | None) -> dict | None:
    """config.json's `quantization` for `model`: the base's default plus one entry per layer that differs.

    mlx-lm's load_model hands a per-path entry ({"group_size", "bits"}) to that layer's to_quantized,
    which is how mixed widths (and the base's own overrides, e.g. an 8-bit embedding) load back.
    """
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES + (QuantizedSwitchLinear,))]
    if not layers:
        return None
    base_q = base_quantization or {}
    q = {k: v for k, v in base_q.items() if not isinstance(v, (dict, bool))}
    if "bits" not in q or "group_size" not in q:
        widths = [(m.group_size, m.bits) for _, m in layers]
        q["group_size"], q["bits"] = max(set(widths), key=widths.count)
    default = (q["group_size"], q["bits"], q.get("mode", "affine"))
    for path, m in sorted(layers, key=lambda pm: pm[0]):
        if (m.group_size, m.bits, m.mode) != default:
            q[path] = {"group_size": m.group_size, "bits": m.bits}
            if m.mode != "affine":
                q[path]["mode"] = m.mode
    q.update({k: False for k, v in base_q.items() if v is False})  # layers the base keeps in float
    return q
