"""The `mlxlora` command line: each command is a few lines over the library API.

Options default to None ("not given"), so the dataclasses in config.py stay the only home
of defaults and a --config file can fill what the command line leaves out.
"""

from __future__ import annotations

import sys

import click

from .errors import MlxloraError


class _Group(click.Group):
    """Turns every MlxloraError into a one-line `Error: ...` and exit code 1 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MlxloraError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlxlora")
def cli():
    """Fine-tune language models with LoRA / DoRA / QLoRA on MLX."""


def _train_options(f):
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file; keys are these flag names."),
        click.option("--model", help="Model folder (HF or MLX), .gguf file, or hub id."),
        click.option("--data", help="Folder with train.jsonl / valid.jsonl / test.jsonl."),
        click.option("--train-file", help="Explicit training .jsonl (overrides --data)."),
        click.option("--valid-file", help="Explicit validation .jsonl."),
        click.option("--adapter-path", help="Output adapter folder. [default: adapters]"),
        click.option("--quantize", type=click.Choice(["2", "3", "4", "5", "6", "8"]), help="Quantize the base at load time (QLoRA)."),
        click.option("--q-group-size", type=int, help="Group size for --quantize. [default: 64]"),
        click.option("--rank", type=int, help="LoRA rank r. [default: 8]"),
        click.option("--alpha", type=float, help="LoRA alpha; scale = alpha/r. [default: 16]"),
        click.option("--dropout", type=float, help="Dropout on the adapter input. [default: 0]"),
        click.option("--target", help="Comma-separated module names, a regex, or all-linear. [default: q_proj,v_proj]"),
        click.option("--layers", type=int, help="Adapt only the last N blocks."),
        click.option("--dora", is_flag=True, default=None, help="DoRA instead of LoRA."),
        click.option("--rslora", is_flag=True, default=None, help="rsLoRA scaling alpha/sqrt(r)."),
        click.option("--epochs", type=int, help="Epochs (default 1 when --iters is not given)."),
        click.option("--iters", type=int, help="Optimizer steps."),
        click.option("--batch-size", type=int, help="[default: 4]"),
        click.option("--grad-accum", type=int, help="Micro-batches per optimizer step. [default: 1]"),
        click.option("--lr", type=float, help="Peak learning rate. [default: 1e-4]"),
        click.option("--weight-decay", type=float, help="AdamW weight decay. [default: 0]"),
        click.option("--warmup", type=int, help="Linear warm-up steps. [default: 0]"),
        click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), help="[default: cosine]"),
        click.option("--clip-grad", type=float, help="Global-norm clipping. [default: 1.0]"),
        click.option("--grad-checkpoint", is_flag=True, default=None, help="Recompute block activations (less memory)."),
        click.option("--max-seq-length", type=int, help="Longer samples are truncated (counted). [default: 2048]"),
        click.option("--pack/--no-pack", default=None, help="Pack several samples per row (attention kept apart). "
                     "[default: when it cuts padding by >15% and the architecture supports it]"),
        click.option("--seed", type=int, help="[default: 0]"),
        click.option("--val-every", type=int, help="Validate every N steps. [default: 50]"),
        click.option("--save-every", type=int, help="Checkpoint every N steps. [default: 100]"),
        click.option("--report-every", type=int, help="Print a progress line every N steps. [default: 10]"),
        click.option("--keep-checkpoints", type=int, help="Keep only the newest K checkpoints (and the best)."),
        click.option("--save-best", is_flag=True, default=None,
                     help="Keep the checkpoint with the lowest validation loss as checkpoints/best."),
        click.option("--early-stop", type=int, metavar="PATIENCE",
                     help="Stop when validation loss has not improved for PATIENCE validations."),
        click.option("--ignore-base-mismatch", is_flag=True, default=None,
                     help="--resume even if the base differs from the one the checkpoint was trained on."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Compute dtype (default float32 on CPU)."),
        click.option("--resume", help="Continue from a checkpoint or an adapter folder with checkpoints/."),
        click.option("--force", is_flag=True, default=None, help="Replace an existing adapter folder."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@cli.command()
@_train_options
def train(config_file, resume, **flags):
    """Train a LoRA/DoRA adapter on a base model.

    Example: mlxlora train --model ./smollm2 --data examples/devil --quantize 4 --iters 200
    """
    from .config import build_train_config, load_config_file
    from .train import train as run_train

    if flags.get("quantize") is not None:
        flags["quantize"] = int(flags["quantize"])
    file_values = load_config_file(config_file) if config_file else None
    cfg = build_train_config(file_values, flags, source=config_file or "config file")
    run_train(cfg, resume=resume)


def _model_options(f):
    for o in reversed([
        click.option("--model", required=True, help="Model folder, .gguf file, or hub id."),
        click.option("--adapter", help="Adapter folder (PEFT, mlx-lm or mlxlora format)."),
        click.option("--quantize", type=click.Choice(["2", "3", "4", "5", "6", "8"]), help="Quantize the base at load time."),
        _IGNORE_BASE,
    ]):
        f = o(f)
    return f


_IGNORE_BASE = click.option("--ignore-base-mismatch", is_flag=True,
                            help="Load the adapter even if it was trained on a different base (fingerprint).")


def _load(model, adapter, quantize, ignore_base_mismatch=False):
    from .inference import load_with_adapter

    return load_with_adapter(model, adapter, ignore_base_mismatch=ignore_base_mismatch,
                             quantize=int(quantize) if quantize else None)


@cli.command()
@_model_options
@click.option("--prompt", required=True, help="The prompt (a user message when --chat).")
@click.option("--chat/--no-chat", default=None, help="Use the chat template. [default: when the tokenizer has one]")
@click.option("--max-tokens", type=int, help="[default: 256]")
@click.option("--temp", type=float, help="Sampling temperature; 0 is greedy. [default: 0]")
@click.option("--top-p", type=float, help="[default: 1.0]")
@click.option("--seed", type=int, help="[default: 0]")
def generate(model, adapter, quantize, ignore_base_mismatch, prompt, **opts):
    """Generate text, streaming it as it comes.

    Example: mlxlora generate --model ./smollm2 --adapter adapters --prompt 'Define "cat".'
    """
    from .config import GenerateConfig, given
    from .inference import generate_text

    cfg = GenerateConfig(**given(**opts))
    base = _load(model, adapter, quantize, ignore_base_mismatch)
    generate_text(base, prompt, cfg, on_text=lambda t: click.echo(t, nl=False))
    click.echo()


@cli.command(name="eval")
@click.option("--model", required=True, help="Model folder, .gguf file, or hub id.")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]DIR",
              help="Adapter folder; repeat (or write NAME=DIR) to compare several against the base in one table.")
@click.option("--quantize", type=click.Choice(["2", "3", "4", "5", "6", "8"]), help="Quantize the base at load time.")
@click.option("--data", required=True, help="Data folder or a .jsonl file.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), help="[default: test]")
@click.option("--batch-size", type=int, help="[default: 4]")
@click.option("--max-seq-length", type=int, help="[default: 2048]")
@_IGNORE_BASE
def eval_cmd(model, adapters, quantize, data, ignore_base_mismatch, **opts):
    """Print loss and perplexity on a data split; with several adapters, a table against the base.

    Example: mlxlora eval --model ./smollm2 --adapter adapters --data examples/devil

    Example: mlxlora eval --model ./smollm2 --adapter devil=runs/devil --adapter poet=runs/poet --data examples/devil
    """
    from .config import EvalConfig, given

    cfg = EvalConfig(**given(**opts))
    table = len(adapters) > 1 or any("=" in a for a in adapters)
    if table:  # one base, every adapter switched on in turn (mlxlora.multi)
        from .commands.serve import parse_adapter_specs
        from .models import load_base
        from .multi import compare_perplexity, format_perplexity_table

        specs = parse_adapter_specs(adapters)  # bad specs fail before the model loads
        base = load_base(model, quantize=int(quantize) if quantize else None)
        base.model.eval()
        rows = compare_perplexity(base, specs, data, cfg)
        res = rows[0]
    else:
        from .inference import eval_split

        res = eval_split(_load(model, adapters[0] if adapters else None, quantize, ignore_base_mismatch), data, cfg)
    click.echo(f"{res['path']}: {res['samples']} samples, {res['target_tokens']} target tokens")
    if table:
        click.echo(format_perplexity_table(rows))
    else:
        click.echo(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}")


@cli.group()
def data():
    """Look at a dataset the way training sees it."""


@data.command()
@click.option("--model", required=True, help="Model whose tokenizer/chat template to use.")
@click.option("--data", "data_path", required=True, help="Data folder or .jsonl file.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="train", show_default=True)
@click.option("-n", "--num", type=int, default=3, show_default=True, help="Samples to show.")
@click.option("--max-seq-length", type=int, help="[default: 2048]")
def inspect(model, data_path, split, num, max_seq_length):
    """Show samples token by token with the no-loss part marked, and counts.

    Example: mlxlora data inspect --model ./smollm2 --data examples/devil
    """
    from pathlib import Path

    from . import data as D
    from .config import TrainConfig
    from .models import load_base

    base = load_base(model)
    p = Path(data_path)
    path = p if p.is_file() else D.find_split_files(data_path, require_train=False).get(split)
    if path is None:
        raise click.ClickException(f"--data: {data_path} has no {split}.jsonl")
    msl = max_seq_length or TrainConfig.max_seq_length
    click.echo(D.inspect_split(D.load_split(path, base.tokenizer, msl), base.tokenizer, n=num))


@cli.command()
@click.option("--out", help="Where the demo writes its adapter. [default: runs/demo]")
@click.option("--iters", type=int, help="Training steps. [default: the demo's config]")
@click.option("--force/--no-force", default=True, show_default=True, help="Replace an earlier demo run's adapter.")
def demo(out, iters, force):
    """Fine-tune the real SmolLM2-135M (4-bit) on The Devil's Dictionary and show before/after."""
    from .demo import run_demo

    run_demo(out=out, iters=iters, force=force)


# Commands in their own modules: (module, attribute holding a click.Command or click.Group).
COMMAND_MODULES = [
    ("mlxlora.commands.fuse", "fuse"),
    ("mlxlora.commands.hub", "upload"),
    ("mlxlora.commands.hub", "export_model"),
    ("mlxlora.commands.interop", "convert"),
    ("mlxlora.commands.interop", "export_adapter"),
    ("mlxlora.commands.plan", "plan"),
    ("mlxlora.commands.serve", "serve"),
    ("mlxlora.commands.serve", "chat"),
]


def _register_commands() -> None:
    import importlib

    for module, attr in COMMAND_MODULES:
        cli.add_command(getattr(importlib.import_module(module), attr))


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: on Linux CPU, re-executes once with OpenBLAS preloaded (see blas.py)."""
    from .blas import maybe_reexec

    maybe_reexec(argv)
    cli.main(args=argv, prog_name="mlxlora")


if __name__ == "__main__":
    sys.exit(main())
