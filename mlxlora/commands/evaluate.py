"""The options and modes of `mlxlora eval` beyond perplexity: --generate (answers scored against the
references, written as eval_report.json / .html) and --tasks (lm-eval benchmarks). The command itself is
in commands/infer.py; these are thin layers over mlxlora.evaluate."""

from __future__ import annotations

import click

from ..config import BenchmarkConfig, GenerativeEvalConfig, given
from ..errors import ConfigError
from .options import default, parse_adapter_specs, quantize_bits

# Options that only --generate / --tasks read (name of the Click parameter -> its flag).
GENERATE_ONLY = {"metric": "--metric", "max_tokens": "--max-tokens"}
REPORT = {"out": "--out", "force": "--force"}  # --generate and --tasks
TASKS_ONLY = {"include_path": "--include-path", "limit": "--limit", "num_fewshot": "--num-fewshot",
              "apply_chat_template": "--apply-chat-template"}


def evaluate_options(f):
    for o in reversed([
        click.option("--generate", is_flag=True,
                     help="Generate an answer per row with the base and each adapter; score against the references."),
        click.option("--metric", multiple=True, metavar="NAME|MODULE:FUNCTION",
                     help="With --generate: a metric (repeat or comma-separate; the first is primary): exact, "
                          "normalized_exact, contains, token_f1, rougeL, chrf, or module:function. "
                          f"{default(GenerativeEvalConfig, 'metrics')}"),
        click.option("--max-tokens", type=int, help=f"With --generate: tokens per answer (greedy). "
                                                   f"{default(GenerativeEvalConfig, 'max_tokens')}"),
        click.option("--out", help="With --generate: the folder for eval_report.json / .html [default: the "
                                   "current folder]. With --tasks: write eval_tasks.json (lm-eval's results) there."),
        click.option("--force", is_flag=True, help="With --generate / --tasks: replace an existing report."),
        click.option("--tasks", help="lm-eval task names, comma-separated (e.g. arc_easy,hellaswag)."),
        click.option("--include-path", help="With --tasks: a folder of lm-eval task YAMLs of your own."),
        click.option("--limit", type=int, help="With --tasks: at most this many documents per task."),
        click.option("--num-fewshot", type=int, help="With --tasks: few-shot examples [default: the task's]."),
        click.option("--apply-chat-template", is_flag=True,
                     help="With --tasks: render each request as a chat (the tokenizer's template, or the fallback "
                          "training uses), as a chat- or completion-trained adapter saw its data."),
    ]):
        f = o(f)
    return f


def _refuse(opts: dict, names: dict, mode: str) -> None:
    for key, flag in names.items():
        if opts.pop(key, None) not in (None, False, ()):
            raise ConfigError(f"{flag} is only read with {mode}; drop it or add {mode}")


def perplexity_only(opts: dict, data) -> None:
    """Check (and drop from opts) the options of the other modes before a perplexity run."""
    if data is None:
        raise ConfigError("--data is needed (a data folder or a .jsonl file) unless --tasks is given")
    _refuse(opts, GENERATE_ONLY, "--generate")
    _refuse(opts, TASKS_ONLY, "--tasks")
    _refuse(opts, REPORT, "--generate or --tasks")


def _metrics(values) -> list[str] | None:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return names or None


def run_evaluation(model, adapters, quantize, data, generate: bool, tasks, opts: dict,
                   ignore_base_mismatch: bool = False) -> None:
    """`eval --generate` or `eval --tasks`; every flag and file is checked before the model loads."""
    from ..models import load_base

    if generate and tasks:
        raise ConfigError("--generate and --tasks: give one of them per run")
    specs = parse_adapter_specs(adapters)  # bad specs fail before the model loads
    if generate:
        _refuse(opts, TASKS_ONLY, "--tasks")
        if data is None:
            raise ConfigError("--generate needs --data (a folder with test.jsonl, or a .jsonl file)")
        if opts.pop("max_seq_length", None) is not None:
            raise ConfigError("--max-seq-length is read by perplexity runs only; drop it with --generate")
        cfg = GenerativeEvalConfig(**given(split=opts.get("split"), metrics=_metrics(opts.get("metric", ())),
                                           max_tokens=opts.get("max_tokens"), batch_size=opts.get("batch_size"),
                                           out=opts.get("out"), force=opts.get("force") or None))
        return _generate(model, specs, quantize, data, cfg, load_base, ignore_base_mismatch)
    _refuse(opts, GENERATE_ONLY, "--generate")
    for key, flag in (("split", "--split"), ("max_seq_length", "--max-seq-length")):
        if opts.get(key) is not None:
            raise ConfigError(f"{flag} is not read with --tasks (each lm-eval task has its own split); drop it")
    if data is not None:
        raise ConfigError("--data is not read with --tasks (lm-eval tasks bring their data); drop it")
    if opts.get("force") and not opts.get("out"):
        raise ConfigError("--force with --tasks replaces an --out report; add --out DIR or drop --force")
    cfg = BenchmarkConfig(**given(tasks=tasks, include_path=opts.get("include_path"), limit=opts.get("limit"),
                                  num_fewshot=opts.get("num_fewshot"), batch_size=opts.get("batch_size"),
                                  apply_chat_template=opts.get("apply_chat_template") or None))
    return _tasks(model, specs, quantize, cfg, load_base, ignore_base_mismatch, opts.get("out"),
                  bool(opts.get("force")))


def _generate(model, specs, quantize, data, cfg, load_base, ignore_base_mismatch) -> None:
    from ..evaluate import check_report_paths, format_tables, generative_eval, resolve_metrics, write_report

    from ..data.sources import prepare_data

    resolve_metrics(cfg.metrics)  # an unknown metric or a missing library fails before the model loads
    check_report_paths(cfg.out, cfg.force)
    data = prepare_data(data)  # a Hub id or `datasets` folder: its test split as JSONL (data/sources.py)
    base = load_base(model, quantize=quantize_bits(quantize))
    base.model.eval()

    def progress(name, done, total):
        click.echo(f"{name}: {done}/{total} rows answered", err=True)

    report = generative_eval(base, specs, data, cfg, on_progress=progress, ignore_base_mismatch=ignore_base_mismatch)
    report = {"model": model, **report}
    json_path, html_path = write_report(report, cfg.out, cfg.force)
    click.echo(format_tables(report))
    click.echo(f"report: {json_path}\nreport: {html_path}")


def _tasks(model, specs, quantize, cfg, load_base, ignore_base_mismatch, out, force) -> None:
    from ..evaluate.harness import check_tasks, evaluate_models, format_task_table, tasks_report
    from ..evaluate.report import TASKS_NAME, check_report_paths, write_json_report

    check_tasks(cfg)  # an unknown task fails before the model loads
    if out is not None:
        check_report_paths(out, force, (TASKS_NAME,))  # and an existing report before any task runs
    base = load_base(model, quantize=quantize_bits(quantize))
    base.model.eval()
    if cfg.apply_chat_template:
        from ..data import TokenizerInfo

        if not TokenizerInfo.from_tokenizer(base.tokenizer).has_template:
            click.echo(f"note: the tokenizer of {model} has no chat template; --apply-chat-template renders requests "
                       "in mlxlora's fallback format (### User: / ### Assistant:), as training renders chat rows",
                       err=True)
    report = tasks_report(model, specs, cfg, evaluate_models(base, specs, cfg, ignore_base_mismatch))
    click.echo(format_task_table(report["rows"]))
    if out is not None:
        click.echo(f"report: {write_json_report(report, out, TASKS_NAME, force)}")


__all__ = ["evaluate_options", "perplexity_only", "run_evaluation", "GENERATE_ONLY", "TASKS_ONLY", "REPORT"]
