"""Reading and writing files safely: atomic folders and files, JSON, safetensors and GGUF readers.

Every output mlxlora writes goes through `atomic_folder` or `atomic_file`: the content is written
beside its destination under a hidden temporary name and renamed into place when complete, so a
crash never leaves a half-written result and the old content stays until the new one is whole.
Readers raise the caller's error class with the file's name and the fix, on one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import AdapterError, MlxloraError, exists_error

SAFETENSORS_HEADER_LIMIT = 100_000_000  # a header larger than this is not a real safetensors file


def natural_key(path: str):
    """Sort key of a dotted module path with numbers compared as numbers (layers.2 before layers.10)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in path.split(".")]


# ---------------------------------------------------------------- paths

def path_problem(path) -> str | None:
    """Why `path` cannot be opened, in words ("does not exist", "is a symbolic link loop", "is a FIFO,
    not a regular file", ...), or None when it is a regular file or a folder."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop; point the link at a real file or folder"
        if p.is_symlink():
            return f"is a broken symbolic link (to {os.readlink(p)})"
        if e.errno == errno.EACCES:
            return "cannot be read (permission denied)"
        if e.errno == errno.ENOTDIR:
            return "does not exist (a part of the path is a file, not a folder)"
        return "does not exist"
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file")
    return f"is {kind}, not a regular file; save its content to a regular file and give that"


def real_path(path) -> Path:
    """`path` with ~ expanded and every symbolic link resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_disjoint(out, inputs: dict, *, flag: str, error: type[MlxloraError] = MlxloraError) -> None:
    """Refuse (`error`) an output that is, holds or lies inside one of `inputs` ({flag: path or None}).

    Writing there (with --force above all) would replace or mix into the user's input. Paths are
    compared with symbolic links resolved; inputs that are no local path (hub ids) are skipped.
    """
    o = real_path(out)
    for in_flag, given in inputs.items():
        if given is None or not Path(given).expanduser().exists():
            continue
        i = real_path(given)
        if o == i:
            how = f"is the {in_flag} input itself"
        elif o in i.parents:
            how = f"holds the {in_flag} input {given}"
        elif i in o.parents:
            how = f"is inside the {in_flag} input {given}"
        else:
            continue
        raise error(f"{flag} {out} {how}; writing there would replace your input; "
                    f"choose an output outside it")


# ---------------------------------------------------------------- writing

def write_failure(e: BaseException) -> str | None:
    """The reason in words when `e` is a failed write (an OSError, or mlx's RuntimeError from a save), else None."""
    if isinstance(e, OSError):
        why = e.strerror or str(e) or type(e).__name__
        return f"{why} ({e.filename})" if e.filename and e.errno not in (errno.ENOSPC, errno.EDQUOT) else why
    if isinstance(e, RuntimeError) and str(e).startswith(("[write]", "[save", "[load_safetensors] Failed to open",
                                                           "[save_safetensors]")):
        return f"{str(e).splitlines()[0].strip()} (disk full or a file-size limit?)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def staging_name(name: str, kind: str = "tmp") -> str:
    """The hidden name a write to `name` stages under: `.{name}.{kind}-{pid}-{tag}` (the pid lets a later
    run tell a killed writer's leftovers from a live one's)."""
    return f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def sweep_stale(out, keep=()) -> list[str]:
    """Delete what killed writers of `out` left beside it (hidden `.{name}.tmp-*` / `.old-*` entries whose
    process is gone, and older ones without a pid); returns the names removed. Live writers' are kept."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{glob_escape(out.name)}.{kind}-*"):
            if p.name in keep:
                continue
            head = p.name[len(f".{out.name}.{kind}-"):].split("-")
            pid = int(head[0]) if len(head) >= 2 and head[0].isdigit() else None
            if pid is not None and (pid == os.getpid() or _alive(pid)):
                continue
            remove_path(p)
            removed.append(p.name)
    return sorted(removed)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def remove_path(p: Path) -> None:
    """Remove a file, a symbolic link or a folder tree; a missing one is fine."""
    p = Path(p)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


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


def make_parent(out: Path, *, flag: str | None, error) -> None:
    """Create `out`'s parent folders; a parent that is a file or cannot be made raises `error` on one line."""
    where = f"{flag} {out}" if flag else str(out)
    for p in [out.parent, *out.parent.parents]:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise error(f"{where}: cannot create it, {p} is a file, not a folder; choose another path")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{where}: cannot create its folder ({write_failure(e)}); choose another path") from None


@contextmanager
def staged_writes(out: Path, *, flag: str | None, error, kept: str):
    """Turn a failed write inside the block into one line of `error` naming `out`, the reason and what is kept."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        why = write_failure(e)
        if why is None:
            raise
        where = f"{flag} {out}" if flag else str(out)
        err = error(f"{where}: could not write ({why}); {kept}; free disk space or choose another "
                    f"{flag or 'output path'}")
        err.write_failure = why  # callers that add their own context (a checkpoint) read the bare reason
        raise err from None


@contextmanager
def atomic_folder(out_dir, *, force: bool = False, error=AdapterError, flag: str | None = None):
    """Yield a staging folder beside `out_dir`; when the block succeeds it replaces `out_dir` by rename.

    Raises `error` (naming the folder and --force) if `out_dir` holds files and not `force`. A symbolic
    link `out_dir` is followed (its target is replaced). On any failure the staging folder is removed
    and `out_dir` is left as it was; a failed write (disk full, read-only, permission) is one line of
    `error`. Stale staging folders of killed earlier writers of `out_dir` are swept first.
    """
    shown = Path(out_dir)
    out = check_output(real_path(out_dir) if shown.is_symlink() else shown, force=force, flag=flag, error=error)
    make_parent(out, flag=flag, error=error)
    sweep_stale(out)
    existed = out.exists()
    kept = f"{shown} is unchanged" if existed else "nothing was written"
    tmp = out.parent / staging_name(out.name)
    with staged_writes(shown, flag=flag, error=error, kept=kept):
        tmp.mkdir()
    try:
        with staged_writes(shown, flag=flag, error=error, kept=kept):
            yield tmp
            for f in tmp.rglob("*"):  # contents on disk before the rename makes them visible
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            swap_in(tmp, out)
    finally:
        remove_path(tmp)


def swap_in(new: Path, out: Path) -> None:
    """Put folder `new` at `out` by rename: an old `out` is moved aside first and removed only after."""
    old = out.parent / staging_name(out.name, "old")
    if out.exists() or out.is_symlink():
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if old.exists():
            old.rename(out)
        raise
    fsync_dir(out.parent)
    remove_path(old)


@contextmanager
def atomic_file(out_file, *, force: bool = False, error=AdapterError, flag: str | None = None):
    """Yield a temporary path beside `out_file` to write; on success it replaces `out_file` by rename.

    Raises `error` if `out_file` exists and not `force`. On failure the temporary file is removed and
    a failed write is one line of `error`.
    """
    shown = Path(out_file)
    out = real_path(shown) if shown.is_symlink() else shown
    if out.exists() and out.is_dir():
        raise error(f"{flag + ': ' if flag else ''}{shown} is a folder; give a file name")
    if out.exists() and not force:
        raise exists_error(shown, flag=flag, what="file name", cls=error)
    make_parent(out, flag=flag, error=error)
    sweep_stale(out)
    tmp = out.parent / staging_name(out.name)
    kept = f"{shown} is unchanged" if out.exists() else "nothing was written"
    try:
        with staged_writes(shown, flag=flag, error=error, kept=kept):
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
    problem = path_problem(path)
    if problem:
        raise error(f"{path} {problem}")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is no error
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path}: not readable JSON ({e or type(e).__name__})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when it is missing or not a JSON object (for optional records)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
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
