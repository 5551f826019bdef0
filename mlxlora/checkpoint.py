"""Training checkpoints: adapter + optimizer state + trainer state, written crash-safely.

Layout under the adapter folder:

    checkpoints/step-00000100/   adapter files (PEFT format) + optimizer.safetensors + trainer_state.json
    checkpoints/latest           name of the newest complete checkpoint (replaced last)

A checkpoint is written into a hidden temp folder, fsynced, then renamed into place, so a
crash mid-write never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .errors import AdapterError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class TrainerState:
    """Where training is: with the optimizer state, enough to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    train_log: list = field(default_factory=list)  # [step, loss, lr, tokens/s]
    val_log: list = field(default_factory=list)  # [step, val_loss]
    nonfinite_skipped: int = 0


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(ckpt_root: Path, state: TrainerState, write_adapter, optimizer, keep: int | None = None) -> Path:
    """Write checkpoint `step-XXXXXXXX` under ckpt_root; `write_adapter(folder)` writes the adapter files.

    Raises AdapterError (disk full, unwritable folder) leaving earlier checkpoints intact.
    """
    final = latest_path(ckpt_root, state)
    name = final.name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        write_adapter(tmp)
        opt = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), opt)
        atomic_write_text(tmp / STATE_FILE, json.dumps(asdict(state)))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        atomic_write_text(ckpt_root / "latest", name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapterError(f"could not write checkpoint {final}: {e.strerror or e}; "
                           "free disk space or pass another --adapter-path (earlier checkpoints are intact)") from None
    if keep:
        prune_checkpoints(ckpt_root, keep, protect={name})
    return final


def latest_path(ckpt_root: Path, state: TrainerState) -> Path:
    """Where the checkpoint for `state` is (or will be) written."""
    return ckpt_root / f"step-{state.step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())


def prune_checkpoints(ckpt_root: Path, keep: int, protect: set[str] = frozenset()) -> None:
    ckpts = list_checkpoints(ckpt_root)
    for p in ckpts[:-keep]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(path: Path) -> Path:
    """Resolve `path` (a checkpoint, or an adapter folder holding checkpoints/) to a checkpoint folder."""
    if (path / STATE_FILE).is_file():
        return path
    root = path / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    ckpts = list_checkpoints(root)
    if not ckpts:
        raise AdapterError(f"--resume: no checkpoint in {path} (expected {root}/step-*/{STATE_FILE})")
    return ckpts[-1]


def load_trainer_state(ckpt: Path, optimizer) -> TrainerState:
    """Restore optimizer moments from a checkpoint; return its TrainerState.

    The RNG needs no saving: the trainer re-seeds it from (seed, step) before every step.
    """
    try:
        state = TrainerState(**json.loads((ckpt / STATE_FILE).read_text()))
        opt = mx.load(str(ckpt / OPTIMIZER_FILE))
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise AdapterError(f"--resume: checkpoint {ckpt} is unreadable ({e}); "
                           "resume from an earlier one under checkpoints/") from None
    optimizer.state = tree_unflatten(list(opt.items()))
    return state
