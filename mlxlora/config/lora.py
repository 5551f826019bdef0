"""LoraConfig: which layers get an adapter and how it is scaled (PEFT semantics)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .choices import ALL_LINEAR, compile_regex, known_keys, number, positive


@dataclass
class LoraConfig:
    """Which layers get an adapter and how it is scaled (PEFT semantics).

    r: rank of the update. lora_alpha: scale numerator; scale = lora_alpha / r,
    or lora_alpha / sqrt(r) with use_rslora. target_modules: short names
    ("q_proj"), full module paths, one regex string (full match, as PEFT), or
    "all-linear". layers_to_transform: block indices (an int is one index, as in
    PEFT). last_n_layers: adapt only the last N blocks (mlx-lm's num_layers).
    rank_pattern / alpha_pattern: regex -> r / alpha overrides, first match wins.
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers_to_transform: list[int] | int | None = None
    last_n_layers: int | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"

    def __post_init__(self):
        positive("r", self.r, int)
        positive("lora_alpha", self.lora_alpha, (int, float))
        self.lora_alpha = float(self.lora_alpha)
        self.lora_dropout = number("lora_dropout (--dropout)", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        elif isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                compile_regex("target_modules", self.target_modules)
        else:
            raise ConfigError(f"target_modules must be a list of names, a regex or 'all-linear', got {self.target_modules!r}")
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            ok = isinstance(self.layers_to_transform, (list, tuple)) and all(
                isinstance(i, int) and i >= 0 for i in self.layers_to_transform)
            if not ok:
                raise ConfigError(f"layers_to_transform must be block indices >= 0, got {self.layers_to_transform!r}")
            self.layers_to_transform = list(self.layers_to_transform)
        if self.last_n_layers is not None:
            positive("last_n_layers", self.last_n_layers, int)
        if self.layers_to_transform is not None and self.last_n_layers is not None:
            raise ConfigError("give layers_to_transform or last_n_layers (--layers), not both")
        for name, pat, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, (int, float))):
            if not isinstance(pat, dict):
                raise ConfigError(f"{name} must be a mapping of regex -> value, got {pat!r}")
            for k, v in pat.items():
                compile_regex(f"{name} key", k)
                positive(f"{name}[{k!r}]", v, kind)
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r} is not supported; only bias='none' (as PEFT's default)")

    def rank_alpha_for(self, path: str) -> tuple[int, float]:
        """(r, alpha) for a module path, applying rank/alpha patterns (first match wins, as PEFT)."""
        return (_first_match(self.rank_pattern, path, self.r),
                float(_first_match(self.alpha_pattern, path, self.lora_alpha)))

    def scale_for(self, path: str) -> float:
        r, alpha = self.rank_alpha_for(path)
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        return cls(**known_keys(cls, d, "LoRA config"))


def _first_match(patterns: dict, path: str, default):
    # PEFT matches pattern keys against the end of the module path.
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", path):
            return value
    return default
