"""`mlxlora demo`: the real SmolLM2-135M fine-tuned on The Devil's Dictionary, before and after."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", help="Where the demo writes its adapter. [default: runs/demo]")
@click.option("--iters", type=int, help="Training steps. [default: the demo's config]")
@click.option("--force/--no-force", default=True, show_default=True, help="Replace an earlier demo run's adapter.")
def demo(out, iters, force):
    """Fine-tune the real SmolLM2-135M (4-bit) on The Devil's Dictionary and show before/after."""
    from ..demo import run_demo

    run_demo(out=out, iters=iters, force=force)
