"""Find the target modules of an mlx-lm model and wrap them with LoRA/DoRA layers (PEFT semantics)."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import ALL_LINEAR, LoraConfig
from ..errors import ConfigError
from ..files import natural_key
from .layers import ADAPTER_TYPES, EMBEDDING_TYPES, LINEAR_TYPES, DoRALinear, LoRAEmbedding, LoRALinear, base_of
from .quant import QUANTIZED_TYPES, unpacked_cols
from .switch import SWITCH_TYPES, LoRASwitchLinear, QuantizedSwitchLinear, routers

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|decoder\.layers)\.(\d+)\.")
# Output heads are never part of "all-linear" (as in PEFT).
_HEAD_NAMES = ("lm_head", "output", "embed_out")


def block_index(path: str) -> int | None:
    """Index of the transformer block a module path lives in (`model.layers.3.mlp` -> 3), or None."""
    m = _LAYER_INDEX.search(path)
    return int(m.group(1)) if m else None


def num_blocks(model: nn.Module) -> int:
    idx = [block_index(p) for p, _ in model.named_modules()]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def _name_matches(path: str, module: nn.Module, cfg: LoraConfig, skip: set[str]) -> bool:
    t = cfg.target_modules
    if t == ALL_LINEAR:
        # The experts are linear layers too; MoE routers are not (PEFT's all-linear on transformers 5 never
        # sees them as nn.Linear): name a router in --target to adapt it.
        return (isinstance(module, LINEAR_TYPES + SWITCH_TYPES) and path.split(".")[-1] not in _HEAD_NAMES
                and path not in skip)
    if isinstance(t, str):
        return re.fullmatch(t, path) is not None
    return any(path == key or path.endswith("." + key) for key in t)


def find_targets(model: nn.Module, cfg: LoraConfig) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module the config targets, in model order.

    Raises ConfigError when nothing matches (naming the modules that exist) or when a
    matched module cannot take an adapter.
    """
    n_blocks = num_blocks(model)
    allowed = None
    if cfg.layers_to_transform is not None:
        allowed = set(cfg.layers_to_transform)
        bad = sorted(i for i in allowed if i >= n_blocks)
        if bad:
            raise ConfigError(f"layers_to_transform: the model has {n_blocks} blocks, no block {bad}")
    elif cfg.last_n_layers is not None:
        allowed = set(range(max(0, n_blocks - cfg.last_n_layers), n_blocks))

    found, skip = [], routers(model) if cfg.target_modules == ALL_LINEAR else set()
    for path, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES) or not _name_matches(path, module, cfg, skip):
            continue
        if allowed is not None and block_index(path) not in allowed:
            continue
        if not isinstance(module, LINEAR_TYPES + EMBEDDING_TYPES + SWITCH_TYPES):
            # A container was named (e.g. "mlp"): PEFT errors too.
            raise ConfigError(f"target_modules: {path} is a {type(module).__name__}; only Linear, "
                              "QuantizedLinear, Embedding and (Quantized)SwitchLinear layers take an adapter")
        found.append((path, module))
    if not found:
        raise ConfigError(_no_match(model, cfg))
    # named_modules() walks children in reverse; report in reading order (block by block).
    return sorted(found, key=lambda pm: natural_key(pm[0]))


def _no_match(model: nn.Module, cfg: LoraConfig) -> str:
    """The one-line error for a target that matched nothing: the layer names that exist, by type."""
    by_type: dict[str, set[str]] = {}
    for p, m in model.named_modules():
        w = m.get("weight") if isinstance(m, dict) else None
        if isinstance(m, LINEAR_TYPES + EMBEDDING_TYPES) or (isinstance(w, mx.array) and w.ndim >= 2):
            by_type.setdefault(type(m).__name__, set()).add(p.split(".")[-1])
    listed = "; ".join(f"{t}: {', '.join(sorted(n))}" for t, n in sorted(by_type.items()))
    adaptable = any(isinstance(m, LINEAR_TYPES) for _, m in model.named_modules())
    if cfg.target_modules == ALL_LINEAR:
        return (f"target_modules all-linear matched no layer: this model has no Linear / QuantizedLinear "
                f"outside the output head (its layers: {listed}); mlxlora adapts only those types")
    hint = " (or use --target all-linear)" if adaptable else ""
    return f"target_modules {cfg.target_modules!r} matched no layer; layers of this model: {listed}{hint}"


def get_lora_model(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze `model` and wrap its target layers with LoRA (or DoRA) in place; returns the model.

    The config is kept on the model (`model.lora_config`) for saving. Only `lora_a`,
    `lora_b` (and DoRA's `m`) are trainable afterwards.
    """
    targets = find_targets(model, config)
    model.freeze()
    new = []
    for path, module in targets:
        r, _ = config.rank_alpha_for(path)
        scale = config.scale_for(path)
        if isinstance(module, EMBEDDING_TYPES):
            if config.use_dora:
                raise ConfigError(f"use_dora: DoRA on an embedding ({path}) is not supported; drop it from --target")
            layer = LoRAEmbedding.from_base(module, r=r, scale=scale, dropout=config.lora_dropout)
        elif isinstance(module, SWITCH_TYPES):
            if config.use_dora:
                raise ConfigError(f"use_dora: DoRA on MoE experts ({path}, {type(module).__name__}) is not supported "
                                  "(nor in mlx-lm or PEFT's target_parameters); drop --dora or target dense layers only")
            layer = LoRASwitchLinear.from_base(module, r=r, scale=scale, dropout=config.lora_dropout)
        else:
            cls = DoRALinear if config.use_dora else LoRALinear
            layer = cls.from_base(module, r=r, scale=scale, dropout=config.lora_dropout)
        new.append((path, layer))
    model.update_modules(tree_unflatten(new))
    model.lora_config = config
    return model


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every LoRA/DoRA layer in the model, in reading order (block 0 first)."""
    return sorted(((p, m) for p, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)),
                  key=lambda pm: natural_key(pm[0]))


def adapter_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Flat {path: array} of the adapter tensors (lora_a, lora_b, m) only."""
    out = {}
    for path, layer in adapter_layers(model):
        for name in ("lora_a", "lora_b", "m"):
            if name in layer:
                out[f"{path}.{name}"] = layer[name]
    return out


def fuse_model(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every adapter layer with its fused plain layer (naive re-quantize for quantized bases)."""
    fused = [(p, m.fuse(dequantize=dequantize)) for p, m in adapter_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Put the base layers back, dropping the adapters (and the config kept on the model)."""
    base = [(p, base_of(m)) for p, m in adapter_layers(model)]
    if base:
        model.update_modules(tree_unflatten(base))
    if "lora_config" in model.__dict__:
        del model.lora_config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count as their float size."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total, quantized = 0, QUANTIZED_TYPES + (QuantizedSwitchLinear,)
    for _, m in model.named_modules():
        for name, v in m.items():
            if not isinstance(v, mx.array):
                continue
            if name == "weight" and isinstance(m, quantized):
                total += unpacked_cols(v.size, m.bits)
            elif name in ("scales", "biases", "global_scale") and isinstance(m, quantized):
                continue
            else:
                total += v.size
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print (and return) PEFT's one-line summary of trainable vs total parameters."""
    t, n = count_parameters(model)
    line = f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(n, 1):.4f}"
    print(line)
    return line


class adapters_off:
    """Context: the model runs as its bare base (each adapter layer swapped for the layer it wraps), then the
    adapter layers come back unchanged. No weights are copied: this is the base a reference pass needs."""

    def __init__(self, model: nn.Module):
        self.model, self.layers = model, adapter_layers(model)

    def __enter__(self):
        if self.layers:
            self.model.update_modules(tree_unflatten([(p, base_of(m)) for p, m in self.layers]))
        return self.model

    def __exit__(self, *exc):
        if self.layers:
            self.model.update_modules(tree_unflatten(self.layers))


class adapter_tensors:
    """Context: the adapter layers hold `tensors` ({path: array}, as adapter_parameters gives), then their own
    tensors again. Swaps references only: a frozen reference adapter costs one copy of the adapter, not of
    the base."""

    def __init__(self, model: nn.Module, tensors: dict[str, mx.array]):
        self.model, self.tensors = model, tensors

    def __enter__(self):
        self.saved = adapter_parameters(self.model)
        self.model.load_weights(list(self.tensors.items()), strict=False)
        return self.model

    def __exit__(self, *exc):
        self.model.load_weights(list(self.saved.items()), strict=False)
