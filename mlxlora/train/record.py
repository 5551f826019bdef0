"""The run record kept with every adapter: what base, what data, which versions, what came out."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata

from ..config.train import FLAG_FIELDS
from ..files import file_sha256


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": f"{sys.platform}-{platform.machine()}"}
    for dist in ("mlxlora", "mlx", "mlx-lm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# TrainConfig fields whose change makes a resumed run differ from one that was never interrupted.
SCHEDULE_FIELDS = ("iters", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup", "schedule",
                   "clip_grad", "max_seq_length", "pad_multiple", "pack", "seed", "quantize", "q_group_size", "dtype")


def resume_drift(record: dict, cfg, files: dict) -> list[str]:
    """What differs between a checkpoint's mlxlora.json (`record`) and this run: data files whose sha256
    changed, and schedule settings (SCHEDULE_FIELDS). Empty when the run continues exactly."""
    out = []
    data = (record.get("run_record") or {}).get("data") or {}
    for split, path in files.items():
        want = (data.get(split) or {}).get("sha256")
        if want and file_sha256(path) != want:
            out.append(f"{split} data {path} changed (sha256 {want[:12]}... -> {file_sha256(path)[:12]}...)")
    stored = record.get("train_config") or {}
    for name in SCHEDULE_FIELDS:
        if name in stored and stored[name] != getattr(cfg, name):
            out.append(f"--{name.replace('_', '-')} {stored[name]} -> {getattr(cfg, name)}")
    # the objective: --method and what matters for it (--beta, --loss-type, --group-size, ...)
    was = {**(stored.get("grpo") or {}), **(stored.get("preference") or {})}
    flags = {field: flag for flag, (sec, field) in FLAG_FIELDS.items() if sec in ("preference", "grpo")}
    for name, now in cfg.method_params().items():
        now = list(now) if isinstance(now, tuple) else now
        if name in was and was[name] != now:
            out.append(f"--{flags.get(name, name).replace('_', '-')} {was[name]} -> {now}")
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
