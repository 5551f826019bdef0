"""`mlxlora plan`: parameters and predicted peak memory of a LoRA run, without loading the weights."""

from __future__ import annotations

import click

from ..config import METHODS, GRPOConfig, TrainConfig
from .options import DTYPE, GROUP_SIZE, QUANTIZE, default


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="A train YAML file; the flags below override it.")
@click.option("--model", help="Model folder, config.json, .gguf file, or hub id (only headers are read).")
@click.option("--quantize", type=QUANTIZE,
              help="Quantize the base at load time (QLoRA).")
@click.option("--q-group-size", type=GROUP_SIZE, help=f"Group size for --quantize. {default(TrainConfig, 'q_group_size')}")
@click.option("--rank", type=int, help=f"LoRA rank r. {default(TrainConfig, 'rank')}")
@click.option("--target", help=f"Comma-separated module names, a regex, or all-linear. {default(TrainConfig, 'target')}")
@click.option("--layers", type=int, help="Adapt only the last N blocks.")
@click.option("--dora", is_flag=True, default=None, help="DoRA instead of LoRA.")
@click.option("--batch-size", type=int, help=default(TrainConfig, "batch_size"))
@click.option("--grad-accum", type=int, help=f"Micro-batches per optimizer step. {default(TrainConfig, 'grad_accum')}")
@click.option("--max-seq-length", type=int, help=f"Every sample is counted at this length. {default(TrainConfig, 'max_seq_length')}")
@click.option("--grad-checkpoint", is_flag=True, default=None, help="Recompute block activations (less memory).")
@click.option("--method", type=click.Choice(list(METHODS)),
              help=f"Training objective; dpo/orpo/simpo/kto count both sequences of an item and the reference, "
              "grpo one group of sampled completions at a time. "
              f"{default(TrainConfig, 'method')}")
@click.option("--group-size", type=int, help=f"--method grpo: completions per prompt. {default(GRPOConfig, 'group_size')}")
@click.option("--max-completion-length", type=int,
              help=f"--method grpo: tokens per completion. {default(GRPOConfig, 'max_completion_length')}")
@click.option("--dtype", type=DTYPE,
              help="Compute dtype. [default: float32 on CPU, the checkpoint's on a GPU]")
@click.option("--backend", type=click.Choice(["cpu", "gpu"]), help="Plan for this mlx backend. [default: this machine's]")
@click.option("--memory-gb", type=float, help="Memory budget in GiB. [default: this machine's]")
@click.option("--fit", "fit", is_flag=True,
              help="Also find the largest batch size that fits, whether it needs --grad-checkpoint and, "
                   "when not even a batch of 1 fits, the longest --max-seq-length that does.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def plan(config_file, backend, memory_gb, fit, as_json, **flags):
    """Predict parameters, adapter size and peak memory of a training run (no weights are loaded).

    Example: mlxlora plan --model ./smollm2 --quantize 4 --rank 16 --target all-linear --batch-size 8 --fit
    """
    import json
    from dataclasses import asdict

    from ..config import build_train_config, load_config_file
    from ..config.choices import number
    from ..errors import ConfigError
    from ..plan import default_backend, format_plan, plan_training, suggest_fit

    for key in ("quantize", "q_group_size"):
        if flags.get(key) is not None:
            flags[key] = int(flags[key])
    if memory_gb is not None:
        number("--memory-gb", memory_gb, low=0.0, low_open=True)
    file_values = load_config_file(config_file) if config_file else None
    cfg = build_train_config(file_values, flags, source=config_file or "config file")
    if cfg.model is None:
        raise ConfigError("--model is required (a model folder, config.json, .gguf file or hub id)")
    backend = backend or default_backend()
    kw = dict(quantize=cfg.quantize, group_size=cfg.q_group_size, max_seq_length=cfg.max_seq_length,
              compute_dtype=cfg.dtype or ("float32" if backend == "cpu" else None), grad_accum=cfg.grad_accum,
              backend=backend, memory_bytes=int(memory_gb * 2**30) if memory_gb else None,
              method=cfg.preference.method, grpo=cfg.grpo)
    result = plan_training(cfg.model, cfg.lora, batch_size=cfg.batch_size, grad_checkpoint=cfg.grad_checkpoint,
                           **kw)
    suggestion = suggest_fit(cfg.model, cfg.lora, batch_size=cfg.batch_size, **kw) if fit else None
    if as_json:
        out = asdict(result)
        if suggestion is not None:
            out["fit"] = {"batch_size": suggestion.batch_size, "grad_checkpoint": suggestion.grad_checkpoint,
                          "max_seq_length": suggestion.max_seq_length, "peak_bytes": suggestion.plan.peak_bytes}
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(format_plan(result))
    if suggestion is not None:
        click.echo(fit_line(suggestion, cfg.batch_size, cfg.max_seq_length))


def fit_line(fit, wanted: int, length: int | None = None) -> str:
    """One line saying what batch size fits and what to pass."""
    from ..plan import human
    from ..plan.budget import MIN_FIT_LENGTH

    if fit.batch_size == 0:
        return (f"fit: not even a batch of 1 x {MIN_FIT_LENGTH} tokens fits with --grad-checkpoint; use --quantize "
                "or fewer targets")
    flags = f"--batch-size {fit.batch_size}" + (" --grad-checkpoint" if fit.grad_checkpoint else "")
    if length is not None and fit.max_seq_length < length:
        flags += f" --max-seq-length {fit.max_seq_length}"
    line = f"fit: {flags} (predicted peak {human(fit.plan.peak_bytes)})"
    if fit.batch_size < wanted:
        accum = -(-wanted // fit.batch_size)
        line += f"; for an effective batch of {wanted} add --grad-accum {accum}"
    return line
