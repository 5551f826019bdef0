"""`mlxlora export-adapter` and `mlxlora convert`: adapters and models into other tools' formats."""

from __future__ import annotations

import click

from .options import DTYPE, GROUP_SIZE, QUANTIZE

TARGETS = ("mlx-lm", "peft", "gguf")


@click.command("export-adapter")
@click.argument("adapter", metavar="DIR")
@click.argument("out", metavar="OUT")
@click.option("--to", "target", type=click.Choice(TARGETS), required=True, help="The format to write.")
@click.option("--model", help="The base model (folder, .gguf or hub id): needed for gguf (architecture, heads) "
                              "and for an mlx-lm adapter to peft.")
@click.option("--force", is_flag=True, default=None, help="Replace an existing OUT.")
def export_adapter(adapter, out, target, model, force):
    """Write the adapter DIR (PEFT, mlxlora or mlx-lm folder, or hub id) as an mlx-lm folder, a PEFT folder,
    or a llama.cpp LoRA GGUF file OUT.

    Example: mlxlora export-adapter runs/devil --to gguf devil-lora.gguf --model ./SmolLM2-135M-Instruct
    """
    from ..adapters import export_adapter as run_export

    click.echo(f"wrote {run_export(adapter, out, target, model=model, force=bool(force))}")


@click.command()
@click.option("--model", required=True, help="A transformers folder, hub id, or .gguf file.")
@click.option("--out", required=True, help="The MLX model folder to write.")
@click.option("-q", "--quantize", type=QUANTIZE, help="Quantize to this many bits.")
@click.option("--q-group-size", type=GROUP_SIZE, help="Group size for -q. [default: mlx-lm's, 64]")
@click.option("--dtype", type=DTYPE,
              help="Dtype of float weights. [default: the checkpoint's]")
@click.option("--requantize", is_flag=True, default=None,
              help="GGUF: re-quantize Q2_K/Q3_K/Q6_K to MLX groups (4/5/8-bit) instead of float16 (exact).")
@click.option("--force", is_flag=True, default=None, help="Replace an existing --out folder.")
def convert(model, out, quantize, q_group_size, dtype, requantize, force):
    """Convert a model to an MLX folder (mlx-lm's format), optionally quantized.

    Example: mlxlora convert --model HuggingFaceTB/SmolLM2-135M-Instruct --out smollm2-4bit -q 4
    """
    from ..models.convert import convert_model

    path = convert_model(model, out, quantize=int(quantize) if quantize else None,
                         q_group_size=int(q_group_size) if q_group_size else None,
                         dtype=dtype, force=bool(force), requantize=requantize)
    click.echo(f"wrote {path}")
