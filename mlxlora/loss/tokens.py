"""The token-level loss of a batch: summed masked cross-entropy and the count of target tokens.

`to_batch` turns collated numpy arrays into the tuple `loss_sums` takes; `loss_sums` runs the model with
the output head only at loss rows (head.py), blocked causal attention on CPU (attention.py) and packed
rows kept apart (packed.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn

from ..lora.quant import on_cpu
from . import head
from .attention import blocked_causal
from .packed import packed_logits


def loss_sums(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
              segments: mx.array | None = None, rows: mx.array | None = None):
    """(sum of masked token cross-entropies, number of target tokens). inputs/targets/mask: (B, L).

    segments (B, L): per-token sample ids of a packed batch (see data/packing.py), or None.
    rows (N,): flattened positions that carry loss (head.target_rows); the head then projects only
    those rows. A model whose head is not recognised returns full logits and the loss uses them.
    """
    if rows is not None:
        head.enable(model)
    with head.only_rows(rows), (blocked_causal(model) if on_cpu() else nullcontext()):
        if segments is None:
            logits = model(inputs)
        else:
            logits = packed_logits(model, inputs, segments)
    if rows is not None and logits.shape[:2] != targets.shape:  # (1, N, V): only the target rows
        targets, mask = targets.reshape(-1)[rows][None], mask.reshape(-1)[rows][None]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask  # (B, L) or (1, N)
    return ce.sum(), mask.sum()


def to_batch(inputs, targets, mask, segments=None) -> tuple:
    """Numpy (B, L) arrays -> the mx tuple loss_sums takes: (inputs, targets, mask, segments, rows),
    segments None unless packed, rows the head's loss positions (head.target_rows) or None."""
    rows = head.target_rows(mask)
    return tuple(None if a is None else mx.array(a) for a in (inputs, targets, mask, segments, rows))
