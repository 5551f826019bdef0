"""Start-up and step-1 notes about the adapters: what was adapted by module kind, what stayed frozen,
and adapters that get no gradient at all (lora/report.py finds them; this prints them)."""

from __future__ import annotations

from ..lora import report


def report_adapted(progress, model) -> None:
    """Say what was adapted by module kind, and warn about linear-like modules left frozen."""
    for line in report.describe(model):
        if line.startswith("warning"):
            progress.console.print(f"[yellow]{line}[/yellow]")
        else:
            progress.note(line)


def report_dead(progress, stepper) -> None:
    """Warn about adapters whose gradient was all zero in the first step (the stepper keeps its last grads)."""
    grads = getattr(stepper, "last_grads", None)
    dead = report.dead_adapters(grads) if grads is not None else []
    if dead:
        progress.console.print(
            f"[yellow]warning: {len(dead)} adapter(s) got an all-zero gradient in step 1 (e.g. {dead[0]}): "
            "nothing flows back to them (an indexer or router whose output only selects, or experts that "
            "got no token); they will not train unless that changes — drop them from --target[/yellow]")
