"""A fast BLAS for MLX's Linux CPU backend, without the user having to know.

mlx's Linux CPU wheel (`mlx-cpu`) links the reference BLAS bundled in `mlx_cpu.libs`
(~2-7 GFLOP/s sgemm). OpenBLAS from the `cmeel-openblas` wheel runs the same sgemm at
~100-400 GFLOP/s on a laptop-class x86 CPU. A library can only be swapped at process
start, so the `mlxlora` entry point re-executes itself once with OpenBLAS preloaded.

OpenBLAS needs `libgfortran.so.5`; mlx-cpu already ships one under a hashed name, so we
point a symlink called `libgfortran.so.5` at it in a small cache folder.

Before it is used the first time, a child process runs a small sgemm with the preload and checks the
result (`probe`); the verdict is cached per library build. A build that fails (cmeel-openblas 0.3.31
dies with SIGILL on an AMD EPYC/Zen 2 KVM guest) is never used: mlx keeps its own (slow)
BLAS. Opt out with `MLXLORA_FAST_BLAS=0`. `python -m mlxlora.blas` prints
the shell exports (used by the test script so pytest gets the same speed).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .cache import cache_dir
from .files import atomic_write_text

_ACTIVE = "MLXLORA_BLAS_ACTIVE"


def _dist_file(dist: str, suffix_match) -> Path | None:
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if suffix_match(str(f)):
            p = Path(f.locate()).resolve()
            if p.exists():
                return p
    return None


def fast_blas_env(environ: dict | None = None) -> dict[str, str] | None:
    """Environment additions that preload OpenBLAS for mlx-cpu, or None when not applicable."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or env.get("MLXLORA_FAST_BLAS", "1") == "0":
        return None
    ref_blas = _dist_file("mlx-cpu", lambda s: "mlx_cpu.libs/libblas" in s)
    gfortran = _dist_file("mlx-cpu", lambda s: "mlx_cpu.libs/libgfortran" in s)
    openblas = _dist_file("cmeel-openblas", lambda s: s.endswith("lib/libopenblas.so.0"))
    if ref_blas is None or gfortran is None or openblas is None:
        return None
    shim = cache_dir() / "blas-shim"
    link = shim / "libgfortran.so.5"
    try:
        shim.mkdir(parents=True, exist_ok=True)
        if not link.exists() or link.resolve() != gfortran:
            tmp = shim / f".link-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(gfortran)
            os.replace(tmp, link)  # atomic: concurrent processes never see a missing link
    except OSError:
        return None
    libpath = [str(shim), str(gfortran.parent)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    preload = [str(openblas)] + [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    out = {"LD_LIBRARY_PATH": ":".join(libpath), "LD_PRELOAD": ":".join(preload), _ACTIVE: "1"}
    if not probe(openblas, dict(env, **out), shim):
        return None
    local = local_ranks(env)
    if local > 1 and "OPENBLAS_NUM_THREADS" not in env:
        # Several ranks on one host: OpenBLAS threads of different processes fighting for the same
        # cores collapse (an eval measured 15 s with one thread per process, 108 s with two).
        out["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local))
    return out


_PROBE = """
import mlx.core as mx, numpy as np
a = np.arange(96 * 80, dtype=np.float32).reshape(96, 80) % 7 - 3
b = np.arange(80 * 64, dtype=np.float32).reshape(80, 64) % 5 - 2
assert np.array_equal(np.array(mx.array(a) @ mx.array(b)), a @ b)
"""


def probe(openblas: Path, env: dict, cache: Path) -> bool:
    """Whether mlx computes a matmul right with `openblas` preloaded (a child process under `env`).

    The verdict is cached in `cache` per library build (path, size, mtime) and mlx version, so the
    child runs once per machine and upgrade. A failure is remembered too and never retried.
    """
    stat = openblas.stat()
    try:
        from importlib.metadata import version

        mlx_version = version("mlx")
    except Exception:  # no metadata: still probe, key without it
        mlx_version = "?"
    key = hashlib.sha256(f"{openblas}:{stat.st_size}:{stat.st_mtime_ns}:{mlx_version}".encode()).hexdigest()[:16]
    verdict = cache / f"probe-{key}.json"
    try:
        return bool(json.loads(verdict.read_text())["ok"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=120)
        ok, why = r.returncode == 0, f"exit status {r.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, type(e).__name__
    try:
        atomic_write_text(verdict, json.dumps({"ok": ok, "library": str(openblas), "mlx": mlx_version, "why": why}))
    except OSError:
        pass
    return ok


def local_ranks(environ: dict) -> int:
    """How many ranks of this mlx.launch job share this host (1 outside a distributed launch).

    Ring backend: MLX_HOSTFILE names a JSON file of ["ip:port", ...] per rank; ranks whose first
    address has this rank's IP share the host. MPI: Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE.
    """
    if environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "").isdigit():
        return int(environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    hostfile, rank = environ.get("MLX_HOSTFILE"), environ.get("MLX_RANK", "")
    if not hostfile or not rank.isdigit():
        return 1
    try:
        hosts = [node[0].rsplit(":", 1)[0] for node in json.loads(Path(hostfile).read_text())]
        return hosts.count(hosts[int(rank)])
    except (OSError, ValueError, IndexError, TypeError, AttributeError):
        return 1


def maybe_reexec(argv: list[str] | None = None) -> None:
    """Re-execute this `python -m mlxlora ...` process once with OpenBLAS preloaded (Linux CPU only)."""
    if os.environ.get(_ACTIVE):
        return
    extra = fast_blas_env()
    if extra is None:
        return
    env = dict(os.environ, **extra)
    args = sys.argv[1:] if argv is None else argv
    try:
        os.execve(sys.executable, [sys.executable, "-m", "mlxlora", *args], env)
    except OSError:
        return  # keep running on the slow BLAS rather than fail


def main() -> None:
    extra = fast_blas_env()
    for k, v in (extra or {}).items():
        print(f"export {k}='{v}'")


if __name__ == "__main__":
    main()
