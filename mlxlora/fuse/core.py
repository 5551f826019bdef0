"""Fuse an adapter into its base model and say how much of the fine-tune the fused model kept.

A float base gets the exact dense fuse (W + scale * B @ A; DoRA with its magnitude) from each
layer's own `fuse()`. A quantized base is the hard case: the delta is usually smaller than
half a rounding step, so re-quantizing W + delta from scratch rounds most of it away. The
strategies in STRATEGIES (see requant.py for the maths) re-quantize only the layers the adapter
touched; every other layer is left bit-identical. `fuse_report.json` records, per layer, how
much of the true delta survived, and, with validation data, how much of the loss improvement.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..adapters import load_adapter
from ..config import FuseConfig, given
from ..errors import AdapterError, ConfigError
from ..lora.layers import LoRAEmbedding, base_of
from ..lora.quant import QUANTIZED_TYPES, use_fast_cpu_path, weight_shape
from ..lora.switch import QuantizedSwitchLinear
from ..lora.surgery import adapter_layers
from . import experts as X
from . import requant as R
from .calibration import collect_hessians, pick_samples, random_rows
from .heldout import adapter_record, fraction_kept, heldout_loss, losses_before, split_for
from .report import delta_stats, layer_kind, output_error, quant_info, summarize
from .storage import cast_to_storage, default_dtype, dequantize_all, quantization_config, storage_dtypes


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
    if X.is_switch(layer):  # MoE experts: the same strategies, one expert at a time
        return X.fuse_switch(layer, bits, group_size, strategy, damp, dtypes, path)
    base = base_of(layer)
    w0 = R.float_weight_np(base)
    dense = layer.fuse(dequantize=True)  # exact: W + scale * B @ A (DoRA: rescaled by m / ||.||)
    wf = np.array(dense.weight.astype(mx.float32))
    if not isinstance(base, QUANTIZED_TYPES):
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
        wk = X.weight_np(fused) if X.is_switch(layer) else R.float_weight_np(fused)
        rows.append({"path": path, "kind": layer_kind(layer), "strategy": used, **quant_info(fused),
                     **delta_stats(w0, wf, wk, check.get(path))})
        new.append((path, fused))
        h = fit.get(path)  # an embedding has none: its rows are its outputs
        errors.append(output_error(wk - wf, wf, h) if h is not None or isinstance(layer, LoRAEmbedding) else None)
    if opts.strategy == "auto" and fit and opts.bits is None and opts.group_size is None:
        for i in _upgrades(layers, new, errors, fit, budget, opts, dtypes):
            path, layer = layers[i]
            fused, w0, wf, used = _fuse_layer(layer, fit.get(path), 8, None, "gptq", opts.damp, dtypes, path)
            rows[i].update(strategy=used, **quant_info(fused),
                           **delta_stats(w0, wf, R.float_weight_np(fused), check.get(path)))
            new[i] = (path, fused)
    return new, rows


def _upgrades(layers, new, errors, fit, budget: float, opts: FuseConfig, dtypes) -> list[int]:
    """Indices of the layers to re-fuse at 8 bits: the largest drop of output error per extra byte
    first, while the extra bytes stay within `budget`. The 8-bit error is estimated by plain rounding
    on the base's grid at step / 17 (the upgrade itself uses gptq, so it does at least as well)."""
    cands = []
    for i, ((path, layer), (_, fused)) in enumerate(zip(layers, new)):
        if errors[i] is None or not isinstance(fused, QUANTIZED_TYPES) or fused.bits >= 8:
            continue
        fine, _, wf, _ = _fuse_layer(layer, None, 8, None, "grid", opts.damp, dtypes, path)
        gain = errors[i] - output_error(R.float_weight_np(fine) - wf, wf, fit.get(path))
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
    touched, default = tuple(p + "." for p, _ in layers), default_dtype(dtypes)
    total = 0
    for name, v in tree_flatten(model.parameters()):
        if not name.startswith(touched) or name.endswith(".bias"):
            floating = mx.issubdtype(v.dtype, mx.floating)
            total += v.size * (dtypes.get(name, default or v.dtype) if floating else v.dtype).size
    for path, layer in layers:
        base = base_of(layer)
        if isinstance(base, QUANTIZED_TYPES + (QuantizedSwitchLinear,)):
            bits, gs = opts.bits or base.bits, opts.group_size or base.group_size
            out_dims, in_dims = weight_shape(base) if not X.is_switch(layer) else (
                base.num_experts * base.output_dims, base.input_dims)
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
    opts = replace(options or FuseConfig(), **given(bits=bits, group_size=group_size, strategy=strategy))
    model, layers, record = _attach(base, adapter, opts)
    notes = []
    msl = int(record.get("train_config", {}).get("max_seq_length") or opts.max_seq_length)
    valid = split_for(data, record, "valid", base.tokenizer, msl, notes)
    model.eval()
    losses = losses_before(model, layers, valid, base.tokenizer) if valid else None
    fit, check, cal = {}, {}, None
    if _requantizes(layers, opts) and calibration is not False:
        fit_needed = opts.strategy in ("auto", "gptq", "refit")
        fit, check, cal = _calibrate(model, layers, calibration, record, valid, base.tokenizer, msl, opts, notes,
                                     fit_needed)
    name = resolve_strategy(opts.strategy, bool(fit))
    if name in ("gptq", "refit") and not fit:
        notes.append(f"strategy {name}: no calibration data, so integers were rounded to the nearest level")
    dtypes = storage_dtypes(getattr(base, "path", None))
    naive_bytes = _naive_bytes(model, layers, opts, dtypes)
    new, rows = _fuse_all(layers, fit, check, opts, name, dtypes, (opts.size_budget - 1.0) * (naive_bytes or 0))
    _install(model, new, opts, dtypes)
    if losses is not None:
        losses["fused"] = heldout_loss(model, valid, base.tokenizer)
        losses["fraction_kept"] = fraction_kept(losses)
        if losses["fraction_kept"] is None:
            notes.append("the adapter does not lower the held-out loss, so the fraction kept is undefined")
    cast_to_storage(model, dtypes)
    fused_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    naive_bytes = naive_bytes or fused_bytes
    report = {"base": str(getattr(base, "source", "") or getattr(base, "path", "")),
              "adapter": str(adapter) if adapter is not None else None, "strategy": name,
              "requested": {"bits": opts.bits, "group_size": opts.group_size, "strategy": opts.strategy},
              "calibration": cal, "summary": summarize(rows),
              "size": {"fused_bytes": fused_bytes, "naive_bytes": naive_bytes,
                       "ratio_to_naive": fused_bytes / naive_bytes},
              "loss": losses, "notes": notes, "layers": rows}
    return model, fused_config(model, base.config), report


def _attach(base, adapter, opts: FuseConfig):
    """(model, its adapter layers, the adapter's mlxlora.json record) after loading `adapter` if given."""
    model, record = base.model, {}
    if adapter is not None:
        load_adapter(model, adapter, base_info=base.describe(), ignore_base_mismatch=opts.ignore_base_mismatch)
        record = adapter_record(Path(adapter))
    layers = _adapter_layers(model)
    if opts.bits and not any(isinstance(base_of(m), QUANTIZED_TYPES + (QuantizedSwitchLinear,)) for _, m in layers):
        raise ConfigError(f"--bits {opts.bits}: the base is not quantized, so the fuse is exact in float; "
                          "drop --bits (quantize the fused folder afterwards with mlx_lm.convert -q if you want)")
    return model, layers, record


def _requantizes(layers, opts: FuseConfig) -> bool:
    """True when some touched layer is quantized and stays quantized (so rounding decides what is kept)."""
    return opts.bits != 0 and any(isinstance(base_of(m), QUANTIZED_TYPES + (QuantizedSwitchLinear,)) for _, m in layers)


def _install(model, new, opts: FuseConfig, dtypes: dict) -> None:
    """Put the fused layers in place; with bits=0 dequantize the rest too; CPU fast path for quantized layers."""
    model.update_modules(tree_unflatten(new))
    if hasattr(model, "lora_config"):
        del model.lora_config
    if opts.bits == 0:
        dequantize_all(model, dtypes)
    use_fast_cpu_path(model)


def _calibrate(model, layers, calibration, record, valid, tokenizer, msl, opts, notes, fit_needed: bool):
    """(H of the calibration rows, H of held-out rows for the report, calibration info) per linear layer.

    Calibration rows: `calibration`, else the adapter's training data, else random tokens (measured on
    the demo with "auto": 102 % of the loss improvement kept with random tokens, 103 % with the
    training data, 72 % by the naive fuse). The
    held-out H comes from the validation rows when there are some; otherwise the report's output
    metrics use the calibration H itself (in-sample, so optimistic) and a note says so.
    """
    split = None if calibration == "random" else split_for(calibration, record, "train", tokenizer, msl, notes)
    linear = [p for p, m in layers if not isinstance(m, LoRAEmbedding) and not X.is_switch(m)]
    if split is not None:
        samples = pick_samples(split, opts.calibration_samples)
        source = split.stats.path
    else:
        samples = random_rows(tokenizer, opts.random_rows, opts.random_row_length)
        source = "random tokens"
        if calibration != "random":
            notes.append(f"calibrated on {len(samples)} rows of random tokens; the adapter's own training rows "
                         "(--calibration) do better")
    cal = {"data": source, "samples": len(samples), "tokens": sum(len(s) for s in samples),
           "held_out": valid.stats.path if valid is not None else None}
    fit = collect_hessians(model, linear, samples) if fit_needed or valid is None else {}
    if valid is not None:
        check = collect_hessians(model, linear, pick_samples(valid, opts.calibration_samples))
    else:
        check = fit
        notes.append("output-space metrics are measured on the calibration rows themselves (no validation data)")
    return (fit if fit_needed else {}), check, cal


def _adapter_layers(model):
    layers = adapter_layers(model)  # reading order (block 0 first), as the report lists them
    if not layers:
        raise AdapterError("fuse: the model has no adapter layers; pass --adapter with an adapter folder")
    return layers


# ---------------------------------------------------------------- data and losses


# ---------------------------------------------------------------- config

def fused_config(model, base_config: dict) -> dict:
    """The base's config.json with the quantization of `model` (none when it is all float)."""
    config = {k: v for k, v in base_config.items() if k not in ("quantization", "quantization_config")}
    q = quantization_config(model, base_config.get("quantization"))
    if q is not None:
        config["quantization"] = q
    return config


# ---------------------------------------------------------------- writing


