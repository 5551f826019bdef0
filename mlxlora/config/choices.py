"""The choices and value checks several configs share: one home each (bits, group sizes, dtypes, sizes)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from ..errors import ConfigError, choice_error

ALL_LINEAR = "all-linear"
# The choices several commands share: one home each.
BITS = (2, 3, 4, 5, 6, 8)  # quantization widths MLX's affine mode has
GROUP_SIZES = (32, 64, 128)  # group sizes MLX's affine quantization supports
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # float dtypes for compute and for written weights
SCHEDULES = ("cosine", "linear", "constant")
TRACKERS = ("wandb", "mlflow", "tensorboard", "trackio")  # train --report-to (mlxlora/train/trackers.py)
FUSE_STRATEGIES = ("naive", "grid", "gptq", "refit")  # fuse.requant.STRATEGIES, in this order
# GGUF tensor types `export-model --format gguf` writes: gguf-py writes the first five itself,
# llama.cpp's llama-quantize the K-quants (models.export_gguf.K_QUANTS).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
EXPORT_FORMATS = ("hf", "gguf")
# Decimal units as transformers/huggingface_hub read "5GB"; binary ones for "4GiB".
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def check_dtype(dtype, flag: str = "--dtype") -> str:
    """`dtype` if it is one of DTYPE_NAMES; else the one ConfigError every command gives."""
    if dtype not in DTYPE_NAMES:
        raise choice_error(flag, dtype, DTYPE_NAMES)
    return dtype


def check_bits(bits, flag: str = "--quantize") -> int:
    """`bits` if it is one of BITS; else the one ConfigError every command gives."""
    if isinstance(bits, bool) or bits not in BITS:
        raise choice_error(flag, bits, BITS)
    return bits


def parse_size(size: int | str, flag: str = "--max-shard-size") -> int:
    """Bytes in a size limit: an int, "5GB" (10**9, as transformers), "500MB", "4GiB" (2**30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if text.endswith(u)), None)
        try:
            value = int(float(text[:-len(unit)]) * SIZE_UNITS[unit]) if unit else int(text)
        except (ValueError, OverflowError):  # "nanGB", "infGB"
            value = 0
    if value <= 0:
        raise ConfigError(f"{flag}: {size!r} is not a size; write e.g. 5GB, 500MB or 4GiB")
    return value


def given(**kwargs) -> dict[str, Any]:
    """The keyword arguments that were actually given (CLI options default to None = not given)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def known_keys(cls, d: dict, what: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(unknown)}")
    return dict(d)


def positive(name: str, value, kind) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def number(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """`value` as a float when it is a finite number in the range; else ConfigError naming `name` and the range.

    NaN and infinity are refused everywhere: one of them in a learning rate or temperature poisons a
    whole run without an error.
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ConfigError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {value!r}")
    return float(value)


def compile_regex(name: str, pattern: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{name}: {pattern!r} is not a valid regex ({e})") from None
