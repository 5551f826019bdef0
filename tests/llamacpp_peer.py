"""llama.cpp as a test peer: build its tools once from the llama-cpp-python sdist, cached by version.

`scripts/llama_cpp` (= `python tests/llamacpp_peer.py`) builds llama-perplexity, llama-quantize and
llama-completion under <mlxlora cache>/llama.cpp/<version>/bin (~/.cache/mlxlora, or $MLXLORA_CACHE) and
is a no-op when they are already there; `mlxlora export-model --gguf-type q4_k_m` finds llama-quantize
there too. Tests call `tool(name)` (PATH is not consulted: the tests check one known version).
The source comes only from PyPI (`pip download --no-binary :all:`), whose sdist vendors llama.cpp.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"   # llama-cpp-python on PyPI; its vendor/llama.cpp is the source we build
TOOLS = ("llama-perplexity", "llama-quantize", "llama-completion")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
)


def cache_root() -> Path:
    from mlxlora.cache import cache_dir

    return cache_dir() / "llama.cpp" / VERSION


def bin_dir() -> Path:
    return cache_root() / "bin"


def tool(name: str) -> Path | None:
    """The cached binary `name` (e.g. "llama-perplexity"), or None when not built."""
    path = bin_dir() / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def built() -> bool:
    return all(tool(name) for name in TOOLS)


def _sdist(work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", str(work)], check=True)
    (archive,) = work.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return work / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def build(jobs: int | None = None) -> Path:
    """Build the tools into bin_dir() unless they are there; returns bin_dir()."""
    if built():
        return bin_dir()
    jobs = jobs or os.cpu_count() or 2
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="mlxlora-llama-cpp-") as tmp:
        work = Path(tmp)
        source = _sdist(work)
        build_dir = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_FLAGS], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS], check=True)
        staged = cache_root() / "bin.partial"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for name in TOOLS:
            shutil.copy2(build_dir / "bin" / name, staged / name)
        shutil.rmtree(bin_dir(), ignore_errors=True)
        staged.rename(bin_dir())   # the cache holds all tools or none
    print(f"llama.cpp {VERSION} tools built in {time.time() - start:.0f} s -> {bin_dir()}")
    return bin_dir()


if __name__ == "__main__":
    if built():
        print(f"llama.cpp {VERSION} tools already built in {bin_dir()}")
    else:
        build()
