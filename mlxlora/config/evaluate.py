"""The configs of `mlxlora eval --generate` (answers scored against references) and `eval --tasks` (lm-eval)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .choices import positive

# The metrics --generate reports when --metric is not given, the primary (fixed / broke) first.
DEFAULT_METRICS = ("token_f1", "exact", "normalized_exact", "contains", "rougeL", "chrf")


@dataclass
class GenerativeEvalConfig:
    """Defaults of `mlxlora eval --generate`.

    split: the data split whose rows are answered. metrics: metric names (or module:function), the
    first is the primary one. max_tokens: generated per answer (greedy). batch_size: rows decoded
    together (mlx-lm's BatchGenerator). out: the folder eval_report.json / .html go in (None: the
    current folder). force: replace an existing report.
    """

    split: str = "test"
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    max_tokens: int = 128
    batch_size: int = 8
    out: str | None = None
    force: bool = False

    def __post_init__(self):
        if self.split not in ("train", "valid", "test"):
            raise ConfigError(f"--split must be train, valid or test, got {self.split!r}")
        if isinstance(self.metrics, str):
            self.metrics = [m.strip() for m in self.metrics.split(",") if m.strip()]
        if not self.metrics:
            raise ConfigError("--metric: give at least one metric name (e.g. --metric token_f1)")
        positive("--max-tokens", self.max_tokens, int)
        positive("--batch-size", self.batch_size, int)


@dataclass
class BenchmarkConfig:
    """Defaults of `mlxlora eval --tasks` (lm-evaluation-harness as the engine).

    tasks: lm-eval task names. include_path: a folder of task YAMLs besides lm-eval's own. limit: at most
    this many documents per task (None: all). num_fewshot: lm-eval's (None: the task's). batch_size:
    requests scored together. max_tokens: generate_until's cap when a task gives none. apply_chat_template:
    render each request as a chat (the tokenizer's template, or the fallback training uses), few-shot examples
    as turns, as lm-eval's own --apply_chat_template does; the form a chat-trained adapter saw in training.
    """

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    max_tokens: int = 256
    apply_chat_template: bool = False

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not self.tasks:
            raise ConfigError("--tasks: give at least one lm-eval task name (e.g. --tasks arc_easy)")
        if self.limit is not None:
            positive("--limit", self.limit, int)
        if self.num_fewshot is not None and (isinstance(self.num_fewshot, bool) or not isinstance(self.num_fewshot, int)
                                             or self.num_fewshot < 0):
            raise ConfigError(f"--num-fewshot must be an integer >= 0, got {self.num_fewshot!r}")
        positive("--batch-size", self.batch_size, int)
        positive("--max-tokens", self.max_tokens, int)
