"""Adapters on models: the one place that attaches an AdapterRecord to a model and takes one back.

Reading and writing files is the formats' job (mlxlora/formats); this module composes a format with
a model: `load_adapter` = read any format + check it against the base + wrap and load; `save_adapter`
= take the record back from the wrapped model + write mlxlora's folder (PEFT's files plus
mlxlora.json); `export_adapter` writes another tool's format. Every tensor is checked before anything
is loaded, and every mismatch is listed at once; a failed load leaves the model as it was.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import LoraConfig
from .errors import AdapterError, ConfigError
from .files import atomic_folder, check_disjoint
from .formats import read_adapter, resolve_adapter, write_adapter
from .formats import gguf_lora, mlxlora as mlxlora_format, peft
from .formats.mlx_lm import WEIGHTS_FILE as MLX_LM_WEIGHTS
from .formats.names import mlx_to_hf
from .formats.record import AdapterRecord, LayerLoRA
from .files import read_json
from .lora.layers import ADAPTER_TYPES, DoRALinear, LoRAEmbedding
from .lora.multi_layers import MULTI_TYPES
from .lora.quant import float_weight, weight_shape
from .lora.switch import SWITCH_TYPES, LoRASwitchLinear, switch_dims
from .lora.surgery import adapter_layers, find_targets, get_lora_model, num_blocks
from .models import load_base, resolve_model_path
from .models.fingerprint import base_differences

CONFIG_FILE, WEIGHTS_FILE = peft.CONFIG_FILE, peft.WEIGHTS_FILE
RECORD_FILE, FORMAT_VERSION = mlxlora_format.RECORD_FILE, mlxlora_format.FORMAT_VERSION
_HEADS = ("lm_head",)


def model_type_of(model: nn.Module) -> str | None:
    """The mlx-lm `model_type` of a model (e.g. "llama"), or None."""
    return getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)


def ties_head(model: nn.Module) -> bool:
    """True when the output head is the input embedding (no separate lm_head module)."""
    return not any(p.split(".")[-1] in _HEADS for p, _ in model.named_modules())


# ---------------------------------------------------------------- model -> record

def record_of(model: nn.Module, *, base_model: str | None = None, meta: dict | None = None) -> AdapterRecord:
    """The adapter of a model wrapped by get_lora_model, as a record ready to write (PEFT names filled in)."""
    layers = adapter_layers(model)
    config = getattr(model, "lora_config", None)
    if not layers or config is None:
        raise AdapterError("save_adapter: the model has no adapters; wrap it with get_lora_model first")
    out = {p: LayerLoRA(m.lora_a, m.lora_b, m.scale, m.m if isinstance(m, DoRALinear) else None,
                        isinstance(m, LoRAEmbedding)) for p, m in layers}
    record = AdapterRecord(config=config, layers=out, model_type=model_type_of(model), base_model=base_model,
                           meta=dict(meta or {}))
    return name_for_peft(record, model)


def name_for_peft(record: AdapterRecord, model: nn.Module) -> AdapterRecord:
    """Fill in what PEFT's adapter_config.json needs from `model` (wrapped or bare): the target names that
    select exactly the record's layers, the block count, and whether the head is tied to an embedding."""
    record.num_blocks = num_blocks(model)
    record.tied_head = bool(record.embeddings) and ties_head(model)
    record.peft_targets = _peft_targets(model, record)
    return record


def _peft_targets(model, record: AdapterRecord) -> list[str]:
    """Short names ("q_proj") when PEFT's matcher selects exactly the record's paths with them, else full HF paths.
    Expert layers are not among them: PEFT reaches transformers' fused experts by target_parameters."""
    model_type, config = record.model_type, record.config
    paths = [p for p in record.module_paths if not record.layers[p].experts]
    if not paths:
        return []
    pattern = peft.layers_pattern_of([mlx_to_hf(p, model_type) for p in paths])
    layers = (list(range(max(0, record.num_blocks - config.last_n_layers), record.num_blocks))
              if config.last_n_layers is not None else config.layers_to_transform)
    short = sorted({p.split(".")[-1] for p in paths})
    index_re = re.compile(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." if pattern else r".*?\.[^.]*\.(?P<idx>\d+)\.")

    def selected(key: str) -> bool:
        if key in short:
            return True
        if not any(key.endswith("." + s) for s in short):
            return False
        if layers is None:
            return True
        m = index_re.match(key)
        return m is not None and int(m["idx"]) in layers

    # Module paths PEFT would see: adapter layers count as their base, their insides do not exist.
    inner = tuple(p + "." for p, m in model.named_modules() if isinstance(m, (*ADAPTER_TYPES, *MULTI_TYPES)))
    candidates = [p for p, m in model.named_modules() if p and not p.startswith(inner)
                  and not isinstance(m, (*SWITCH_TYPES, LoRASwitchLinear))]
    if {p for p in candidates if selected(mlx_to_hf(p, model_type))} == set(paths):
        return short
    return sorted(mlx_to_hf(p, model_type) for p in paths)


# ---------------------------------------------------------------- record -> model

def fit(model: nn.Module, record: AdapterRecord) -> AdapterRecord:
    """Check every tensor of `record` against a bare base `model`; return the record (DoRA magnitudes that
    an mlx-lm file leaves out filled in with ||W|| per row, as mlx-lm does).

    Raises AdapterError listing every missing, unexpected and mis-shaped tensor at once, named as the
    file names them. The model is not changed.
    """
    where = record.weights or record.path or "adapter"
    try:
        targets = dict(find_targets(model, record.config))
    except ConfigError as e:
        raise AdapterError(f"{record.path / CONFIG_FILE if record.path else 'adapter'}: {e}") from None
    problems, filled, ranks = [], {}, []  # ranks: (config's r, the tensors' r) of mismatches in the rank alone
    for path, module in targets.items():
        embedding = isinstance(module, (nn.Embedding, nn.QuantizedEmbedding))
        rows, cols = _dims(module, embedding)
        r = record.config.rank_alpha_for(path)[0]
        want = {"lora_a": (rows, r), "lora_b": (r, cols)}
        if isinstance(module, SWITCH_TYPES):  # one pair per expert
            e = module.num_experts
            want = {"lora_a": (e, rows, r), "lora_b": (e, r, cols)}
        if record.config.use_dora:
            want["m"] = (cols,)
        lora = record.layers.get(path)
        have = lora.arrays() if lora is not None else {}
        have.update({k.rpartition(".")[2]: v for k, v in record.loose.items() if k.rpartition(".")[0] == path})
        for kind, shape in want.items():
            name = _display(record, f"{path}.{kind}", embedding)
            if kind not in have:
                if kind == "m" and record.format == "mlx-lm" and lora is not None:
                    filled[path] = mx.linalg.norm(float_weight(module).astype(mx.float32), axis=1)
                    continue
                problems.append(f"missing {name} {shape}")
            elif tuple(have[kind].shape) != shape:
                problems.append(f"{name} is {tuple(have[kind].shape)}, the model needs {shape}")
                got = tuple(have[kind].shape)
                if kind != "m" and len(got) == 2 and (got[0] == rows if kind == "lora_a" else got[1] == cols):
                    ranks.append((r, got[1] if kind == "lora_a" else got[0]))
    for name, value in {**record.tensors(), **record.loose}.items():
        if name.rpartition(".")[0] not in targets:
            problems.append(f"unexpected {name} {tuple(value.shape)}")
    if problems and len(ranks) == len(problems):
        conf = (record.path / (RECORD_FILE if record.format == "mlxlora" else CONFIG_FILE)) if record.path else "config"
        said, held = sorted({a for a, _ in ranks}), sorted({b for _, b in ranks})
        raise AdapterError(f"{conf} gives rank {', '.join(map(str, said))} but {where} holds rank "
                           f"{', '.join(map(str, held))} tensors ({len(problems)} tensor(s)); the config and the tensors "
                           "disagree, so the scale alpha/r cannot be trusted; fix r in the config")
    if problems:
        raise AdapterError(f"{where} does not fit this base model ({len(problems)} problem(s)): " + "; ".join(problems))
    for path, m in filled.items():
        record.layers[path].m = m
    return record


def _dims(module, embedding: bool) -> tuple[int, int]:
    """(rows of lora_a, columns of lora_b): (in, out) of a linear (or switch) layer, (num, dims) of an embedding."""
    if isinstance(module, SWITCH_TYPES):
        return switch_dims(module)[1:]
    rows, cols = weight_shape(module)
    return (rows, cols) if embedding else (cols, rows)


def _display(record: AdapterRecord, name: str, embedding: bool) -> str:
    """A tensor's name as the record's file writes it (PEFT's keys for PEFT/mlxlora folders)."""
    if record.format in ("peft", "mlxlora"):
        try:
            return peft.peft_key(name, record.model_type, embedding)
        except AdapterError:
            return name
    return name


def attach(model: nn.Module, record: AdapterRecord) -> nn.Module:
    """Wrap a bare base `model` with `record`'s config and load its tensors (bit-exact, their own dtype).

    Raises AdapterError (see `fit`) and leaves the model unwrapped then.
    """
    if adapter_layers(model):
        raise AdapterError(f"load_adapter({record.source}): the model already has adapters; load into a fresh base model")
    _check_tying(model, record)
    fit(model, record)
    try:
        get_lora_model(model, record.config)
    except ConfigError as e:
        raise AdapterError(f"{record.path / CONFIG_FILE if record.path else 'adapter'}: {e}") from None
    model.load_weights(list(record.tensors().items()), strict=False)
    return model


def _check_tying(model, record: AdapterRecord) -> None:
    # PEFT adapts a tied output head only with ensure_weight_tying; mlxlora's LoRAEmbedding always does.
    if record.format != "peft" or not record.embeddings or not ties_head(model):
        return
    if not (record.source_config or {}).get("ensure_weight_tying"):
        raise AdapterError(f"{record.path / CONFIG_FILE}: ensure_weight_tying is false but "
                           f"{sorted(record.embeddings)[0]} is tied to the output head; PEFT adapts only the input "
                           "side there, mlxlora both, so outputs would differ")


# ---------------------------------------------------------------- the API

def load_adapter(model: nn.Module, adapter_dir, *, base_info: dict | None = None,
                 ignore_base_mismatch: bool = False) -> nn.Module:
    """Wrap `model` (a plain mlx-lm base) with the adapter in `adapter_dir` and load its tensors.

    Reads PEFT folders, ours and mlx-lm's (adapters.safetensors), or a hub id of any of them; tensors
    are loaded bit-exact in their saved dtype. Raises AdapterError (one line) for a missing/corrupt
    file, an unsupported PEFT variant, or tensors that do not fit the model (every one listed at once);
    the model is left unwrapped then. base_info (models.describe_base, taken before wrapping): refuse an
    mlxlora adapter whose recorded base fingerprint differs, unless ignore_base_mismatch.
    """
    if adapter_layers(model):
        raise AdapterError(f"load_adapter({adapter_dir}): the model already has adapters; load into a fresh base model")
    record = read_adapter(adapter_dir)
    check_base(record, base_info, ignore_base_mismatch)
    return attach(model, record)


def load_adapter_weights(model: nn.Module, adapter_dir, *, base_info: dict | None = None,
                         ignore_base_mismatch: bool = False) -> nn.Module:
    """Load an adapter folder's tensors into a model that already has matching adapter layers (resume).

    Same checks as load_adapter; the model's LoraConfig and layers are kept. Raises AdapterError.
    """
    if not adapter_layers(model):
        raise AdapterError(f"load_adapter_weights({adapter_dir}): the model has no adapters; use load_adapter")
    record = read_adapter(adapter_dir)
    check_base(record, base_info, ignore_base_mismatch)
    record.config = model.lora_config  # the layers are the model's: check the file against them
    wrapped = record_of(model)
    expected = wrapped.tensors()
    problems = [f"missing {n} {tuple(v.shape)}" for n, v in expected.items() if n not in record.tensors()]
    problems += [f"{n} is {tuple(v.shape)}, the model needs {tuple(expected[n].shape)}"
                 for n, v in record.tensors().items() if n in expected and v.shape != expected[n].shape]
    problems += [f"unexpected {n} {tuple(v.shape)}" for n, v in record.tensors().items() if n not in expected]
    if problems:
        raise AdapterError(f"{record.weights} does not fit this model ({len(problems)} problem(s)): " + "; ".join(problems))
    model.load_weights(list(record.tensors().items()), strict=False)
    return model


def read_adapter_config(adapter_dir, model_type: str | None = None) -> LoraConfig:
    """The LoraConfig of an adapter folder: mlxlora.json's exact copy if present, else from PEFT's config."""
    d = Path(adapter_dir)
    if (d / RECORD_FILE).is_file():
        return mlxlora_format.record_config(mlxlora_format.read_record(d), d / RECORD_FILE)
    try:
        return peft.lora_config_from_peft(read_json(d / CONFIG_FILE), model_type)
    except AdapterError as e:
        raise AdapterError(f"{d / CONFIG_FILE}: {e}") from None


def save_adapter(model: nn.Module, out_dir, *, base_model: str, extra: dict | None = None,
                 force: bool = False) -> Path:
    """Write the adapters of `model` (wrapped by get_lora_model) to `out_dir`: PEFT's files + mlxlora.json.

    base_model: written as PEFT's base_model_name_or_path. extra: more top-level keys for mlxlora.json.
    Tensors keep their dtype (float32 normally). Raises AdapterError if the model has no adapters, or
    `out_dir` already holds files and `force` is False.
    """
    return write_adapter(record_of(model, base_model=base_model, meta=extra), out_dir, "mlxlora", force=force)


def save_record(record: AdapterRecord, model: nn.Module, out_dir, *, base_model: str | None = None,
                extra: dict | None = None, force: bool = False) -> Path:
    """Write an in-memory record (a merge) as an mlxlora folder, naming PEFT's targets from `model`."""
    fit(model, record)
    record.base_model = base_model or record.base_model
    record.model_type = record.model_type or model_type_of(model)
    record.meta = {**record.meta, **(extra or {})}
    return write_adapter(name_for_peft(record, model), out_dir, "mlxlora", force=force)


def export_adapter(adapter, out, to: str, *, model: str | None = None, force: bool = False,
                   dtype: str = "float32") -> Path:
    """Write an adapter (any format, or a hub id) as `to` = "mlx-lm" | "peft" (folders) or "gguf" (a llama.cpp
    LoRA file, `dtype` float32 or float16). model: the base (folder, .gguf or hub id), needed for gguf head
    counts and tying, and for an mlx-lm adapter to peft (PEFT's target names come from the model).
    Raises AdapterError / ModelError.
    """
    check_disjoint(out, {"DIR": adapter, "--model": model}, flag="OUT", error=AdapterError)
    if to == "mlx-lm":
        return write_adapter(read_adapter(adapter), out, "mlx-lm", force=force, flag="OUT")
    if to == "gguf":
        return gguf_lora.write(read_adapter(adapter), out, _gguf_base_info(model, adapter), force=force, dtype=dtype)
    if to != "peft":
        raise AdapterError(f"--to {to!r}: choose mlx-lm, peft or gguf")
    path, fmt = resolve_adapter(adapter)
    if model is None:
        if fmt == "mlx-lm":
            raise AdapterError(f"{path} is an mlx-lm adapter: give --model (its base model) so PEFT's target "
                               "modules can be named")
        read_adapter(path)  # checks the tensors (NaN, infinity) before copying them
        with atomic_folder(out, force=force, flag="OUT") as tmp:  # PEFT's own files, as they are
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(path / name, tmp / name)
        return Path(out)
    base = load_base(model)
    load_adapter(base.model, path)
    return save_adapter(base.model, out, base_model=model, force=force,
                        extra={"converted_from": {"format": fmt, "path": str(path)}})


def export_mlx_lm(adapter, out, force: bool = False) -> Path:
    """export_adapter(..., "mlx-lm"): a folder `mlx_lm.load(adapter_path=...)` and `mlx_lm generate` read."""
    return export_adapter(adapter, out, "mlx-lm", force=force)


def export_peft(adapter, out, model: str | None = None, force: bool = False) -> Path:
    """export_adapter(..., "peft"): a folder `peft.PeftModel.from_pretrained` reads."""
    return export_adapter(adapter, out, "peft", model=model, force=force)


def export_gguf_lora(adapter, out, model_dir=None, force: bool = False, dtype: str = "float32") -> Path:
    """export_adapter(..., "gguf"): a llama.cpp LoRA file (`llama-cli --lora`)."""
    return export_adapter(adapter, out, "gguf", model=model_dir, force=force, dtype=dtype)


def _gguf_base_info(model: str | None, adapter) -> gguf_lora.BaseInfo:
    if model is not None and str(model).lower().endswith(".gguf"):
        return gguf_lora.base_info_from_gguf(Path(model))
    if model is None:
        return gguf_lora.base_info_for(read_adapter(adapter).model_type)
    return gguf_lora.base_info_from_folder(resolve_model_path(str(model)))


def check_base(record: AdapterRecord, base_info: dict | None, ignore: bool = False) -> None:
    """Refuse (AdapterError) an mlxlora adapter whose run_record.base_fingerprint differs from base_info's."""
    if base_info is None or ignore or record.format != "mlxlora":
        return
    rec = record.meta.get("run_record") or {}
    want = rec.get("base_fingerprint")
    if want and want != base_info.get("fingerprint"):
        diffs = base_differences(rec, base_info)
        raise AdapterError(f"{record.path / RECORD_FILE}: trained on a different base ({rec.get('base_model')}, "
                           f"fingerprint {want}; this one is {base_info.get('fingerprint')}): the shape check failed, "
                           "recorded vs this base: " + "; ".join(diffs) + "; load the base it was trained on, or pass "
                           "--ignore-base-mismatch to load it anyway")
    content, have = rec.get("base_content"), base_info.get("content")
    if content and have and content != have:  # records older than the content check have none
        raise AdapterError(f"{record.path / RECORD_FILE}: trained on a different base ({rec.get('base_model')}): "
                           f"the shapes match but the weight check failed (sampled weight values hash {content}, "
                           f"this base's {have}: another checkpoint of the same architecture); load the base it "
                           "was trained on, or pass --ignore-base-mismatch to load it anyway")


__all__ = ["save_adapter", "load_adapter", "load_adapter_weights", "read_adapter_config", "record_of", "attach",
           "fit", "save_record", "export_adapter", "export_mlx_lm", "export_peft", "export_gguf_lora", "check_base", "model_type_of", "ties_head", "name_for_peft",
           "CONFIG_FILE", "WEIGHTS_FILE", "RECORD_FILE", "FORMAT_VERSION", "MLX_LM_WEIGHTS"]
