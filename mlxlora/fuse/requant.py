"""Re-quantize a fused weight so the fine-tune survives rounding (affine mode, numpy on the host).

A quantized base stores each group of `group_size` weights of a row as integers q in
[0, 2**bits - 1] with one float scale s and bias b: w = s * q + b. Adding a small LoRA
delta (typically a few % of ||W||, i.e. well under half a rounding step) and quantizing
again from the group's new min/max (what `mx.quantize` does) lands almost every weight back
on its old integer: the fine-tune is rounded away. The tools here keep it instead:

- `round_to_grid`: round W_fused on the ORIGINAL grid (s, b kept), so a weight whose
  delta does not cross a rounding boundary keeps its integer bit for bit.
- `gptq_round`: the same grid, but integers chosen column by column with error feedback
  weighted by the input second moment H = sum x x^T of calibration activations
  (GPTQ, Frantar et al. 2022), minimising ||(W_q - W_fused) X|| instead of ||W_q - W_fused||.
- `refit_grid`: given the integers, re-solve each group's (s, b) by least squares in the
  same output metric; the continuous scales absorb part of the delta at no size cost.
- `finer_grid`: the base grid expressed at more bits (4 -> 8: s / 17, same b), so the base
  weights stay exactly representable and only the delta is rounded, on a 17x finer step.

STRATEGIES names these combinations; `target_grid` gives each layer its starting grid (the base's,
re-gridding only groups the delta pushes out of range). On the demo (SmolLM2-135M 4-bit, devil
adapter) naive keeps 72 % of the held-out loss improvement, gptq/refit ~103 %: the trained delta
lies where the activations are, and that is where calibrated rounding puts its accuracy.

Packing is mlx's: the integers of a row as one little-endian bit stream in uint32 words.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..lora.quant import QUANTIZED_TYPES, float_weight



@dataclass
class Grid:
    """Per-group affine grid of one weight: w = scales * q + biases. scales/biases (out, in // group_size)."""

    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def per_column(self) -> tuple[np.ndarray, np.ndarray]:
        """scales and biases broadcast to the weight's (out, in) shape."""
        return (np.repeat(self.scales, self.group_size, axis=1), np.repeat(self.biases, self.group_size, axis=1))

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        s, b = self.per_column()
        return s * q + b


def unpack(weight: np.ndarray, bits: int) -> np.ndarray:
    """Integers (out, in) uint8 of a packed uint32 weight (out, in * bits // 32)."""
    rows = weight.shape[0]
    stream = np.unpackbits(weight.astype("<u4").view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
    stream = stream.reshape(rows, -1, bits).astype(np.uint8)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers (out, in) in [0, 2**bits) into uint32 words (out, in * bits // 32), as mlx does."""
    rows = q.shape[0]
    q = q.astype(np.uint8)
    stream = ((q[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, -1)
    return np.packbits(stream, axis=1, bitorder="little").view("<u4").astype(np.uint32)


def layer_grid(layer) -> Grid:
    """The grid of a QuantizedLinear / QuantizedEmbedding in affine mode (float32 copies)."""
    if getattr(layer, "mode", "affine") != "affine":
        raise ValueError(f"only affine quantization has a per-group grid, this layer is {layer.mode}")
    return Grid(np.array(layer.scales.astype(mx.float32)), np.array(layer.biases.astype(mx.float32)),
                layer.bits, layer.group_size)


def layer_integers(layer) -> np.ndarray:
    return unpack(np.array(layer.weight), layer.bits)


def float_weight_np(layer) -> np.ndarray:
    """The (dequantized) weight of a Linear / Embedding or quantized one, float32 numpy."""
    return np.array(float_weight(layer).astype(mx.float32))


def fresh_grid(w: np.ndarray, bits: int, group_size: int) -> Grid:
    """The grid `mx.quantize` would choose for `w` (min/max per group)."""
    _, s, b = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    return Grid(np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32)), bits, group_size)


def finer_grid(grid: Grid, bits: int) -> Grid | None:
    """`grid` at more bits with every old level still a level (4 -> 8: s / 17), or None when impossible."""
    old, new = grid.levels, (1 << bits) - 1
    if bits <= grid.bits or new % old:
        return None
    return Grid(grid.scales / (new // old), grid.biases.copy(), bits, grid.group_size)


def round_to_grid(w: np.ndarray, grid: Grid) -> np.ndarray:
    """Nearest integers of `w` (out, in) on `grid`, clipped to the level range; uint8."""
    s, b = grid.per_column()
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s != 0, np.rint((w - b) / s), 0.0)
    return np.clip(q, 0, grid.levels).astype(np.uint8)


def gptq_round(w: np.ndarray, h: np.ndarray, grid: Grid, damp: float = 0.01, block: int = 128) -> np.ndarray:
    """Integers on `grid` minimising ||(dequant(q) - w) X||^2 approximately (GPTQ with act order).

    w: (out, in) target weight; h: (in, in) = sum of x x^T over calibration inputs x (in,).
    Columns are visited in decreasing order of h's diagonal; each column's rounding error is
    spread over the columns not yet visited through the Cholesky factor of h^-1.
    """
    out_dims, in_dims = w.shape
    h = h.astype(np.float64).copy()
    w = w.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[order][:, order]
    s_col, b_col = (a[:, order].astype(np.float64) for a in grid.per_column())
    w = w[:, order]
    h[np.diag_indices(in_dims)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: h^-1 = u^T u
    q = np.zeros((out_dims, in_dims), dtype=np.uint8)
    levels = grid.levels
    safe_s = np.where(s_col != 0, s_col, 1.0)
    for i1 in range(0, in_dims, block):
        i2 = min(i1 + block, in_dims)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            col = w1[:, i]
            qi = np.clip(np.rint((col - b_col[:, j]) / safe_s[:, j]), 0, levels)
            qi = np.where(s_col[:, j] != 0, qi, 0)
            q[:, j] = qi
            e = (col - (qi * s_col[:, j] + b_col[:, j])) / u[j, j]
            w1[:, i:] -= np.outer(e, u[j, j:i2])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    out = np.empty_like(q)
    out[:, order] = q
    return out


def refit_grid(w: np.ndarray, q: np.ndarray, grid: Grid, h: np.ndarray | None = None,
               ridge: float = 1e-6) -> Grid:
    """Least-squares (scales, biases) per group for fixed integers `q`, target `w`.

    Minimises sum over rows of (dequant - w) H (dequant - w)^T with H = `h` (output error on the
    calibration inputs) or the identity (weight error). Groups are coupled through H, so each row
    solves one (2G, 2G) system. A group whose integers are all equal keeps its old scale.
    """
    out_dims, in_dims = w.shape
    gs, n_groups = grid.group_size, in_dims // grid.group_size
    qf = q.astype(np.float64).reshape(out_dims, n_groups, gs)
    if h is None:
        # Identity metric: groups decouple into 2x2 systems.
        wf = w.astype(np.float64).reshape(out_dims, n_groups, gs)
        a11, a12, a22 = (qf * qf).sum(-1), qf.sum(-1), float(gs)
        r1, r2 = (qf * wf).sum(-1), wf.sum(-1)
        det = a11 * a22 - a12 * a12
        ok = det > 1e-9 * np.maximum(a11 * a22, 1e-30)
        det = np.where(ok, det, 1.0)
        s = np.where(ok, (r1 * a22 - a12 * r2) / det, grid.scales)
        b = np.where(ok, (a11 * r2 - a12 * r1) / det, (r2 - grid.scales * a12) / a22)
        return Grid(s.astype(np.float32), b.astype(np.float32), grid.bits, gs)
    hf = h.astype(np.float64)
    qm = qf.reshape(out_dims, in_dims)
    # Features per row: q masked to group g (G of them), then the group's indicator (G); the
    # normal equations need their pairwise H-products, built one group at a time (O(out * in) memory).
    h1 = hf.reshape(in_dims, n_groups, gs).sum(-1)           # (in, G): H @ indicators
    a_qq = np.empty((out_dims, n_groups, n_groups))
    for g in range(n_groups):
        sl = slice(g * gs, (g + 1) * gs)
        a_qq[:, g] = ((qm[:, sl] @ hf[sl]) * qm).reshape(out_dims, n_groups, gs).sum(-1)
    a_q1 = np.einsum("rgk,gkG->rgG", qf, h1.reshape(n_groups, gs, n_groups))
    a_11 = h1.reshape(n_groups, gs, n_groups).sum(1)         # (G, G)
    hw = w.astype(np.float64) @ hf                           # (out, in)
    rhs_q = (qm * hw).reshape(out_dims, n_groups, gs).sum(-1)
    rhs_1 = hw.reshape(out_dims, n_groups, gs).sum(-1)
    a = np.empty((out_dims, 2 * n_groups, 2 * n_groups))
    a[:, :n_groups, :n_groups] = a_qq
    a[:, :n_groups, n_groups:] = a_q1
    a[:, n_groups:, :n_groups] = np.swapaxes(a_q1, 1, 2)
    a[:, n_groups:, n_groups:] = a_11
    rhs = np.concatenate([rhs_q, rhs_1], axis=1)
    # Ridge towards the old grid keeps degenerate groups (constant integers, dead inputs) in place.
    old = np.concatenate([grid.scales, grid.biases], axis=1).astype(np.float64)
    lam = ridge * np.trace(a, axis1=1, axis2=2)[:, None] / (2 * n_groups)
    a[:, np.arange(2 * n_groups), np.arange(2 * n_groups)] += lam
    theta = np.linalg.solve(a, (rhs + lam * old)[..., None])[..., 0]
    return Grid(theta[:, :n_groups].astype(np.float32), theta[:, n_groups:].astype(np.float32), grid.bits, gs)


def as_dtype(grid: Grid, dtype) -> Grid:
    """`grid` with scales/biases rounded to the dtype they will be stored in (e.g. float16)."""
    cast = lambda a: np.array(mx.array(a).astype(dtype).astype(mx.float32))  # noqa: E731
    return Grid(cast(grid.scales), cast(grid.biases), grid.bits, grid.group_size)


def quantized_layer(like, q: np.ndarray, grid: Grid, dtype) -> nn.Module:
    """A new QuantizedLinear / QuantizedEmbedding of `like`'s class holding `q` on `grid`.

    `like` gives the class and the float bias (kept as it is); scales/biases are stored as `dtype`.
    """
    cls = type(like)
    layer = cls.__new__(cls)  # skip __init__: it would quantize a random weight first
    nn.Module.__init__(layer)
    layer.group_size, layer.bits, layer.mode = grid.group_size, grid.bits, "affine"
    if isinstance(like, nn.QuantizedEmbedding):
        layer.num_embeddings, layer.dims = q.shape
    layer.weight = mx.array(pack(q, grid.bits))
    layer.scales = mx.array(grid.scales).astype(dtype)
    layer.biases = mx.array(grid.biases).astype(dtype)
    if "bias" in like:
        layer.bias = like.bias
    layer.freeze()
    return layer


# ---------------------------------------------------------------- strategies

def target_grid(base, wf: np.ndarray, bits: int, group_size: int, dtype) -> Grid:
    """The grid of quantized layer `base` at (bits, group_size), kept wherever it can hold `wf`.

    Every base level stays a level (smaller groups share their parent's scale; 4 -> 8 bits divides
    the step by 17), so unchanged weights keep their value. A group the delta pushes so far out of
    its range that clipping would cost more than re-rounding it takes the fresh grid `mx.quantize`
    would give it. Scales are rounded to `dtype`, the dtype they are stored in.
    """
    g = layer_grid(base)
    fresh = as_dtype(fresh_grid(wf, bits, group_size), dtype)
    if group_size != g.group_size:
        if g.group_size % group_size:
            return fresh
        k = g.group_size // group_size
        g = Grid(np.repeat(g.scales, k, axis=1), np.repeat(g.biases, k, axis=1), g.bits, group_size)
    if bits != g.bits:
        g = finer_grid(g, bits)
        if g is None:
            return fresh
        g = as_dtype(g, dtype)
    return _fit_range(g, fresh, wf)


def _fit_range(grid: Grid, fresh: Grid, wf: np.ndarray) -> Grid:
    """`grid` with the groups whose clipping error exceeds `fresh`'s expected rounding error replaced."""
    out_dims, n_groups = grid.scales.shape
    w = wf.reshape(out_dims, n_groups, grid.group_size)
    lo, hi = grid.biases[..., None], (grid.biases + grid.levels * grid.scales)[..., None]
    clip = (np.maximum(w - np.maximum(lo, hi), 0) ** 2 + np.maximum(np.minimum(lo, hi) - w, 0) ** 2).sum(-1)
    swap = clip > grid.group_size * fresh.scales ** 2 / 12  # uniform rounding error of a fresh grid
    if not swap.any():
        return grid
    return Grid(np.where(swap, fresh.scales, grid.scales), np.where(swap, fresh.biases, grid.biases),
                grid.bits, grid.group_size)


# Each takes (w_fused (out, in) float32, the base's grid at the target width, h (in, in) or None,
# damp, dtype the scales are stored in) and returns (integers, grid). h None means no
# calibration (or an embedding, whose rows are used one at a time): the weight error is minimised.

def _naive(wf, grid, h, damp, dtype):
    g = as_dtype(fresh_grid(wf, grid.bits, grid.group_size), dtype)  # what mlx-lm's fuse does
    return round_to_grid(wf, g), g


def _grid(wf, grid, h, damp, dtype):
    return round_to_grid(wf, grid), grid


def _gptq(wf, grid, h, damp, dtype):
    if h is None:
        return round_to_grid(wf, grid), grid
    return gptq_round(wf, h, grid, damp=damp), grid


def _refit(wf, grid, h, damp, dtype):
    q, g = _gptq(wf, grid, h, damp, dtype)
    for _ in range(2):  # integers and scales are fitted in turn; two rounds settle
        g = as_dtype(refit_grid(wf, q, g, h), dtype)
        q, _ = _gptq(wf, g, h, damp, dtype)
    return q, g


STRATEGIES = {
    "naive": _naive,   # fresh min/max grid (mlx-lm's fuse): the baseline, forgets most of a small delta
    "grid": _grid,     # original grid, nearest integers: unchanged weights stay bit-identical
    "gptq": _gptq,     # original grid, integers chosen for the output error on calibration inputs
    "refit": _refit,   # gptq, then scales/biases re-solved by least squares in the same metric
}


# ---------------------------------------------------------------- how much was kept


# ---------------------------------------------------------------- calibration


# ---------------------------------------------------------------- models: storage and config



__all__ = ["Grid", "unpack", "pack", "layer_grid", "layer_integers", "float_weight_np", "fresh_grid", "finer_grid",
           "round_to_grid", "gptq_round", "refit_grid", "as_dtype", "quantized_layer", "target_grid", "STRATEGIES",
           "QUANTIZED_TYPES"]
