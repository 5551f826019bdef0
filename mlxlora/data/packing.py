"""Sequence packing: several samples per row, with per-token segment ids so attention stays apart.

This module plans rows and pads them (numpy); the forward pass of a packed batch is loss/packed.py,
whose mask lets every sample attend only to itself. The loss mask is kept per sample, so the loss is
the same as unpacked (tests/test_packing.py checks this per architecture). Only architectures in PACKABLE are packed: models with absolute position
embeddings would differ, and gemma2's attention broadcasts a (B, 1, L, L) mask wrongly.
"""

from __future__ import annotations

import numpy as np

from .rows import Sample

# model_type values whose packed loss was checked equal to the unpacked one (tests/test_packing.py).
PACKABLE = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


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
