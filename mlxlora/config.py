"""Configuration dataclasses: the only home of mlxlora's defaults.

`LoraConfig` mirrors the fields of PEFT's `LoraConfig` that matter for LoRA/DoRA;
`TrainConfig` holds everything `mlxlora train` accepts. CLI flags and config-file
keys use the same names (see `FLAG_FIELDS`), and both are validated here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, choice_error

ALL_LINEAR = "all-linear"
# The choices several commands share: one home each.
BITS = (2, 3, 4, 5, 6, 8)  # quantization widths MLX's affine mode has
GROUP_SIZES = (32, 64, 128)  # group sizes MLX's affine quantization supports
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # float dtypes for compute and for written weights
SCHEDULES = ("cosine", "linear", "constant")
FUSE_STRATEGIES = ("naive", "grid", "gptq", "refit")  # fuse.requant.STRATEGIES, in this order
# Decimal units as transformers/huggingface_hub read "5GB"; binary ones for "4GiB".
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


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
        _positive("r", self.r, int)
        _positive("lora_alpha", self.lora_alpha, (int, float))
        self.lora_alpha = float(self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.lora_dropout = float(self.lora_dropout)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        elif isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                _compile("target_modules", self.target_modules)
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
            _positive("last_n_layers", self.last_n_layers, int)
        if self.layers_to_transform is not None and self.last_n_layers is not None:
            raise ConfigError("give layers_to_transform or last_n_layers (--layers), not both")
        for name, pat, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, (int, float))):
            if not isinstance(pat, dict):
                raise ConfigError(f"{name} must be a mapping of regex -> value, got {pat!r}")
            for k, v in pat.items():
                _compile(f"{name} key", k)
                _positive(f"{name}[{k!r}]", v, kind)
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
        return cls(**_known_keys(cls, d, "LoRA config"))


def _first_match(patterns: dict, path: str, default):
    # PEFT matches pattern keys against the end of the module path.
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", path):
            return value
    return default


@dataclass
class TrainConfig:
    """Everything `mlxlora train` needs. Field names are the CLI flag names with '-' -> '_'."""

    model: str | None = None
    data: str | None = None
    train_file: str | None = None
    valid_file: str | None = None
    adapter_path: str = "adapters"
    quantize: int | None = None
    q_group_size: int = 64
    lora: LoraConfig = field(default_factory=LoraConfig)
    epochs: int | None = None
    iters: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    clip_grad: float | None = 1.0
    grad_checkpoint: bool = False
    max_seq_length: int = 2048
    pad_multiple: int = 8
    pack: bool | None = None  # None: pack when it cuts padding (see Trainer._choose_packing)
    seed: int = 0
    val_every: int = 50
    val_batches: int = -1
    save_every: int = 100
    report_every: int = 10
    dtype: str | None = None
    max_nonfinite: int = 5
    keep_checkpoints: int | None = None
    save_best: bool = False  # keep the best-validation checkpoint as checkpoints/best
    early_stop: int | None = None  # stop after this many validations without improvement
    ignore_base_mismatch: bool = False  # --resume onto a base whose fingerprint differs
    force: bool = False

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraConfig.from_dict(self.lora)
        if self.quantize not in (None, *BITS):
            raise choice_error("--quantize", self.quantize, BITS)
        for name in ("batch_size", "grad_accum", "max_seq_length", "pad_multiple", "val_every",
                     "save_every", "report_every", "q_group_size", "max_nonfinite"):
            _positive(f"--{name.replace('_', '-')}", getattr(self, name), int)
        _positive("--lr", self.lr, (int, float))
        for name in ("epochs", "iters", "early_stop", "keep_checkpoints"):
            if getattr(self, name) is not None:
                _positive(f"--{name.replace('_', '-')}", getattr(self, name), int)
        if self.epochs is not None and self.iters is not None:
            raise ConfigError("give --epochs or --iters, not both")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"--warmup must be an integer >= 0, got {self.warmup!r}")
        if self.schedule not in SCHEDULES:
            raise choice_error("--schedule", self.schedule, SCHEDULES)
        if self.clip_grad is not None and not (isinstance(self.clip_grad, (int, float)) and self.clip_grad > 0):
            raise ConfigError(f"--clip-grad must be > 0, got {self.clip_grad!r}")
        if self.dtype is not None:
            check_dtype(self.dtype)

    @property
    def total_iters_fixed(self) -> bool:
        return self.iters is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# CLI flag / config-file key -> (section, field). Section "lora" means LoraConfig.
FLAG_FIELDS: dict[str, tuple[str, str]] = {
    "rank": ("lora", "r"),
    "alpha": ("lora", "lora_alpha"),
    "dropout": ("lora", "lora_dropout"),
    "target": ("lora", "target_modules"),
    "layers": ("lora", "last_n_layers"),
    "dora": ("lora", "use_dora"),
    "rslora": ("lora", "use_rslora"),
    "rank_pattern": ("lora", "rank_pattern"),
    "alpha_pattern": ("lora", "alpha_pattern"),
    "layers_to_transform": ("lora", "layers_to_transform"),
}
for _f in dataclasses.fields(TrainConfig):
    if _f.name != "lora":
        FLAG_FIELDS[_f.name] = ("train", _f.name)


def build_train_config(file_values: dict[str, Any] | None, flag_values: dict[str, Any],
                       source: str = "config file") -> TrainConfig:
    """Merge a config file (flag-named keys) with CLI flags (flags win) into a TrainConfig.

    Unknown keys raise ConfigError naming the key and the file.
    """
    merged: dict[str, Any] = {}
    float_keys = {"lr", "weight_decay", "clip_grad", "alpha", "dropout"}
    for values, where in ((file_values or {}, source), (flag_values, "command line")):
        for key, value in values.items():
            norm = key.replace("-", "_")
            if norm not in FLAG_FIELDS:
                raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(FLAG_FIELDS))}")
            if value is not None:
                if norm in float_keys and isinstance(value, str):
                    # YAML 1.1 reads "1e-4" as a string
                    try:
                        value = float(value)
                    except ValueError:
                        raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None
                merged[norm] = value
    lora_kw, train_kw = {}, {}
    for key, value in merged.items():
        section, name = FLAG_FIELDS[key]
        if key == "target" and isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif key == "target" and isinstance(value, (tuple, list)) and len(value) == 1 and value[0] == ALL_LINEAR:
            value = ALL_LINEAR
        (lora_kw if section == "lora" else train_kw)[name] = value
    try:
        return TrainConfig(lora=LoraConfig(**lora_kw), **train_kw)
    except TypeError as e:  # a wrong type slipped past a validator
        raise ConfigError(f"{source}: {e}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config whose keys are flag names."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _known_keys(cls, d: dict, what: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(unknown)}")
    return dict(d)


def _positive(name: str, value, kind) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _compile(name: str, pattern: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{name}: {pattern!r} is not a valid regex ({e})") from None


@dataclass
class GenerateConfig:
    """Defaults of `mlxlora generate` (and the demo's sample generations)."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool | None = None  # None: use the chat template when the tokenizer has one

    def __post_init__(self):
        _positive("--max-tokens", self.max_tokens, int)
        if not isinstance(self.temp, (int, float)) or self.temp < 0:
            raise ConfigError(f"--temp must be >= 0, got {self.temp!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p!r}")


@dataclass
class EvalConfig:
    """Defaults of `mlxlora eval`."""

    split: str = "test"
    batch_size: int = 4
    max_seq_length: int = 2048
    pad_multiple: int = 8

    def __post_init__(self):
        if self.split not in ("train", "valid", "test"):
            raise ConfigError(f"--split must be train, valid or test, got {self.split!r}")
        for name in ("batch_size", "max_seq_length", "pad_multiple"):
            _positive(f"--{name.replace('_', '-')}", getattr(self, name), int)


def given(**kwargs) -> dict[str, Any]:
    """The keyword arguments that were actually given (CLI options default to None = not given)."""
    return {k: v for k, v in kwargs.items() if v is not None}


@dataclass
class ServeConfig:
    """Defaults of `mlxlora serve`: where to listen and the largest request body accepted (bytes)."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_request_bytes: int = 1_000_000

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"--host must be an address such as 127.0.0.1, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port!r}")
        if isinstance(self.max_request_bytes, bool) or not isinstance(self.max_request_bytes, int) \
                or self.max_request_bytes < 1:
            raise ConfigError(f"--max-request-bytes must be a positive integer, got {self.max_request_bytes!r}")


@dataclass
class ExportConfig:
    """Defaults of `mlxlora export-model`. dtype: float weights written; max_shard_size: per file."""

    dtype: str = "float32"
    max_shard_size: str = "5GB"

    def __post_init__(self):
        check_dtype(self.dtype)
        parse_size(self.max_shard_size)


@dataclass
class FuseConfig:
    """Defaults of `mlxlora fuse` / `fuse_model`.

    bits: None keeps the base's bits; 0 writes float weights; 2..8 re-quantizes the touched layers of
    a quantized base at that width (a float base is fused exactly, in float). strategy: "auto" or one
    of FUSE_STRATEGIES; auto = refit with calibration (else naive) plus 8-bit layers.
    calibration_samples: training rows whose activations weight the rounding (GPTQ's H); without
    training data, random_rows rows of random_row_length random tokens stand in.
    size_budget: "auto" may spend up to this ratio of the naive fuse's size on 8-bit layers.
    """

    bits: int | None = None
    group_size: int | None = None
    strategy: str = "auto"
    calibration_samples: int = 128
    random_rows: int = 32
    random_row_length: int = 128
    max_seq_length: int = 512
    size_budget: float = 1.10
    damp: float = 0.01

    def __post_init__(self):
        if isinstance(self.bits, str):
            name = self.bits.lower()
            self.bits = 0 if name in ("none", "float") else int(name) if name.isdigit() else self.bits
        if self.bits not in (None, 0, *BITS):
            raise choice_error("--bits", self.bits, (*BITS, "none"))
        if self.group_size not in (None, *GROUP_SIZES):
            raise choice_error("--group-size", self.group_size, GROUP_SIZES)
        if self.strategy not in ("auto", *FUSE_STRATEGIES):
            raise choice_error("--strategy", self.strategy, ("auto", *FUSE_STRATEGIES))
        if not self.size_budget >= 1.0:
            raise ConfigError(f"--size-budget must be >= 1.0 (a multiple of the naive fuse's size), "
                              f"got {self.size_budget!r}")


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
        except ValueError:
            value = 0
    if value <= 0:
        raise ConfigError(f"{flag}: {size!r} is not a size; write e.g. 5GB, 500MB or 4GiB")
    return value
