"""The report of `eval --generate`: text tables for the terminal, eval_report.json and eval_report.html.

Both files go in one folder (the current one, or --out). Neither replaces an existing report unless
`force`: both are checked before either is written, and each is written atomically (mlxlora.files).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, exists_error
from ..files import atomic_file
from .generative import BASE
from .html import report_html

JSON_NAME, HTML_NAME = "eval_report.json", "eval_report.html"
TASKS_NAME = "eval_tasks.json"  # eval --tasks --out


def format_tables(report: dict) -> str:
    """One table per adapter: each metric's mean for the base and the adapter, the difference, and the
    rows the adapter fixed / broke by the primary metric. With no adapter, the base's means alone."""
    metrics, means = report["metrics"], report["means"]
    width = max(len("metric"), *(len(m) for m in metrics))
    adapters = [n for n in report["models"] if n != BASE]
    blocks = []
    for name in adapters or [None]:
        head = f"{'metric':<{width}}  {BASE:>8}"
        if name:
            head += f"  {name:>{max(8, len(name))}}  {'Δ':>7}"
        lines = [f"{report['rows']} rows of {report['data']}" + (f": {name} against the base" if name else ""),
                 head]
        for m in metrics:
            line = f"{m:<{width}}  {means[BASE][m]:>8.4f}"
            if name:
                d = means[name][m] - means[BASE][m]
                line += f"  {means[name][m]:>{max(8, len(name))}.4f}  {d:>+7.4f}"
            lines.append(line)
        if name:
            ch = report["changes"][name]
            lines.append(f"{name} fixed {len(ch['fixed'])} and broke {len(ch['broke'])} of {report['rows']} rows "
                         f"(by {report['primary']}, the primary metric)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def report_paths(out: str | Path | None, names: tuple[str, ...] = (JSON_NAME, HTML_NAME)) -> tuple[Path, ...]:
    folder = Path(out) if out is not None else Path.cwd()
    return tuple(folder / n for n in names)


def check_report_paths(out: str | Path | None, force: bool, names: tuple[str, ...] = (JSON_NAME, HTML_NAME)
                       ) -> tuple[Path, ...]:
    """The report paths (`names` in `out`), refused (ConfigError naming --force) when one exists and not force.

    Called before any answer is generated, so a refused run costs nothing."""
    paths = report_paths(out, names)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for {' and '.join(names)}")
    for p in paths:
        if p.exists() and not force:
            raise exists_error(p, flag="--out" if out is not None else None, what="--out folder",
                               cls=ConfigError)
    return paths


def write_report(report: dict, out: str | Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """Write eval_report.json and eval_report.html into `out` (default: the current folder); their paths."""
    json_path, html_path = check_report_paths(out, force)
    flag = "--out" if out is not None else None
    with atomic_file(json_path, force=force, error=ConfigError, flag=flag) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    with atomic_file(html_path, force=force, error=ConfigError, flag=flag) as tmp:
        Path(tmp).write_text(report_html(report))
    return json_path, html_path


def write_json_report(report: dict, out: str | Path, name: str, force: bool = False) -> Path:
    """`report` as `out`/`name` (eval --tasks --out), atomically, refused when it exists and not force."""
    (path,) = check_report_paths(out, force, (name,))
    with atomic_file(path, force=force, error=ConfigError, flag="--out") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n")
    return path


__all__ = ["JSON_NAME", "HTML_NAME", "TASKS_NAME", "format_tables", "report_paths", "check_report_paths",
           "write_report", "write_json_report"]
