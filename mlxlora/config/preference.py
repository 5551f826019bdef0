"""PreferenceConfig: which objective `mlxlora train` optimizes (--method) and that method's parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, choice_error
from .choices import number
from .grpo import GRPO_LOSS_TYPES

# sft: token cross-entropy. dpo / orpo / simpo: pairs {"prompt", "chosen", "rejected"}. kto: rows
# {"prompt", "completion", "label"}. grpo: online, {"prompt", "answer"} (its engine lives elsewhere).
METHODS = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")
PAIR_METHODS = ("dpo", "orpo", "simpo")
# Methods whose loss compares the policy with a frozen reference (the base with the adapter switched off,
# or the --init-adapter as it was loaded).
REFERENCE_METHODS = ("dpo", "kto")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# --beta and --loss-type when not given, per method (TRL's own defaults: DPOConfig's beta 0.1 and "sigmoid";
# GRPOConfig's beta 0.0, so no reference pass, and "dapo"). Methods not named here take "dpo"'s.
METHOD_DEFAULTS = {"dpo": {"beta": 0.1, "loss_type": "sigmoid"}, "grpo": {"beta": 0.0, "loss_type": "dapo"}}


@dataclass
class PreferenceConfig:
    """The training objective and its parameters (the definitions are TRL's; see mlxlora/loss/preference.py).

    method: one of METHODS. beta: DPO/KTO's inverse temperature, ORPO's lambda (weight of the odds-ratio
    term), SimPO's reward scale, GRPO's KL weight. loss_type: DPO's loss (sigmoid, ipo, hinge) or GRPO's token
    aggregation (dapo, grpo, bnpo, dr_grpo). beta and loss_type default per method (METHOD_DEFAULTS). label_smoothing: the assumed
    share of flipped labels (conservative DPO / SimPO), in [0, 0.5). gamma: SimPO's target reward margin.
    desirable_weight / undesirable_weight: KTO's weights of desirable (label true) and undesirable rows.
    """

    method: str = "sft"
    beta: float | None = None  # None: the method's default, METHOD_DEFAULTS
    loss_type: str | None = None  # None: the method's default, METHOD_DEFAULTS
    label_smoothing: float = 0.0
    gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise choice_error("--method", self.method, METHODS)
        defaults = METHOD_DEFAULTS.get(self.method, METHOD_DEFAULTS["dpo"])
        self.beta = defaults["beta"] if self.beta is None else self.beta
        self.loss_type = defaults["loss_type"] if self.loss_type is None else self.loss_type
        loss_types = GRPO_LOSS_TYPES if self.method == "grpo" else DPO_LOSS_TYPES
        if self.loss_type not in loss_types:
            raise choice_error("--loss-type", self.loss_type, loss_types)
        self.beta = number("--beta", self.beta, low=0.0, low_open=self.method != "grpo")
        self.label_smoothing = number("--label-smoothing", self.label_smoothing, low=0.0, high=0.5, high_open=True)
        self.gamma = number("--gamma", self.gamma, low=0.0)
        for name in ("desirable_weight", "undesirable_weight"):
            setattr(self, name, number(f"--{name.replace('_', '-')}", getattr(self, name), low=0.0, low_open=True))
        if self.label_smoothing and not (self.method == "simpo" or (self.method == "dpo"
                                                                     and self.loss_type == "sigmoid")):
            raise ConfigError(f"--label-smoothing applies to --method dpo --loss-type sigmoid and to --method simpo, "
                              f"not to --method {self.method}{' --loss-type ' + self.loss_type if self.method == 'dpo' else ''}")

    @property
    def pairs(self) -> bool:
        """True for the methods trained on chosen/rejected pairs."""
        return self.method in PAIR_METHODS

    @property
    def needs_reference(self) -> bool:
        return self.method in REFERENCE_METHODS

    def params(self) -> dict:
        """The parameters that matter for this method (for the run record and progress)."""
        keep = {"dpo": ("beta", "loss_type", "label_smoothing"), "orpo": ("beta",),
                "simpo": ("beta", "gamma", "label_smoothing"), "kto": ("beta", "desirable_weight", "undesirable_weight"),
                "grpo": ("beta", "loss_type"), "sft": ()}[self.method]
        return {"method": self.method, **{k: getattr(self, k) for k in keep}}
