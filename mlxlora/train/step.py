"""The compiled pieces of a training step: loss, gradient of one micro-batch, optimizer update.

Gradient accumulation is token-weighted: each micro-batch contributes the gradient of its
*summed* token loss, and the update divides by the total number of target tokens, so k
micro-batches give exactly the gradient of one batch holding all of them.
"""

from __future__ import annotations

import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..config import TrainConfig
from ..loss.tokens import loss_sums


def build_schedule(cfg: TrainConfig, total_steps: int):
    """Linear warm-up to cfg.lr, then cosine / linear decay to 0, or constant."""
    decay_steps = max(1, total_steps - cfg.warmup)
    if cfg.schedule == "cosine":
        main = optim.cosine_decay(cfg.lr, decay_steps, 0.0)
    elif cfg.schedule == "linear":
        main = optim.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        main = lambda step: mx.array(cfg.lr, dtype=mx.float32)  # noqa: E731
    if cfg.warmup == 0:
        return main
    warm = optim.linear_schedule(cfg.lr / cfg.warmup, cfg.lr, cfg.warmup)
    return optim.join_schedules([warm, main], [cfg.warmup])


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optim.Optimizer:
    return optim.AdamW(learning_rate=build_schedule(cfg, total_steps), weight_decay=cfg.weight_decay)


class Stepper:
    """Holds the compiled micro-batch gradient and update functions for one model/optimizer.

    time_comm: when True (set it on an instance), each step evaluates the gradients before the
    cross-rank sum and the summed result after it, adding the seconds in between to
    comm_seconds and the float32 buffer size to comm_bytes (per rank, one call per step). This
    adds two host syncs per step, so it is off by default; off, the step is unchanged.
    """

    time_comm = False

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, clip_grad: float | None, group=None,
                 loss_fn=loss_sums, chunk: int | None = None):
        """group: an mx.distributed group of size > 1 sums gradients and token counts across ranks,
        so every rank applies the same update (data parallel); None or size 1 trains alone.

        loss_fn(model, *batch) -> (summed loss, count[, metric sums (K,)]): the objective (SFT's token
        cross-entropy by default; loss/preference.py's preference_sums). The update divides by the summed
        count; metric sums are summed like the loss and left in `self.metrics` after each step.
        chunk: tokens per chunk of loss_fn's head (loss.tokens.loss_sums; None: from the vocabulary, 0: plain)."""
        self.model, self.optimizer = model, optimizer
        self.group = group if group is not None and group.size() > 1 else None
        if loss_fn is loss_sums:  # training's chunked loss forms the head's gradient in the forward
            fn = partial(loss_sums, chunk=chunk, train=True)
        else:
            fn = loss_fn if chunk is None else partial(loss_fn, chunk=chunk)
        vg = nn.value_and_grad(model, fn)

        # model.state is an output too: value_and_grad swaps traced parameters into the model.
        @partial(mx.compile, inputs=[model.state, mx.random.state], outputs=[model.state, mx.random.state])
        def micro(*batch):  # (inputs, targets, mask[, segments[, rows]]) for loss_sums
            out, grads = vg(model, *batch)
            extra = out[2] if len(out) > 2 else mx.zeros((0,), dtype=mx.float32)
            return out[0], out[1], extra, grads

        @partial(mx.compile, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state])
        def update(grads, ntok):
            grads = tree_map(lambda g: g / ntok, grads)
            if clip_grad is not None:
                grads, norm = optim.clip_grad_norm(grads, clip_grad)
            else:
                norm = optim.clip_grad_norm(grads, float("inf"))[1]
            optimizer.update(model, grads)
            return norm

        self.micro, self.update = micro, update
        self.metrics = None
        self.comm_seconds, self.comm_bytes, self.comm_calls = 0.0, 0, 0

    def step(self, batches) -> tuple[mx.array, mx.array, mx.array]:
        """One optimizer step over micro-batches [(inputs, targets, mask[, segments[, rows]]), ...].

        Returns (mean loss, target tokens, grad norm), unevaluated; with several micro-batches
        each one is evaluated before the next so only one holds activations at a time.
        """
        total_l, total_n, total_m, acc = None, None, None, None
        for batch in batches:
            lsum, ntok, extra, grads = self.micro(*batch)
            if acc is None:
                total_l, total_n, total_m, acc = lsum, ntok, extra, grads
            else:
                total_l, total_n, total_m = total_l + lsum, total_n + ntok, total_m + extra
                acc = tree_map(mx.add, acc, grads)
            if len(batches) > 1:
                # Evaluate each micro-batch so its activations are freed before the next one.
                mx.eval(total_l, total_n, total_m, acc)
        if self.group is not None and self.time_comm:
            total_l, total_n, total_m, acc = self._timed_all_sum((total_l, total_n, total_m, acc))
        elif self.group is not None:
            total_l, total_n, total_m, acc = all_sum_tree((total_l, total_n, total_m, acc), self.group)
        self.metrics = total_m
        ntok = mx.maximum(total_n, 1)
        self.last_grads = acc  # summed adapter gradients of this step (the start-up report reads step 1's)
        norm = self.update(acc, ntok)
        return total_l / ntok, total_n, norm

    def _timed_all_sum(self, tree):
        mx.eval(tree)  # local compute ends here, so the clock below sees only the collective
        t0 = time.perf_counter()
        out = all_sum_tree(tree, self.group)
        mx.eval(out)
        self.comm_seconds += time.perf_counter() - t0
        self.comm_bytes += 4 * sum(v.size for _, v in tree_flatten(tree))
        self.comm_calls += 1
        return out


def all_sum_tree(tree, group):
    """Sum every array of `tree` across the ranks of `group` in ONE collective (flatten, sum, split).

    Only what is passed travels: for training, the adapter gradients plus two scalars.
    """
    leaves = tree_flatten(tree)
    flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in leaves])
    summed = mx.distributed.all_sum(flat, group=group)
    out, offset = [], 0
    for key, v in leaves:
        out.append((key, summed[offset:offset + v.size].reshape(v.shape).astype(v.dtype)))
        offset += v.size
    return tree_unflatten(out)


def grad_checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass (less memory, ~30% more compute).

    Only the block instances of this model change class (to a checkpointed subclass); no class
    is patched globally. Returns the number of blocks switched.
    """
    blocks = getattr(model, "layers", None)
    if blocks is None:
        return 0
    for block in blocks:
        block.__class__ = _checkpointed(type(block))
    return len(blocks)


_CKPT: dict[type, type] = {}


def checkpointed_call(block: nn.Module, call, x: mx.array) -> mx.array:
    """call(x) (the block's forward) with its activations recomputed in the backward, block by block.

    Like mx.checkpoint, the backward recomputes the block from its input, tied to the cotangent so
    mx.compile cannot merge the recomputation with the forward. Unlike it, the block's input gradient
    is made to depend on the block's adapter gradients: otherwise the lazy graph evaluates the chain of
    input gradients first (the first block's adapters are the first outputs) and every block's
    recomputed activations that only an adapter gradient needs (down_proj's (T, I) input) stay alive
    until the whole backward is done. Only (x, trainable parameters) are inputs: other arguments
    (mask, cache) are closed over and get no gradient.
    """
    flat = tree_flatten(block.trainable_parameters())
    names, values = [k for k, _ in flat], [v for _, v in flat]

    def run(x, params):
        saved = dict(tree_flatten(block.trainable_parameters()))
        block.update(tree_unflatten(list(zip(names, params))))
        try:
            return call(x)
        finally:
            block.update(tree_unflatten(list(saved.items())))

    @mx.custom_function
    def f(x, *params):
        return run(x, params)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        primals = mx.depends(list(primals), [cotangent])
        _, grads = mx.vjp(lambda x, *p: [run(x, p)], primals, [cotangent])
        dx, *dparams = grads
        if dparams:
            (dx,) = mx.depends([dx], dparams)  # this block's adapter gradients first: then its buffers go
        return [dx, *dparams]

    return f(x, *values)


def _checkpointed(cls: type) -> type:
    if getattr(cls, "_mlxlora_checkpointed", False):
        return cls
    if cls not in _CKPT:
        def __call__(self, x, *args, **kwargs):
            return checkpointed_call(self, lambda h: cls.__call__(self, h, *args, **kwargs), x)

        _CKPT[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_mlxlora_checkpointed": True})
    return _CKPT[cls]
