"""The configs of the commands that use a model: generate, eval, serve, export-model and fuse."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError, choice_error
from .choices import BITS, EXPORT_FORMATS, FUSE_STRATEGIES, GGUF_TYPES, GROUP_SIZES, check_dtype, number, parse_size, positive


@dataclass
class GenerateConfig:
    """Defaults of `mlxlora generate` (and the demo's sample generations)."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool | None = None  # None: use the chat template when the tokenizer has one

    def __post_init__(self):
        positive("--max-tokens", self.max_tokens, int)
        if isinstance(self.temp, (int, float)) and not isinstance(self.temp, bool) and self.temp < 0:
            raise ConfigError(f"--temp must be >= 0, got {self.temp!r}")
        number("--temp", self.temp, low=0.0)
        if isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool) and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        number("--top-p", self.top_p, low=0.0, low_open=True, high=1.0)


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
            positive(f"--{name.replace('_', '-')}", getattr(self, name), int)


@dataclass
class ServeConfig:
    """Defaults of `mlxlora serve`: where to listen, what one request may ask for, and how much runs at once.

    max_request_bytes: the largest request body accepted. max_tokens_limit: the most tokens one request
    may generate (a larger max_tokens is capped; so is any that would pass the context length).
    max_batch: requests of one adapter decoded together in one batch. max_pending: requests running or
    waiting; more get 503. request_timeout: seconds from arrival to the last token (then 504).
    workers: HTTP threads (fixed: no thread per request); backlog: connections the socket holds while
    every worker is busy. read_timeout: seconds a client may take to send its request.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    max_request_bytes: int = 1_000_000
    max_tokens_limit: int = 4096
    max_batch: int = 16
    max_pending: int = 64
    request_timeout: float = 600.0
    workers: int = 64
    backlog: int = 128
    read_timeout: float = 30.0

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"--host must be an address such as 127.0.0.1, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port!r}")
        if isinstance(self.max_request_bytes, bool) or not isinstance(self.max_request_bytes, int) \
                or self.max_request_bytes < 1:
            raise ConfigError(f"--max-request-bytes must be a positive integer, got {self.max_request_bytes!r}")
        for name in ("max_tokens_limit", "max_batch", "max_pending", "workers", "backlog"):
            positive(f"--{name.replace('_', '-')}", getattr(self, name), int)
        for name in ("request_timeout", "read_timeout"):
            number(f"--{name.replace('_', '-')}", getattr(self, name), low=0.0, low_open=True)


@dataclass
class ExportConfig:
    """Defaults of `mlxlora export-model` (and of `fuse --format gguf`'s gguf_type).

    format: "hf" (a transformers folder) or "gguf" (one llama.cpp file + an Ollama Modelfile).
    dtype: float weights written for hf; max_shard_size: per hf file; gguf_type: GGUF_TYPES entry.
    """

    format: str = "hf"
    dtype: str = "float32"
    max_shard_size: str = "5GB"
    gguf_type: str = "f16"

    def __post_init__(self):
        if self.format not in EXPORT_FORMATS:
            raise choice_error("--format", self.format, EXPORT_FORMATS)
        check_dtype(self.dtype)
        parse_size(self.max_shard_size)
        if self.gguf_type not in GGUF_TYPES:
            raise choice_error("--gguf-type", self.gguf_type, GGUF_TYPES)


@dataclass
class FuseConfig:
    """Defaults of `mlxlora fuse` / `fuse_model`.

    bits: None keeps the base's bits; 0 writes float weights; 2..8 re-quantizes the touched layers of
    a quantized base at that width (a float base is fused exactly, in float). strategy: "auto" or one
    of FUSE_STRATEGIES; auto = refit with calibration (else naive) plus 8-bit layers.
    calibration_samples: training rows whose activations weight the rounding (GPTQ's H); without
    training data, random_rows rows of random_row_length random tokens stand in.
    size_budget: "auto" may spend up to this ratio of the naive fuse's size on 8-bit layers.
    ignore_base_mismatch: fuse an adapter whose recorded base (fingerprint, weight check) differs.
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
    ignore_base_mismatch: bool = False  # fuse an mlxlora adapter whose recorded base differs

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
        if not (isinstance(self.size_budget, (int, float)) and math.isfinite(self.size_budget)
                and self.size_budget >= 1.0):
            raise ConfigError(f"--size-budget must be a finite number >= 1.0 (a multiple of the naive fuse's size), "
                              f"got {self.size_budget!r}")
        number("damp", self.damp, low=0.0, low_open=True)
