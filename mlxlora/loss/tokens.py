"""The token-level loss of a batch: summed masked cross-entropy and the count of target tokens.

`to_batch` turns collated numpy arrays into the tuple `loss_sums` takes; `loss_sums` runs the model with
the output head only at loss rows (head.py), blocked causal attention on CPU (attention.py), packed
rows kept apart (packed.py) and, for a recognised model, the cross-entropy in chunks that never hold
all the logits (chunked.py). `token_logprobs` gives the per-token log-probabilities the same way.
"""

from __future__ import annotations

from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn

from ..lora.quant import on_cpu
from . import head
from .attention import blocked_causal
from .chunked import head_parts, masked_ce_sum, token_ce
from .packed import segment_cache


def _forward(fn, model, inputs, segments):
    cache = None if segments is None else segment_cache(model, segments)
    with blocked_causal(model) if on_cpu() else nullcontext():
        return fn(inputs) if cache is None else fn(inputs, cache=cache)


def _hidden_rows(trunk, model, inputs, targets, segments, rows):
    hidden = _forward(trunk, model, inputs, segments)  # (B, L, D) after the final norm
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    return (h[rows], t[rows]) if rows is not None else (h, t)


def per_token_ce(model: nn.Module, inputs: mx.array, targets: mx.array, segments: mx.array | None = None,
                 rows: mx.array | None = None, chunk: int | None = None) -> tuple[mx.array, tuple]:
    """Cross-entropy of every target token: (ce, shape) with ce (B, L), or (1, N) at `rows`.

    chunk: tokens per chunk of the chunked loss (None: chunked.chunk_rows of the vocabulary; 0: the
    plain loss over full logits). A model the chunked loss does not recognise takes the plain loss.
    """
    parts = head_parts(model) if chunk != 0 else None
    if parts is not None:
        trunk, module, method, cap = parts
        h, t = _hidden_rows(trunk, model, inputs, targets, segments, rows)
        shape = (1, rows.size) if rows is not None else targets.shape
        return token_ce(module, method, h, t, cap, rows=chunk).reshape(shape), shape
    if rows is not None:
        head.enable(model)
    with head.only_rows(rows):
        logits = _forward(model, model, inputs, segments)
    if rows is not None and logits.shape[:2] != targets.shape:  # (1, N, V): only the target rows
        targets = targets.reshape(-1)[rows][None]
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets), targets.shape


def loss_sums(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
              segments: mx.array | None = None, rows: mx.array | None = None, chunk: int | None = None,
              train: bool = False):
    """(sum of masked token cross-entropies, number of target tokens). inputs/targets/mask: (B, L).

    segments (B, L): per-token sample ids of a packed batch (see data/packing.py), or None.
    rows (N,): flattened positions that carry loss (head.target_rows); only those rows reach the head.
    chunk: as per_token_ce. train: the chunked loss forms its gradient in the forward (chunked.masked_ce_sum:
    no recomputation; for value_and_grad), else it recomputes in the backward (any use).
    """
    parts = head_parts(model) if chunk != 0 and train else None
    if parts is not None:
        trunk, module, method, cap = parts
        h, t = _hidden_rows(trunk, model, inputs, targets, segments, rows)
        w = mask.reshape(-1)[rows] if rows is not None else mask.reshape(-1)
        return masked_ce_sum(module, method, h, t, w.astype(mx.float32), cap, rows=chunk), mask.sum()
    ce, shape = per_token_ce(model, inputs, targets, segments, rows, chunk)
    if tuple(shape) != tuple(mask.shape):
        mask = mask.reshape(-1)[rows][None]
    return (ce * mask).sum(), mask.sum()


def token_logprobs(model: nn.Module, inputs: mx.array, targets: mx.array, segments: mx.array | None = None,
                   chunk: int | None = None) -> mx.array:
    """log p(target) of every position, (B, L), differentiable (the preference losses' per-token
    log-probabilities), computed in chunks like loss_sums."""
    return -per_token_ce(model, inputs, targets, segments, None, chunk)[0]


def to_batch(inputs, targets, mask, segments=None) -> tuple:
    """Numpy (B, L) arrays -> the mx tuple loss_sums takes: (inputs, targets, mask, segments, rows),
    segments None unless packed, rows the head's loss positions (head.target_rows) or None."""
    rows = head.target_rows(mask)
    return tuple(None if a is None else mx.array(a) for a in (inputs, targets, mask, segments, rows))
