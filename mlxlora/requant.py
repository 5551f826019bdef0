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

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding)


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
    from .quant import float_weight

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

def output_error(e: np.ndarray, wf: np.ndarray, h: np.ndarray | None) -> float:
    """||E X||^2 / ||W_fused X||^2 for inputs with sum x x^T = h: the share of the layer's output that is
    wrong. h None: one-hot inputs (an embedding's rows), i.e. ||E||^2 / ||W_fused||^2."""
    if h is None:
        return float(np.vdot(e, e) / max(np.vdot(wf, wf), 1e-30))
    return float(np.vdot(e @ h, e) / max(np.vdot(wf @ h, wf), 1e-30))


def delta_stats(w0: np.ndarray, wf: np.ndarray, wk: np.ndarray, h: np.ndarray | None = None) -> dict:
    """How much of the true delta (wf - w0) the fused weight wk kept: relative error ||kept - true|| / ||true||
    and cosine, in weight space and, given h = sum x x^T over some inputs x, in output space (on those
    inputs). delta_norm = ||true|| / ||w0||, the size of the fine-tune next to the weight."""
    true, kept = (wf - w0).astype(np.float64), (wk - w0).astype(np.float64)
    out = {"delta_norm": _ratio(np.linalg.norm(true), np.linalg.norm(w0)),
           "rel_error": _ratio(np.linalg.norm(kept - true), np.linalg.norm(true)),
           "cosine": _cos(np.vdot(kept, true), np.vdot(kept, kept), np.vdot(true, true))}
    if h is not None:
        th, kh = true @ h, kept @ h
        tt, kk, kt = np.vdot(th, true), np.vdot(kh, kept), np.vdot(kh, true)
        out["out_rel_error"] = _ratio(math.sqrt(max(kk - 2 * kt + tt, 0.0)), math.sqrt(max(tt, 0.0)))
        out["out_cosine"] = _cos(kt, kk, tt)
    return out


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def _cos(ab: float, aa: float, bb: float) -> float:
    return float(ab / math.sqrt(aa * bb)) if aa > 0 and bb > 0 else 0.0


# ---------------------------------------------------------------- calibration

class _Recorder(nn.Module):
    """Stands in for an adapter layer while calibrating: accumulates H = sum x x^T over its inputs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.h = None

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)  # (tokens, in)
        h = flat.T @ flat
        self.h = h if self.h is None else self.h + h
        return self.inner(x)


def collect_hessians(model: nn.Module, paths: list[str], samples: list[list[int]]) -> dict[str, np.ndarray]:
    """{path: H (in, in) float32} of the inputs each adapter layer at `paths` sees on `samples` (token ids).

    The samples run one at a time (no padding enters H) through the model with its adapters.
    """
    modules = dict(model.named_modules())
    recorders = [(p, _Recorder(modules[p])) for p in paths]
    model.update_modules(tree_unflatten(recorders))
    try:
        for ids in samples:
            model(mx.array(ids)[None])
            mx.eval([r.h for _, r in recorders])
    finally:
        model.update_modules(tree_unflatten([(p, r.inner) for p, r in recorders]))
    return {p: np.array(r.h) for p, r in recorders if r.h is not None}


def pick_samples(split, n: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(split.samples))[:n]
    return [split.samples[i].ids for i in sorted(idx)]


def random_rows(tokenizer, n: int, length: int) -> list[list[int]]:
    """`n` rows of `length` token ids drawn uniformly from the vocabulary, special tokens left out."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    vocab = np.array([i for i in range(tokenizer.vocab_size) if i not in special])
    rng = np.random.default_rng(0)
    return [rng.choice(vocab, length).tolist() for _ in range(n)]


# ---------------------------------------------------------------- models: storage and config

_FILE_DTYPES = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}


def storage_dtypes(path) -> dict:
    """{parameter name: float dtype} as stored in a model folder's safetensors files (headers only)."""
    out = {}
    for f in sorted(Path(path).glob("model*.safetensors")) if path is not None else []:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        out.update({k: _FILE_DTYPES[v["dtype"]] for k, v in header.items()
                    if k != "__metadata__" and v.get("dtype") in _FILE_DTYPES})
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
        if isinstance(m, QUANTIZED_TYPES):
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
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)]
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


__all__ = ["Grid", "unpack", "pack", "layer_grid", "layer_integers", "float_weight_np", "fresh_grid", "finer_grid",
           "round_to_grid", "gptq_round", "refit_grid", "as_dtype", "quantized_layer", "target_grid", "STRATEGIES",
           "collect_hessians", "pick_samples", "random_rows", "delta_stats", "output_error", "QUANTIZED_TYPES",
           "storage_dtypes", "default_dtype", "cast_to_storage", "dequantize_all", "quantization_config"]
