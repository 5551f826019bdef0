"""Scores of one generated answer against its reference: a table of named metrics, plus user metrics.

Every metric takes (prediction, reference, row) and returns a float in [0, 1]:

    exact             prediction == reference, after stripping surrounding whitespace
    normalized_exact  equal after SQuAD's normalisation (lower case, no punctuation, no a/an/the, one space)
    contains          the normalised reference appears in the normalised prediction
    token_f1          SQuAD's token F1: harmonic mean of token precision and recall over normalised words
    rougeL            ROUGE-L F-measure (the `rouge-score` library, Porter stemmer on)
    chrf              chrF (the `sacrebleu` library, its defaults), divided by 100

`--metric mymodule:function` names a user metric with the same signature (the module is imported from
the current folder or the Python path).
"""

from __future__ import annotations

import importlib
import math
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from ..errors import ConfigError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact(prediction: str, reference: str, row=None) -> float:
    return float(prediction.strip() == reference.strip())


def normalized_exact(prediction: str, reference: str, row=None) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def contains(prediction: str, reference: str, row=None) -> float:
    ref = normalize_answer(reference)
    return float(bool(ref) and f" {ref} " in f" {normalize_answer(prediction)} ")


def token_f1(prediction: str, reference: str, row=None) -> float:
    """SQuAD's F1 over normalised words; when either side has no word, 1.0 if both have none, else 0.0
    (as SQuAD v2.0's script scores empty answers)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _missing(module: str, package: str, metric: str) -> ConfigError:
    return ConfigError(f"--metric {metric} needs the {module} library (a dependency of mlxlora that is "
                       f"missing here); pip install {package}")


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise _missing("rouge_score", "rouge-score", "rougeL") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str, row=None) -> float:
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise _missing("sacrebleu", "sacrebleu", "chrf") from None
    return sacrebleu


def chrf(prediction: str, reference: str, row=None) -> float:
    return float(_sacrebleu().sentence_chrf(prediction, [reference]).score) / 100.0


@dataclass(frozen=True)
class Metric:
    """A named scoring function (prediction, reference, row) -> float, and what it measures."""

    name: str
    fn: Callable[[str, str, dict], float]
    about: str
    check: Callable[[], object] | None = None  # raises the one-line "pip install" error before any generation


METRICS = {m.name: m for m in (
    Metric("exact", exact, "the answer is the reference (surrounding whitespace ignored)"),
    Metric("normalized_exact", normalized_exact, "equal after SQuAD normalisation"),
    Metric("contains", contains, "the normalised reference appears in the answer"),
    Metric("token_f1", token_f1, "SQuAD token F1"),
    Metric("rougeL", rouge_l, "ROUGE-L F-measure (rouge-score)", check=_rouge_scorer),
    Metric("chrf", chrf, "chrF / 100 (sacrebleu)", check=_sacrebleu),
)}


def user_metric(spec: str) -> Metric:
    """`module:function` imported as a Metric; ConfigError (one line) when it cannot be found or called."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"--metric {spec!r}: a user metric is written module:function (e.g. mymetrics:score)")
    added = str(Path.cwd())
    sys.path.insert(0, added)  # a module file in the current folder, as `python -m` would find it
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"--metric {spec}: cannot import {module!r} ({e}); put {module}.py in the current "
                          "folder or on PYTHONPATH") from None
    finally:
        if sys.path and sys.path[0] == added:
            sys.path.pop(0)
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(f"--metric {spec}: {module} has no function {attr!r}")
    return Metric(spec, fn, f"user metric {spec}")


def resolve_metrics(names: list[str]) -> list[Metric]:
    """Metric objects for `names` (built-in names or module:function), each library checked now."""
    out = []
    for name in names:
        if ":" in name:
            out.append(user_metric(name))
        elif name in METRICS:
            out.append(METRICS[name])
        else:
            raise ConfigError(f"--metric {name!r} is not a metric; use one of {', '.join(METRICS)} "
                              "or module:function")
    for m in out:
        if m.check:
            m.check()
    if len({m.name for m in out}) != len(out):
        raise ConfigError(f"--metric: a metric is named twice ({', '.join(m.name for m in out)})")
    return out


def score(metric: Metric, prediction: str, reference: str, row: dict) -> float:
    """metric(prediction, reference, row) as a float; a user metric returning something else is a ConfigError."""
    value = metric.fn(prediction, reference, row)
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = None
    if out is None or isinstance(value, bool) or not math.isfinite(out):
        raise ConfigError(f"--metric {metric.name} returned {type(value).__name__} {value!r}; "
                          "a metric returns a finite number")
    return out


__all__ = ["METRICS", "Metric", "normalize_answer", "exact", "normalized_exact", "contains", "token_f1",
           "rouge_l", "chrf", "user_metric", "resolve_metrics", "score"]
