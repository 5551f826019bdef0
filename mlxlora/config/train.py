"""TrainConfig (everything `mlxlora train` accepts), its flag names, and reading a --config file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, choice_error
from ..files import path_problem
from .choices import ALL_LINEAR, BITS, GROUP_SIZES, SCHEDULES, TRACKERS, check_dtype, number, positive
from .lora import LoraConfig
from .grpo import GRPOConfig
from .preference import PreferenceConfig


@dataclass
class TrainConfig:
    """Everything `mlxlora train` needs. Field names are the CLI flag names with '-' -> '_'."""

    model: str | None = None
    data: str | list[str] | None = None  # several: a weighted mixture (mlxlora.data.sources)
    split_map: str | None = None  # "valid=validation,test=test": our split = the dataset's
    columns: str | None = None  # "prompt=instruction,completion=output": our field = the dataset's column
    train_file: str | None = None
    valid_file: str | None = None
    adapter_path: str = "adapters"
    quantize: int | None = None
    q_group_size: int = 64
    lora: LoraConfig = field(default_factory=LoraConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # --method and its parameters
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # --method grpo's own knobs (--group-size, --reward...)
    init_adapter: str | None = None  # start from this adapter (e.g. SFT's); a reference method's reference too
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
    auto_fit: bool = False  # choose batch size / checkpointing / max_seq_length from the planner
    memory_limit: float | None = None  # GiB; None: this machine's (plan.machine_memory)
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
    report_to: str | list[str] | None = None  # "wandb,mlflow,tensorboard,trackio" (mlxlora.train.trackers)

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraConfig.from_dict(self.lora)
        if isinstance(self.preference, dict):
            self.preference = PreferenceConfig(**self.preference)
        if isinstance(self.grpo, dict):
            self.grpo = GRPOConfig(**self.grpo)
        if self.preference.method != "grpo":
            default = GRPOConfig()
            changed = [f.name for f in dataclasses.fields(GRPOConfig)
                       if getattr(self.grpo, f.name) != getattr(default, f.name)]
            if changed:
                flag = "--reward" if changed[0] == "rewards" else f"--{changed[0].replace('_', '-')}"
                raise ConfigError(f"{flag} applies to --method grpo, not --method {self.preference.method}; "
                                  "add --method grpo or drop it")
        if isinstance(self.data, (list, tuple)):
            self.data = (None if not self.data else self.data[0] if len(self.data) == 1 else
                         [str(d) for d in self.data])
        if self.quantize not in (None, *BITS):
            raise choice_error("--quantize", self.quantize, BITS)
        for name in ("batch_size", "grad_accum", "max_seq_length", "pad_multiple", "val_every",
                     "save_every", "report_every", "q_group_size", "max_nonfinite"):
            positive(f"--{name.replace('_', '-')}", getattr(self, name), int)
        positive("--lr", self.lr, (int, float))
        self.weight_decay = number("--weight-decay", self.weight_decay, low=0.0)
        if self.q_group_size not in GROUP_SIZES:
            raise choice_error("--q-group-size", self.q_group_size, GROUP_SIZES)
        for name in ("epochs", "iters", "early_stop", "keep_checkpoints"):
            if getattr(self, name) is not None:
                positive(f"--{name.replace('_', '-')}", getattr(self, name), int)
        if self.epochs is not None and self.iters is not None:
            raise ConfigError("give --epochs or --iters, not both")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"--warmup must be an integer >= 0, got {self.warmup!r}")
        if self.schedule not in SCHEDULES:
            raise choice_error("--schedule", self.schedule, SCHEDULES)
        if self.clip_grad is not None:
            number("--clip-grad", self.clip_grad, low=0.0, low_open=True)
        if self.memory_limit is not None:
            self.memory_limit = number("--memory-limit", self.memory_limit, low=0.0, low_open=True)
        if self.dtype is not None:
            check_dtype(self.dtype)
        if self.report_to is not None:
            names = self.report_to.split(",") if isinstance(self.report_to, str) else list(self.report_to)
            unknown = [n for n in (x.strip() for x in names) if n and n not in TRACKERS]
            if unknown:
                raise choice_error("--report-to", ",".join(unknown), TRACKERS)

    @property
    def total_iters_fixed(self) -> bool:
        return self.iters is not None

    def method_params(self) -> dict[str, Any]:
        """The method and the parameters that matter for it (run record, progress): GRPO's include its own."""
        params = self.preference.params()
        if self.preference.method == "grpo":
            params.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.grpo).items()
                           if k != "format_pattern" or any(r.split(":")[0] == "format" for r in self.grpo.rewards)})
        return params

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# CLI flag / config-file key -> (section, field). Section "lora" means LoraConfig, "preference" PreferenceConfig,
# "grpo" GRPOConfig.
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
for _f in dataclasses.fields(PreferenceConfig):
    FLAG_FIELDS[_f.name] = ("preference", _f.name)
for _f in dataclasses.fields(GRPOConfig):
    FLAG_FIELDS["reward" if _f.name == "rewards" else _f.name] = ("grpo", _f.name)
SECTIONS = ("lora", "preference", "grpo")  # TrainConfig fields that hold a nested config
for _f in dataclasses.fields(TrainConfig):
    if _f.name not in SECTIONS:
        FLAG_FIELDS[_f.name] = ("train", _f.name)


# Keys of which one given on the command line (or in the file) replaces the other one stored by a checkpoint.
EXCLUSIVE = (("iters", "epochs"), ("layers", "layers_to_transform"))


def stored_flags(stored: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig dict (as a checkpoint stores it) as flag-named values for build_train_config; keys this
    version does not know are left out (the record may come from another version)."""
    out = {k: v for k, v in stored.items() if k not in SECTIONS and k in FLAG_FIELDS}
    for sec in SECTIONS:
        back = {name: flag for flag, (section, name) in FLAG_FIELDS.items() if section == sec}
        for name, value in (stored.get(sec) or {}).items():
            if name in back:
                out[back[name]] = value
    return out


def build_train_config(file_values: dict[str, Any] | None, flag_values: dict[str, Any],
                       source: str = "config file", stored: dict[str, Any] | None = None) -> TrainConfig:
    """Merge a config file (flag-named keys) with CLI flags (flags win) into a TrainConfig.

    stored: the resolved config a checkpoint saved (--resume): it fills what the file and the flags
    leave out. Unknown keys raise ConfigError naming the key and the file.
    """
    merged: dict[str, Any] = {}
    float_keys = {"lr", "weight_decay", "clip_grad", "alpha", "dropout", "beta", "label_smoothing", "gamma",
                  "desirable_weight", "undesirable_weight", "temperature", "top_p", "epsilon", "epsilon_high",
                  "memory_limit"}
    given_keys = {k.replace("-", "_") for k, v in (*(file_values or {}).items(), *flag_values.items()) if v is not None}
    kept = {k: v for k, v in stored_flags(stored or {}).items()
            if not any(a == k and b in given_keys or b == k and a in given_keys for a, b in EXCLUSIVE)}
    layered = ((kept, "the checkpoint's config"), (file_values or {}, source), (flag_values, "command line"))
    for values, where in layered:
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
    shape = sorted(k for k in given_keys if FLAG_FIELDS[k][0] == "lora")  # every key is known by now
    if merged.get("init_adapter") and shape:  # the adapter brings its own rank, alpha, targets, ...
        raise ConfigError(f"--init-adapter {merged['init_adapter']}: training continues that adapter as it was "
                          f"saved (its rank, alpha, targets and dropout), so {', '.join('--' + k.replace('_', '-') for k in shape)} "
                          "would be ignored; drop them, or train a new adapter without --init-adapter")
    kw: dict[str, dict[str, Any]] = {"lora": {}, "preference": {}, "grpo": {}, "train": {}}
    for key, value in merged.items():
        section, name = FLAG_FIELDS[key]
        if key == "target" and isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif key == "target" and isinstance(value, (tuple, list)) and len(value) == 1 and value[0] == ALL_LINEAR:
            value = ALL_LINEAR
        kw[section][name] = value
    try:
        return TrainConfig(lora=LoraConfig(**kw["lora"]), preference=PreferenceConfig(**kw["preference"]),
                           grpo=GRPOConfig(**kw["grpo"]), **kw["train"])
    except TypeError as e:  # a wrong type slipped past a validator
        raise ConfigError(f"{source}: {e}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config whose keys are flag names."""
    import yaml

    p = Path(path)
    if not p.is_file():
        problem = path_problem(p) or "is a folder, not a YAML file"
        raise ConfigError(f"--config: {p} {problem}")
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
