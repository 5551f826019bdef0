"""The layers behind MultiAdapterModel: a base layer wrapped once, holding any number of named updates.

`MultiLoRALinear` / `MultiLoRAEmbedding` keep a dict name -> {lora_a, lora_b[, m]} (in the parameter tree)
and apply the entry named by `active`, or, under a `RowPlan`, a different entry per batch row.
The base layer is held as is: switching or removing an adapter never copies its arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import AdapterError
from .layers import EMBEDDING_TYPES, LINEAR_TYPES, linear_dims
from .quant import float_weight, weight_shape
from .switch import SWITCH_TYPES, switch_dims


@dataclass(frozen=True)
class RowPlan:
    """Which adapter each batch row uses: groups of (name or None, row indices) and the inverse order."""

    size: int
    groups: tuple
    inverse: mx.array

    @classmethod
    def of(cls, names: list) -> "RowPlan":
        by_name: dict = {}
        for i, n in enumerate(names):
            by_name.setdefault(n, []).append(i)
        order = [i for rows in by_name.values() for i in rows]
        groups = tuple((n, mx.array(rows)) for n, rows in by_name.items())
        return cls(len(names), groups, mx.argsort(mx.array(order)))


class _Multi(nn.Module):
    """Shared bookkeeping of the multi-adapter layers.

    adapters: name -> arrays (in the parameter tree). active: the adapter applied (None: the base).
    plan: a RowPlan while a mixed batch runs, else None. base: the wrapped layer, held under the
    attribute named by BASE ("linear" / "embedding", as in LoRALinear / LoRAEmbedding).
    """

    BASE = ""

    def __init__(self, base: nn.Module):
        super().__init__()
        setattr(self, self.BASE, base)
        self.adapters = {}
        self._scales = {}
        self.active = None
        self.plan = None

    def add(self, name: str, lora) -> None:
        """Attach `lora` (a formats.record.LayerLoRA: lora_a, lora_b, scale, m) under `name`."""
        self.adapters[name] = lora.arrays()
        self._scales[name] = float(lora.scale)

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._scales.pop(name, None)

    @property
    def base(self) -> nn.Module:
        return getattr(self, self.BASE)

    def _select(self, fn, x):
        """fn(name, x) for the active adapter, or row by row under a RowPlan (batch first)."""
        plan = self.plan
        if plan is None:
            return fn(self.active, x)
        if len(plan.groups) == 1:
            return fn(plan.groups[0][0], x)
        if x.shape[0] != plan.size:
            raise AdapterError(f"adapter_names has {plan.size} entries but a layer saw a batch of {x.shape[0]} rows; "
                               "give one name (or None) per row of the input")
        parts = [fn(name, x[rows]) for name, rows in plan.groups]  # each (rows_i, ...)
        return mx.concatenate(parts, axis=0)[plan.inverse]


class MultiLoRALinear(_Multi):
    """A Linear / QuantizedLinear wrapped once, with any number of named LoRA or DoRA updates.

    y = linear(x) + scale * x @ lora_a @ lora_b for the active adapter (DoRA: as DoRALinear), else linear(x).
    """

    BASE = "linear"

    def __call__(self, x):
        return self._select(self._forward, x)

    def _forward(self, name, x):
        p = self.adapters.get(name) if name is not None else None
        if p is None:
            return self.linear(x)
        scale = self._scales[name]
        if "m" in p:
            return self._dora(p, scale, x)
        z = (x @ p["lora_a"]) @ p["lora_b"]
        return self.linear(x) + (scale * z).astype(x.dtype)

    def _dora(self, p, scale, x):
        # The same computation as DoRALinear.__call__ (row norm of the adapted weight, detached as PEFT).
        w = float_weight(self.linear)
        y = x @ w.astype(x.dtype).T
        y = y + (scale * ((x @ p["lora_a"]) @ p["lora_b"])).astype(x.dtype)
        delta = scale * (p["lora_b"].T.astype(mx.float32) @ p["lora_a"].T.astype(mx.float32))
        denom = mx.stop_gradient(mx.linalg.norm(w.astype(mx.float32) + delta, axis=1))  # (out,)
        y = (p["m"] / denom).astype(x.dtype) * y
        if "bias" in self.linear:
            y = y + self.linear.bias
        return y


class MultiLoRAEmbedding(_Multi):
    """An Embedding wrapped once, with named updates lora_a (num, r) / lora_b (r, dims); `as_linear` for tied heads."""

    BASE = "embedding"

    def __call__(self, ids):
        return self._select(self._lookup, ids)

    def as_linear(self, x):
        return self._select(self._head, x)

    def _lookup(self, name, ids):
        y = self.embedding(ids)
        p = self.adapters.get(name) if name is not None else None
        if p is None:
            return y
        z = p["lora_a"][ids] @ p["lora_b"]
        return y + (self._scales[name] * z).astype(y.dtype)

    def _head(self, name, x):
        y = self.embedding.as_linear(x)
        p = self.adapters.get(name) if name is not None else None
        if p is None:
            return y
        z = (x @ p["lora_b"].T.astype(x.dtype)) @ p["lora_a"].T.astype(x.dtype)
        return y + (self._scales[name] * z).astype(y.dtype)


class MultiLoRASwitchLinear(_Multi):
    """MoE experts (SwitchLinear / QuantizedSwitchLinear) wrapped once, with named per-expert updates
    lora_a (E, in, r) / lora_b (E, r, out), applied with the base's indices as LoRASwitchLinear does.

    A batch mixing adapters row by row is refused: the MoE block sorts (token, expert) pairs by expert
    before these layers see them, so which row a pair came from is gone.
    """

    BASE = "linear"

    def __call__(self, x, indices, sorted_indices: bool = False):
        plan = self.plan
        if plan is not None and len(plan.groups) > 1:
            raise AdapterError("adapter_names: a batch mixing adapters row by row is not supported on MoE experts "
                               "(tokens are regrouped by expert); run one adapter per batch")
        name = plan.groups[0][0] if plan is not None else self.active
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        p = self.adapters.get(name) if name is not None else None
        if p is None:
            return y
        z = mx.gather_mm(x, p["lora_a"], rhs_indices=indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, p["lora_b"], rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self._scales[name] * z).astype(x.dtype)


MULTI_TYPES = (MultiLoRALinear, MultiLoRAEmbedding, MultiLoRASwitchLinear)


def fit_problem(path: str, lora, module) -> str | None:
    """Why `lora` (a formats.record.LayerLoRA) cannot go on `module` (the base layer at `path`, or its
    multi-adapter wrapper), or None."""
    if isinstance(module, MULTI_TYPES):
        module = module.base
    if lora.experts or isinstance(module, SWITCH_TYPES):
        if not (lora.experts and isinstance(module, SWITCH_TYPES)):
            return f"{path}: per-expert tensors and the base layer ({type(module).__name__}) do not match"
        e, in_dims, out_dims = switch_dims(module)
        a, b = tuple(lora.lora_a.shape), tuple(lora.lora_b.shape)
        if a != (e, in_dims, lora.rank) or b != (e, lora.rank, out_dims):
            return f"{path}: lora_a {a} / lora_b {b} do not fit ({e}, {in_dims}, r) / ({e}, r, {out_dims})"
        return None
    kinds = EMBEDDING_TYPES if lora.embedding else LINEAR_TYPES
    if not isinstance(module, kinds):
        return f"{path}: the base has no {'Embedding' if lora.embedding else 'Linear'} there"
    if lora.embedding:
        in_dims, out_dims = weight_shape(module)  # (num_embeddings, dims)
    else:
        in_dims, out_dims = linear_dims(module)
    a, b = tuple(lora.lora_a.shape), tuple(lora.lora_b.shape)
    if a != (in_dims, lora.rank) or b != (lora.rank, out_dims):
        return f"{path}: lora_a {a} / lora_b {b} do not fit ({in_dims}, r) / (r, {out_dims})"
    return None


__all__ = ["RowPlan", "MultiLoRALinear", "MultiLoRAEmbedding", "MultiLoRASwitchLinear", "MULTI_TYPES", "fit_problem"]
