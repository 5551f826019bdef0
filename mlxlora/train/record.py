"""The run record kept with every adapter: what base, what data, which versions, what came out."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata

from ..files import file_sha256


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": f"{sys.platform}-{platform.machine()}"}
    for dist in ("mlxlora", "mlx", "mlx-lm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_record(base, files: dict, splits: dict, cfg, st, resumed_from=None, **final) -> dict:
    """A JSON-able summary of a training run. Never holds tokens or secrets."""
    data = {}
    for name, path in files.items():
        split = splits.get(name)
        entry = {"path": str(path), "sha256": file_sha256(path)}
        if split is not None:
            s = split.stats
            entry.update(samples=s.samples, tokens=s.tokens, target_tokens=s.target_tokens,
                         truncated=s.truncated, dropped=s.dropped)
        data[name] = entry
    rec = {
        "base_model": base.source,
        "base_path": str(base.path),
        "base_fingerprint": base.info.get("fingerprint"),
        "base_model_type": base.config.get("model_type"),
        "base_quantization": base.config.get("quantization"),
        "data": data,
        "seed": cfg.seed,
        "steps": st.step,
        "tokens": st.tokens,
        "final_train_loss": st.train_log[-1][1] if st.train_log else None,
        "val_log": st.val_log,
        "nonfinite_skipped": st.nonfinite_skipped,
        "resumed_from": resumed_from,
        "versions": versions(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rec.update(final)
    return rec
