"""Logits only where the loss needs them.

The output head is the costliest layer of a small model with a large vocabulary: on SmolLM2
(576 -> 49,152) the head and its cross-entropy (one `exp` per vocabulary entry per token, which
MLX's CPU backend computes at ~100 M/s) took ~4 s of a 4 x 1024-token step. In chat and
prompt/completion data about half the tokens carry no loss (prompts, role headers, padding), so
the head is computed only at the positions that do: the batch carries `rows`, the flattened
(B * L) indices of its target tokens padded to a coarse size (so compiled shapes repeat), and
while `only_rows(rows)` is active the model's head keeps those rows before projecting.

The head's class is swapped per instance (parameters and names unchanged, nothing patched
globally). Outside `only_rows` it behaves exactly as before. A model whose head is not found
(`lm_head`, or tied `model.embed_tokens.as_linear`) simply returns full logits and the loss
takes the usual path (step.loss_sums checks the shape).
"""

from __future__ import annotations

from contextvars import ContextVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

_ROWS: ContextVar = ContextVar("mlxlora_head_rows", default=None)
LEVELS = 8  # at most this many row counts per (B, L) batch shape, so compiled traces are reused


class only_rows:
    """Context: while active, a swapped head projects only flattened rows `rows` (N,) of its input."""

    def __init__(self, rows: mx.array | None):
        self.rows = rows

    def __enter__(self):
        self.token = _ROWS.set(self.rows)

    def __exit__(self, *exc):
        _ROWS.reset(self.token)


def _gather(x: mx.array) -> mx.array:
    rows = _ROWS.get()
    if rows is None or x.ndim != 3:
        return x
    return x.reshape(-1, x.shape[-1])[rows][None]  # (B, L, D) -> (1, N, D)


_SWAPPED: dict[tuple[type, str], type] = {}


def _rows_class(cls: type, method: str) -> type:
    key = (cls, method)
    if key not in _SWAPPED:
        base_method = getattr(cls, method)

        def project(self, x, *args, **kwargs):
            return base_method(self, _gather(x), *args, **kwargs)

        _SWAPPED[key] = type(f"Rows{cls.__name__}", (cls,), {method: project, "_mlxlora_rows_head": True})
    return _SWAPPED[key]


def find_head(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(module, method) that projects hidden states to the vocabulary, or None if not recognised."""
    head = model.get("lm_head") if isinstance(model, dict) else None
    if isinstance(head, nn.Module):
        return head, "__call__"
    inner = model.get("model") if isinstance(model, dict) else None
    emb = inner.get("embed_tokens") if isinstance(inner, dict) else None
    if isinstance(emb, nn.Module) and hasattr(emb, "as_linear"):
        return emb, "as_linear"
    return None


def enable(model: nn.Module) -> bool:
    """Swap the model's head to the row-selecting class (idempotent). False if no head was found."""
    found = find_head(model)
    if found is None:
        return False
    module, method = found
    if not getattr(module, "_mlxlora_rows_head", False):
        module.__class__ = _rows_class(type(module), method)
    return True


def padded_rows(n_targets: int, n_tokens: int) -> int:
    """Rows the head projects for a batch of n_tokens holding n_targets loss tokens: n_targets rounded
    up to a multiple of n_tokens / LEVELS, or n_tokens when that saves nothing."""
    quantum = -(-n_tokens // LEVELS)
    return min(-(-max(n_targets, 1) // quantum) * quantum, n_tokens)


def target_rows(mask: np.ndarray) -> np.ndarray | None:
    """Flattened indices (N,) of the non-zero entries of a (B, L) loss mask, padded to one of LEVELS sizes.

    Padding repeats a position whose mask is 0, so padded rows carry no loss. Returns None when
    selecting would not save at least one level (text data: nearly every token is a target); such
    batches take the plain full-logits step.
    """
    flat_mask = mask.reshape(-1)
    flat = np.flatnonzero(flat_mask)
    size = padded_rows(len(flat), flat_mask.size)
    if size >= flat_mask.size:
        return None
    rows = np.full(size, np.flatnonzero(flat_mask == 0)[0], dtype=np.int32)
    rows[:len(flat)] = flat
    return rows
