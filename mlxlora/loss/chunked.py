"""Cross-entropy over the output head in chunks of tokens, never holding all the logits.

At 2,048 loss tokens and Gemma's 262,144-token vocabulary, the float32 logits alone are 2.1 GB and
autodiff keeps them, their softmax and their gradient. `token_ce` instead runs the head on `rows`
tokens at a time under a custom VJP (`mx.custom_function`): the forward keeps only each token's
log-sum-exp and target logit (N floats each); the backward recomputes one chunk's logits, forms
softmax - one_hot there, and pushes it back through the head with `mx.vjp` (so LoRA on `lm_head`,
a LoRA tied embedding, quantized heads and DoRA get their gradients from their own code), then
frees it before the next chunk.

Models are recognised by their mlx-lm `Model.__call__`: `head(model.model(inputs, cache))`, then
optionally gemma2's final soft-capping `tanh(z / c) * c`. Anything else returns None from
`head_parts` and the loss takes the plain full-logits path.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .head import find_head

# model_type -> attribute of the mlx-lm Model holding the final-logit soft-cap (None: no soft-cap).
# Each of these computes exactly head(self.model(inputs, cache)) [then the soft-cap] in Model.__call__.
CHUNKABLE = {"llama": None, "mistral": None, "qwen2": None, "qwen3": None, "gemma3_text": None,
             "phi3": None, "gemma": None, "gemma2": "final_logit_softcapping"}

# (rows, V) float32 buffers alive at once, measured (mlx 0.32.4, CPU, compiled training step, V 151,936):
# 7.2. A chunk's logits, softmax-gradient and temporaries, and the next chunk's buffers, which mlx
# allocates when it queues the next chunk's ops, before the running chunk's are freed.
CHUNK_COPIES = 8
# One chunk of the loss may use 1/64 of the machine's memory: 16 GB and Qwen's 151,936 tokens give 48 rows
# (measured head time: 40-72 rows 5-11 % faster than the full-logits loss, 24 rows 13 % slower).
MEMORY_SHARE = 64
DEFAULT_MEMORY = 16 << 30  # when the caller cannot tell the machine's memory: a 16 GB laptop


def chunk_rows(vocab: int, memory_bytes: int | None = None) -> int:
    """Tokens per chunk so that one chunk's CHUNK_COPIES (rows, vocab) float32 buffers fit in
    memory_bytes / MEMORY_SHARE (the one home of this rule; the planner uses it too). At least 8."""
    budget = (memory_bytes or DEFAULT_MEMORY) // MEMORY_SHARE
    return max(8, budget // (CHUNK_COPIES * 4 * max(vocab, 1)) // 8 * 8)


def model_chunk_rows(model: nn.Module, memory_bytes: int | None = None) -> int | None:
    """chunk_rows for this model's head vocabulary, or None when the chunked loss does not apply."""
    parts = head_parts(model)
    if parts is None:
        return None
    weights = [v for k, v in tree_flatten(parts[1].parameters()) if k.endswith("weight")]
    return chunk_rows(weights[0].shape[0], memory_bytes) if weights else None


def chunk_bounds(n: int, rows: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering 0..n in chunks of `rows` tokens."""
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


def head_parts(model: nn.Module):
    """(trunk, head module, head method, soft-cap or None) of a recognised model, else None."""
    args = getattr(model, "args", None)
    model_type = getattr(args, "model_type", None) or getattr(model, "model_type", None)
    if model_type not in CHUNKABLE or not isinstance(getattr(model, "model", None), nn.Module):
        return None
    found = find_head(model)
    if found is None:
        return None
    cap_attr = CHUNKABLE[model_type]
    cap = getattr(model, cap_attr, None) if cap_attr else None
    return model.model, found[0], found[1], cap


class _Head:
    """The head module with its adapters as explicit arrays: logits(h, trainable) for mx.vjp."""

    def __init__(self, module: nn.Module, method: str, cap):
        self.module, self.method, self.cap = module, method, cap
        self.names = [k for k, _ in tree_flatten(module.trainable_parameters())]
        self.params = dict(tree_flatten(module.parameters()))
        self.trainable = [self.params[k] for k in self.names]

    def with_params(self, values: dict, fn):
        self.module.update(tree_unflatten(list(values.items())))
        try:
            return fn()
        finally:
            self.module.update(tree_unflatten([(k, self.params[k]) for k in values]))

    def raw(self, h: mx.array, *trainable) -> list[mx.array]:
        """[uncapped float32 logits (c, V)] of hidden rows h (c, D) with adapter values `trainable`."""
        call = getattr(self.module, self.method)
        return [self.with_params(dict(zip(self.names, trainable)), lambda: call(h[None]).squeeze(0).astype(mx.float32))]

    def capped(self, z: mx.array) -> mx.array:
        return mx.tanh(z / self.cap) * self.cap if self.cap else z

    def chunk_grad(self, h, t, trainable, g):
        """(ce (c,), lse (c,), d(Σ g·ce)/dh (c, D), [d/d adapters]) of one chunk, all from one pass of its logits."""
        z = self.capped(self.raw(h, *trainable)[0])  # (c, V): alive for this chunk only
        lse = mx.logsumexp(z, axis=-1)
        ce = lse - mx.take_along_axis(z, t[:, None], axis=-1)[:, 0]
        gz = g[:, None] * (mx.exp(z - lse[:, None]) - (mx.arange(z.shape[-1])[None] == t[:, None]))
        if self.cap:
            gz = gz * (1 - mx.square(z / self.cap))  # d(tanh(x / c) * c)/dx, written with z itself
        _, grads = mx.vjp(self.raw, [h, *trainable], [gz])
        return ce, lse, grads[0].astype(h.dtype), grads[1:]


def masked_ce_sum(module: nn.Module, method: str, hidden: mx.array, targets: mx.array, weights: mx.array,
                  cap=None, rows: int | None = None) -> mx.array:
    """Σ weights · cross-entropy (a scalar) of the head at hidden rows (N, D), for training.

    The gradient is formed in the forward, chunk by chunk, from the same logits (weights are known, so
    d loss / d logits = weights · (softmax - one_hot)); the backward only scales it. No recomputation:
    the head costs what the plain loss costs. Each chunk's hidden rows depend on the previous chunk's
    gradients, so the lazy graph finishes a chunk (and frees its logits) before starting the next.
    """
    head = _Head(module, method, cap)
    n = hidden.shape[0]
    rows = rows or chunk_rows(next(v for k, v in head.params.items() if k.endswith("weight")).shape[0])

    @mx.custom_function
    def f(h, t, w, *trainable):
        total, dh, dparams, prev = mx.array(0.0), [], None, []
        for i, j in chunk_bounds(n, rows):
            hc = mx.depends([h[i:j]], prev)[0] if prev else h[i:j]
            ce, _, dhc, dp = head.chunk_grad(hc, t[i:j], trainable, w[i:j])
            total = total + (ce * w[i:j]).sum()
            dh.append(dhc)
            dparams = dp if dparams is None else [a + b for a, b in zip(dparams, dp)]
            prev = [dhc, total, *dparams]  # total too: its take of the chunk's logits must come before
        return total, mx.concatenate(dh), *(dparams or [])

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        h, t, w, *_ = primals
        s = cotangents[0]
        return [s * outputs[1], mx.zeros_like(t), mx.zeros_like(w), *(s * d for d in outputs[2:])]

    return f(hidden, targets, weights, *head.trainable)[0]


def token_ce(module: nn.Module, method: str, hidden: mx.array, targets: mx.array, cap=None,
             rows: int | None = None) -> mx.array:
    """Per-token cross-entropy (N,) of the head `getattr(module, method)` at hidden rows (N, D) for
    targets (N,), `rows` tokens at a time (default: chunk_rows of the head's vocabulary).

    Any cotangent works (per-token log-probabilities for the preference losses): the forward keeps
    each token's log-sum-exp and target logit; the backward recomputes each chunk's logits. Gradients
    reach `hidden` and the module's trainable parameters (adapters); frozen weights get none.
    """
    head = _Head(module, method, cap)
    frozen_names = [k for k in head.params if k not in set(head.names)]
    n = hidden.shape[0]
    rows = rows or chunk_rows(next(v for k, v in head.params.items() if k.endswith("weight")).shape[0])

    @mx.custom_function
    def f(h, t, *trainable):
        lse, tgt = [], []
        for i, j in chunk_bounds(n, rows):  # each chunk after the previous one's results (see masked_ce_sum)
            hc = mx.depends([h[i:j]], [lse[-1], tgt[-1]])[0] if lse else h[i:j]
            z = head.capped(head.raw(hc, *trainable)[0])  # (c, V): alive for this chunk only
            lse.append(mx.logsumexp(z, axis=-1))
            tgt.append(mx.take_along_axis(z, t[i:j, None], axis=-1)[:, 0])
        lse = mx.concatenate(lse)
        return lse - mx.concatenate(tgt), lse

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        h, t, *trainable = primals
        g = cotangents[0]
        # Tie the recomputation to the cotangent: otherwise mx.compile merges it with the forward's
        # identical head (common subexpression) and keeps every chunk's logits alive until here.
        h, *frozen = mx.depends([h, *(head.params[k] for k in frozen_names)], [g, *outputs])

        def backward():
            dh, dparams, prev = [], None, []
            for i, j in chunk_bounds(n, rows):  # one chunk after the other (see masked_ce_sum)
                hc = mx.depends([h[i:j]], prev)[0] if prev else h[i:j]
                _, _, dhc, dp = head.chunk_grad(hc, t[i:j], trainable, g[i:j])
                dh.append(dhc)
                dparams = dp if dparams is None else [a + b for a, b in zip(dparams, dp)]
                prev = [dhc, *dparams]
            return [mx.concatenate(dh), mx.zeros_like(t), *(dparams or [])]

        return head.with_params(dict(zip(frozen_names, frozen)), backward)

    return f(hidden, targets, *head.trainable)[0]
