"""`mlxlora eval --generate`: the base and every adapter answer each row of a split; answers are scored.

The base is loaded once; adapters are attached to it by name and switched as `serve` switches them
(mlxlora.serve.multi.MultiAdapterModel), so only the small adapter tensors are added per adapter.
Answers are greedy and decoded in batches (mlx-lm's batch_generate: rows of different lengths are
left-padded and masked), batch_size rows at a time.
"""

from __future__ import annotations

from statistics import fmean
from typing import Callable

from .. import data as D
from ..config import GenerativeEvalConfig
from ..serve.multi import MultiAdapterModel
from .metrics import Metric, resolve_metrics, score
from .rows import EvalRow, read_eval_rows

BASE = "base"


def generate_answers(model, tokenizer, rows: list[EvalRow], max_tokens: int, batch_size: int,
                     on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers to `rows` (their prompt ids) from `model` as it is now, batch_size rows at a time."""
    from mlx_lm.generate import batch_generate

    answers: list[str] = []
    # Similar lengths together: less padding per batch. The answers are put back in row order.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    by_row: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        res = batch_generate(model, tokenizer, [rows[i].ids for i in chunk], max_tokens=max_tokens,
                             completion_batch_size=batch_size, prefill_batch_size=batch_size)
        by_row.update(zip(chunk, res.texts))
        if on_batch:
            on_batch(len(chunk))
    answers = [by_row[i] for i in range(len(rows))]
    return answers


def score_rows(rows: list[EvalRow], answers: dict[str, list[str]], metrics: list[Metric]) -> list[dict]:
    """One item per row: line, prompt, reference, each model's answer and its score on every metric."""
    items = []
    for i, row in enumerate(rows):
        items.append({
            "line": row.line, "prompt": row.prompt, "reference": row.reference,
            "answers": {name: texts[i] for name, texts in answers.items()},
            "scores": {name: {m.name: score(m, texts[i], row.reference, row.row) for m in metrics}
                       for name, texts in answers.items()},
        })
    return items


def summarize(items: list[dict], names: list[str], metrics: list[str]) -> tuple[dict, dict]:
    """(means: model -> metric -> mean, changes: adapter -> {"fixed": [item indices], "broke": [...]}).

    An adapter fixed a row when its primary score (metrics[0]) is above the base's, broke it when below.
    """
    means = {n: {m: fmean(it["scores"][n][m] for it in items) for m in metrics} for n in names}
    primary = metrics[0]
    changes = {}
    for n in names:
        if n == BASE:
            continue
        fixed = [i for i, it in enumerate(items) if it["scores"][n][primary] > it["scores"][BASE][primary]]
        broke = [i for i, it in enumerate(items) if it["scores"][n][primary] < it["scores"][BASE][primary]]
        changes[n] = {"fixed": fixed, "broke": broke}
    return means, changes


def generative_eval(base, adapters: dict[str, str], data: str, cfg: GenerativeEvalConfig | None = None,
                    on_progress: Callable[[str, int, int], None] | None = None,
                    ignore_base_mismatch: bool = False) -> dict:
    """Answers of the bare base and of each adapter to every row of a split, scored; the report as a dict.

    base: a mlxlora.models.Base (bare; left bare afterwards). adapters: name -> adapter folder. data: a
    folder or .jsonl file (cfg.split picks the split). on_progress(model, done, total) after each batch.
    Raises ConfigError for an unknown metric, DataError for a row without a reference, AdapterError for
    an adapter that does not fit the base, all before any answer is generated.
    """
    cfg = cfg or GenerativeEvalConfig()
    metrics = resolve_metrics(cfg.metrics)
    path = D.split_file(data, cfg.split)
    rows = read_eval_rows(path, base.tokenizer)
    multi = MultiAdapterModel.of_base(base, ignore_base_mismatch)
    answers: dict[str, list[str]] = {}
    try:
        for name, folder in adapters.items():
            multi.load_adapter(folder, name)
        for name in [None, *adapters]:
            label, done = name or BASE, [0]

            def progress(n, label=label, done=done):
                done[0] += n
                if on_progress:
                    on_progress(label, done[0], len(rows))

            with multi.set_adapter(name):
                answers[label] = generate_answers(multi.model, base.tokenizer, rows, cfg.max_tokens,
                                                  cfg.batch_size, progress)
    finally:
        for name in multi.adapters:
            multi.delete_adapter(name)
    items = score_rows(rows, answers, metrics)
    names = [BASE, *adapters]
    metric_names = [m.name for m in metrics]
    means, changes = summarize(items, names, metric_names)
    return {"data": str(path), "split": cfg.split, "rows": len(items), "metrics": metric_names,
            "primary": metric_names[0], "max_tokens": cfg.max_tokens, "greedy": True,
            "adapters": dict(adapters), "models": names, "means": means, "changes": changes, "items": items}


__all__ = ["BASE", "generate_answers", "score_rows", "summarize", "generative_eval"]
