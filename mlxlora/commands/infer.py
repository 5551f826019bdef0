"""`mlxlora generate` and `mlxlora eval`: text from, and held-out loss of, a base with an adapter."""

from __future__ import annotations

import click

from ..config import EvalConfig, GenerateConfig, GenerativeEvalConfig
from .evaluate import evaluate_options, perplexity_only, run_evaluation
from .options import IGNORE_BASE, QUANTIZE, default, load, model_options, parse_adapter_specs, quantize_bits


@click.command()
@model_options
@click.option("--prompt", required=True, help="The prompt (a user message when --chat).")
@click.option("--chat/--no-chat", default=None, help="Use the chat template. [default: when the tokenizer has one]")
@click.option("--max-tokens", type=int, help=default(GenerateConfig, "max_tokens"))
@click.option("--temp", type=float, help=f"Sampling temperature; 0 is greedy. {default(GenerateConfig, 'temp')}")
@click.option("--top-p", type=float, help=default(GenerateConfig, "top_p"))
@click.option("--seed", type=int, help=default(GenerateConfig, "seed"))
def generate(model, adapter, quantize, ignore_base_mismatch, prompt, **opts):
    """Generate text, streaming it as it comes.

    Example: mlxlora generate --model ./smollm2 --adapter adapters --prompt 'Define "cat".'
    """
    from ..config import given
    from ..inference import generate_text

    cfg = GenerateConfig(**given(**opts))
    base = load(model, adapter, quantize, ignore_base_mismatch)
    generate_text(base, prompt, cfg, on_text=lambda t: click.echo(t, nl=False))
    click.echo()


@click.command(name="eval")
@click.option("--model", required=True, help="Model folder, .gguf file, or hub id.")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]DIR",
              help="Adapter folder; repeat (or write NAME=DIR) to compare several against the base in one table.")
@click.option("--quantize", type=QUANTIZE, help="Quantize the base at load time.")
@click.option("--data", help="Data folder or a .jsonl file (not needed with --tasks).")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), help=default(EvalConfig, "split"))
@click.option("--batch-size", type=int, help=f"Rows per batch. {default(EvalConfig, 'batch_size')} "
                                           f"(--generate: {default(GenerativeEvalConfig, 'batch_size')[1:-1]})")
@click.option("--max-seq-length", type=int, help=default(EvalConfig, "max_seq_length"))
@IGNORE_BASE
@evaluate_options
def eval_cmd(model, adapters, quantize, data, ignore_base_mismatch, generate, tasks, **opts):
    """Print loss and perplexity on a data split; with several adapters, a table against the base.
    --generate: answers of the base and each adapter scored against the references (eval_report.json/.html).
    --tasks: lm-evaluation-harness benchmarks on the base and each unfused adapter.

    Example: mlxlora eval --model ./smollm2 --adapter adapters --data examples/devil

    Example: mlxlora eval --model ./smollm2 --adapter devil=runs/devil --adapter poet=runs/poet --data examples/devil

    Example: mlxlora eval --generate --model ./smollm2 --adapter devil=runs/devil --data examples/devil --out report

    Example: mlxlora eval --tasks arc_easy --limit 100 --model ./smollm2 --adapter devil=runs/devil
    """
    from ..config import given

    if generate or tasks:
        return run_evaluation(model, adapters, quantize, data, generate, tasks, opts, ignore_base_mismatch)
    perplexity_only(opts, data)
    from ..data.sources import prepare_data

    data = prepare_data(data)  # a Hub id or `datasets` folder: its splits as JSONL (data/sources.py)

    cfg = EvalConfig(**given(**opts))
    table = len(adapters) > 1 or any("=" in a for a in adapters)
    if table:  # one base, every adapter switched on in turn (mlxlora.multi)
        from ..models import load_base
        from ..serve.compare import compare_perplexity, format_perplexity_table

        specs = parse_adapter_specs(adapters)  # bad specs fail before the model loads
        base = load_base(model, quantize=quantize_bits(quantize))
        base.model.eval()
        rows = compare_perplexity(base, specs, data, cfg, ignore_base_mismatch)
        res = rows[0]
    else:
        from ..inference import eval_split

        res = eval_split(load(model, adapters[0] if adapters else None, quantize, ignore_base_mismatch), data, cfg)
    click.echo(f"{res['path']}: {res['samples']} samples, {res['target_tokens']} target tokens")
    if table:
        click.echo(format_perplexity_table(rows))
    else:
        click.echo(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}")
