"""Where a training run writes: the run folder (checkpoints, partial files) and the adapter folder it ends in.

A fresh run into an empty or new --adapter-path writes there directly. With --force over a folder that
holds files, the run lives in a staging folder beside it (`.NAME.run-PID-TAG`) and is swapped in by
rename only when it is complete: an interrupted or failed run leaves the old adapter as it was (the
staging folder keeps its checkpoints, and `mlxlora train --resume STAGING` continues it). --resume
continues in the folder that holds the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ..data.sources import parse_source
from ..errors import AdapterError, exists_error
from ..files import check_disjoint, make_parent, real_path, remove_path, staging_name, sweep_stale
from .checkpoint import STATE_FILE

RUN_KIND = "run"


def run_of(resume) -> Path:
    """The adapter folder a --resume path belongs to: the folder itself, or the one a checkpoint lies in."""
    r = Path(resume)
    if (r / STATE_FILE).is_file() and r.parent.name == "checkpoints":
        return r.parent.parent
    return r


def is_staging_for(folder: Path, out: Path) -> bool:
    """True when `folder` is a staging run folder of `out` (an interrupted --force run)."""
    folder, out = real_path(folder), real_path(out)
    return folder.parent == out.parent and folder.name.startswith(f".{out.name}.{RUN_KIND}-")


def check_inputs(cfg, resume) -> None:
    """Refuse an --adapter-path that is, holds or lies inside an input (model, data, a foreign --resume)."""
    if isinstance(cfg.data, list):  # a mixture: each source's path (its :WEIGHT taken off)
        data = {f"--data #{i + 1}": parse_source(d).name for i, d in enumerate(cfg.data)}
    else:
        data = {"--data": cfg.data}
    inputs = {"--model": cfg.model, **data, "--train-file": cfg.train_file,
              "--valid-file": cfg.valid_file, "--config": None}
    if resume is not None:
        run = real_path(run_of(resume))
        if run != real_path(cfg.adapter_path) and not is_staging_for(run, Path(cfg.adapter_path)):
            inputs["--resume"] = str(resume)
    check_disjoint(cfg.adapter_path, inputs, flag="--adapter-path", error=AdapterError)


def plan_run_folder(out: Path, force: bool, resume) -> Path:
    """The folder this run writes its checkpoints into (see the module docstring). Raises AdapterError."""
    if out.exists() and not out.is_dir():
        raise AdapterError(f"--adapter-path: {out} is a file; choose a folder name")
    if resume is not None:
        run = run_of(resume)
        if is_staging_for(run, out) or real_path(run) == real_path(out):
            return run
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise exists_error(out, flag="--adapter-path", also=", --resume to continue its training",
                               cls=AdapterError)
        target = real_path(out)
        make_parent(target, flag="--adapter-path", error=AdapterError)
        sweep_stale(target)
        sweep_runs(target)
        return target.parent / staging_name(target.name, RUN_KIND)
    make_parent(out, flag="--adapter-path", error=AdapterError)
    return out


def sweep_runs(out: Path, keep: Path | None = None) -> None:
    """Remove staging run folders of `out` left by runs that are over (not `keep`)."""
    for p in sweep_candidates(out):
        if keep is None or real_path(p) != real_path(keep):
            remove_path(p)


def sweep_candidates(out: Path) -> list[Path]:
    import os

    out = real_path(out)
    found = []
    for p in out.parent.glob(f".{out.name}.{RUN_KIND}-*"):
        head = p.name[len(f".{out.name}.{RUN_KIND}-"):].split("-")
        pid = int(head[0]) if head[0].isdigit() else None
        if pid == os.getpid():
            continue
        if pid is not None:
            try:
                os.kill(pid, 0)
                continue  # a live run
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        found.append(p)
    return found


__all__ = ["RUN_KIND", "run_of", "is_staging_for", "check_inputs", "plan_run_folder", "sweep_runs"]
