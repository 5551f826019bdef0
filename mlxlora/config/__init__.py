"""Configuration dataclasses: the only home of mlxlora's defaults.

`LoraConfig` (lora.py) mirrors the fields of PEFT's `LoraConfig` that matter for LoRA/DoRA; `TrainConfig`
(train.py) holds everything `mlxlora train` accepts, CLI flags and config-file keys using the same names
(`FLAG_FIELDS`); run.py has the configs of generate, eval, serve, export-model and fuse; choices.py the
choices and checks they share. Each validates itself in `__post_init__`, naming the flag.
"""

from .choices import (ALL_LINEAR, BITS, DTYPE_NAMES, EXPORT_FORMATS, FUSE_STRATEGIES, GGUF_TYPES, GROUP_SIZES,
                      SCHEDULES, SIZE_UNITS, TRACKERS, check_bits, check_dtype, given, parse_size)
from .evaluate import DEFAULT_METRICS, BenchmarkConfig, GenerativeEvalConfig
from .grpo import BUILTIN_REWARDS, GRPO_LOSS_TYPES, SCALE_REWARDS, GRPOConfig
from .lora import LoraConfig
from .preference import DPO_LOSS_TYPES, METHOD_DEFAULTS, METHODS, PAIR_METHODS, PreferenceConfig
from .run import EvalConfig, ExportConfig, FuseConfig, GenerateConfig, ServeConfig
from .train import FLAG_FIELDS, TrainConfig, build_train_config, load_config_file

__all__ = ["ALL_LINEAR", "BITS", "DTYPE_NAMES", "EXPORT_FORMATS", "FUSE_STRATEGIES", "GGUF_TYPES", "GROUP_SIZES",
           "SCHEDULES", "SIZE_UNITS", "check_bits", "check_dtype", "given", "parse_size", "LoraConfig", "EvalConfig",
           "ExportConfig", "FuseConfig", "GenerateConfig", "ServeConfig", "DPO_LOSS_TYPES", "METHODS", "PAIR_METHODS",
           "METHOD_DEFAULTS", "BUILTIN_REWARDS", "GRPO_LOSS_TYPES", "SCALE_REWARDS", "GRPOConfig",
           "PreferenceConfig", "FLAG_FIELDS", "TrainConfig", "build_train_config",
           "load_config_file", "TRACKERS", "DEFAULT_METRICS", "BenchmarkConfig", "GenerativeEvalConfig"]
