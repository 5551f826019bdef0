"""The forward pass of a packed batch: several samples per row, attention kept apart.

mlx-lm models take their attention mask from the cache (`cache[0].make_mask(...)`) and their RoPE
offset from `cache.offset`. `SegmentCache` is a stand-in cache that stores nothing and hands out a
block-diagonal causal mask built from per-token segment ids (data/packing.py makes them), so every
sample attends only to itself; RoPE scores depend only on relative positions, so a packed sample gets
exactly the attention it would get alone.
"""

from __future__ import annotations

import mlx.core as mx


class SegmentCache:
    """A cache that caches nothing: offset 0, keys/values pass through, mask from segment ids."""

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask  # (B, 1, L, L) bool

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, N, return_array=False, window_size=None, **kw):
        if window_size is None:
            return self.mask
        i = mx.arange(N)
        return self.mask & (i[:, None] < i[None] + window_size)

    @property
    def state(self):
        return []


def segment_mask(segments: mx.array) -> mx.array:
    """(B, L) segment ids (0 = padding) -> (B, 1, L, L) causal mask within each segment."""
    L = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = mx.arange(L)[:, None] >= mx.arange(L)[None]
    return (same & causal)[:, None]


def segment_cache(model, segments: mx.array) -> list[SegmentCache]:
    """The per-layer cache list that keeps the samples of a packed batch apart. segments: (B, L)."""
    return [SegmentCache(segment_mask(segments))] * len(model.layers)


def packed_logits(model, inputs: mx.array, segments: mx.array) -> mx.array:
    """Forward pass of a packed batch. inputs, segments: (B, L)."""
    return model(inputs, cache=segment_cache(model, segments))
