"""`mlxlora train`: train a LoRA / DoRA adapter on a base model."""

from __future__ import annotations

import click

from ..config import SCHEDULES, TrainConfig
from .options import DTYPE, QUANTIZE, default


def train_options(f):
    """Every flag of `train` (also read by `plan --config`); each maps to a TrainConfig/LoraConfig field."""
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file; keys are these flag names."),
        click.option("--model", help="Model folder (HF or MLX), .gguf file, or hub id."),
        click.option("--data", help="Folder with train.jsonl / valid.jsonl / test.jsonl."),
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
        click.option("--dtype", type=DTYPE, help="Compute dtype (default float32 on CPU)."),
        click.option("--resume", help="Continue from a checkpoint or an adapter folder with checkpoints/."),
        click.option("--force", is_flag=True, default=None, help="Replace an existing adapter folder."),
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
    file_values = load_config_file(config_file) if config_file else None
    stored = None
    if resume is not None:  # the checkpoint's own config fills what is not given: --resume DIR alone works
        from ..train.checkpoint import stored_config

        stored = stored_config(resume)
    cfg = build_train_config(file_values, flags, source=config_file or "config file", stored=stored)
    run_train(cfg, resume=resume)
