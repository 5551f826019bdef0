"""Training checkpoints: adapter + optimizer state + trainer state, written crash-safely.

Layout under the adapter folder:

    checkpoints/step-00000100/   adapter files (PEFT format) + optimizer.safetensors + trainer_state.json
    checkpoints/latest           name of the newest complete checkpoint (replaced last)
    checkpoints/best             name of the checkpoint with the best validation loss (--save-best)

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

from ..errors import AdapterError
from ..files import atomic_write_text, fsync_dir, read_json_or_empty, real_path, swap_in, write_failure

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
BEST_FILE = "best"


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
    best_step: int | None = None  # the step of the lowest validation loss after step 0
    best_val: float | None = None
    bad_vals: int = 0  # validations since best_val last improved (--early-stop)
    method_log: list = field(default_factory=list)  # [step, {metric: value}]: grpo's reward, KL, length per step


def save_checkpoint(ckpt_root: Path, state: TrainerState, write_adapter, optimizer, keep: int | None = None,
                    best: bool = False) -> Path:
    """Write checkpoint `step-XXXXXXXX` under ckpt_root; `write_adapter(folder)` writes the adapter files.

    best: also point `checkpoints/best` at it. keep: prune to the newest `keep` (never the best).
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
        # The pointer goes first: a kill between it and the rename leaves it naming a missing folder, and
        # latest_checkpoint falls back to the newest complete one. The other order left it naming the
        # previous checkpoint while a newer complete one existed (resume then redid those steps).
        atomic_write_text(ckpt_root / "latest", name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        if best:
            atomic_write_text(ckpt_root / BEST_FILE, name)
    except (OSError, RuntimeError, AdapterError) as e:  # mlx reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "write_failure", None) or write_failure(e)
        if why is None:
            raise
        raise AdapterError(f"could not write checkpoint {final}: {why}; free disk space or pass another "
                           "--adapter-path (earlier checkpoints are intact; --resume continues from the last)") from None
    if keep:
        prune_checkpoints(ckpt_root, keep, protect={name})
    return final


def write_final(run_dir: Path, out: Path, state: TrainerState, write_adapter, after=None) -> None:
    """The end of a run: `write_adapter(folder)` writes the final adapter files, which are moved to the top
    of `run_dir` (checkpoints/ stays beside them); `after(run_dir)` adds more (loss.png); a staging `run_dir`
    then replaces `out` by rename.

    A failed write (disk full, read-only) raises AdapterError naming the checkpoint that holds the
    trained weights and the command that finishes the run; no checkpoint is touched.
    """
    tmp = run_dir / f".tmp-final-{os.getpid()}"
    staged = real_path(run_dir) != real_path(out)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        write_adapter(tmp)
        for f in tmp.iterdir():
            os.replace(f, run_dir / f.name)
        fsync_dir(run_dir)
        if after is not None:
            after(run_dir)
        if staged:
            swap_in(run_dir, real_path(out))
    except (OSError, RuntimeError, AdapterError) as e:
        why = getattr(e, "write_failure", None) or write_failure(e)
        if why is None:
            raise
        ckpts = list_checkpoints(run_dir / "checkpoints")
        held = (f"the weights of step {state.step} are not lost: checkpoint {ckpts[-1]} holds step "
                f"{int(ckpts[-1].name.split('-')[1])} and resuming redoes the rest exactly" if ckpts else
                "no checkpoint was written yet (the run was shorter than --save-every)")
        kept = f"; {out} is unchanged" if staged else ""
        raise AdapterError(f"could not write the final adapter to {out} ({why}){kept}; {held}; free disk space "
                           f"and run: mlxlora train --resume {run_dir}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def best_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `checkpoints/best` points at, if it is complete."""
    pointer = ckpt_root / BEST_FILE
    if not pointer.is_file():
        return None
    cand = ckpt_root / pointer.read_text().strip()
    return cand if (cand / STATE_FILE).is_file() else None


def remove_stale_temps(ckpt_root: Path) -> list[str]:
    """Delete half-written checkpoints a killed run left (hidden `.tmp-*` entries); returns their names.

    Call only when no other process writes into ckpt_root (resume start).
    """
    if not ckpt_root.is_dir():
        return []
    stale = [p for p in ckpt_root.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return sorted(p.name for p in stale)


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
    """Delete all but the newest `keep` checkpoints; `protect` and the best checkpoint always stay."""
    best = best_checkpoint(ckpt_root)
    protect = set(protect) | ({best.name} if best else set())
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


def stored_config(resume) -> dict:
    """The resolved TrainConfig (as a dict) saved with the checkpoint `resume` names, so `mlxlora train
    --resume DIR` alone continues the run; {} when the checkpoint holds none. Raises AdapterError."""
    ckpt = latest_checkpoint(Path(resume))
    record = read_json_or_empty(ckpt / "mlxlora.json")
    cfg = record.get("train_config")
    return cfg if isinstance(cfg, dict) else {}


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
