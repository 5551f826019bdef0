"""Sequence packing: several samples per row, attention blocked between them.

mlx-lm models take their attention mask from the cache (`cache[0].make_mask(...)`) and
their RoPE offset from `cache.offset`. `SegmentCache` is a stand-in cache that stores
nothing and hands out a block-diagonal causal mask built from per-token segment ids, so
every sample attends only to itself. RoPE scores depend only on relative positions, so a
sample packed after others gets exactly the attention it would get alone; the loss mask
is kept per sample, so the loss is the same too (tests/test_packing.py checks this per
architecture). Only architectures in PACKABLE are packed: models with absolute position
embeddings would differ, and gemma2's attention broadcasts a (B, 1, L, L) mask wrongly.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .data import Sample

# model_type values whose packed loss was checked equal to the unpacked one (tests/test_packing.py).
PACKABLE = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


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


def packed_logits(model, inputs: mx.array, segments: mx.array) -> mx.array:
    """Forward pass of a packed batch. inputs, segments: (B, L)."""
    cache = SegmentCache(segment_mask(segments))
    return model(inputs, cache=[cache] * len(model.layers))


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices grouped into rows of at most `capacity` tokens.

    lengths are the per-sample token counts (len(ids) - 1, what a row holds). Deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def epoch_packed_batches(lengths: list[int], capacity: int, batch_size: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Rows packed once, then grouped into batches of `batch_size` rows in an order seeded by (seed, epoch)."""
    rows = pack_rows(lengths, capacity)
    rng = np.random.default_rng([seed, epoch, 7])
    perm = rng.permutation(len(rows)).tolist()
    rows = [rows[i] for i in perm]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def collate_packed(samples: list[Sample], rows: list[list[int]], pad_multiple: int, pad_id: int):
    """(inputs, targets, loss_mask, segments), each (B, L) numpy; segments count from 1, 0 is padding."""
    width = max(sum(len(samples[i].ids) - 1 for i in row) for row in rows)
    width = -(-width // pad_multiple) * pad_multiple
    B = len(rows)
    inputs = np.full((B, width), pad_id, np.int32)
    targets = np.full((B, width), pad_id, np.int32)
    mask = np.zeros((B, width), np.float32)
    segments = np.zeros((B, width), np.int32)
    for b, row in enumerate(rows):
        pos = 0
        for seg, i in enumerate(row, start=1):
            ids, m = samples[i].ids, samples[i].mask
            n = len(ids) - 1
            inputs[b, pos:pos + n] = ids[:-1]
            targets[b, pos:pos + n] = ids[1:]
            mask[b, pos:pos + n] = m[1:]
            segments[b, pos:pos + n] = seg
            pos += n
    return inputs, targets, mask, segments


def padding_fraction(lengths: list[int], batches: list, packed: bool, pad_multiple: int) -> float:
    """Fraction of the batch area that is padding, for a batch plan (rows of indices)."""
    real = area = 0
    for batch in batches:
        rows = batch if packed else [[i] for i in batch]
        sizes = [sum(lengths[i] for i in row) for row in rows]
        width = -(-max(sizes) // pad_multiple) * pad_multiple
        real += sum(sizes)
        area += width * len(rows)
    return 1 - real / max(area, 1)
