"""Adapter file formats as readers and writers over one in-memory AdapterRecord (formats/record.py).

    "mlxlora"  adapter_config.json + adapter_model.safetensors + mlxlora.json  (PEFT's files plus our record)
    "peft"     adapter_config.json + adapter_model.safetensors
    "mlx-lm"   adapter_config.json + adapters.safetensors
    "gguf"     a llama.cpp LoRA file (write only; formats/gguf_lora.py)

READERS is ordered: a folder is in the format of the first reader that accepts it. A spec that is no
local path but looks like a hub id ("user/name") is fetched first, adapter files only. PEFT's pickle
format (adapter_model.bin) is refused: it is never unpickled. Formats import files, config and each
other only; attaching a record to a model is mlxlora.adapters' job.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import AdapterError
from ..files import atomic_folder, path_problem
from . import mlx_lm, mlxlora, peft
from .record import AdapterRecord, LayerLoRA, nonfinite_tensors

# (name, accepts(folder), read(folder)), in the order formats are tried.
READERS = (("mlxlora", mlxlora.accepts, mlxlora.read), ("peft", peft.accepts, peft.read),
           ("mlx-lm", mlx_lm.accepts, mlx_lm.read))
WRITERS = {"mlxlora": mlxlora.write, "peft": peft.write, "mlx-lm": mlx_lm.write}
FORMATS = ("peft", "mlxlora", "mlx-lm")
# What a hub download fetches: every file any format needs, nothing else.
HUB_FILES = [peft.CONFIG_FILE, peft.WEIGHTS_FILE, mlxlora.RECORD_FILE, mlx_lm.WEIGHTS_FILE]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def detect_adapter(path) -> str:
    """"peft", "mlxlora" or "mlx-lm" for an adapter folder or hub id. Raises AdapterError (one line)."""
    return resolve_adapter(path)[1]


def resolve_adapter(spec) -> tuple[Path, str]:
    """(local folder, format) for an adapter folder or a hub id (downloaded with huggingface_hub)."""
    p = Path(spec).expanduser()
    if p.exists() or not _HUB_ID.match(str(spec)):
        return p, _format_of(p)
    local = _download(str(spec))
    try:
        return local, _format_of(local)
    except AdapterError as e:
        raise AdapterError(f"hub adapter {spec}: {e}") from None


def read_adapter(spec) -> AdapterRecord:
    """Read an adapter folder (or hub id) of any format. Raises AdapterError naming the file, also for
    tensors holding NaN or infinity (such an adapter is never used)."""
    path, fmt = resolve_adapter(spec)
    record = dict((name, read) for name, _, read in READERS)[fmt](path)
    check_finite(record, f"{record.weights or path}")
    return record


def check_finite(record: AdapterRecord, where: str) -> None:
    """Raise AdapterError when a tensor of `record` holds NaN or infinity (a diverged run)."""
    bad = nonfinite_tensors({**record.tensors(), **record.loose})
    if bad:
        raise AdapterError(f"{where}: {len(bad)} tensor(s) hold NaN or infinity (e.g. {bad[0]}); the adapter is "
                           "unusable: retrain it (lower --lr) or use an earlier checkpoint")


def write_adapter(record: AdapterRecord, out_dir, fmt: str = "mlxlora", *, force: bool = False,
                  flag: str | None = None) -> Path:
    """Write `record` as an adapter folder of `fmt` (atomic; an existing non-empty folder only with force).

    Raises AdapterError for tensors holding NaN or infinity: nothing is written then.
    """
    if fmt not in WRITERS:
        raise AdapterError(f"no adapter writer for {fmt!r} (known: {', '.join(WRITERS)})")
    bad = nonfinite_tensors(record.tensors())
    if bad:
        raise AdapterError(f"{flag + ' ' if flag else ''}{out_dir}: not written: {len(bad)} adapter tensor(s) hold "
                           f"NaN or infinity (e.g. {bad[0]}); retrain with a lower --lr")
    with atomic_folder(out_dir, force=force, flag=flag) as tmp:
        WRITERS[fmt](record, tmp)
    return Path(out_dir)


def _format_of(d: Path) -> str:
    if not d.exists():
        raise AdapterError(f"adapter folder {d} {path_problem(d) or 'does not exist'} (give the folder that holds "
                           f"{peft.CONFIG_FILE}, or a hub id user/name)")
    if not d.is_dir():
        raise AdapterError(f"{d} is a file; give the adapter folder that holds it")
    for name, accepts, _ in READERS:
        if accepts(d):
            return name
    has = {n for n in (peft.CONFIG_FILE, peft.WEIGHTS_FILE, mlx_lm.WEIGHTS_FILE, peft.PICKLE_WEIGHTS)
           if (d / n).is_file()}
    if peft.WEIGHTS_FILE in has or mlx_lm.WEIGHTS_FILE in has:
        raise AdapterError(f"{d}: missing {peft.CONFIG_FILE}")
    if peft.PICKLE_WEIGHTS in has:
        raise AdapterError(f"{d}: only {peft.PICKLE_WEIGHTS} (PEFT's pickle format, never loaded); re-save the "
                           "adapter with PEFT's save_pretrained(..., safe_serialization=True)")
    missing = ", ".join(n for n in (peft.CONFIG_FILE, peft.WEIGHTS_FILE) if n not in has)
    raise AdapterError(f"{d}: missing {missing} (PEFT / mlxlora adapter) or {mlx_lm.WEIGHTS_FILE} (mlx-lm adapter)")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, auth, network: all one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise AdapterError(f"adapter {repo_id}: no such local folder, and fetching it from the hub failed "
                           f"({type(e).__name__}: {first}); check the id and the network (HF_HUB_OFFLINE?), "
                           "or give a local folder") from None


__all__ = ["FORMATS", "READERS", "WRITERS", "HUB_FILES", "AdapterRecord", "LayerLoRA", "detect_adapter",
           "resolve_adapter", "read_adapter", "write_adapter", "check_finite"]
