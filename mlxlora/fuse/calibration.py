"""Calibration for the quantized fuse: H = Σ x xᵀ of the inputs each adapted layer sees on sample rows."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten


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
