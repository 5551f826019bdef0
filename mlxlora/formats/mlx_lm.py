"""mlx-lm's adapter folders <-> AdapterRecord.

mlx-lm (mlx_lm.lora trains, mlx_lm.tuner.utils.load_adapters loads) keeps:
    adapter_config.json   fine_tune_type "lora" | "dora" | "full", num_layers (the last N blocks, -1 all),
                          lora_parameters {rank, scale, dropout, keys}
    adapters.safetensors  <module path>.lora_a (in, r), .lora_b (r, out), DoRA .m (out,);
                          MoE experts (LoRASwitchLinear): .lora_a (E, r, in), .lora_b (E, out, r)
`keys` are module paths relative to a block ("self_attn.q_proj"), adapted in the last `num_layers`
blocks, or full module paths ("model.embed_tokens", "lm_head", "model.layers.0.mlp.down_proj"),
adapted wherever they are. Tensor names and layouts are ours already except the experts' (ours:
lora_a (E, in, r), lora_b (E, r, out): the last two axes swap), so mostly the config is translated. mlx-lm's `scale` is the multiplier itself: ours is r and lora_alpha = scale * r.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import mlx.core as mx

from ..config import ALL_LINEAR, LoraConfig
from ..errors import AdapterError, ConfigError
from ..files import read_json, read_safetensors
from .names import EMBEDDING_NAMES
from .record import TENSORS, AdapterRecord

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
# `<prefix>layers.<i>.<key>`: a module inside block i (mlx-lm walks `model.layers`)
_IN_BLOCK = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<idx>\d+)\.(?P<key>.+)$")


# ---------------------------------------------------------------- import

def accepts(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read_mlx_lm_config(folder) -> dict:
    return read_json(Path(folder) / CONFIG_FILE)


def read(folder: Path) -> AdapterRecord:
    """An mlx-lm adapter folder as an AdapterRecord (DoRA layers may lack `m`: mlx-lm then keeps ||W||)."""
    folder = Path(folder)
    config, tensors = import_mlx_lm(folder)
    paths = {n.rpartition(".")[0] for n in tensors}
    embeddings = {p for p in paths if p.split(".")[-1] in EMBEDDING_NAMES}
    cfg = read_mlx_lm_config(folder)
    return AdapterRecord.from_tensors(config, tensors, embeddings, format="mlx-lm", path=folder,
                                      weights=folder / WEIGHTS_FILE, base_model=cfg.get("model"), source_config=cfg)


def import_mlx_lm(folder) -> tuple[LoraConfig, dict[str, mx.array]]:
    """(LoraConfig, {`<path>.lora_a|lora_b|m`: array}) of an mlx-lm adapter folder.

    The adapted modules, their ranks and DoRA come from the tensors (`.m` present means DoRA even
    when fine_tune_type says "lora" or is missing, as mlx-lm-lora / mlx-tune write); scale and
    dropout from lora_parameters. Layers of another rank get a rank_pattern entry. Raises
    AdapterError for full fine-tunes, MoE (SwitchLinear) adapters and incomplete tensor pairs.
    """
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
    tensors = read_safetensors(d / WEIGHTS_FILE)
    ranks = _check_tensors(tensors, d / WEIGHTS_FILE)
    tensors = {k: mx.contiguous(v.swapaxes(-1, -2)) if v.ndim == 3 else v for k, v in tensors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    if "rank" in params and params["rank"] != r and not any(k == params["rank"] for k in ranks.values()):
        raise AdapterError(f"{where}: lora_parameters.rank is {params['rank']!r} but the tensors in {WEIGHTS_FILE} "
                           f"are rank {r}; fix the config (mlx-lm would fail to load it)")
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
        elif kind != "m" and value.ndim not in (2, 3):
            problems.append(f"{name} is {tuple(value.shape)}: expected (in, r) / (r, out), or per expert (E, r, in) / (E, out, r)")
        else:
            paths.setdefault(path, set()).add(kind)
    for path, kinds in paths.items():
        problems += [f"missing {path}.{k}" for k in ("lora_a", "lora_b") if k not in kinds]
    if not problems:
        # lora_a (in, r) or (E, r, in): the rank is axis 1 either way; lora_b (r, out) or (E, out, r)
        ranks = {p: tensors[f"{p}.lora_a"].shape[1] for p in paths}
        a_b = {p: (tensors[f"{p}.lora_a"], tensors[f"{p}.lora_b"]) for p in paths}
        problems = [f"{p}.lora_a is {tuple(a.shape)} but lora_b {tuple(b.shape)}: one is per expert (SwitchLinear), "
                    "the other not" for p, (a, b) in a_b.items() if a.ndim != b.ndim]
        problems += [f"{p}.lora_b is {tuple(b.shape)}, rank {ranks[p]} from lora_a" for p, (a, b) in a_b.items()
                     if a.ndim == b.ndim and b.shape[0 if b.ndim == 2 else 2] != ranks[p]]
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


# ---------------------------------------------------------------- export

def write(record: AdapterRecord, folder: Path) -> None:
    """adapters.safetensors + adapter_config.json for `record` into `folder` (an empty staging folder).

    `mlx_lm.load(model, adapter_path=folder)` then computes what mlxlora computes. mlx-lm has one rank
    and one scale per adapter: layers of a smaller rank are padded with zero rows/columns (the same
    product), and a layer whose scale differs has the ratio folded into its lora_b. Raises AdapterError
    for DoRA on an embedding (no mlx-lm form).
    """
    cfg, paths = record.config, record.module_paths
    if cfg.use_dora and record.embeddings:
        raise AdapterError(f"{record.source}: DoRA on an embedding ({sorted(record.embeddings)[0]}) has no mlx-lm form here")
    rank = max(lora.rank for lora in record.layers.values())
    scale = Counter(lora.scale for lora in record.layers.values()).most_common(1)[0][0]
    tensors = {}
    for p in paths:
        lora = record.layers[p]
        a, b = lora.lora_a, lora.lora_b_for(scale)
        pad = rank - lora.rank
        if pad:  # zero columns of A meet zero rows of B: the product is unchanged
            a = mx.concatenate([a, mx.zeros((*a.shape[:-1], pad), a.dtype)], axis=-1)
            b = mx.concatenate([b, mx.zeros((*b.shape[:-2], pad, b.shape[-1]), b.dtype)], axis=-2)
        if lora.experts:  # mlx-lm's LoRASwitchLinear: lora_a (E, r, in), lora_b (E, out, r)
            a, b = a.swapaxes(-1, -2), b.swapaxes(-1, -2)
        tensors[f"{p}.lora_a"], tensors[f"{p}.lora_b"] = a, b
        if lora.m is not None:
            tensors[f"{p}.m"] = lora.m
    keys, num_layers = mlx_lm_keys(paths, cfg)
    config = {"fine_tune_type": "dora" if cfg.use_dora else "lora", "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": cfg.lora_dropout, "keys": keys}}
    if record.base_model:
        config["model"] = record.base_model
    mx.save_safetensors(str(folder / WEIGHTS_FILE), tensors, metadata={"format": "mlx"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n")


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




__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "accepts", "read", "write", "import_mlx_lm", "mlx_lm_keys",
           "read_mlx_lm_config"]
