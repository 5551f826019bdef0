"""loss.png: train and validation loss curves (matplotlib's Agg canvas; no pyplot global state)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MlxloraError
from ..files import atomic_file


def plot_losses(train_log: list, val_log: list, out: Path, note=None) -> Path | None:
    """Write the curves to `out`; returns None (and writes nothing) when matplotlib is unavailable.

    note: when given, a failed write is reported through it instead of raised (the plot is optional).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train_log:
        ax.plot([r[0] for r in train_log], [r[1] for r in train_log], label="train", color="#1f77b4", lw=1)
    if val_log:
        ax.plot([r[0] for r in val_log], [r[1] for r in val_log], "o-", label="validation", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(out, force=True) as tmp:
            fig.savefig(tmp, format="png")
    except MlxloraError as e:
        if note is None:
            raise
        note(f"warning: {out.name} not written: {e}")
        return None
    return out
