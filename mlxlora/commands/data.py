"""`mlxlora data inspect`: look at a dataset the way training sees it."""

from __future__ import annotations

import click

from ..config import TrainConfig
from .options import default


@click.group()
def data():
    """Look at a dataset the way training sees it."""


@data.command()
@click.option("--model", required=True, help="Model whose tokenizer/chat template to use.")
@click.option("--data", "data_path", required=True, help="Data folder or .jsonl file.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="train", show_default=True)
@click.option("-n", "--num", type=int, default=3, show_default=True, help="Samples to show.")
@click.option("--max-seq-length", type=int, help=default(TrainConfig, "max_seq_length"))
def inspect(model, data_path, split, num, max_seq_length):
    """Show samples token by token with the no-loss part marked, and counts.

    Preference rows (chosen/rejected, or KTO's completion/label) show both sides of each item.

    Example: mlxlora data inspect --model ./smollm2 --data examples/devil
    """
    from .. import data as D
    from ..models import load_base

    path = D.split_file(data_path, split)  # before the model loads: a bad --data fails in a second
    base = load_base(model)
    msl = max_seq_length or TrainConfig.max_seq_length
    kind = D.preference_kind(path)
    if kind is not None:  # pairs or KTO rows: both sides, as --method dpo / kto trains them
        split = D.load_preference_split(path, base.tokenizer, msl, kind, kl_group=TrainConfig.batch_size)
        click.echo(D.inspect_preference(split, base.tokenizer, n=num))
        return
    click.echo(D.inspect_split(D.load_split(path, base.tokenizer, msl), base.tokenizer, n=num))
