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
@click.option("--data", "data_path", required=True, multiple=True, metavar="SOURCE[:WEIGHT]",
              help="Data folder, .jsonl file, `datasets` folder or Hub id ORG/NAME[:CONFIG]; repeat for a mixture.")
@click.option("--split-map", help="Our split = the dataset's, e.g. valid=validation.")
@click.option("--columns", help="Our field = the dataset's column, e.g. prompt=instruction,completion=output.")
@click.option("--seed", type=int, help=f"Seed of a mixture. {default(TrainConfig, 'seed')}")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="train", show_default=True)
@click.option("-n", "--num", type=int, default=3, show_default=True, help="Samples to show.")
@click.option("--max-seq-length", type=int, help=default(TrainConfig, "max_seq_length"))
def inspect(model, data_path, split, num, max_seq_length, split_map, columns, seed):
    """Show samples token by token with the no-loss part marked, and counts.

    Preference rows (chosen/rejected, or KTO's completion/label) show both sides of each item.

    Example: mlxlora data inspect --model ./smollm2 --data examples/devil

    Example: mlxlora data inspect --model ./smollm2 --data tatsu-lab/alpaca --split train
    """
    from .. import data as D
    from ..data.sources import describe_prepared, prepare_data
    from ..models import load_base

    folder = prepare_data(list(data_path), split_map, columns, TrainConfig.seed if seed is None else seed)
    path = D.split_file(folder, split)  # before the model loads: a bad --data fails in a second
    base = load_base(model)
    msl = max_seq_length or TrainConfig.max_seq_length
    about = describe_prepared(folder)
    if about:
        click.echo(about)
    kind = D.preference_kind(path)
    if kind is not None:  # pairs or KTO rows: both sides, as --method dpo / kto trains them
        split = D.load_preference_split(path, base.tokenizer, msl, kind, kl_group=TrainConfig.batch_size)
        click.echo(D.inspect_preference(split, base.tokenizer, n=num))
        return
    click.echo(D.inspect_split(D.load_split(path, base.tokenizer, msl), base.tokenizer, n=num))
