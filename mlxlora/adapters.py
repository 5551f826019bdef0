"""Save and load adapter folders in PEFT's format.

A folder holds:
    adapter_config.json         PEFT's LoraConfig (peft.PeftModel.from_pretrained reads it)
    adapter_model.safetensors   PEFT's tensor names and orientation (see convert/peft.py)
    mlxlora.json                our record: the exact LoraConfig, adapted module paths, format
                                version, and whatever the caller adds (train config, run, base fingerprint)

Folders are written into a temporary sibling and renamed into place, so a crash never
leaves a half-written adapter, and an existing one is only replaced with force.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import LoraConfig
from .convert.peft import (from_peft_state, layers_pattern_of, lora_config_from_peft, peft_config_dict,
                           peft_key, to_peft_state)
from .convert.names import mlx_to_hf
from .errors import AdapterError, ConfigError
from .layers import LoRAEmbedding
from .surgery import adapter_layers, adapter_parameters, get_lora_model, num_blocks, unwrap

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RECORD_FILE = "mlxlora.json"
_HEADS = ("lm_head",)


def model_type_of(model: nn.Module) -> str | None:
    """The mlx-lm `model_type` of a model (e.g. "llama"), or None."""
    return getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)


# ---------------------------------------------------------------- saving

def save_adapter(model: nn.Module, out_dir, *, base_model: str, extra: dict | None = None,
                 force: bool = False) -> Path:
    """Write the adapters of `model` (wrapped by get_lora_model) to `out_dir` in PEFT's format.

    base_model: written as PEFT's base_model_name_or_path. extra: more top-level keys for
    mlxlora.json. Tensors keep their dtype (float32 normally). Raises AdapterError if the model
    has no adapters, or `out_dir` already holds files and `force` is False.
    """
    layers = adapter_layers(model)
    config = getattr(model, "lora_config", None)
    if not layers or config is None:
        raise AdapterError("save_adapter: the model has no adapters; wrap it with get_lora_model first")
    model_type = model_type_of(model)
    paths = [p for p, _ in layers]
    embeddings = {p for p, m in layers if isinstance(m, LoRAEmbedding)}
    hf_paths = [mlx_to_hf(p, model_type) for p in paths]
    pattern = layers_pattern_of(hf_paths)
    layers_idx = _layer_indices(config, model)
    tied = bool(embeddings) and _ties_head(model)
    peft_cfg = peft_config_dict(
        config, base_model, _peft_targets(model, paths, layers_idx, pattern, model_type),
        model_type=model_type, num_blocks=num_blocks(model), layers_pattern=pattern,
        tie_embedding_adapters=tied)
    record = {"format_version": FORMAT_VERSION, "lora_config": config.to_dict(), "adapted_modules": paths,
              "model_type": model_type, "base_model": base_model}
    clash = sorted(set(record) & set(extra or {}))
    if clash:
        raise AdapterError(f"save_adapter: extra may not set {', '.join(clash)} (mlxlora.json's own keys)")
    record.update(extra or {})
    tensors = to_peft_state(adapter_parameters(model), model_type, embeddings, "lm_head" if tied else None)
    with atomic_folder(out_dir, force=force) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), tensors, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return Path(out_dir)


@contextmanager
def atomic_folder(out_dir, *, force: bool = False, error=AdapterError):
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` by rename.

    Raises `error` (naming the folder and --force) if `out_dir` holds files and not `force`.
    On any failure the temporary folder is removed and `out_dir` is left as it was.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise error(f"{out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise error(f"{out} already holds files; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # contents on disk before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = out.parent / f".{out.name}.old-{tag}"
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _layer_indices(config: LoraConfig, model) -> list[int] | None:
    if config.last_n_layers is not None:
        n = num_blocks(model)
        return list(range(max(0, n - config.last_n_layers), n))
    return config.layers_to_transform


def _candidate_paths(model) -> list[str]:
    """Module paths PEFT would see: adapter layers count as their base, their insides do not exist."""
    inner = [p + "." for p, _ in adapter_layers(model)]
    return [p for p, _ in model.named_modules() if p and not any(p.startswith(i) for i in inner)]


def _peft_targets(model, paths: list[str], layers: list[int] | None, pattern: str | None,
                  model_type: str | None) -> list[str]:
    """Short names ("q_proj") when PEFT's matcher selects exactly `paths` with them, else full HF paths."""
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

    chosen = {p for p in _candidate_paths(model) if selected(mlx_to_hf(p, model_type))}
    if chosen == set(paths):
        return short
    return sorted(mlx_to_hf(p, model_type) for p in paths)


def _ties_head(model) -> bool:
    """True when the output head is the input embedding (no separate lm_head module)."""
    return not any(p.split(".")[-1] in _HEADS for p, _ in model.named_modules())


# ---------------------------------------------------------------- loading

def read_adapter_config(adapter_dir, model_type: str | None = None) -> LoraConfig:
    """The LoraConfig of an adapter folder: mlxlora.json's exact copy if present, else from PEFT's config."""
    d = _check_folder(adapter_dir, [CONFIG_FILE])
    peft_cfg = _read_json(d / CONFIG_FILE)
    if (d / RECORD_FILE).is_file():
        record = _read_json(d / RECORD_FILE)
        try:
            return LoraConfig.from_dict(record["lora_config"])
        except (KeyError, TypeError, ConfigError) as e:
            raise AdapterError(f"{d / RECORD_FILE}: bad lora_config ({e})") from None
    try:
        return lora_config_from_peft(peft_cfg, model_type)
    except AdapterError as e:
        raise AdapterError(f"{d / CONFIG_FILE}: {e}") from None


def load_adapter(model: nn.Module, adapter_dir, *, base_info: dict | None = None,
                 ignore_base_mismatch: bool = False) -> nn.Module:
    """Wrap `model` (a plain mlx-lm base) with the adapter in `adapter_dir` and load its tensors.

    Reads PEFT folders, ours and mlx-lm's (adapters.safetensors), or a hub id of any of them (see
    mlxlora/detect.py); tensors are loaded bit-exact in their saved dtype. Raises
    AdapterError (one line) for a missing/corrupt file, an unsupported PEFT variant, or tensors
    that do not fit the model (every missing, unexpected and mis-shaped tensor listed at once);
    the model is left unwrapped then. base_info (see `describe_base`, taken before wrapping): refuse an
    mlxlora adapter whose recorded base fingerprint differs, unless ignore_base_mismatch.
    """
    from .detect import resolve_adapter

    adapter_dir, fmt = resolve_adapter(adapter_dir)
    if fmt == "mlx-lm":
        from .convert.mlx_lm import load_mlx_lm_adapter

        return load_mlx_lm_adapter(model, adapter_dir)
    d = _check_folder(adapter_dir, [CONFIG_FILE, WEIGHTS_FILE])
    if adapter_layers(model):
        raise AdapterError(f"load_adapter({d}): the model already has adapters; load into a fresh base model")
    check_base(d, base_info, ignore_base_mismatch)
    model_type = model_type_of(model)
    config = read_adapter_config(d, model_type)
    peft_cfg = _read_json(d / CONFIG_FILE)
    tensors = _read_safetensors(d / WEIGHTS_FILE)
    try:
        get_lora_model(model, config)
    except ConfigError as e:
        raise AdapterError(f"{d / CONFIG_FILE}: {e}") from None
    try:
        _check_tying(model, peft_cfg, has_record=(d / RECORD_FILE).is_file(), where=d / CONFIG_FILE)
        loaded = _match_tensors(model, tensors, model_type, d / WEIGHTS_FILE)
    except AdapterError:
        unwrap(model)
        del model.lora_config
        raise
    model.load_weights(list(loaded.items()), strict=False)
    return model


def load_adapter_weights(model: nn.Module, adapter_dir, *, base_info: dict | None = None,
                         ignore_base_mismatch: bool = False) -> nn.Module:
    """Load an adapter folder's tensors into a model that already has matching adapter layers (resume).

    Same checks as load_adapter; the model's LoraConfig and layers are kept. Raises AdapterError.
    """
    d = _check_folder(adapter_dir, [WEIGHTS_FILE])
    check_base(d, base_info, ignore_base_mismatch)
    if not adapter_layers(model):
        raise AdapterError(f"load_adapter_weights({d}): the model has no adapters; use load_adapter")
    loaded = _match_tensors(model, _read_safetensors(d / WEIGHTS_FILE), model_type_of(model), d / WEIGHTS_FILE)
    model.load_weights(list(loaded.items()), strict=False)
    return model


def _check_tying(model, peft_cfg: dict, has_record: bool, where: Path) -> None:
    # PEFT adapts a tied output head only with ensure_weight_tying; mlxlora's LoRAEmbedding always does.
    embeddings = [p for p, m in adapter_layers(model) if isinstance(m, LoRAEmbedding)]
    if embeddings and _ties_head(model) and not has_record and not peft_cfg.get("ensure_weight_tying"):
        raise AdapterError(f"{where}: ensure_weight_tying is false but {embeddings[0]} is tied to the output head; "
                           "PEFT adapts only the input side there, mlxlora both, so outputs would differ")


def _match_tensors(model, tensors: dict, model_type, where: Path) -> dict[str, mx.array]:
    """The file's tensors under our names, after checking every one against the model."""
    layers = dict(adapter_layers(model))
    expected = adapter_parameters(model)
    loaded, leftover = from_peft_state(tensors, model_type)
    problems = []
    for name, want in expected.items():
        path = name.rpartition(".")[0]
        key = peft_key(name, model_type, isinstance(layers[path], LoRAEmbedding))
        if name not in loaded:
            problems.append(f"missing {key} {tuple(want.shape)}")
        elif loaded[name].shape != want.shape:
            problems.append(f"{key} is {tuple(loaded[name].shape)}, the model needs {tuple(want.shape)}")
    tied = _tied_head_copies(model, loaded)
    for name in sorted(set(loaded) - set(expected) - tied):
        problems.append(f"unexpected {name} {tuple(loaded[name].shape)}")
    for key in leftover:
        if not _is_saved_base(key, tensors[key], layers, model_type, _ties_head(model)):
            problems.append(f"unexpected {key} {tuple(tensors[key].shape)}")
    if problems:
        raise AdapterError(f"{where} does not fit this base model ({len(problems)} problem(s)): " + "; ".join(problems))
    return {k: v for k, v in loaded.items() if k in expected}


def _tied_head_copies(model, loaded: dict) -> set[str]:
    """PEFT's copies of a tied head adapter (`lm_head.lora_a/b`), when they equal the embedding adapter's."""
    if not _ties_head(model):
        return set()
    emb = [p for p, m in adapter_layers(model) if isinstance(m, LoRAEmbedding)]
    out = set()
    for head in {n.rpartition(".")[0] for n in loaded if n.rpartition(".")[0].split(".")[-1] in _HEADS}:
        a, b = loaded.get(f"{head}.lora_a"), loaded.get(f"{head}.lora_b")
        for e in emb:
            ea, eb = loaded.get(f"{e}.lora_a"), loaded.get(f"{e}.lora_b")
            if all(x is not None for x in (a, b, ea, eb)) and a.shape == eb.T.shape and b.shape == ea.T.shape \
                    and mx.array_equal(a, eb.T).item() and mx.array_equal(b, ea.T).item():
                out |= {f"{head}.lora_a", f"{head}.lora_b"}
    return out


def _is_saved_base(key: str, value, layers: dict, model_type, tied: bool) -> bool:
    """PEFT saves the base weight beside embedding adapters (`<path>.base_layer.weight`); accept it if it fits."""
    if not key.endswith(".base_layer.weight"):
        return False
    hf_path = key[len("base_model.model."):-len(".base_layer.weight")]
    for path, layer in layers.items():
        if isinstance(layer, LoRAEmbedding) and mlx_to_hf(path, model_type) == hf_path:
            return tuple(value.shape) == (layer.lora_a.shape[0], layer.lora_b.shape[1])
    # The head PEFT ties to an adapted embedding.
    return tied and hf_path.split(".")[-1] in _HEADS and any(isinstance(m, LoRAEmbedding) for m in layers.values())


# ---------------------------------------------------------------- base fingerprint

def base_shapes(model: nn.Module) -> dict[str, list]:
    """Base parameter shapes, adapters left out and block indices folded: {"model.layers.*.mlp.up_proj.weight":
    [[128, 64], 2], ...} (name -> [shape, how many]). Works on a wrapped or a plain model."""
    from mlx.utils import tree_flatten

    groups: dict[str, list] = {}
    for name, arr in tree_flatten(model.parameters()):
        if ".lora_" in name or name.endswith(".m"):  # as models.fingerprint: adapter tensors are not the base
            continue
        name = name.replace(".linear.", ".").replace(".embedding.", ".")
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append((name, list(arr.shape)))
    out = {}
    for key, items in groups.items():
        if all(shape == items[0][1] for _, shape in items):
            out[key] = [items[0][1], len(items)]
        else:  # blocks of different shapes: keep each one by name
            out.update({name: [shape, 1] for name, shape in items})
    return out


def describe_base(model: nn.Module, config: dict, fingerprint: str | None = None) -> dict:
    """What an adapter's run record says about its base, for `check_base`: fingerprint, model_type,
    quantization and `base_shapes`. Take it before wrapping (or pass the fingerprint load_base computed)."""
    from .models import fingerprint as fp

    return {"fingerprint": fingerprint or fp(model, config), "model_type": config.get("model_type"),
            "quantization": config.get("quantization"), "shapes": base_shapes(model)}


def _quant_text(q) -> str:
    return f"{q.get('bits')}-bit (group size {q.get('group_size')})" if q else "not quantized"


def _shape_text(entry) -> str:
    return "absent" if entry is None else f"{tuple(entry[0])}" + (f" x{entry[1]}" if entry[1] > 1 else "")


def base_differences(recorded: dict, base: dict) -> list[str]:
    """What differs between the base an adapter was trained on (its run_record) and `base` (describe_base)."""
    if recorded.get("base_model_type") != base.get("model_type"):
        return [f"model_type {recorded.get('base_model_type')} vs {base.get('model_type')}"]
    rq, bq = recorded.get("base_quantization") or None, base.get("quantization") or None
    if (rq or {}).get("bits") != (bq or {}).get("bits") or (rq or {}).get("group_size") != (bq or {}).get("group_size"):
        fix = f" (load it with --quantize {rq.get('bits')})" if rq and not bq else ""
        return [f"quantization {_quant_text(rq)} vs {_quant_text(bq)}{fix}"]
    want, have = recorded.get("base_shapes"), base.get("shapes") or {}
    if not want:
        return ["parameter names/shapes (this adapter records no shape list)"]
    out = []
    for key in sorted(set(want) | set(have)):
        a, b = want.get(key), have.get(key)
        if a != b:
            out.append(f"{key} {_shape_text(a)} vs {_shape_text(b)}")
    return out or ["parameter names/shapes"]


def check_base(adapter_dir: Path, base_info: dict | None, ignore: bool = False) -> None:
    """Refuse (AdapterError) an mlxlora adapter whose run_record.base_fingerprint differs from base_info's."""
    if base_info is None or ignore or not (adapter_dir / RECORD_FILE).is_file():
        return
    rec = _read_json(adapter_dir / RECORD_FILE).get("run_record") or {}
    want = rec.get("base_fingerprint")
    if not want or want == base_info.get("fingerprint"):
        return
    diffs = base_differences(rec, base_info)
    raise AdapterError(f"{adapter_dir / RECORD_FILE}: trained on a different base ({rec.get('base_model')}, fingerprint "
                       f"{want}; this one is {base_info.get('fingerprint')}): recorded vs this base: " + "; ".join(diffs)
                       + "; load the base it was trained on, or pass --ignore-base-mismatch to load it anyway")


# ---------------------------------------------------------------- files

def _check_folder(adapter_dir, files: list[str]) -> Path:
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterError(f"adapter folder {d} does not exist (give the folder that holds {files[0]})")
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        hint = ""
        if WEIGHTS_FILE in missing and (d / "adapter_model.bin").is_file():
            hint = " (PEFT's older .bin format: re-save it with safe_serialization=True)"
        elif WEIGHTS_FILE in missing and (d / "adapters.safetensors").is_file():
            hint = " (this is an mlx-lm adapter folder, not PEFT's format)"
        raise AdapterError(f"{d}: missing {', '.join(missing)}{hint}")
    return d


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    """All tensors of a safetensors file; a truncated or corrupt file is an AdapterError naming it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("header larger than the file")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) > size:
            raise ValueError(f"truncated: {size} bytes, the header needs {8 + n + max(ends)}")
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError; the header may be anything
        raise AdapterError(f"{path}: not a readable safetensors file ({e}); re-save or re-download it") from None


__all__ = ["save_adapter", "load_adapter", "load_adapter_weights", "read_adapter_config", "atomic_folder", "model_type_of",
           "describe_base", "base_shapes", "check_base",
           "CONFIG_FILE", "WEIGHTS_FILE", "RECORD_FILE", "FORMAT_VERSION"]
