"""LoRA and DoRA layers that wrap a base Linear / QuantizedLinear / Embedding.

Layout follows mlx-lm: `lora_a` is (input_dims, r) and `lora_b` is (r, output_dims),
so the update is `scale * (x @ lora_a) @ lora_b`. In PEFT's layout the same update
is `lora_B.weight @ lora_A.weight` with lora_A = lora_a.T (r, in) and lora_B =
lora_b.T (out, r). Each layer is built by `from_base(...)`; `fuse()` returns a new
plain layer and leaves the wrapper untouched.
"""

from __future__ import annotations

import copy
import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError
from .quant import dequantize_weight, float_weight, weight_shape
from .switch import LoRASwitchLinear

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
EMBEDDING_TYPES = (nn.Embedding, nn.QuantizedEmbedding)


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def linear_dims(linear) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear or QuantizedLinear (packed weights unpacked)."""
    out_dims, in_dims = weight_shape(linear)
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) @ lora_a @ lora_b."""

    @classmethod
    def from_base(cls, linear: nn.Module, r: int = 8, scale: float = 2.0, dropout: float = 0.0):
        in_dims, out_dims = linear_dims(linear)
        layer = cls(in_dims, out_dims, r=r, scale=scale, dropout=dropout)
        layer.linear = linear
        return layer

    def __init__(self, input_dims: int, output_dims: int, r: int = 8, scale: float = 2.0,
                 dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=False)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = float(scale)
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, r))
        self.lora_b = mx.zeros((r, output_dims))

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    @property
    def weight(self) -> mx.array:
        """The base layer's weight: some mlx-lm models read (gemma3n's AltUp even clips) a projection's
        weight directly, so a wrapped projection must still answer `.weight`."""
        return self.linear.weight

    def __setattr__(self, name, value):
        if name == "weight" and "linear" in self:
            self.linear.weight = value  # writes go to the base, never a second "weight" parameter
        else:
            super().__setattr__(name, value)

    def delta(self) -> mx.array:
        """The weight update scale * B @ A in the base layout (out, in), float32."""
        return self.scale * (self.lora_b.T.astype(mx.float32) @ self.lora_a.T.astype(mx.float32))

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return add_to_splits(y, (self.scale * z).astype(x.dtype))

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A new layer with W + delta; re-quantized naively (same bits/group) if the base was quantized
        and `dequantize` is False. Quantization-aware strategies live in `mlxlora.fuse`."""
        w = float_weight(self.linear)
        return fused_like(self.linear, (w.astype(mx.float32) + self.delta()).astype(w.dtype), dequantize)


class DoRALinear(LoRALinear):
    """DoRA: y = m / ||W + scale*B@A||_row * (W x + scale * x A B) + bias, the norm detached (as PEFT)."""

    @classmethod
    def from_base(cls, linear: nn.Module, r: int = 8, scale: float = 2.0, dropout: float = 0.0):
        layer = super().from_base(linear, r=r, scale=scale, dropout=dropout)
        layer.m = mx.linalg.norm(float_weight(linear).astype(mx.float32), axis=1)
        return layer

    def __init__(self, input_dims: int, output_dims: int, r: int = 8, scale: float = 2.0,
                 dropout: float = 0.0):
        super().__init__(input_dims, output_dims, r=r, scale=scale, dropout=dropout)
        self.m = mx.ones((output_dims,))

    def __call__(self, x):
        base = self.linear
        w = float_weight(base)
        y = x @ w.astype(x.dtype).T
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        y = y + (self.scale * z).astype(x.dtype)
        adapted = w.astype(mx.float32) + self.delta()
        denom = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))  # (out,)
        y = (self.m / denom).astype(x.dtype) * y
        if "bias" in base:
            y = y + base.bias
        indices = getattr(base, "indices", None)  # a fused projection that returns its splits (afm7)
        return y.split(indices, axis=-1) if isinstance(indices, list) else y

    def fuse(self, dequantize: bool = False) -> nn.Module:
        w = float_weight(self.linear)
        adapted = w.astype(mx.float32) + self.delta()
        adapted = (self.m / mx.linalg.norm(adapted, axis=1))[:, None] * adapted
        return fused_like(self.linear, adapted.astype(w.dtype), dequantize)


def add_to_splits(y, z: mx.array):
    """y + z, where y may be the list of splits a fused projection returns (afm7's FusedLinear
    returns q, k, v as a list): z (..., sum of widths) is split the same way."""
    if not isinstance(y, (list, tuple)):
        return y + z
    cuts, at = [], 0
    for part in y[:-1]:
        at += part.shape[-1]
        cuts.append(at)
    return type(y)(a + b for a, b in zip(y, z.split(cuts, axis=-1)))


def fused_like(base: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A new layer like `base` (same class, so a subclass's forward such as afm7's splits is kept)
    holding the float `weight` (out, in); a quantized base is re-quantized with its own bits and group
    size unless `dequantize`, which gives a plain Linear."""
    quantized = isinstance(base, nn.QuantizedLinear)
    if quantized and dequantize:
        if isinstance(getattr(base, "indices", None), list):
            raise ConfigError(f"fuse --dequantize: {type(base).__name__} returns splits and has no plain float "
                              "form here; fuse without --dequantize")
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in base)
        fused.weight = weight
        if "bias" in base:
            fused.bias = base.bias
        return fused
    fused = copy.copy(base)  # a new module: same class and attributes, its own parameter dict
    if quantized:
        packed = mx.quantize(weight, base.group_size, base.bits, mode=base.mode)
        fused.weight, fused.scales = packed[0], packed[1]
        if len(packed) > 2 and packed[2] is not None:
            fused.biases = packed[2]
    else:
        fused.weight = weight
    return fused


class LoRAEmbedding(nn.Module):
    """Embedding lookup plus scale * lora_a[ids] @ lora_b; lora_a (num_embeddings, r), lora_b (r, dims).

    PEFT stores lora_embedding_A = lora_a.T (r, num) and lora_embedding_B = lora_b.T (dims, r).
    `as_linear` (tied output head) adds the transposed update so both uses stay consistent.
    """

    @classmethod
    def from_base(cls, embedding: nn.Module, r: int = 8, scale: float = 2.0, dropout: float = 0.0):
        num, dims = weight_shape(embedding)
        layer = cls(num, dims, r=r, scale=scale, dropout=dropout)
        layer.embedding = embedding
        return layer

    def __init__(self, num_embeddings: int, dims: int, r: int = 8, scale: float = 2.0,
                 dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dims)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = float(scale)
        # PEFT initialises embedding A to zeros and B randomly; either way the update starts at 0.
        self.lora_a = mx.zeros((num_embeddings, r))
        self.lora_b = mx.random.normal((r, dims))

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def delta(self) -> mx.array:
        """scale * lora_a @ lora_b, (num_embeddings, dims), float32."""
        return self.scale * (self.lora_a.astype(mx.float32) @ self.lora_b.astype(mx.float32))

    def __call__(self, ids):
        y = self.embedding(ids)
        z = self.dropout(self.lora_a[ids]) @ self.lora_b
        return y + (self.scale * z).astype(y.dtype)

    def as_linear(self, x):
        y = self.embedding.as_linear(x)
        z = (x @ self.lora_b.T.astype(x.dtype)) @ self.lora_a.T.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        base = self.embedding
        w = float_weight(base)
        fused = nn.Embedding(*w.shape)
        fused.weight = (w.astype(mx.float32) + self.delta()).astype(w.dtype)
        if isinstance(base, nn.QuantizedEmbedding) and not dequantize:
            fused = nn.QuantizedEmbedding.from_embedding(fused, base.group_size, base.bits, mode=base.mode)
        return fused


ADAPTER_TYPES = (LoRALinear, LoRAEmbedding, LoRASwitchLinear)


def base_of(layer: nn.Module) -> nn.Module:
    """The wrapped base layer of an adapter layer."""
    return layer.embedding if isinstance(layer, LoRAEmbedding) else layer.linear


__all__ = ["LoRALinear", "DoRALinear", "LoRAEmbedding", "lora_scale", "base_of", "linear_dims",
           "dequantize_weight", "LINEAR_TYPES", "EMBEDDING_TYPES", "ADAPTER_TYPES"]
