"""Length-bucketed batches of samples and their padding into (B, L) arrays."""

from __future__ import annotations

import numpy as np

from .rows import Sample


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of sample indices for one epoch; same inputs -> same output.

    Indices are sorted by length (stable; ties in a seeded random order), cut into consecutive
    batches of batch_size (the last may be smaller), and the order of the batches is shuffled.
    The generator is seeded from (seed, epoch), so a resumed run rebuilds the same epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([seed % 2**63, epoch % 2**63])
    ties = rng.permutation(len(lengths))
    order = ties[np.argsort(np.asarray(lengths, dtype=np.int64)[ties], kind="stable")]
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]


def collate(samples: list[Sample], idxs: list[int], pad_multiple: int,
            pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad samples[idxs] into (inputs, targets, loss_mask), each (B, L).

    inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:] (float32, 0 on padding);
    L is the longest len(ids) - 1 rounded up to a multiple of pad_multiple.
    """
    rows = [samples[i] for i in idxs]
    if not rows:
        raise ValueError("collate needs at least one sample index")
    longest = max(max(len(s.ids) - 1 for s in rows), 1)
    width = -(-longest // pad_multiple) * pad_multiple
    inputs = np.full((len(rows), width), pad_id, dtype=np.int32)  # (B, L)
    targets = np.full((len(rows), width), pad_id, dtype=np.int32)
    loss_mask = np.zeros((len(rows), width), dtype=np.float32)
    for b, s in enumerate(rows):
        n = len(s.ids) - 1
        inputs[b, :n] = s.ids[:-1]
        targets[b, :n] = s.ids[1:]
        loss_mask[b, :n] = s.mask[1:]
    return inputs, targets, loss_mask


def pad_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else EOS, else 0."""
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else int(tokenizer.eos_token_id or 0)
