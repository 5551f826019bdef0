"""Reading and writing files safely: atomic folders and files, JSON, safetensors and GGUF readers.

Every output mlxlora writes goes through `atomic_folder` or `atomic_file`: the content is written
beside its destination under a hidden temporary name and renamed into place when complete, so a
crash never leaves a half-written result and the old content stays until the new one is whole.
Readers raise the caller's error class with the file's name and the fix, on one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import AdapterError, MlxloraError, exists_error

SAFETENSORS_HEADER_LIMIT = 100_000_000  # a header larger than this is not a real safetensors file


def natural_key(path: str):
    """Sort key of a dotted module path with numbers compared as numbers (layers.2 before layers.10)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in path.split(".")]


# ---------------------------------------------------------------- writing

def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling: readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output(out, *, force: bool, flag: str | None = None, error=AdapterError, what: str = "folder") -> Path:
    """Refuse (`error`) an existing non-empty `out` unless `force`; refuse a file where a folder goes."""
    out = Path(out)
    if out.exists() and not out.is_dir() and what == "folder":
        raise error(f"{flag + ': ' if flag else ''}{out} exists and is not a folder; choose another output path")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise exists_error(out, flag=flag, what=what, cls=error)
    return out


@contextmanager
def atomic_folder(out_dir, *, force: bool = False, error=AdapterError, flag: str | None = None):
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` by rename.

    Raises `error` (naming the folder and --force) if `out_dir` holds files and not `force`.
    On any failure the temporary folder is removed and `out_dir` is left as it was.
    """
    out = check_output(out_dir, force=force, flag=flag, error=error)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):  # contents on disk before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = out.parent / f".{out.name}.old-{tag}"
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():
                old.rename(out)
            raise
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out_file, *, force: bool = False, error=AdapterError, flag: str | None = None):
    """Yield a temporary path beside `out_file` to write; on success it replaces `out_file` by rename.

    Raises `error` if `out_file` exists and not `force`. On failure the temporary file is removed.
    """
    out = Path(out_file)
    if out.exists() and not force:
        raise exists_error(out, flag=flag, what="file name", cls=error)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading

def read_json(path: Path, error: type[MlxloraError] = AdapterError) -> dict[str, Any]:
    """A JSON object from `path`; unreadable, invalid or non-object JSON raises `error` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when it is missing or not a JSON object (for optional records)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def safetensors_header(path: Path, error: type[MlxloraError] = AdapterError, whole: bool = True) -> dict[str, Any]:
    """The JSON header of a .safetensors file (`__metadata__` included), without reading tensor data.

    Raises `error` for a file too short, a header that is not JSON, or (with `whole`) data offsets past
    the end; whole=False reads a header alone (the planner needs no tensor data).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8 or n > SAFETENSORS_HEADER_LIMIT:
                raise ValueError("header larger than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if whole and 8 + n + max(ends, default=0) > size:
            raise ValueError(f"truncated: {size} bytes, the header needs {8 + n + max(ends)}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise error(f"{path}: not a readable safetensors file ({e}); re-save or re-download it") from None
    return header


def tensor_headers(path: Path, error: type[MlxloraError] = AdapterError, whole: bool = True) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a .safetensors file (no `__metadata__`)."""
    return {k: v for k, v in safetensors_header(path, error, whole).items() if k != "__metadata__"}


def read_safetensors(path: Path, error: type[MlxloraError] = AdapterError) -> dict:
    """All tensors of a safetensors file as mx arrays; a truncated or corrupt file raises `error` naming it."""
    import mlx.core as mx

    safetensors_header(path, error)
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError
        raise error(f"{path}: not a readable safetensors file ({e}); re-save or re-download it") from None


def open_gguf(path: Path, error: type[MlxloraError], check_data: bool = False):
    """(`gguf.GGUFReader`, metadata dict) of a GGUF file; every failure is one line of `error`.

    check_data: also check that no tensor is cut short (a truncated download).
    """
    path = Path(path)
    try:
        from gguf import GGUFReader
    except ImportError:
        raise error("reading GGUF files needs the `gguf` package: pip install gguf") from None
    if not path.is_file():
        raise error(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(path)
        if check_data:
            for t in reader.tensors:
                if t.data.nbytes != t.n_bytes:
                    raise ValueError(f"tensor {t.name} is cut short")
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
        raise error(f"{path.name}: not a readable GGUF file ({e}); re-download or re-export it") from None
    return reader, meta


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
