"""LoRA on mixture-of-experts layers: one low-rank pair per expert over mlx-lm's SwitchLinear.

mlx-lm keeps the E experts of an MoE block in one `SwitchLinear` (weight (E, out, in)) or
`QuantizedSwitchLinear`, called as `layer(x, indices)` with the expert index of every (token, slot).
`LoRASwitchLinear` adds `scale * x @ lora_a[e] @ lora_b[e]` for the expert e each token is routed to,
with the same `mx.gather_mm` and the same indices as the base, so only routed (token, expert) pairs
are computed; there is no loop over experts.

Layout, per expert as for a dense layer: lora_a (E, in, r), lora_b (E, r, out); the update of
expert e in the base layout is scale * (lora_a[e] @ lora_b[e]).T, (out, in). mlx-lm's own
LoRASwitchLinear stores the transposes, lora_a (E, r, in) and lora_b (E, out, r) (formats/mlx_lm.py).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .quant import weight_shape

SWITCH_TYPES = (SwitchLinear, QuantizedSwitchLinear)


def switch_dims(layer) -> tuple[int, int, int]:
    """(num_experts, input_dims, output_dims) of a SwitchLinear / QuantizedSwitchLinear."""
    return layer.num_experts, layer.input_dims, layer.output_dims


def switch_weight(layer) -> mx.array:
    """The float weight (E, out, in) of a switch layer, dequantized when quantized."""
    if isinstance(layer, QuantizedSwitchLinear):
        if layer.get("global_scale") is not None:
            return mx.dequantize(layer.weight, layer.scales, None, group_size=layer.group_size, bits=layer.bits,
                                 mode=layer.mode, global_scale=layer.global_scale)
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                             bits=layer.bits, mode=layer.mode)
    return layer.weight


def plain_switch(weight: mx.array, bias: mx.array | None) -> SwitchLinear:
    """A SwitchLinear holding `weight` (E, out, in) and `bias` (E, out) or no bias."""
    e, out_dims, in_dims = weight.shape
    layer = SwitchLinear(in_dims, out_dims, e, bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


class LoRASwitchLinear(nn.Module):
    """y = base(x, indices) + scale * gather(dropout(x) @ lora_a[e] @ lora_b[e]), e = indices."""

    @classmethod
    def from_base(cls, linear: nn.Module, r: int = 8, scale: float = 2.0, dropout: float = 0.0):
        e, in_dims, out_dims = switch_dims(linear)
        layer = cls(in_dims, out_dims, e, r=r, scale=scale, dropout=dropout)
        layer.linear = linear
        return layer

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, r: int = 8, scale: float = 2.0,
                 dropout: float = 0.0):
        super().__init__()
        self.linear = SwitchLinear(input_dims, output_dims, num_experts, bias=False)  # lazy: replaced by from_base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = float(scale)
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(num_experts, input_dims, r))
        self.lora_b = mx.zeros((num_experts, r, output_dims))

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    @property
    def num_experts(self) -> int:
        return self.lora_a.shape[0]

    def delta(self) -> mx.array:
        """The update of every expert in the base layout, scale * (lora_a @ lora_b).T: (E, out, in), float32."""
        ab = self.lora_a.astype(mx.float32) @ self.lora_b.astype(mx.float32)  # (E, in, out)
        return self.scale * ab.swapaxes(-1, -2)

    def __call__(self, x, indices, sorted_indices: bool = False):
        # x: (..., 1, in) broadcast against indices (...,) as the base layer takes it -> (..., 1, out)
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(self.dropout(x), self.lora_a, rhs_indices=indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A new SwitchLinear with W[e] + delta[e]; re-quantized naively (same bits/group, per expert as
        mlx-lm quantizes them) when the base was quantized and `dequantize` is False."""
        base = self.linear
        w = switch_weight(base)
        fused = plain_switch((w.astype(mx.float32) + self.delta()).astype(w.dtype), base.get("bias"))
        if isinstance(base, QuantizedSwitchLinear) and not dequantize:
            fused = fused.to_quantized(group_size=base.group_size, bits=base.bits, mode=base.mode,
                                       global_scale=base.get("global_scale") is not None)
        return fused


def routers(model: nn.Module) -> set[str]:
    """Paths of the router Linear of every MoE block: a Linear beside a switch layer's container (its
    parent is the switch layer's parent or grandparent, `mlp.gate` beside `mlp.switch_mlp.up_proj`) whose
    output size is that layer's expert count. A shared expert's scalar gate (output 1) is no router."""
    blocks: dict[str, int] = {}
    for path, module in model.named_modules():
        if isinstance(module, SWITCH_TYPES):
            parts = path.split(".")
            for up in (1, 2):
                if len(parts) > up:
                    blocks[".".join(parts[:-up])] = module.num_experts
    found = set()
    for path, module in model.named_modules():
        parent = path.rpartition(".")[0]
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and parent in blocks and weight_shape(module)[0] == blocks[parent]:
            found.add(path)
    return found


__all__ = ["SWITCH_TYPES", "LoRASwitchLinear", "switch_dims", "switch_weight", "plain_switch", "routers"]
