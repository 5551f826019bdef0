"""Where mlxlora keeps what it makes once and reuses (demo model, GGUF imports, the BLAS shim)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$MLXLORA_CACHE` (when set and non-empty), else `~/.cache/mlxlora`."""
    return Path(os.environ.get("MLXLORA_CACHE") or Path.home() / ".cache" / "mlxlora")
