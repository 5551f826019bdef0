"""Weighted combinations of LoRA adapters, with the meanings PEFT's `add_weighted_adapter` gives them.

Per adapted module, with adapter i's update ΔW_i = s_i * lora_a_i @ lora_b_i (s_i its scale) and weight w_i:

    linear  lora_a = Σ sign(w_i s_i) √|w_i s_i| lora_a_i,  lora_b = Σ √|w_i s_i| lora_b_i  (same rank r).
            PEFT's rough approximation: the product has cross terms, it is NOT Σ w_i ΔW_i.
    cat     lora_a = [w_1 s_1 lora_a_1 | w_2 s_2 lora_a_2 | ...], lora_b = [lora_b_1; lora_b_2; ...]
            rank Σ r_i, exact: lora_a @ lora_b = Σ w_i ΔW_i.
    svd     the best rank-k approximation of Σ w_i ΔW_i (k = svd_rank, default the largest input rank),
            singular values on the lora_b side as PEFT puts them on lora_B.

The result is a plain LoRA with scale 1 (lora_alpha = r, as PEFT sets it); modules that get less than the
common rank (cat over adapters with different targets, svd of a small matrix) are padded with zeros as PEFT does.
Arithmetic is done in float64 with numpy and cast back to the inputs' dtype. DoRA adapters cannot be combined
this way (their magnitude is not additive), so they are refused. MoE experts combine expert by expert.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..config import LoraConfig
from ..errors import AdapterError, ConfigError
from ..formats.record import AdapterRecord, LayerLoRA

COMBINATIONS = ("linear", "cat", "svd")


def add_weighted_adapter(adapters: list[AdapterRecord], weights: list[float], combination_type: str = "svd",
                         svd_rank: int | None = None) -> AdapterRecord:
    """A new AdapterRecord (meta: how it was made) combining `adapters` with `weights` (may be negative); see the module docstring.

    As PEFT: one adapter always uses "linear"; "linear" needs every module at the same rank; "cat" has rank
    Σ r_i; "svd" has rank svd_rank or the largest input rank. Raises ConfigError for a bad combination_type,
    weights or svd_rank, AdapterError for DoRA inputs or adapters that disagree on a module's kind.
    """
    _check_inputs(adapters, weights, combination_type, svd_rank)
    if len(adapters) == 1:
        combination_type = "linear"
    max_ranks = [max(lora.rank for lora in a.layers.values()) for a in adapters]
    if combination_type == "linear":
        ranks = {lora.rank for a in adapters for lora in a.layers.values()}
        if len(ranks) != 1:
            raise ConfigError(f"combination_type='linear' needs every adapter at the same rank, got ranks {sorted(ranks)}; "
                              "use 'cat' or 'svd'")
        rank = ranks.pop()
    elif combination_type == "cat":
        rank = sum(max_ranks)
    else:
        rank = svd_rank or max(max_ranks)

    combine = {"linear": _linear, "cat": _cat, "svd": _svd}[combination_type]
    paths = list(dict.fromkeys(p for a in adapters for p in a.layers))
    layers = {}
    for path in paths:
        present = [(a.layers[path], float(w)) for a, w in zip(adapters, weights) if path in a.layers]
        lora_a, lora_b = combine(present, rank)
        dtype = present[0][0].lora_a.dtype
        layers[path] = LayerLoRA(_mx(_pad(lora_a, rank, axis=-1), dtype), _mx(_pad(lora_b, rank, axis=-2), dtype),
                                 scale=1.0, embedding=present[0][0].embedding)
    config = LoraConfig(r=rank, lora_alpha=float(rank), lora_dropout=adapters[0].config.lora_dropout,
                        target_modules=paths)
    mx.eval([lora.arrays() for lora in layers.values()])
    info = {"combination_type": combination_type, "weights": [float(w) for w in weights],
            "sources": [a.source for a in adapters]}
    return AdapterRecord(config=config, layers=layers, meta=info)


def delta_weight(lora: LayerLoRA) -> np.ndarray:
    """scale * lora_a @ lora_b in float64: (in, out) for a Linear (the transpose of W's layout), (num, dims) for an Embedding."""
    return lora.scale * (_np(lora.lora_a) @ _np(lora.lora_b))


def _check_inputs(adapters, weights, combination_type, svd_rank) -> None:
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type {combination_type!r}: choose one of {', '.join(COMBINATIONS)}")
    if not adapters:
        raise ConfigError("add_weighted_adapter: give at least one adapter")
    if len(weights) != len(adapters):
        raise ConfigError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ConfigError(f"add_weighted_adapter: weights must be finite numbers, got {weights!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    for i, a in enumerate(adapters):
        if not a.layers:
            raise AdapterError(f"add_weighted_adapter: adapter {i} ({a.source}) has no layers")
        dora = [p for p, lora in a.layers.items() if lora.m is not None]
        if dora:
            raise AdapterError(f"add_weighted_adapter: adapter {i} ({a.source}) is DoRA ({dora[0]}); its magnitude "
                               "vector does not add up, so only LoRA adapters can be combined")
    kinds: dict = {}
    for a in adapters:
        for p, lora in a.layers.items():
            if kinds.setdefault(p, (lora.embedding, lora.experts)) != (lora.embedding, lora.experts):
                raise AdapterError(f"add_weighted_adapter: {p} is not the same kind of layer (embedding, linear, "
                                   "experts) in every adapter")


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _mx(x: np.ndarray, dtype) -> mx.array:
    return mx.array(x.astype(np.float32)).astype(dtype)


def _linear(present, rank):
    lora_a, lora_b = 0.0, 0.0
    for lora, w in present:
        ws = w * lora.scale
        root = math.sqrt(abs(ws))
        # the sign goes on one side only, or two negatives would cancel (as PEFT)
        lora_a = lora_a + (root if ws >= 0 else -root) * _np(lora.lora_a)
        lora_b = lora_b + root * _np(lora.lora_b)
    return lora_a, lora_b


# Experts (lora_a (E, in, r), lora_b (E, r, out)) combine expert by expert: every step below works on the
# last two axes, so a leading expert axis is carried through (numpy's qr / svd take stacks of matrices).

def _cat(present, rank):
    lora_a = np.concatenate([w * lora.scale * _np(lora.lora_a) for lora, w in present], axis=-1)  # (.., in, Σr)
    lora_b = np.concatenate([_np(lora.lora_b) for lora, _ in present], axis=-2)  # (.., Σr, out)
    return lora_a, lora_b


def _svd(present, rank):
    # Σ w_i ΔW_i = A @ B with A = [w_i s_i a_i] (in, R) and B = [b_i] (R, out). Its SVD comes from the small
    # R x R core of two QR factorisations, never from the full (in, out) matrix.
    big_a, big_b = _cat(present, rank)
    qa, ra = np.linalg.qr(big_a)  # (.., in, Ka), (.., Ka, R)
    qb, rb = np.linalg.qr(np.swapaxes(big_b, -1, -2))  # (.., out, Kb), (.., Kb, R)
    u, s, vt = np.linalg.svd(ra @ np.swapaxes(rb, -1, -2))  # core (.., Ka, Kb)
    k = min(rank, s.shape[-1])
    return qa @ u[..., :k], s[..., :k, None] * (vt[..., :k, :] @ np.swapaxes(qb, -1, -2))  # (.., in, k), (.., k, out)


def _pad(x: np.ndarray, rank: int, axis: int) -> np.ndarray:
    missing = rank - x.shape[axis]
    if missing <= 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, missing)
    return np.pad(x, widths)


__all__ = ["add_weighted_adapter", "delta_weight", "COMBINATIONS"]
