"""`mlxlora upload` and `mlxlora export-model`: thin commands over mlxlora.hub."""

from __future__ import annotations

import click

from ..config import EXPORT_FORMATS, GGUF_TYPES, ExportConfig
from .options import DTYPE, default


@click.command(name="upload")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--repo", "repo_id", required=True, help="Hub model repo, user/name (created if missing).")
@click.option("--private", is_flag=True, default=False, help="Create the repo private.")
@click.option("--message", help="Commit message. [default: Upload <adapter|mlx|hf> with mlxlora]")
@click.option("--base-model", help="Hub id of the base model for the card, when PATH only records a local folder.")
def upload(path, repo_id, private, message, base_model):
    """Upload an adapter or model folder to the Hugging Face Hub, with a model card.

    Skips checkpoints/ and hidden/temporary files. Needs a token: `hf auth login` or HF_TOKEN.

    Example: mlxlora upload runs/devil --repo alice/smollm2-devil-lora --private
    """
    from ..hub import upload as run_upload

    url = run_upload(path, repo_id, private=private, message=message, base_model=base_model)
    click.echo(f"uploaded {path} to {repo_id}: {url}")


@click.command(name="export-model")
@click.option("--model", required=True, help="Base model: folder, .gguf file or hub id.")
@click.option("--adapter", help="Adapter folder to fuse in (float) before exporting.")
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(list(EXPORT_FORMATS)),
              help="hf: a transformers folder; gguf: one llama.cpp/Ollama/LM Studio file + Modelfile. "
                   f"{default(ExportConfig, 'format')}")
@click.option("--dtype", type=DTYPE, help=f"Weight dtype (hf). {default(ExportConfig, 'dtype')}")
@click.option("--gguf-type", type=click.Choice(list(GGUF_TYPES)),
              help="GGUF tensor type; the K-quants need llama.cpp's llama-quantize. "
                   f"{default(ExportConfig, 'gguf_type')}")
@click.option("--max-shard-size", help=f"Largest weight file (hf), e.g. 5GB, 500MB, 4GiB. "
                                       f"{default(ExportConfig, 'max_shard_size')}")
@click.option("--base-model", help="Hub id of the base model for the card, when --model is a local folder.")
@click.option("--force", is_flag=True, default=False, help="Replace an existing --out folder.")
def export_model(model, adapter, out, fmt, dtype, gguf_type, max_shard_size, base_model, force):
    """Write a model (with an adapter fused in) that transformers, or llama.cpp/Ollama/LM Studio, load.

    \b
    Example: mlxlora export-model --model ./smollm2 --adapter runs/devil --out smollm2-devil-hf
    Example: mlxlora export-model --model ./smollm2 --adapter runs/devil --format gguf --gguf-type q8_0 --out devil-gguf
    """
    from ..config import given
    from ..hub import export_model as run_export

    from ..errors import ConfigError

    if fmt != "gguf" and gguf_type is not None:
        raise ConfigError(f"--gguf-type {gguf_type} needs --format gguf")
    if fmt == "gguf" and (dtype or max_shard_size):
        raise ConfigError(f"--format gguf writes one file in --gguf-type; drop --{'dtype' if dtype else 'max-shard-size'}")
    cfg = ExportConfig(**given(format=fmt, dtype=dtype, max_shard_size=max_shard_size, gguf_type=gguf_type))
    folder = run_export(model, out, adapter=adapter, config=cfg, force=force, base_model=base_model)
    files = sorted(p.name for p in folder.iterdir())
    click.echo(f"wrote {folder} ({cfg.gguf_type if cfg.format == 'gguf' else cfg.dtype}): {', '.join(files)}")
