"""Many adapters over one base: load the base once, attach named adapters, switch between them.

Each adapted base layer is wrapped ONCE by a `MultiLoRALinear` / `MultiLoRAEmbedding` that holds a
dict name -> {lora_a, lora_b[, m]} and applies the active entry. Switching, disabling and deleting
only change which entry is read: no weight is reloaded and the base arrays are never copied.
A batch may also mix adapters row by row (`model(ids, adapter_names=["a", None, "b"])`, as PEFT's
`adapter_names=`): each layer gathers the rows of one adapter, applies it, and puts the rows back.

Adapter folders are read through `mlxlora.adapters.load_adapter` on the bare base (the wrappers are
taken off for the moment and put back), so every folder format it reads works here too.
The layer classes live in `mlxlora.multi_layers` and are re-exported here.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .config import LoraConfig
from .errors import AdapterError
from .layers import DoRALinear, LoRAEmbedding
from .multi_layers import MULTI_TYPES, LayerLoRA, MultiLoRAEmbedding, MultiLoRALinear, RowPlan, fit_problem
from .surgery import adapter_layers, unwrap

_NAME = re.compile(r"[A-Za-z0-9_-]+")


# ---------------------------------------------------------------- adapters as plain arrays

@dataclass
class Adapter:
    """A whole adapter: its LoraConfig and, per module path (`model.layers.0.self_attn.q_proj`), a LayerLoRA."""

    config: LoraConfig
    layers: dict[str, LayerLoRA]
    source: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the adapter tensors (what attaching it costs)."""
        return sum(a.nbytes for lora in self.layers.values() for a in lora.arrays().values())


def read_adapter(model: nn.Module, adapter_dir) -> Adapter:
    """The adapter in `adapter_dir` as plain arrays, checked against `model` (a bare base, left bare).

    Goes through `mlxlora.adapters.load_adapter`, so it reads every format that does and raises its
    AdapterError (one line, naming the file) when the folder does not fit the model.
    """
    from .adapters import load_adapter

    load_adapter(model, adapter_dir)
    try:
        layers = {}
        for path, layer in adapter_layers(model):
            m = layer.m if isinstance(layer, DoRALinear) else None
            layers[path] = LayerLoRA(layer.lora_a, layer.lora_b, layer.scale, m, isinstance(layer, LoRAEmbedding))
        config = model.lora_config
    finally:
        unwrap(model)
        del model.lora_config
    adapter = Adapter(config=config, layers=layers, source=str(adapter_dir))
    mx.eval([lora.arrays() for lora in layers.values()])
    return adapter


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
    """

    def __init__(self, model: nn.Module):
        if adapter_layers(model):
            raise AdapterError("MultiAdapterModel: the model already has a single adapter; start from a bare base "
                               "(mlxlora.models.load_base) and attach adapters with load_adapter(path, name)")
        if any(isinstance(m, MULTI_TYPES) for _, m in model.named_modules()):
            raise AdapterError("MultiAdapterModel: this model is already managed by another MultiAdapterModel; use that one")
        self.model = model
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
            adapter = read_adapter(model, adapter_dir)
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
                layer = MultiLoRAEmbedding(layer) if lora.embedding else MultiLoRALinear(layer)
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
        """PEFT's add_weighted_adapter over loaded adapters (see mlxlora.merge); the result is attached as adapter_name."""
        from .merge import add_weighted_adapter

        self._check_new_name(adapter_name)
        merged = add_weighted_adapter([self.get_adapter(n) for n in adapters], weights,
                                      combination_type=combination_type, svd_rank=svd_rank)
        self.add_adapter(adapter_name, merged)
        return merged

    def save_adapter(self, name: str, out_dir, *, base_model: str, force: bool = False, extra: dict | None = None) -> Path:
        """Write adapter `name` as a normal adapter folder (PEFT format) with mlxlora.adapters.save_adapter."""
        adapter = self.get_adapter(name)
        with self._bare() as model:
            return write_adapter(model, adapter, out_dir, base_model=base_model, force=force, extra=extra)

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


def write_adapter(model: nn.Module, adapter: Adapter, out_dir, *, base_model: str, force: bool = False,
                  extra: dict | None = None) -> Path:
    """Save an in-memory Adapter as a normal adapter folder, using a bare base `model` (left bare)."""
    from .adapters import save_adapter
    from .surgery import get_lora_model

    get_lora_model(model, adapter.config)
    try:
        layers = dict(adapter_layers(model))
        if set(layers) != set(adapter.layers):
            missing = sorted(set(adapter.layers) ^ set(layers))
            raise AdapterError(f"write_adapter: the adapter's config selects other modules than its tensors ({', '.join(missing)})")
        for path, lora in adapter.layers.items():
            if abs(layers[path].scale - lora.scale) > 1e-6 * max(1.0, abs(lora.scale)):
                raise AdapterError(f"write_adapter: {path} has scale {lora.scale} but its config gives {layers[path].scale}")
            for key, value in lora.arrays().items():
                layers[path][key] = value
        return save_adapter(model, out_dir, base_model=base_model, force=force, extra=extra)
    finally:
        unwrap(model)
        del model.lora_config


# ---------------------------------------------------------------- comparing adapters

def compare_perplexity(base, adapters: dict[str, str], data: str, cfg=None) -> list[dict]:
    """Loss and perplexity of the bare base and of each adapter on one data split; the base is loaded once.

    base: a mlxlora.models.Base (left bare afterwards). adapters: name -> adapter folder. data: a folder or
    .jsonl file (cfg.split picks the split). Returns one row per model, base first: adapter, loss, perplexity,
    delta_loss (vs the base), samples, target_tokens, path.
    """
    from .config import EvalConfig
    from .inference import eval_split

    cfg = cfg or EvalConfig()
    multi = MultiAdapterModel(base.model)
    rows = []
    try:
        for name, path in adapters.items():
            multi.load_adapter(path, name)
        for name in [None, *adapters]:
            with multi.set_adapter(name):
                res = eval_split(base, data, cfg)
            rows.append({"adapter": name or "base", "loss": res["loss"], "perplexity": res["perplexity"],
                         "samples": res["samples"], "target_tokens": res["target_tokens"], "path": res["path"]})
    finally:
        for name in multi.adapters:
            multi.delete_adapter(name)
    base_loss = rows[0]["loss"] if rows else None
    for row in rows:
        row["delta_loss"] = None if row["loss"] is None or base_loss is None else row["loss"] - base_loss
    return rows


def format_perplexity_table(rows: list[dict]) -> str:
    """compare_perplexity's rows as an aligned text table."""
    width = max([len("adapter")] + [len(r["adapter"]) for r in rows])
    lines = [f"{'adapter':<{width}}  {'loss':>8}  {'perplexity':>10}  {'Δloss':>8}"]
    for r in rows:
        if r["loss"] is None:
            lines.append(f"{r['adapter']:<{width}}  {'-':>8}  {'-':>10}  {'-':>8}")
            continue
        delta = "" if r["adapter"] == "base" else f"{r['delta_loss']:+.4f}"
        lines.append(f"{r['adapter']:<{width}}  {r['loss']:>8.4f}  {r['perplexity']:>10.3f}  {delta:>8}")
    return "\n".join(lines)


__all__ = ["Adapter", "LayerLoRA", "MultiAdapterModel", "MultiLoRALinear", "MultiLoRAEmbedding", "RowPlan",
           "read_adapter", "write_adapter", "compare_perplexity", "format_perplexity_table", "MULTI_TYPES"]
