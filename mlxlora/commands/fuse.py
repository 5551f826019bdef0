"""`mlxlora fuse`: fuse an adapter into its base and write a model folder mlx-lm (or transformers) loads."""

from __future__ import annotations

import click

from ..config import FUSE_STRATEGIES, GGUF_TYPES, ExportConfig, FuseConfig
from .options import GROUP_SIZE, IGNORE_BASE, QUANTIZE, default


@click.command()
@click.option("--model", required=True, help="Base model folder (HF or MLX), .gguf file, or hub id.")
@click.option("--adapter", required=True, help="Adapter folder (PEFT or mlxlora format).")
@click.option("--out", required=True, help="Output folder for the fused model.")
@click.option("--bits", type=click.Choice([*QUANTIZE.choices, "none"]),
              help="Width of the re-quantized layers; none writes float. [default: the base's]")
@click.option("--group-size", type=GROUP_SIZE, help="[default: the base's]")
@click.option("--strategy", type=click.Choice(["auto", *FUSE_STRATEGIES]),
              help=f"How a quantized base is re-quantized. {default(FuseConfig, 'strategy')}")
@click.option("--size-budget", type=float,
              help="auto may grow the model up to this multiple of the naive fuse's size with 8-bit layers. "
                   f"{default(FuseConfig, 'size_budget')}")
@click.option("--format", "fmt", type=click.Choice(["mlx", "hf", "gguf"]), default="mlx", show_default=True,
              help="mlx: an mlx-lm folder; hf: a transformers folder (float weights); gguf: a llama.cpp file "
                   "+ Ollama Modelfile.")
@click.option("--gguf-type", type=click.Choice(list(GGUF_TYPES)),
              help=f"With --format gguf: the GGUF tensor type. {default(ExportConfig, 'gguf_type')}")
@click.option("--data", help="Validation data (folder or .jsonl) for the held-out losses. [default: the adapter's]")
@click.option("--calibration", help="Data (folder or .jsonl) whose activations guide re-quantization, or 'random'. "
              "[default: the adapter's training data, else random tokens]")
@click.option("--report", "show_report", is_flag=True, help="Print the per-layer report too.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@IGNORE_BASE
@click.option("--upload", "upload_repo", help="Then upload the fused folder to this Hub repo (user/name).")
@click.option("--private", is_flag=True, help="With --upload: create the repo private.")
def fuse(model, adapter, out, bits, group_size, strategy, size_budget, fmt, gguf_type, data, calibration, show_report, force,
         ignore_base_mismatch, upload_repo, private):
    """Fuse an adapter into its base model; writes fuse_report.json beside the weights.

    Example: mlxlora fuse --model ./smollm2-q4 --adapter runs/devil --out fused/devil
    """
    from ..fuse import format_report, fuse_to_folder, summary_line

    folder, report = fuse_to_folder(
        model, adapter, out, fmt=fmt, gguf_type=gguf_type, force=force, calibration=calibration, data=data,
        bits=bits, group_size=int(group_size) if group_size else None, strategy=strategy, size_budget=size_budget,
        ignore_base_mismatch=ignore_base_mismatch or None)
    if show_report:
        click.echo(format_report(report))
    click.echo(summary_line(report, folder))
    if upload_repo:
        from ..hub import upload_after_fuse

        click.echo(f"uploaded: {upload_after_fuse(folder, upload_repo, adapter=adapter, private=private)}")


