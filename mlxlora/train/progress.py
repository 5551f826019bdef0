"""Live training progress (rich): a bar with step, loss, val loss, tokens/s, peak memory and ETA.

On a terminal the bar updates every step; report lines are printed every --report-every
steps either way, so logs and CI output show the run too.
"""

from __future__ import annotations

import time

import mlx.core as mx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class Progress:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        """quiet: print nothing (ranks other than 0 of a distributed run)."""
        self.console = console or Console(stderr=True, quiet=quiet)
        if quiet:
            self.console.quiet = True
        self._bar = None

    def note(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/dim]")

    def start(self, total: int, done: int, trainable: int, n_params: int, stats, cfg) -> None:
        self.t0, self.total = time.perf_counter(), total
        self.console.print(
            f"[bold]training[/bold] {total} steps · batch {cfg.batch_size}×{cfg.grad_accum} · lr {cfg.lr:g} · "
            f"trainable {trainable:,} / {n_params:,} params ({100 * trainable / max(n_params, 1):.3f}%)")
        self.console.print(
            f"train data: {stats.samples} samples, {stats.tokens:,} tokens ({stats.target_tokens:,} with loss), "
            f"{stats.truncated} truncated, {stats.dropped} dropped")
        if self.console.is_terminal:
            self._bar = RichProgress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeRemainingColumn(), console=self.console,
                                     transient=True)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=done)

    def update(self, st, loss: float, val: float | None, tps: float, report: bool, extra: str = "") -> None:
        """extra: the method's metrics (preference: reward accuracy, margin, chosen/rejected log-probs)."""
        peak = mx.get_peak_memory()
        text = f"step {st.step}/{self.total} · epoch {st.epoch + 1} · loss {loss:.4f}"
        if extra:
            text += f" · {extra}"
        last_val = st.val_log[-1][1] if st.val_log else None
        if last_val is not None:
            text += f" · val {last_val:.4f}"
        text += f" · {tps:,.0f} tok/s · peak {_gb(peak)}"
        if self._bar is not None:
            self._bar.update(self._task, completed=st.step, description=text)
        if report or val is not None:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(st.step, 1) * (self.total - st.step)
            self.console.print(f"{text} · ETA {eta:,.0f}s")

    def finish(self, st, val: float | None, out) -> None:
        if self._bar is not None:
            self._bar.stop()
        first = st.val_log[0][1] if st.val_log else None
        msg = f"[bold green]done[/bold green] {st.step} steps, {st.tokens:,} tokens"
        if first is not None and val is not None:
            msg += f" · val loss {first:.4f} → {val:.4f}"
        if st.nonfinite_skipped:
            msg += f" · {st.nonfinite_skipped} non-finite steps skipped"
        self.console.print(msg)
        self.console.print(f"adapter saved to {out} (PEFT format; loss curves in {out}/loss.png)")
