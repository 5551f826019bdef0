"""Quantized-weight helpers and the CPU fast path.

MLX's CPU `quantized_matmul` runs at ~2 GFLOP/s while `dequantize` + a BLAS matmul
runs at ~80+ GFLOP/s. On the CPU backend we therefore dequantize each quantized
layer's weight transiently inside its forward pass (and again in the backward
pass, so the float copy is never kept alive for autodiff). On Metal/CUDA the fused
kernel is faster and is left alone.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear


def on_cpu() -> bool:
    """True when MLX's default device is the CPU (Linux wheel, or forced)."""
    return mx.default_device().type == mx.DeviceType.cpu


def dequantize_weight(layer) -> mx.array:
    """Float weight (out, in) of a QuantizedLinear / QuantizedEmbedding."""
    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def unpacked_cols(packed_cols: int, bits: int) -> int:
    """Logical columns of a quantized weight stored as `packed_cols` uint32 words per row."""
    return packed_cols * 32 // bits


def weight_shape(layer) -> tuple[int, int]:
    """Logical (rows, cols) of a Linear/Embedding weight, quantized or not: (out, in) or (num, dims)."""
    rows, cols = layer.weight.shape
    if isinstance(layer, QUANTIZED_TYPES):
        cols = unpacked_cols(cols, layer.bits)
    return rows, cols


def float_weight(layer) -> mx.array:
    """The weight of a Linear/Embedding, dequantized if it is quantized."""
    if isinstance(layer, QUANTIZED_TYPES):
        return dequantize_weight(layer)
    return layer.weight


# Dequantize at most this many weights at a time (32 MiB in float32): a large matrix (a 49k- or
# 128k-token output head) is processed in slices of output rows, so its float copy never exists whole.
CHUNK_ELEMENTS = 1 << 21


def _row_slices(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _dequant_matmul_fn(group_size: int, bits: int, mode: str, has_biases: bool):
    """x @ dequantize(w).T with a VJP that re-dequantizes instead of keeping the float weight."""

    def deq(w, scales, biases, i, j):  # output rows i:j as float (j - i, in)
        return mx.dequantize(w[i:j], scales[i:j], biases[i:j] if has_biases else None,
                             group_size=group_size, bits=bits, mode=mode)

    @mx.custom_function
    def f(x, w, scales, biases):
        parts = [x @ deq(w, scales, biases, i, j).astype(x.dtype).T
                 for i, j in _row_slices(scales.shape[0], x.shape[-1])]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        # Tie the re-dequantization to the cotangent: otherwise mx.compile merges it with the forward's
        # identical dequantize (common subexpression) and keeps that float copy alive until the backward.
        (w,) = mx.depends([w], [cotangent])
        dx = None
        for i, j in _row_slices(scales.shape[0], x.shape[-1]):
            part = cotangent[..., i:j] @ deq(w, scales, biases, i, j).astype(cotangent.dtype)
            dx = part if dx is None else dx + part
        # The quantized base is frozen: its cotangents are never used.
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return f


_FNS: dict = {}


def dequant_matmul(layer, x: mx.array) -> mx.array:
    """x @ W.T for a quantized layer via dequantize + BLAS matmul. x: (..., in) -> (..., out)."""
    key = (layer.group_size, layer.bits, layer.mode, "biases" in layer)
    fn = _FNS.get(key)
    if fn is None:
        fn = _FNS[key] = _dequant_matmul_fn(*key)
    biases = layer["biases"] if key[3] else mx.zeros((1,), dtype=layer.scales.dtype)
    return fn(x, layer.weight, layer.scales, biases)


# Below this many input rows (token decode), dequantizing the whole matrix costs more than MLX's
# quantized kernel saves: one decoded token on SmolLM2 went from 0.10 s to 1.43 s with dequantize.
MIN_ROWS_FOR_DEQUANT = 16


def _few_rows(x) -> bool:
    return x.size // max(x.shape[-1], 1) < MIN_ROWS_FOR_DEQUANT


class CPUQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear whose forward uses dequantize + matmul (same parameters, same names)."""

    def __call__(self, x):
        if _few_rows(x):
            return super().__call__(x)
        y = dequant_matmul(self, x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose tied output projection uses dequantize + matmul."""

    def as_linear(self, x):
        if _few_rows(x):
            return super().as_linear(x)
        return dequant_matmul(self, x)


def _dequant_gather_fn(group_size: int, bits: int, mode: str, has_biases: bool, sorted_indices: bool):
    """gather_mm(x, dequantize(w).T per expert, indices) with a VJP that re-dequantizes (as above)."""

    def experts_t(w, scales, biases, dtype):  # (E, in, out)
        w = mx.dequantize(w, scales, biases if has_biases else None, group_size=group_size, bits=bits, mode=mode)
        return w.astype(dtype).swapaxes(-1, -2)

    def gather(x, wt, indices):
        return mx.gather_mm(x, wt, rhs_indices=indices, sorted_indices=sorted_indices)

    @mx.custom_function
    def f(x, w, scales, biases, indices):
        return gather(x, experts_t(w, scales, biases, x.dtype), indices)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, w, scales, biases, indices = primals
        (w,) = mx.depends([w], [cotangent])
        wt = experts_t(w, scales, biases, x.dtype)
        _, (dx,) = mx.vjp(lambda x: gather(x, wt, indices), [x], [cotangent])
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases), mx.zeros_like(indices)

    return f


class CPUQuantizedSwitchLinear(QuantizedSwitchLinear):
    """A QuantizedSwitchLinear whose forward dequantizes the experts for one gather_mm (CPU fast path:
    3x MLX's CPU gather_qmm on 512 routed tokens, 8 experts 128->256, 4-bit). The whole (E, out, in)
    float copy exists only inside the call; decode-sized inputs and nvfp4 global scales use the kernel."""

    def __call__(self, x, indices, sorted_indices=False):
        if _few_rows(x) or self.get("global_scale") is not None:
            return super().__call__(x, indices, sorted_indices=sorted_indices)
        key = (self.group_size, self.bits, self.mode, self.get("biases") is not None, bool(sorted_indices))
        fn = _FNS.get(("switch",) + key)
        if fn is None:
            fn = _FNS[("switch",) + key] = _dequant_gather_fn(*key)
        biases = self["biases"] if key[3] else mx.zeros((1,), dtype=self.scales.dtype)
        y = fn(x, self.weight, self.scales, biases, indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y


_FAST = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding,
         QuantizedSwitchLinear: CPUQuantizedSwitchLinear}


def use_fast_cpu_path(model: nn.Module, force: bool | None = None) -> int:
    """Switch every quantized layer of `model` to the dequantize+matmul forward when on CPU.

    Only the class of each instance changes (parameters and their names do not), so
    saving, fusing and `isinstance(m, nn.QuantizedLinear)` behave as before.
    Returns the number of layers switched. `force` overrides the CPU detection.
    """
    if not (on_cpu() if force is None else force):
        return 0
    n = 0
    for _, m in model.named_modules():
        fast = _FAST.get(type(m))
        if fast is not None:
            m.__class__ = fast
            n += 1
    return n
