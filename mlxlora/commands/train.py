"""`mlxlora train`: train a LoRA / DoRA adapter on a base model."""

from __future__ import annotations

import click

from ..config import (BUILTIN_REWARDS, DPO_LOSS_TYPES, GRPO_LOSS_TYPES, METHOD_DEFAULTS, METHODS, SCALE_REWARDS,
                      SCHEDULES, GRPOConfig, TrainConfig)
from .options import DTYPE, QUANTIZE, default


def _per_method(name: str) -> str:
    """The per-method defaults of --beta / --loss-type, from config.preference.METHOD_DEFAULTS."""
    other = METHOD_DEFAULTS["dpo"][name]
    return f"[{other}; grpo: {METHOD_DEFAULTS['grpo'][name]}]"


def train_options(f):
    """Every flag of `train` (also read by `plan --config`); each maps to a TrainConfig/LoraConfig field."""
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file; keys are these flag names."),
        click.option("--model", help="Model folder (HF or MLX), .gguf file, or hub id."),
        click.option("--data", multiple=True, metavar="SOURCE[:WEIGHT]",
                     help="Folder with train.jsonl / valid.jsonl / test.jsonl, a .jsonl file, a `datasets` folder, "
                          "or a Hub dataset ORG/NAME[:CONFIG]; repeat with :WEIGHT for a mixture."),
        click.option("--split-map", help="Our split = the dataset's, e.g. valid=validation,test=test."),
        click.option("--columns", help="Our field = the dataset's column, e.g. prompt=instruction,completion=output."),
        click.option("--train-file", help="Explicit training .jsonl (overrides --data)."),
        click.option("--valid-file", help="Explicit validation .jsonl."),
        click.option("--adapter-path", help=f"Output adapter folder. {default(TrainConfig, 'adapter_path')}"),
        click.option("--quantize", type=QUANTIZE, help="Quantize the base at load time (QLoRA)."),
        click.option("--q-group-size", type=int, help=f"Group size for --quantize. {default(TrainConfig, 'q_group_size')}"),
        click.option("--rank", type=int, help=f"LoRA rank r. {default(TrainConfig, 'rank')}"),
        click.option("--alpha", type=float, help=f"LoRA alpha; scale = alpha/r. {default(TrainConfig, 'alpha')}"),
        click.option("--dropout", type=float, help=f"Dropout on the adapter input. {default(TrainConfig, 'dropout')}"),
        click.option("--target", help=f"Comma-separated module names, a regex, or all-linear. {default(TrainConfig, 'target')}"),
        click.option("--layers", type=int, help="Adapt only the last N blocks."),
        click.option("--dora", is_flag=True, default=None, help="DoRA instead of LoRA."),
        click.option("--rslora", is_flag=True, default=None, help="rsLoRA scaling alpha/sqrt(r)."),
        click.option("--epochs", type=int, help="Epochs (default 1 when --iters is not given)."),
        click.option("--iters", type=int, help="Optimizer steps."),
        click.option("--batch-size", type=int, help=default(TrainConfig, "batch_size")),
        click.option("--grad-accum", type=int, help=f"Micro-batches per optimizer step. {default(TrainConfig, 'grad_accum')}"),
        click.option("--lr", type=float, help=f"Peak learning rate. {default(TrainConfig, 'lr')}"),
        click.option("--weight-decay", type=float, help=f"AdamW weight decay. {default(TrainConfig, 'weight_decay')}"),
        click.option("--warmup", type=int, help=f"Linear warm-up steps. {default(TrainConfig, 'warmup')}"),
        click.option("--schedule", type=click.Choice(list(SCHEDULES)), help=default(TrainConfig, "schedule")),
        click.option("--clip-grad", type=float, help=f"Global-norm clipping. {default(TrainConfig, 'clip_grad')}"),
        click.option("--grad-checkpoint", is_flag=True, default=None, help="Recompute block activations (less memory)."),
        click.option("--auto-fit", is_flag=True, default=None,
                     help="Choose --batch-size, --grad-checkpoint and if needed --max-seq-length to fit the memory."),
        click.option("--memory-limit", type=float, metavar="GIB",
                     help="Checkpoint and stop before MLX's memory passes this many GiB. [default: this machine's memory]"),
        click.option("--max-seq-length", type=int, help=f"Longer samples are truncated (counted). {default(TrainConfig, 'max_seq_length')}"),
        click.option("--pack/--no-pack", default=None, help="Pack several samples per row (attention kept apart). "
                     "[default: when it cuts padding by >15% and the architecture supports it]"),
        click.option("--seed", type=int, help=default(TrainConfig, "seed")),
        click.option("--val-every", type=int, help=f"Validate every N steps. {default(TrainConfig, 'val_every')}"),
        click.option("--save-every", type=int, help=f"Checkpoint every N steps. {default(TrainConfig, 'save_every')}"),
        click.option("--report-every", type=int, help=f"Print a progress line every N steps. {default(TrainConfig, 'report_every')}"),
        click.option("--keep-checkpoints", type=int, help="Keep only the newest K checkpoints (and the best)."),
        click.option("--save-best", is_flag=True, default=None,
                     help="Keep the checkpoint with the lowest validation loss as checkpoints/best."),
        click.option("--early-stop", type=int, metavar="PATIENCE",
                     help="Stop when validation loss has not improved for PATIENCE validations."),
        click.option("--ignore-base-mismatch", is_flag=True, default=None,
                     help="--resume even if the base differs from the one the checkpoint was trained on."),
        click.option("--method", type=click.Choice(list(METHODS)),
                     help=f"Objective: sft (token loss), dpo / orpo / simpo (chosen/rejected pairs), kto (rows "
                     f"labelled good/bad), grpo (online). {default(TrainConfig, 'method')}"),
        click.option("--beta", type=float, help="DPO/KTO inverse temperature, ORPO's lambda, SimPO's reward scale, "
                     f"GRPO's KL weight (0: no reference pass). {_per_method('beta')}"),
        click.option("--loss-type", type=click.Choice(list(DPO_LOSS_TYPES + GRPO_LOSS_TYPES)),
                     help=f"DPO loss ({', '.join(DPO_LOSS_TYPES)}) or GRPO's token aggregation "
                     f"({', '.join(GRPO_LOSS_TYPES)}). {_per_method('loss_type')}"),
        click.option("--reward", multiple=True, metavar="NAME[:WEIGHT]",
                     help=f"grpo: a reward function, repeatable: a built-in ({', '.join(BUILTIN_REWARDS)}), "
                     "module:function or path/to/file.py:function, each with an optional :WEIGHT. "
                     f"[default: {','.join(GRPOConfig().rewards)}]"),
        click.option("--group-size", type=int, help=f"grpo: completions sampled per prompt. "
                     f"{default(GRPOConfig, 'group_size')}"),
        click.option("--max-completion-length", type=int, help=f"grpo: tokens per sampled completion at most. "
                     f"{default(GRPOConfig, 'max_completion_length')}"),
        click.option("--temperature", type=float, help=f"grpo: sampling temperature. {default(GRPOConfig, 'temperature')}"),
        click.option("--top-p", type=float, help=f"grpo: nucleus sampling (1: off). {default(GRPOConfig, 'top_p')}"),
        click.option("--epsilon", type=float, help=f"grpo: clip range of the probability ratio. "
                     f"{default(GRPOConfig, 'epsilon')}"),
        click.option("--epsilon-high", type=float, help="grpo: upper clip bound (DAPO's clip-higher; default --epsilon)."),
        click.option("--scale-rewards", type=click.Choice(list(SCALE_REWARDS)),
                     help=f"grpo: divide centred rewards by the group's std, the batch's, or not. "
                     f"{default(GRPOConfig, 'scale_rewards')}"),
        click.option("--format-pattern", help="grpo: the regex the built-in `format` reward looks for. "
                     f"[default: {GRPOConfig().format_pattern}]"),
        click.option("--label-smoothing", type=float,
                     help=f"Share of flipped labels assumed (dpo sigmoid, simpo). {default(TrainConfig, 'label_smoothing')}"),
        click.option("--gamma", type=float, help=f"SimPO's target reward margin. {default(TrainConfig, 'gamma')}"),
        click.option("--desirable-weight", type=float, help=f"KTO weight of label-true rows. "
                     f"{default(TrainConfig, 'desirable_weight')}"),
        click.option("--undesirable-weight", type=float, help=f"KTO weight of label-false rows. "
                     f"{default(TrainConfig, 'undesirable_weight')}"),
        click.option("--init-adapter", help="Start from this adapter folder (e.g. an SFT run); for dpo/kto it is "
                     "also the frozen reference."),
        click.option("--dtype", type=DTYPE, help="Compute dtype (default float32 on CPU)."),
        click.option("--resume", help="Continue from a checkpoint or an adapter folder with checkpoints/."),
        click.option("--force", is_flag=True, default=None, help="Replace an existing adapter folder."),
        click.option("--report-to", metavar="TRACKERS",
                     help="Log the progress metrics and config to any of wandb,mlflow,tensorboard,trackio."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command()
@train_options
def train(config_file, resume, **flags):
    """Train a LoRA/DoRA adapter on a base model.

    Example: mlxlora train --model ./smollm2 --data examples/devil --quantize 4 --iters 200
    """
    from ..config import build_train_config, load_config_file
    from ..train import train as run_train

    if flags.get("quantize") is not None:
        flags["quantize"] = int(flags["quantize"])
    flags["data"] = list(flags.get("data") or ()) or None
    flags["reward"] = tuple(flags.get("reward") or ()) or None
    file_values = load_config_file(config_file) if config_file else None
    stored = None
    if resume is not None:  # the checkpoint's own config fills what is not given: --resume DIR alone works
        from ..train.checkpoint import stored_config

        stored = stored_config(resume)
    cfg = build_train_config(file_values, flags, source=config_file or "config file", stored=stored)
    run_train(cfg, resume=resume)
