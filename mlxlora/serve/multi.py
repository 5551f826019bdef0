"""Many adapters over one base: load the base once, attach named adapters, switch between them.

Each adapted base layer is wrapped ONCE by a `MultiLoRALinear` / `MultiLoRAEmbedding` that holds a
dict name -> {lora_a, lora_b[, m]} and applies the active entry. Switching, disabling and deleting
only change which entry is read: no weight is reloaded and the base arrays are never copied.
A batch may also mix adapters row by row (`model(ids, adapter_names=["a", None, "b"])`, as PEFT's
`adapter_names=`): each layer gathers the rows of one adapter, applies it, and puts the rows back.

Adapters are AdapterRecords (mlxlora.formats): a folder of any format is read once and checked
against the bare base (the wrappers are taken off for the moment and put back) with
`mlxlora.adapters.fit`, the same check `load_adapter` makes. The layer classes live in
`mlxlora.lora.multi_layers`.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..adapters import check_base, fit, save_record
from ..errors import AdapterError
from ..formats import read_adapter as read_record
from ..formats.record import AdapterRecord
from ..lora.multi_layers import (MULTI_TYPES, MultiLoRAEmbedding, MultiLoRALinear, MultiLoRASwitchLinear, RowPlan,
                                 fit_problem)
from ..lora.surgery import adapter_layers
from .merge import add_weighted_adapter as merge_adapters

_NAME = re.compile(r"[A-Za-z0-9_-]+")
Adapter = AdapterRecord  # the name this module's API has used for a whole adapter


def read_adapter(model: nn.Module, adapter_dir, base_info: dict | None = None,
                 ignore_base_mismatch: bool = False) -> AdapterRecord:
    """The adapter in `adapter_dir` (any format, or a hub id), checked against `model` (a bare base, unchanged).

    Raises AdapterError (one line, naming the file) when the folder does not fit the model, or (base_info given,
    models.describe_base) when an mlxlora adapter records another base, unless ignore_base_mismatch.
    """
    record = read_record(adapter_dir)
    check_base(record, base_info, ignore_base_mismatch)
    record = fit(model, record)
    mx.eval([lora.arrays() for lora in record.layers.values()])
    return record


# ---------------------------------------------------------------- the model

class _Restore:
    """Returned by set/disable: already applied; as a context manager it restores the previous adapter on exit."""

    def __init__(self, owner: "MultiAdapterModel", previous: str | None):
        self.owner, self.previous = owner, previous

    def __enter__(self):
        return self.owner

    def __exit__(self, *exc):
        self.owner._activate(self.previous)
        return False


class MultiAdapterModel:
    """One base model (an mlx-lm module, wrapped in place) serving any number of named adapters (PEFT's API).

    load_adapter(path, name) / add_adapter(name, adapter), set_adapter(name), disable_adapter() (also a
    context manager), delete_adapter(name), `adapters`, `active_adapter`, and `model(ids, adapter_names=[...])`
    for a batch whose rows use different adapters. Not thread-safe: serialise calls (see mlxlora.server).
    base_info (models.Base.describe() of the bare model; `of_base` takes it): load_adapter refuses an mlxlora
    adapter trained on another base, as load_adapter does for one adapter, unless ignore_base_mismatch.
    """

    @classmethod
    def of_base(cls, base, ignore_base_mismatch: bool = False) -> "MultiAdapterModel":
        """Over a loaded mlxlora.models.Base (bare), checking each adapter's recorded base against it."""
        return cls(base.model, base_info=base.describe(), ignore_base_mismatch=ignore_base_mismatch)

    def __init__(self, model: nn.Module, base_info: dict | None = None, ignore_base_mismatch: bool = False):
        if adapter_layers(model):
            raise AdapterError("MultiAdapterModel: the model already has a single adapter; start from a bare base "
                               "(mlxlora.models.load_base) and attach adapters with load_adapter(path, name)")
        if any(isinstance(m, MULTI_TYPES) for _, m in model.named_modules()):
            raise AdapterError("MultiAdapterModel: this model is already managed by another MultiAdapterModel; use that one")
        self.model = model
        self.base_info, self.ignore_base_mismatch = base_info, ignore_base_mismatch
        self._adapters: dict[str, Adapter] = {}
        self._active: str | None = None

    # -- what is loaded
    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def get_adapter(self, name: str) -> Adapter:
        self._check_known(name)
        return self._adapters[name]

    def multi_layers(self) -> list[tuple[str, nn.Module]]:
        return [(p, m) for p, m in self.model.named_modules() if isinstance(m, MULTI_TYPES)]

    # -- adding and removing
    def load_adapter(self, adapter_dir, name: str) -> Adapter:
        """Read an adapter folder (any format load_adapter reads) and attach it as `name`. Raises AdapterError."""
        self._check_new_name(name)
        with self._bare() as model:
            adapter = read_adapter(model, adapter_dir, self.base_info, self.ignore_base_mismatch)
        self.add_adapter(name, adapter)
        return adapter

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        """Attach an in-memory Adapter (e.g. a merge result) as `name`; its tensors must fit the base."""
        self._check_new_name(name)
        modules = dict(self.model.named_modules())
        problems = [p for p in (fit_problem(path, lora, modules.get(path)) for path, lora in adapter.layers.items()) if p]
        if problems:
            raise AdapterError(f"adapter {name!r} does not fit this base ({len(problems)} problem(s)): " + "; ".join(problems))
        new = []
        for path, lora in adapter.layers.items():
            layer = modules[path]
            if not isinstance(layer, MULTI_TYPES):
                cls = MultiLoRAEmbedding if lora.embedding else MultiLoRASwitchLinear if lora.experts else MultiLoRALinear
                layer = cls(layer)
                layer.active = self._active
                new.append((path, layer))
            layer.add(name, lora)
        if new:
            self.model.update_modules(tree_unflatten(new))
        self._adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        """Drop an adapter; layers left with none go back to their plain base layer."""
        self._check_known(name)
        bare = []
        for path, layer in self.multi_layers():
            layer.remove(name)
            if not layer.adapters:
                bare.append((path, layer.base))
        if bare:
            self.model.update_modules(tree_unflatten(bare))
        del self._adapters[name]
        if self._active == name:
            self._activate(None)

    # -- choosing
    def set_adapter(self, name: str | None) -> _Restore:
        """Make `name` active (None: the base); usable as `with model.set_adapter("a"):` to switch back after."""
        if name is not None:
            self._check_known(name)
        previous = self._active
        self._activate(name)
        return _Restore(self, previous)

    def disable_adapter(self) -> _Restore:
        """Run the bare base from now on; `with model.disable_adapter():` re-enables the previous one on exit."""
        return self.set_adapter(None)

    def __call__(self, inputs: mx.array, *args, adapter_names: list | None = None, **kwargs):
        """The model's forward; with adapter_names (one name or None per batch row) each row uses its own."""
        if adapter_names is None:
            return self.model(inputs, *args, **kwargs)
        if len(adapter_names) != inputs.shape[0]:
            raise AdapterError(f"adapter_names has {len(adapter_names)} entries for a batch of {inputs.shape[0]} rows")
        for n in set(adapter_names) - {None}:
            self._check_known(n)
        plan = RowPlan.of(list(adapter_names))
        layers = [m for _, m in self.multi_layers()]
        for layer in layers:
            layer.plan = plan
        try:
            return self.model(inputs, *args, **kwargs)
        finally:
            for layer in layers:
                layer.plan = None

    # -- merging and saving
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> Adapter:
        """PEFT's add_weighted_adapter over loaded adapters (see serve/merge.py); the result is attached as adapter_name."""
        self._check_new_name(adapter_name)
        merged = merge_adapters([self.get_adapter(n) for n in adapters], weights,
                                      combination_type=combination_type, svd_rank=svd_rank)
        self.add_adapter(adapter_name, merged)
        return merged

    def save_adapter(self, name: str, out_dir, *, base_model: str, force: bool = False, extra: dict | None = None) -> Path:
        """Write adapter `name` as a normal adapter folder (PEFT's files plus mlxlora.json)."""
        adapter = self.get_adapter(name)
        with self._bare() as model:
            return save_record(adapter, model, out_dir, base_model=base_model, force=force, extra=extra)

    # -- internals
    def _activate(self, name: str | None) -> None:
        for _, layer in self.multi_layers():
            layer.active = name
        self._active = name

    @contextmanager
    def _bare(self):
        """The model with every multi-adapter layer replaced by its base for a moment (no copies)."""
        layers = self.multi_layers()
        if layers:
            self.model.update_modules(tree_unflatten([(p, m.base) for p, m in layers]))
        try:
            yield self.model
        finally:
            if layers:
                self.model.update_modules(tree_unflatten(layers))

    def _check_known(self, name) -> None:
        if name not in self._adapters:
            have = ", ".join(self._adapters) or "none loaded"
            raise AdapterError(f"no adapter named {name!r} (loaded: {have})")

    def _check_new_name(self, name) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise AdapterError(f"adapter name {name!r}: use letters, digits, '_' and '-' only")
        if name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded; delete_adapter({name!r}) first or pick another name")


__all__ = ["Adapter", "MultiAdapterModel", "read_adapter"]
