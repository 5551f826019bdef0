"""mlx-lm's adapter folders <-> mlxlora adapters; model conversion through mlx-lm.

mlx-lm (mlx_lm.lora trains, mlx_lm.tuner.utils.load_adapters loads) keeps:
    adapter_config.json   fine_tune_type "lora" | "dora" | "full", num_layers (the last N blocks, -1 all),
                          lora_parameters {rank, scale, dropout, keys}
    adapters.safetensors  <module path>.lora_a (in, r), .lora_b (r, out), DoRA .m (out,)
`keys` are module paths relative to a block ("self_attn.q_proj"), adapted in the last `num_layers`
blocks, or full module paths ("model.embed_tokens", "lm_head", "model.layers.0.mlp.down_proj"),
adapted wherever they are. Tensor names and layouts are ours already, so only the config is
translated. mlx-lm's `scale` is the multiplier itself: ours is r and lora_alpha = scale * r.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..config import ALL_LINEAR, LoraConfig
from ..errors import AdapterError, ConfigError, ModelError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
TENSORS = ("lora_a", "lora_b", "m")
# `<prefix>layers.<i>.<key>`: a module inside block i (mlx-lm walks `model.layers`)
_IN_BLOCK = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<idx>\d+)\.(?P<key>.+)$")


# ---------------------------------------------------------------- import

def read_mlx_lm_config(folder) -> dict:
    from ..adapters import _read_json

    return _read_json(Path(folder) / CONFIG_FILE)


def import_mlx_lm(folder) -> tuple[LoraConfig, dict[str, mx.array]]:
    """(LoraConfig, {`<path>.lora_a|lora_b|m`: array}) of an mlx-lm adapter folder.

    The adapted modules, their ranks and DoRA come from the tensors (`.m` present means DoRA even
    when fine_tune_type says "lora" or is missing, as mlx-lm-lora / mlx-tune write); scale and
    dropout from lora_parameters. Layers of another rank get a rank_pattern entry. Raises
    AdapterError for full fine-tunes, MoE (SwitchLinear) adapters and incomplete tensor pairs.
    """
    from ..adapters import _read_safetensors

    d = Path(folder)
    cfg = read_mlx_lm_config(d)
    where = d / CONFIG_FILE
    kind = cfg.get("fine_tune_type", "lora")
    if kind == "full":
        raise AdapterError(f"{where}: fine_tune_type 'full' holds whole weights, not an adapter; make a model "
                           f"of it with `mlx_lm fuse --model BASE --adapter-path {d} --save-path OUT`")
    if kind not in ("lora", "dora"):
        raise AdapterError(f"{where}: fine_tune_type {kind!r} is not supported (lora, dora)")
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict) or not isinstance(params.get("scale"), (int, float)):
        hint = " (mlx-lm reads 'scale', the multiplier, not 'alpha')" if isinstance(params, dict) and "alpha" in params else ""
        raise AdapterError(f"{where}: lora_parameters.scale is missing{hint}")
    tensors = _read_safetensors(d / WEIGHTS_FILE)
    ranks = _check_tensors(tensors, d / WEIGHTS_FILE)
    r = Counter(ranks.values()).most_common(1)[0][0]
    scale = float(params["scale"])
    odd = {re.escape(p): k for p, k in ranks.items() if k != r}
    targets, last_n = _targets(list(ranks), params.get("keys"), cfg.get("num_layers", -1))
    try:
        config = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=float(params.get("dropout", 0.0)),
                            target_modules=targets, last_n_layers=last_n, rank_pattern=odd,
                            alpha_pattern={p: scale * k for p, k in odd.items()},
                            use_dora=kind == "dora" or any(n.endswith(".m") for n in tensors))
    except ConfigError as e:
        raise AdapterError(f"{where}: {e}") from None
    return config, tensors


def _check_tensors(tensors: dict, where: Path) -> dict[str, int]:
    """{module path: rank}; every name must be a LoRA tensor and every module must have lora_a and lora_b."""
    problems, paths = [], {}
    for name, value in tensors.items():
        path, _, kind = name.rpartition(".")
        if kind not in TENSORS:
            problems.append(f"{name} is no lora_a/lora_b/m tensor")
        elif kind != "m" and value.ndim != 2:
            problems.append(f"{name} is {tuple(value.shape)}: per-expert (SwitchLinear) adapters are not supported")
        else:
            paths.setdefault(path, set()).add(kind)
    for path, kinds in paths.items():
        problems += [f"missing {path}.{k}" for k in ("lora_a", "lora_b") if k not in kinds]
    if not problems:
        ranks = {p: tensors[f"{p}.lora_a"].shape[1] for p in paths}
        problems = [f"{p}.lora_b is {tuple(tensors[f'{p}.lora_b'].shape)}, rank {k} from lora_a"
                    for p, k in ranks.items() if tensors[f"{p}.lora_b"].shape[0] != k]
    if problems:
        raise AdapterError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems))
    if not paths:
        raise AdapterError(f"{where}: holds no adapter tensors")
    return ranks


def _split(paths: list[str]) -> tuple[dict[int, set[str]], list[str]]:
    """({block index: keys relative to the block}, [paths outside blocks])."""
    blocks, top = {}, []
    for p in paths:
        m = _IN_BLOCK.match(p)
        if m:
            blocks.setdefault(int(m["idx"]), set()).add(m["key"])
        else:
            top.append(p)
    return blocks, top


def _targets(paths: list[str], keys, num_layers) -> tuple[list[str], int | None]:
    """Our (target_modules, last_n_layers) selecting exactly `paths`.

    When mlx-lm chose them by block-relative keys (`keys`, or all when None) in the last `num_layers`
    blocks, and the tensors agree (the same keys in blocks lo..hi): the keys, and last_n_layers =
    hi-lo+1 (None when lo is 0: all blocks). Otherwise the full module paths.
    """
    blocks, top = _split(paths)
    if blocks and len({frozenset(k) for k in blocks.values()}) == 1:
        lo, hi = min(blocks), max(blocks)
        relative = sorted(blocks[lo])
        chosen_by_key = keys is None or all(k in keys for k in relative)
        n = hi - lo + 1
        suffix = isinstance(num_layers, int) and sorted(blocks) == list(range(lo, hi + 1)) and (
            num_layers == n or (lo == 0 and (num_layers <= 0 or num_layers >= n)))
        if chosen_by_key and suffix and (lo == 0 or not top):
            return relative + sorted(top), None if lo == 0 else n
    return sorted(paths), None


def load_mlx_lm_adapter(model: nn.Module, folder) -> nn.Module:
    """Wrap `model` with the mlx-lm adapter in `folder` and load its tensors (load_adapter routes here).

    Every missing, unexpected and mis-shaped tensor is listed at once; the model is left unwrapped then.
    A DoRA layer without `.m` keeps ||W|| per row, as mlx-lm does.
    """
    from ..surgery import adapter_layers, adapter_parameters, get_lora_model, unwrap

    d = Path(folder)
    if adapter_layers(model):
        raise AdapterError(f"load_adapter({d}): the model already has adapters; load into a fresh base model")
    config, tensors = import_mlx_lm(d)
    try:
        get_lora_model(model, config)
    except ConfigError as e:
        raise AdapterError(f"{d / CONFIG_FILE}: {e}") from None
    expected = adapter_parameters(model)
    problems = [f"missing {n} {tuple(v.shape)}" for n, v in expected.items()
                if n not in tensors and not n.endswith(".m")]
    problems += [f"{n} is {tuple(tensors[n].shape)}, the model needs {tuple(v.shape)}"
                 for n, v in expected.items() if n in tensors and tensors[n].shape != v.shape]
    problems += [f"unexpected {n} {tuple(v.shape)}" for n, v in tensors.items() if n not in expected]
    if problems:
        unwrap(model)
        del model.lora_config
        raise AdapterError(f"{d / WEIGHTS_FILE} does not fit this base model ({len(problems)} problem(s)): "
                           + "; ".join(problems))
    model.load_weights(list(tensors.items()), strict=False)
    return model


# ---------------------------------------------------------------- export

def export_mlx_lm(adapter_dir, out_dir, force: bool = False) -> Path:
    """Write an adapter (mlxlora / PEFT / mlx-lm folder or hub id) as an mlx-lm adapter folder.

    `mlx_lm.load(model, adapter_path=out_dir)` and `mlx_lm generate --adapter-path` then compute what
    mlxlora computes. mlx-lm has one rank and one scale per adapter: layers of a smaller rank are
    padded with zero rows/columns (the same product), and a layer whose scale differs has the ratio
    folded into its lora_b. Raises AdapterError (DoRA on an embedding, an existing `out_dir` without
    `force`, unreadable input).
    """
    from ..adapters import atomic_folder
    from ..detect import read_adapter

    src = read_adapter(adapter_dir)
    cfg, paths = src.config, src.module_paths
    if cfg.use_dora and src.embeddings:
        raise AdapterError(f"{src.path}: DoRA on an embedding ({sorted(src.embeddings)[0]}) has no mlx-lm form here")
    ranks = {p: src.tensors[f"{p}.lora_a"].shape[1] for p in paths}
    scales = {p: cfg.scale_for(p) for p in paths}
    rank = max(ranks.values())
    scale = Counter(scales.values()).most_common(1)[0][0]
    tensors = {}
    for p in paths:
        a, b = src.tensors[f"{p}.lora_a"], src.tensors[f"{p}.lora_b"]
        pad = rank - ranks[p]
        if pad:  # zero columns of A meet zero rows of B: the product is unchanged
            a = mx.concatenate([a, mx.zeros((a.shape[0], pad), a.dtype)], axis=1)
            b = mx.concatenate([b, mx.zeros((pad, b.shape[1]), b.dtype)], axis=0)
        if scales[p] != scale:
            b = (b.astype(mx.float32) * (scales[p] / scale)).astype(b.dtype)
        tensors[f"{p}.lora_a"], tensors[f"{p}.lora_b"] = a, b
        if f"{p}.m" in src.tensors:
            tensors[f"{p}.m"] = src.tensors[f"{p}.m"]
    keys, num_layers = mlx_lm_keys(paths, cfg)
    config = {"fine_tune_type": "dora" if cfg.use_dora else "lora", "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": cfg.lora_dropout, "keys": keys}}
    if src.base_model:
        config["model"] = src.base_model
    with atomic_folder(out_dir, force=force) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), tensors, metadata={"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n")
    return Path(out_dir)


def mlx_lm_keys(paths: list[str], cfg: LoraConfig) -> tuple[list[str], int]:
    """mlx-lm's (keys, num_layers) adapting exactly `paths`.

    Block-relative keys with num_layers when the config selects by name (block-independent targets)
    over all blocks (-1) or the last N (`last_n_layers`) and every adapted block has the same keys;
    otherwise full module paths, which mlx-lm adapts wherever they are (num_layers is then unused).
    """
    blocks, top = _split(paths)
    targets = cfg.target_modules
    by_name = targets == ALL_LINEAR or (isinstance(targets, list) and not any(_IN_BLOCK.match(t) for t in targets))
    if blocks and by_name and cfg.layers_to_transform is None and len({frozenset(k) for k in blocks.values()}) == 1:
        idx = sorted(blocks)
        lo, hi = idx[0], idx[-1]
        contiguous = idx == list(range(lo, hi + 1))
        keys = sorted(blocks[lo]) + sorted(top)
        if contiguous and cfg.last_n_layers is None and lo == 0:
            return keys, -1
        if contiguous and cfg.last_n_layers is not None and (hi - lo + 1 == cfg.last_n_layers or lo == 0):
            return keys, cfg.last_n_layers
    return sorted(paths), -1


# ---------------------------------------------------------------- PEFT and models

def export_peft(adapter_dir, out_dir, model: str | None = None, force: bool = False) -> Path:
    """Write an adapter (any format) as a PEFT folder.

    With `model` (the base: folder, .gguf or hub id) the adapter is loaded onto it and saved with
    `save_adapter`, which names PEFT's target modules from the model; without it only a PEFT /
    mlxlora folder can be written (its PEFT files are copied). Raises AdapterError / ModelError.
    """
    from ..adapters import atomic_folder, load_adapter, save_adapter
    from ..adapters import CONFIG_FILE as PEFT_CONFIG, WEIGHTS_FILE as PEFT_WEIGHTS
    from ..detect import resolve_adapter

    path, fmt = resolve_adapter(adapter_dir)
    if model is None:
        if fmt == "mlx-lm":
            raise AdapterError(f"{path} is an mlx-lm adapter: give --model (its base model) so PEFT's target "
                               "modules can be named")
        with atomic_folder(out_dir, force=force) as tmp:
            for name in (PEFT_CONFIG, PEFT_WEIGHTS):
                shutil.copy2(path / name, tmp / name)
        return Path(out_dir)
    from ..models import load_base

    base = load_base(model)
    load_adapter(base.model, path)
    return save_adapter(base.model, out_dir, base_model=model, force=force,
                        extra={"converted_from": {"format": fmt, "path": str(path)}})


def convert_model(model: str, out_dir, quantize: int | None = None, q_group_size: int | None = None,
                  dtype: str | None = None, force: bool = False) -> Path:
    """An MLX model folder from a transformers folder / hub id (mlx-lm's convert) or a .gguf file.

    quantize: bits (2-8); q_group_size and dtype go to mlx-lm (its defaults when None). GGUF files go
    through `mlxlora.convert.gguf.convert_gguf` (group size 32, no dtype). Atomic; an existing
    non-empty `out_dir` is replaced only with `force`. Raises ModelError.
    """
    from ..adapters import atomic_folder

    if str(model).lower().endswith(".gguf"):
        given = [flag for flag, v in (("--q-group-size", q_group_size), ("--dtype", dtype)) if v is not None]
        if given:
            raise ModelError(f"{' and '.join(given)}: not used for a .gguf model (GGUF blocks are 32 wide, "
                             "weights keep their type); drop them")
        from .gguf import convert_gguf

        return Path(convert_gguf(model, out_dir, force=bool(force), quantize_bits=quantize))
    from mlx_lm.convert import convert

    from ..models import resolve_model_path

    src = resolve_model_path(str(model))
    if Path(out_dir).resolve() == src.resolve():
        raise ModelError(f"--out {out_dir} is the model folder itself; choose another folder")
    with atomic_folder(out_dir, force=force, error=ModelError) as tmp:
        try:
            convert(str(src), str(tmp / "model"), quantize=quantize is not None, q_bits=quantize,
                    q_group_size=q_group_size, dtype=dtype)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ModelError(f"--model {model}: mlx-lm could not convert it ({str(e).splitlines()[0]})") from None
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
    return Path(out_dir)


__all__ = ["import_mlx_lm", "load_mlx_lm_adapter", "export_mlx_lm", "mlx_lm_keys", "read_mlx_lm_config",
           "export_peft", "convert_model"]
