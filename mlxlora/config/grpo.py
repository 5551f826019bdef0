"""GRPOConfig: the knobs only online GRPO training has (`mlxlora train --method grpo`), defaults as TRL's.

TRL 1.x defaults kept here: epsilon 0.2, temperature 1.0, max_completion_length 256, scale_rewards
"group". group_size is TRL's num_generations (TRL: 8; 4 here, since every completion costs a laptop a
sampled sequence). --beta and --loss-type are shared with the other methods; their GRPO defaults (TRL's:
beta 0.0, so no reference pass, and loss_type "dapo") are passed to the engine with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError, choice_error
from .choices import compile_regex, number

# How per-token losses are aggregated (TRL's loss_type); see loss/grpo.py for each formula.
GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
# How group-centred rewards are scaled (TRL's scale_rewards): by the group's std, the batch's, or not at all.
SCALE_REWARDS = ("group", "batch", "none")
BUILTIN_REWARDS = ("exact", "format", "length")


@dataclass
class GRPOConfig:
    """GRPO settings; field names are the flag names with '-' -> '_'.

    rewards: reward specs as `--reward` takes them ("exact", "format:0.2", "mymod:fn", "path/f.py:fn:0.5");
    train/rewards.py parses them. format_pattern: the regex the built-in `format` reward searches for.
    epsilon_high: the upper clip bound (None: epsilon, symmetric clipping).
    """

    group_size: int = 4
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    scale_rewards: str = "group"
    rewards: tuple[str, ...] = field(default_factory=lambda: ("exact",))
    format_pattern: str = r"\\boxed\{[^{}]*\}"

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ConfigError(f"--group-size must be an integer >= 2 (advantages compare completions within a "
                              f"group), got {self.group_size!r}")
        if (isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int)
                or self.max_completion_length < 1):
            raise ConfigError(f"--max-completion-length must be a positive integer, got "
                              f"{self.max_completion_length!r}")
        number("--temperature", self.temperature, low=0, low_open=True)
        number("--top-p", self.top_p, low=0, high=1, low_open=True)
        number("--epsilon", self.epsilon, low=0, high=1, low_open=True, high_open=True)
        if self.epsilon_high is not None:
            number("--epsilon-high", self.epsilon_high, low=0, low_open=True)
        if self.scale_rewards not in SCALE_REWARDS:
            raise choice_error("--scale-rewards", self.scale_rewards, SCALE_REWARDS)
        self.rewards = tuple(self.rewards)
        if not self.rewards:
            raise ConfigError("GRPO needs at least one --reward (e.g. --reward exact)")
        compile_regex("--format-pattern", self.format_pattern)

    @property
    def clip_range(self) -> tuple[float, float]:
        """(1 - epsilon, 1 + epsilon_high): the trust region of the probability ratio."""
        return 1 - self.epsilon, 1 + (self.epsilon if self.epsilon_high is None else self.epsilon_high)
