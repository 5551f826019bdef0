"""Writing a fused model: an mlx-lm folder (weights, config with its quantization, tokenizer, report) or a
transformers folder; `fuse_to_folder` is the one call `mlxlora fuse` makes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import ExportConfig, FuseConfig, given
from ..errors import ConfigError, ModelError
from ..files import atomic_folder, check_disjoint, check_output
from ..lora.surgery import adapter_layers
from ..models import load_base
from ..models.export_gguf import check_gguf_exportable, export_gguf
from ..models.hf_export import TOKENIZER_FILES, export_hf
from .core import fuse_model
from .report import REPORT_FILE, write_report


def save_fused(model, config: dict, tokenizer_dir, out_dir, force: bool = False, report: dict | None = None,
               flag: str | None = None) -> Path:
    """Write a fused model as mlx-lm writes one: model.safetensors (+ index), config.json with its
    `quantization` (per-layer entries included), the tokenizer files of `tokenizer_dir`, and
    fuse_report.json when `report` is given. Atomic; an existing non-empty `out_dir` is replaced
    only with `force` (ModelError otherwise). Returns the folder.
    """
    from mlx_lm.utils import save_config, save_model

    if adapter_layers(model):
        raise ModelError("save_fused: the model still has adapter layers; fuse it first (fuse_model)")
    tok = Path(tokenizer_dir)
    with atomic_folder(out_dir, force=force, error=ModelError, flag=flag) as tmp:
        save_model(tmp, model)
        save_config(dict(config), config_path=tmp / "config.json")
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copy2(tok / name, tmp / name)
        if report is not None:
            write_report(report, tmp)
    return Path(out_dir)


def fuse_to_folder(model: str, adapter, out_dir, *, fmt: str = "mlx", force: bool = False, calibration=None,
                   data=None, gguf_type: str | None = None, **options) -> tuple[Path, dict]:
    """Load `model`, fuse `adapter` into it, write `out_dir` (mlx-lm folder, transformers with
    fmt="hf", or a GGUF file + Modelfile with fmt="gguf" in `gguf_type`, ExportConfig's default when None);
    returns (folder, report). fuse_report.json is always written into the folder.
    `options`: FuseConfig fields (bits, group_size, strategy, ...). An existing non-empty `out_dir`
    is refused before any work unless `force`. This is the one call the CLI makes; an uploader can
    call it and then push the folder it returns.
    """
    out = Path(out_dir)
    check_disjoint(out, {"--model": model, "--adapter": adapter, "--data": data,
                         "--calibration": None if calibration == "random" else calibration},
                   flag="--out", error=ModelError)
    check_output(out, force=force, flag="--out", error=ModelError)
    if fmt not in ("mlx", "hf", "gguf"):
        raise ConfigError(f"--format must be mlx, hf or gguf, got {fmt!r}")
    if gguf_type is not None and fmt != "gguf":
        raise ConfigError(f"--gguf-type {gguf_type} needs --format gguf")
    gguf_type = ExportConfig(**given(gguf_type=gguf_type)).gguf_type
    opts = FuseConfig(**given(**options))
    if fmt in ("hf", "gguf"):
        if opts.bits:
            raise ConfigError(f"--format {fmt} writes float weights; drop --bits {opts.bits} (or use --format mlx)")
        opts.bits = 0  # transformers / llama.cpp get the exact float fuse
    base = load_base(model)
    if fmt == "gguf":  # before the fuse: fail in a second, not after minutes
        check_gguf_exportable(base.config.get("model_type"), gguf_type)
    fused, config, report = fuse_model(base, adapter, calibration=calibration, data=data, options=opts)
    if fmt == "mlx":
        save_fused(fused, config, base.path, out, force=force, report=report, flag="--out")
    elif fmt == "hf":
        export_hf(fused, config, base.path, out, dtype=_dtype_name(fused), force=force,
                  extra_files={REPORT_FILE: json.dumps(report, indent=2) + "\n"}, flag="--out")
    else:
        export_gguf(fused, config, base.path, out, gguf_type, force=force,
                    extra_files={REPORT_FILE: json.dumps(report, indent=2) + "\n"}, flag="--out")
    return out, report


def _dtype_name(model) -> str:
    names = [str(v.dtype).split(".")[-1] for _, v in tree_flatten(model.parameters())
             if mx.issubdtype(v.dtype, mx.floating) and v.ndim == 2]
    return max(set(names), key=names.count) if names else "float32"
