"""What several commands share: choices, the options every model-loading command has, `--adapter NAME=DIR`
specs, and help texts whose `[default: ...]` is read from the dataclass field (a default is written once).

Options default to None ("not given"), so the dataclasses in mlxlora/config.py stay the only home of
defaults and a --config file can fill what the command line leaves out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ..config import BITS, DTYPE_NAMES, GROUP_SIZES, LoraConfig, PreferenceConfig, TrainConfig
from ..errors import ConfigError

QUANTIZE = click.Choice([str(b) for b in BITS])
DTYPE = click.Choice(list(DTYPE_NAMES))
GROUP_SIZE = click.Choice([str(g) for g in GROUP_SIZES])
# Flags of `train` whose field lives in LoraConfig (name of the flag's field there).
_LORA_FIELDS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target": "target_modules"}


def default(cls, name: str) -> str:
    """"[default: X]" for field `name` of dataclass `cls` (a LoRA flag name is looked up in LoraConfig)."""
    if cls is TrainConfig and name in _LORA_FIELDS:
        cls, name = LoraConfig, _LORA_FIELDS[name]
    elif cls is TrainConfig and name in {f.name for f in dataclasses.fields(PreferenceConfig)}:
        cls = PreferenceConfig
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, list):
        value = ",".join(map(str, value))
    elif isinstance(value, float) and value.is_integer() and name != "clip_grad":
        value = int(value)
    return f"[default: {value}]"


def quantize_bits(value: str | None) -> int | None:
    return int(value) if value is not None else None


def parse_adapter_specs(specs) -> dict[str, str]:
    """`--adapter name=DIR` (or just DIR: named after the folder) -> {name: DIR}. Raises ConfigError."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise ConfigError(f"--adapter {spec!r}: write name=DIR (e.g. --adapter devil=runs/devil)")
        if name.lower() in ("none", "base"):
            raise ConfigError(f"--adapter {spec!r}: {name!r} is reserved for the bare base; pick another name")
        if name in out:
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} is given twice")
        out[name] = path
    return out


IGNORE_BASE = click.option("--ignore-base-mismatch", is_flag=True,
                           help="Load the adapter even if it was trained on a different base (fingerprint).")


def model_options(f):
    """--model, --adapter, --quantize, --ignore-base-mismatch (generate and friends)."""
    for o in reversed([
        click.option("--model", required=True, help="Model folder, .gguf file, or hub id."),
        click.option("--adapter", help="Adapter folder (PEFT, mlx-lm or mlxlora format)."),
        click.option("--quantize", type=QUANTIZE, help="Quantize the base at load time."),
        IGNORE_BASE,
    ]):
        f = o(f)
    return f


def load(model, adapter, quantize, ignore_base_mismatch=False):
    """The base (and adapter) a command works on."""
    from ..inference import load_with_adapter

    return load_with_adapter(model, adapter, ignore_base_mismatch=ignore_base_mismatch,
                             quantize=quantize_bits(quantize))


__all__ = ["QUANTIZE", "DTYPE", "GROUP_SIZE", "default", "quantize_bits", "parse_adapter_specs", "IGNORE_BASE",
           "model_options", "load"]
