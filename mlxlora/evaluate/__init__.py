"""Evaluation beyond perplexity: answers of the base and adapters scored against references
(`eval --generate`: metrics.py, rows.py, generative.py, report.py, html.py) and lm-eval benchmarks on an
unfused adapter (`eval --tasks`: harness.py)."""

from .generative import BASE, generative_eval
from .metrics import METRICS, Metric, resolve_metrics
from .report import check_report_paths, format_tables, write_report

__all__ = ["BASE", "generative_eval", "METRICS", "Metric", "resolve_metrics", "check_report_paths",
           "format_tables", "write_report"]
