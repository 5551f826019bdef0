"""Fusing an adapter into MoE experts (LoRASwitchLinear over SwitchLinear / QuantizedSwitchLinear).

A float base gets the exact fuse, W[e] + delta[e], from the layer's own `fuse()`. A quantized base is
re-quantized one expert at a time with the same strategies as a dense layer (requant.py): each
expert's (out, in) slice is a quantized matrix with its own grid, so "grid" keeps every weight the
delta does not move bit-identical there too. Experts get no calibration Hessian (tokens reach each
expert through the router, which the Hessian collector does not follow): gptq/refit then minimise
the weight error, as for a layer without calibration rows.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from ..lora.switch import LoRASwitchLinear, switch_weight
from . import requant as R


def is_switch(layer) -> bool:
    return isinstance(layer, LoRASwitchLinear)


def weight_np(layer) -> np.ndarray:
    """The float32 weight of a (quantized) switch layer as numpy: (E, out, in)."""
    return np.array(switch_weight(layer).astype(mx.float32))


def _expert(base: QuantizedSwitchLinear, e: int) -> nn.QuantizedLinear:
    """Expert e of a quantized switch layer as a QuantizedLinear holding its slices (no copy of the rest)."""
    layer = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
    nn.Module.__init__(layer)
    layer.group_size, layer.bits, layer.mode = base.group_size, base.bits, base.mode
    layer.weight, layer.scales = base.weight[e], base.scales[e]
    if base.get("biases") is not None:
        layer.biases = base.biases[e]
    return layer


def fuse_switch(layer: LoRASwitchLinear, bits: int | None, group_size: int | None, strategy: str, damp: float,
                dtypes: dict, path: str):
    """(fused switch layer, base float weight (E, out, in), exact fused float weight, strategy used)."""
    base = layer.linear
    w0 = weight_np(base)
    dense = layer.fuse(dequantize=True)
    wf = np.array(dense.weight.astype(mx.float32))
    if not isinstance(base, QuantizedSwitchLinear):
        dense.weight = dense.weight.astype(dtypes.get(f"{path}.weight", dense.weight.dtype))
        return dense, w0, wf, "dense"
    scale_dtype = dtypes.get(f"{path}.scales", base.scales.dtype)
    if bits == 0:
        dense.weight = dense.weight.astype(scale_dtype)
        return dense, w0, wf, "dense"
    if base.mode != "affine" or base.get("global_scale") is not None:
        return layer.fuse(), w0, wf, "naive"
    bits, group_size = bits or base.bits, group_size or base.group_size
    parts = []
    for e in range(base.num_experts):
        view = _expert(base, e)
        grid = R.target_grid(view, wf[e], bits, group_size, scale_dtype)
        q, g = R.STRATEGIES[strategy](wf[e], grid, None, damp, scale_dtype)
        parts.append(R.quantized_layer(view, q, g, scale_dtype))
    fused = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)  # skip __init__: it quantizes a random weight
    nn.Module.__init__(fused)
    fused.group_size, fused.bits, fused.mode = group_size, bits, "affine"
    fused.weight = mx.stack([p.weight for p in parts])  # (E, out, in * bits / 32)
    fused.scales = mx.stack([p.scales for p in parts])
    fused.biases = mx.stack([p.biases for p in parts])
    fused.global_scale = None
    if "bias" in base:
        fused.bias = base.bias
    fused.freeze()
    return fused, w0, wf, strategy


__all__ = ["is_switch", "weight_np", "fuse_switch"]
