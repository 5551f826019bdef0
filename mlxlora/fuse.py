"""Fuse an adapter into its base model and say how much of the fine-tune the fused model kept.

A float base gets the exact dense fuse (W + scale * B @ A; DoRA with its magnitude) from each
layer's own `fuse()`. A quantized base is the hard case: the delta is usually smaller than
half a rounding step, so re-quantizing W + delta from scratch rounds most of it away. The
strategies in STRATEGIES (see requant.py for the maths) re-quantize only the layers the adapter
touched; every other layer is left bit-identical. `fuse_report.json` records, per layer, how
much of the true delta survived, and, with validation data, how much of the loss improvement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import requant as R
from .errors import AdapterError, ConfigError, DataError, ModelError
from .layers import LoRAEmbedding, base_of

REPORT_FILE = "fuse_report.json"


@dataclass
class FuseConfig:
    """Defaults of `mlxlora fuse` / `fuse_model`.

    bits: None keeps the base's bits; 0 writes float weights; 2..8 re-quantizes the touched layers of
    a quantized base at that width (a float base is fused exactly, in float). strategy: "auto" or a
    key of requant.STRATEGIES; auto = refit with calibration (else naive) plus 8-bit layers.
    calibration_samples: training rows whose activations weight the rounding (GPTQ's H); without
    training data, random_rows rows of random_row_length random tokens stand in.
    size_budget: "auto" may spend up to this ratio of the naive fuse's size on 8-bit layers.
    """

    bits: int | None = None
    group_size: int | None = None
    strategy: str = "auto"
    calibration_samples: int = 128
    random_rows: int = 32
    random_row_length: int = 128
    max_seq_length: int = 512
    size_budget: float = 1.10
    damp: float = 0.01

    def __post_init__(self):
        if isinstance(self.bits, str):
            name = self.bits.lower()
            self.bits = 0 if name in ("none", "float") else int(name) if name.isdigit() else self.bits
        if self.bits not in (None, 0, 2, 3, 4, 5, 6, 8):
            raise ConfigError(f"--bits must be 2, 3, 4, 5, 6, 8 or none, got {self.bits!r}")
        if self.group_size not in (None, 32, 64, 128):
            raise ConfigError(f"--group-size must be 32, 64 or 128, got {self.group_size!r}")
        if self.strategy != "auto" and self.strategy not in R.STRATEGIES:
            raise ConfigError(f"--strategy must be auto or one of {', '.join(R.STRATEGIES)}, got {self.strategy!r}")
        if not self.size_budget >= 1.0:
            raise ConfigError(f"--size-budget must be >= 1.0 (a multiple of the naive fuse's size), "
                              f"got {self.size_budget!r}")


def resolve_strategy(strategy: str, has_calibration: bool) -> str:
    """The strategy "auto" stands for (measured in scripts/fuse_study.py), or `strategy` itself."""
    if strategy != "auto":
        return strategy
    # Without activations, re-rounding on a fresh grid (naive) kept more than rounding on the base's
    # grid: 72 % vs 64 % of the loss improvement on the demo. Calibrated refit kept 103 %.
    return "refit" if has_calibration else "naive"


# ---------------------------------------------------------------- one layer

def _fuse_layer(layer, h, bits: int | None, group_size: int | None, strategy: str, damp: float, dtypes: dict,
                path: str):
    """(fused plain layer, the base's float weight, the exact fused float weight, strategy used)."""
    base = base_of(layer)
    w0 = R.float_weight_np(base)
    dense = layer.fuse(dequantize=True)  # exact: W + scale * B @ A (DoRA: rescaled by m / ||.||)
    wf = np.array(dense.weight.astype(mx.float32))
    if not isinstance(base, R.QUANTIZED_TYPES):
        dense.weight = dense.weight.astype(dtypes.get(f"{path}.weight", dense.weight.dtype))
        return dense, w0, wf, "dense"
    scale_dtype = dtypes.get(f"{path}.scales", base.scales.dtype)
    if bits == 0:
        dense.weight = dense.weight.astype(scale_dtype)  # mlx-lm dequantizes to the scales' dtype
        return dense, w0, wf, "dense"
    if base.mode != "affine":  # no per-group affine grid to reuse: only mx.quantize's own rounding
        return layer.fuse(), w0, wf, "naive"
    bits, group_size = bits or base.bits, group_size or base.group_size
    grid = R.target_grid(base, wf, bits, group_size, scale_dtype)
    q, g = R.STRATEGIES[strategy](wf, grid, None if isinstance(layer, LoRAEmbedding) else h, damp, scale_dtype)
    return R.quantized_layer(base, q, g, scale_dtype), w0, wf, strategy


def _fuse_all(layers, fit: dict, check: dict, opts: FuseConfig, strategy: str, dtypes: dict, budget: float):
    """Fuse every adapter layer, then (auto) spend `budget` extra bytes on 8-bit layers. (new layers, rows)."""
    new, rows, errors = [], [], []
    for path, layer in layers:
        fused, w0, wf, used = _fuse_layer(layer, fit.get(path), opts.bits, opts.group_size, strategy, opts.damp,
                                          dtypes, path)
        wk = R.float_weight_np(fused)
        rows.append({"path": path, "kind": _kind(layer), "strategy": used, **_quant_info(fused),
                     **R.delta_stats(w0, wf, wk, check.get(path))})
        new.append((path, fused))
        h = fit.get(path)  # an embedding has none: its rows are its outputs
        errors.append(R.output_error(wk - wf, wf, h) if h is not None or isinstance(layer, LoRAEmbedding) else None)
    if opts.strategy == "auto" and fit and opts.bits is None and opts.group_size is None:
        for i in _upgrades(layers, new, errors, fit, budget, opts, dtypes):
            path, layer = layers[i]
            fused, w0, wf, used = _fuse_layer(layer, fit.get(path), 8, None, "gptq", opts.damp, dtypes, path)
            rows[i].update(strategy=used, **_quant_info(fused),
                           **R.delta_stats(w0, wf, R.float_weight_np(fused), check.get(path)))
            new[i] = (path, fused)
    return new, rows


def _upgrades(layers, new, errors, fit, budget: float, opts: FuseConfig, dtypes) -> list[int]:
    """Indices of the layers to re-fuse at 8 bits: the largest drop of output error per extra byte
    first, while the extra bytes stay within `budget`. The 8-bit error is estimated by plain rounding
    on the base's grid at step / 17 (the upgrade itself uses gptq, so it does at least as well)."""
    cands = []
    for i, ((path, layer), (_, fused)) in enumerate(zip(layers, new)):
        if errors[i] is None or not isinstance(fused, R.QUANTIZED_TYPES) or fused.bits >= 8:
            continue
        fine, _, wf, _ = _fuse_layer(layer, None, 8, None, "grid", opts.damp, dtypes, path)
        gain = errors[i] - R.output_error(R.float_weight_np(fine) - wf, wf, fit.get(path))
        extra = _layer_bytes(fine) - _layer_bytes(fused)
        if gain > 0 and extra > 0:
            cands.append((gain / extra, i, extra))
    chosen, spent = [], 0
    for _, i, extra in sorted(cands, reverse=True):
        if spent + extra <= budget:
            chosen.append(i)
            spent += extra
    return sorted(chosen)


def _layer_bytes(layer) -> int:
    return sum(v.nbytes for _, v in tree_flatten(layer.parameters()))


def _naive_bytes(model, layers, opts: FuseConfig, dtypes: dict) -> int | None:
    """Bytes on disk of the naive fuse (touched layers re-quantized from scratch at the target width,
    everything else as stored); None when nothing is re-quantized (float fuse: no choice to compare)."""
    if not _requantizes(layers, opts):
        return None
    touched, default = tuple(p + "." for p, _ in layers), R.default_dtype(dtypes)
    total = 0
    for name, v in tree_flatten(model.parameters()):
        if not name.startswith(touched) or name.endswith(".bias"):
            floating = mx.issubdtype(v.dtype, mx.floating)
            total += v.size * (dtypes.get(name, default or v.dtype) if floating else v.dtype).size
    for path, layer in layers:
        base = base_of(layer)
        if isinstance(base, R.QUANTIZED_TYPES):
            bits, gs = opts.bits or base.bits, opts.group_size or base.group_size
            out_dims, in_dims = base.weight.shape[0], base.weight.shape[1] * 32 // base.bits
            item = dtypes.get(f"{path}.scales", base.scales.dtype).size
            total += out_dims * in_dims * bits // 8 + 2 * out_dims * (in_dims // gs) * item
    return total


# ---------------------------------------------------------------- the model

def fuse_model(base, adapter=None, *, bits=None, group_size: int | None = None, strategy: str | None = None,
               calibration=None, data=None, options: FuseConfig | None = None):
    """Fuse the adapter into `base` (a models.Base: .model, .tokenizer, .config, .path) in place.

    adapter: an adapter folder, or None when base.model already has adapter layers.
    bits / group_size / strategy override `options` (see FuseConfig). calibration: a data folder or
    .jsonl whose rows weight the rounding; None: the adapter's training data (from mlxlora.json), else
    random tokens; "random": random tokens; False: none. data: validation data for the losses
    (default: the adapter's validation data).
    Returns (fused model, config.json dict, report dict). Raises AdapterError for an adapter that
    does not fit the base (every mismatched tensor listed), ConfigError for bad options.
    """
    from dataclasses import replace

    from .config import given

    opts = replace(options or FuseConfig(), **given(bits=bits, group_size=group_size, strategy=strategy))
    model, layers, record = _attach(base, adapter, opts)
    notes = []
    msl = int(record.get("train_config", {}).get("max_seq_length") or opts.max_seq_length)
    valid = _load_split(data, record, "valid", base.tokenizer, msl, notes)
    model.eval()
    losses = _losses_before(model, layers, valid, base.tokenizer) if valid else None
    fit, check, cal = {}, {}, None
    if _requantizes(layers, opts) and calibration is not False:
        fit_needed = opts.strategy in ("auto", "gptq", "refit")
        fit, check, cal = _calibrate(model, layers, calibration, record, valid, base.tokenizer, msl, opts, notes,
                                     fit_needed)
    name = resolve_strategy(opts.strategy, bool(fit))
    if name in ("gptq", "refit") and not fit:
        notes.append(f"strategy {name}: no calibration data, so integers were rounded to the nearest level")
    dtypes = R.storage_dtypes(getattr(base, "path", None))
    naive_bytes = _naive_bytes(model, layers, opts, dtypes)
    new, rows = _fuse_all(layers, fit, check, opts, name, dtypes, (opts.size_budget - 1.0) * (naive_bytes or 0))
    _install(model, new, opts, dtypes)
    if losses is not None:
        losses["fused"] = _loss(model, valid, base.tokenizer)
        losses["fraction_kept"] = _fraction(losses)
        if losses["fraction_kept"] is None:
            notes.append("the adapter does not lower the held-out loss, so the fraction kept is undefined")
    R.cast_to_storage(model, dtypes)
    fused_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    naive_bytes = naive_bytes or fused_bytes
    report = {"base": str(getattr(base, "source", "") or getattr(base, "path", "")),
              "adapter": str(adapter) if adapter is not None else None, "strategy": name,
              "requested": {"bits": opts.bits, "group_size": opts.group_size, "strategy": opts.strategy},
              "calibration": cal, "summary": _summary(rows),
              "size": {"fused_bytes": fused_bytes, "naive_bytes": naive_bytes,
                       "ratio_to_naive": fused_bytes / naive_bytes},
              "loss": losses, "notes": notes, "layers": rows}
    return model, fused_config(model, base.config), report


def _attach(base, adapter, opts: FuseConfig):
    """(model, its adapter layers, the adapter's mlxlora.json record) after loading `adapter` if given."""
    model, record = base.model, {}
    if adapter is not None:
        from .adapters import load_adapter

        load_adapter(model, adapter)
        record = _read_record(Path(adapter))
    layers = _adapter_layers(model)
    if opts.bits and not any(isinstance(base_of(m), R.QUANTIZED_TYPES) for _, m in layers):
        raise ConfigError(f"--bits {opts.bits}: the base is not quantized, so the fuse is exact in float; "
                          "drop --bits (quantize the fused folder afterwards with mlx_lm.convert -q if you want)")
    return model, layers, record


def _requantizes(layers, opts: FuseConfig) -> bool:
    """True when some touched layer is quantized and stays quantized (so rounding decides what is kept)."""
    return opts.bits != 0 and any(isinstance(base_of(m), R.QUANTIZED_TYPES) for _, m in layers)


def _install(model, new, opts: FuseConfig, dtypes: dict) -> None:
    """Put the fused layers in place; with bits=0 dequantize the rest too; CPU fast path for quantized layers."""
    from .quant import use_fast_cpu_path

    model.update_modules(tree_unflatten(new))
    if hasattr(model, "lora_config"):
        del model.lora_config
    if opts.bits == 0:
        R.dequantize_all(model, dtypes)
    use_fast_cpu_path(model)


def _calibrate(model, layers, calibration, record, valid, tokenizer, msl, opts, notes, fit_needed: bool):
    """(H of the calibration rows, H of held-out rows for the report, calibration info) per linear layer.

    Calibration rows: `calibration`, else the adapter's training data, else random tokens (measured on
    the demo with "auto": 102 % of the loss improvement kept with random tokens, 103 % with the
    training data, 72 % by the naive fuse). The
    held-out H comes from the validation rows when there are some; otherwise the report's output
    metrics use the calibration H itself (in-sample, so optimistic) and a note says so.
    """
    split = None if calibration == "random" else _load_split(calibration, record, "train", tokenizer, msl, notes)
    linear = [p for p, m in layers if not isinstance(m, LoRAEmbedding)]
    if split is not None:
        samples = R.pick_samples(split, opts.calibration_samples)
        source = split.stats.path
    else:
        samples = R.random_rows(tokenizer, opts.random_rows, opts.random_row_length)
        source = "random tokens"
        if calibration != "random":
            notes.append(f"calibrated on {len(samples)} rows of random tokens; the adapter's own training rows "
                         "(--calibration) do better")
    cal = {"data": source, "samples": len(samples), "tokens": sum(len(s) for s in samples),
           "held_out": valid.stats.path if valid is not None else None}
    fit = R.collect_hessians(model, linear, samples) if fit_needed or valid is None else {}
    if valid is not None:
        check = R.collect_hessians(model, linear, R.pick_samples(valid, opts.calibration_samples))
    else:
        check = fit
        notes.append("output-space metrics are measured on the calibration rows themselves (no validation data)")
    return (fit if fit_needed else {}), check, cal


def _adapter_layers(model):
    from .surgery import adapter_layers

    layers = adapter_layers(model)
    if not layers:
        raise AdapterError("fuse: the model has no adapter layers; pass --adapter with an adapter folder")
    # reading order (block 0 first), as the report lists them
    return sorted(layers, key=lambda pm: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in pm[0].split(".")])


def _kind(layer) -> str:
    from .layers import DoRALinear

    return "embedding" if isinstance(layer, LoRAEmbedding) else "dora" if isinstance(layer, DoRALinear) else "lora"


def _quant_info(layer) -> dict:
    if isinstance(layer, R.QUANTIZED_TYPES):
        return {"bits": layer.bits, "group_size": layer.group_size}
    return {"bits": None, "group_size": None}


def _summary(rows: list[dict]) -> dict:
    """Layer count, layers per width ({"4": n, "8": m} or {"float": n}) and mean/min/max of each metric."""
    widths = [str(r["bits"] or "float") for r in rows]
    out = {"layers": len(rows), "widths": {w: widths.count(w) for w in sorted(set(widths))}}
    for key in ("delta_norm", "cosine", "rel_error", "out_cosine", "out_rel_error"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            out[f"mean_{key}"], out[f"min_{key}"], out[f"max_{key}"] = (float(np.mean(vals)), float(min(vals)),
                                                                        float(max(vals)))
    return out


# ---------------------------------------------------------------- data and losses

def _read_record(adapter_dir: Path) -> dict:
    from .adapters import RECORD_FILE

    f = adapter_dir / RECORD_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _load_split(spec, record: dict, split: str, tokenizer, max_seq_length: int, notes: list):
    """A data split: `spec` (folder or .jsonl) if given, else the adapter's own `split` file; None if neither."""
    from . import data as D

    flag = "--data" if split == "valid" else "--calibration"
    if spec is False:
        return None
    if spec is not None:
        p = Path(spec)
        path = p if p.is_file() else D.find_split_files(p, require_train=False).get(split) if p.is_dir() else None
        if path is None:
            raise DataError(f"{flag}: {spec} is neither a .jsonl file nor a folder with {split}.jsonl")
    else:
        path = record.get("run_record", {}).get("data", {}).get(split, {}).get("path")
        if path is None or not Path(path).is_file():
            why = f"{path} no longer exists" if path else "the adapter names no such file"
            notes.append(f"no {split} data ({why}); pass {flag} FILE_OR_FOLDER")
            return None
    return D.load_split(path, tokenizer, max_seq_length)


def _loss(model, split, tokenizer) -> float:
    from .config import EvalConfig
    from .train import _pad_id, evaluate

    return evaluate(model, split, EvalConfig.batch_size, EvalConfig.pad_multiple, _pad_id(tokenizer))


def _losses_before(model, layers, valid, tokenizer) -> dict:
    """Held-out loss of base + adapter (unfused) and of the base alone (adapters swapped out and back)."""
    model.eval()
    adapter_loss = _loss(model, valid, tokenizer)
    model.update_modules(tree_unflatten([(p, base_of(m)) for p, m in layers]))
    try:
        base_loss = _loss(model, valid, tokenizer)
    finally:
        model.update_modules(tree_unflatten(layers))
    return {"data": valid.stats.path, "base": base_loss, "adapter": adapter_loss}


def _fraction(losses: dict) -> float | None:
    """(base - fused) / (base - adapter): 1.0 = the fused model keeps all of the improvement."""
    gain = losses["base"] - losses["adapter"]
    return (losses["base"] - losses["fused"]) / gain if gain > 0 else None


# ---------------------------------------------------------------- config

def fused_config(model, base_config: dict) -> dict:
    """The base's config.json with the quantization of `model` (none when it is all float)."""
    config = {k: v for k, v in base_config.items() if k not in ("quantization", "quantization_config")}
    q = R.quantization_config(model, base_config.get("quantization"))
    if q is not None:
        config["quantization"] = q
    return config


# ---------------------------------------------------------------- writing

def save_fused(model, config: dict, tokenizer_dir, out_dir, force: bool = False, report: dict | None = None) -> Path:
    """Write a fused model as mlx-lm writes one: model.safetensors (+ index), config.json with its
    `quantization` (per-layer entries included), the tokenizer files of `tokenizer_dir`, and
    fuse_report.json when `report` is given. Atomic; an existing non-empty `out_dir` is replaced
    only with `force` (ModelError otherwise). Returns the folder.
    """
    import shutil

    from mlx_lm.utils import save_config, save_model

    from .adapters import atomic_folder
    from .convert.hf import TOKENIZER_FILES
    from .surgery import adapter_layers

    if adapter_layers(model):
        raise ModelError("save_fused: the model still has adapter layers; fuse it first (fuse_model)")
    tok = Path(tokenizer_dir)
    with atomic_folder(out_dir, force=force, error=ModelError) as tmp:
        save_model(tmp, model)
        save_config(dict(config), config_path=tmp / "config.json")
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copy2(tok / name, tmp / name)
        if report is not None:
            write_report(report, tmp)
    return Path(out_dir)


def write_report(report: dict, folder) -> Path:
    """Write `report` as fuse_report.json into `folder`."""
    path = Path(folder) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def fuse_to_folder(model: str, adapter, out_dir, *, fmt: str = "mlx", force: bool = False, calibration=None,
                   data=None, **options) -> tuple[Path, dict]:
    """Load `model`, fuse `adapter` into it, write `out_dir` (mlx-lm folder, or transformers with
    fmt="hf"); returns (folder, report). fuse_report.json is always written into the folder.
    `options`: FuseConfig fields (bits, group_size, strategy, ...). An existing non-empty `out_dir`
    is refused before any work unless `force`. This is the one call the CLI makes; an uploader can
    call it and then push the folder it returns.
    """
    from .config import given
    from .models import load_base

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ModelError(f"--out: {out} already exists; pass --force to replace it or choose another folder")
    if fmt not in ("mlx", "hf"):
        raise ConfigError(f"--format must be mlx or hf, got {fmt!r}")
    opts = FuseConfig(**given(**options))
    if fmt == "hf":
        if opts.bits:
            raise ConfigError(f"--format hf writes float weights; drop --bits {opts.bits} (or use --format mlx)")
        opts.bits = 0  # transformers gets the exact float fuse
    base = load_base(model)
    fused, config, report = fuse_model(base, adapter, calibration=calibration, data=data, options=opts)
    if fmt == "mlx":
        save_fused(fused, config, base.path, out, force=force, report=report)
    else:
        from .convert.hf import export_hf

        export_hf(fused, config, base.path, out, dtype=_dtype_name(fused), force=force,
                  extra_files={REPORT_FILE: json.dumps(report, indent=2) + "\n"})
    return out, report


def _dtype_name(model) -> str:
    names = [str(v.dtype).split(".")[-1] for _, v in tree_flatten(model.parameters())
             if mx.issubdtype(v.dtype, mx.floating) and v.ndim == 2]
    return max(set(names), key=names.count) if names else "float32"
