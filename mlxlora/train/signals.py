"""Signals during training: Ctrl-C, and SIGTERM in a single-process run, checkpoint and stop between steps;
SIGTERM under several ranks (mlx.launch) stops at once."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from .checkpoint import list_checkpoints


class StopSignals:
    """Ctrl-C (SIGINT) becomes a flag the loop checks between steps (a second one aborts).

    SIGTERM in a single-process run (`kill`, a job scheduler, a logout) does the same: the run
    checkpoints at the end of the step and stops. Under several ranks, `mlx.launch` sends SIGTERM
    to every rank when one rank dies, and the ring cannot finish a step: the process ends at once
    with a one-line message (checkpoints are written atomically, so the last complete one is intact
    and resumable). `how` records which signal stopped the run.
    """

    def __init__(self, out: Path, rank: int, world: int = 1):
        self.how, self.out, self.rank, self.world, self._old = None, out, rank, world, {}
        try:
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._sigint)
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._sigterm)
        except ValueError:  # not the main thread
            pass

    @property
    def hit(self) -> bool:
        return self.how is not None

    def _stop_between_steps(self, how: str):
        if self.hit:  # a second signal aborts
            raise KeyboardInterrupt
        self.how = how

    def _sigint(self, signum, frame):
        self._stop_between_steps("Ctrl-C")

    def message(self, why: str) -> str:
        ckpts = list_checkpoints(self.out / "checkpoints")
        last = f"last checkpoint {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        return (f"rank {self.rank}: training stopped: {why}; {last}; "
                f"resume with: mlxlora train --resume {self.out}")

    def _sigterm(self, signum, frame):
        if self.world == 1:
            return self._stop_between_steps("SIGTERM")
        why = "SIGTERM (under mlx.launch: another rank died or was stopped)"
        sys.stderr.write(f"Error: {self.message(why)}\n")
        sys.stderr.flush()
        os._exit(143)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
