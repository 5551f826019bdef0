"""This machine for the planner: the mlx backend, the memory a run may use, and byte counts for people."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def default_backend() -> str:
    import mlx.core as mx

    return "cpu" if mx.default_device().type == mx.DeviceType.cpu else "gpu"


def machine_memory() -> tuple[int | None, str]:
    """(bytes a run may use on this machine, where the number comes from).

    macOS: Metal's recommended working set (else 0.75 × hw.memsize); Linux: MemTotal of /proc/meminfo.
    """
    if sys.platform == "darwin":
        try:
            import mlx.core as mx

            if mx.metal.is_available():
                info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
                return int(info["max_recommended_working_set_size"]), "Metal recommended working set"
        except (ImportError, AttributeError, KeyError, RuntimeError):
            pass
        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, check=True)
            return int(out.stdout.strip()) * 3 // 4, "0.75 × hw.memsize"
        except (OSError, ValueError, subprocess.CalledProcessError):
            return None, "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, "MemTotal (/proc/meminfo)"
    except OSError:
        pass
    return None, "unknown"


def human(n: float) -> str:
    """Bytes as B/KiB/MiB/GiB/TiB with three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TiB"
