"""mlxlora adapter tensors and LoraConfig <-> PEFT's `adapter_model.safetensors` / `adapter_config.json`.

Tensor names (saved files carry no adapter-name infix):

    ours  <path>.lora_a (in, r)      PEFT  base_model.model.<hf path>.lora_A.weight (r, in)
          <path>.lora_b (r, out)           base_model.model.<hf path>.lora_B.weight (out, r)
          <path>.m      (out,)             base_model.model.<hf path>.lora_magnitude_vector (out,)
    embedding: lora_a (num, r) -> lora_embedding_A (r, num); lora_b (r, dims) -> lora_embedding_B (dims, r)
    MoE experts: PEFT's target_parameters on transformers' fused expert parameters (formats/experts.py)

Only transposes and renames happen here, so a round trip is bit-exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..config import ALL_LINEAR, LoraConfig
from ..errors import AdapterError, ConfigError
from ..files import read_json, read_safetensors
from . import experts
from .names import EMBEDDING_NAMES, hf_to_mlx, mlx_to_hf, renames
from .record import AdapterRecord

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"  # PEFT's old pickle format: refused, never unpickled

# our tensor -> (PEFT suffix on a Linear, PEFT suffix on an Embedding, transposed?)
TENSOR_TABLE: dict[str, tuple[str, str | None, bool]] = {
    "lora_a": ("lora_A.weight", "lora_embedding_A", True),
    "lora_b": ("lora_B.weight", "lora_embedding_B", True),
    "m": ("lora_magnitude_vector", None, False),
}
# PEFT suffix -> our tensor (older PEFT saved the magnitude as `lora_magnitude_vector.weight`)
_FROM_PEFT = {lin: ours for ours, (lin, _, _) in TENSOR_TABLE.items()}
_FROM_PEFT.update({emb: ours for ours, (_, emb, _) in TENSOR_TABLE.items() if emb})
_FROM_PEFT["lora_magnitude_vector.weight"] = "m"
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+?)\.(?P<kind>"
                       + "|".join(re.escape(k) for k in sorted(_FROM_PEFT, key=len, reverse=True)) + r")$")

# Block containers mlxlora's surgery recognises; a PEFT layers_pattern must be one of them.
LAYER_CONTAINERS = ("layers", "h", "blocks", "block")


def peft_key(name: str, model_type: str | None, embedding: bool = False) -> str:
    """PEFT's saved name of one of our tensors (`<mlx path>.lora_a|lora_b|m`)."""
    path, _, tensor = name.rpartition(".")
    if tensor not in TENSOR_TABLE:
        raise AdapterError(f"{name}: not an adapter tensor (expected lora_a, lora_b or m)")
    linear_key, embedding_key, _ = TENSOR_TABLE[tensor]
    key = embedding_key if embedding else linear_key
    if key is None:
        raise AdapterError(f"{name}: PEFT has no {tensor!r} for embeddings (DoRA on an embedding)")
    return f"{PEFT_PREFIX}{mlx_to_hf(path, model_type)}.{key}"


def to_peft_state(adapter_tensors: dict[str, mx.array], model_type: str | None,
                  embedding_paths=frozenset(), tied_head: str | None = None) -> dict[str, mx.array]:
    """{`<mlx path>.lora_a|lora_b|m`: array} -> PEFT's saved names and orientation.

    `embedding_paths`: module paths whose adapter is a LoRAEmbedding. `tied_head`: the HF path of
    an output head tied to that embedding ("lm_head"); PEFT (ensure_weight_tying) then also saves
    the head's view of the embedding adapter: lora_A = lora_embedding_B.T, lora_B = lora_embedding_A.T.
    Values keep their dtype (mx arrays, so bfloat16 survives; `mx.save_safetensors` writes them).
    """
    out = {}
    for name, value in adapter_tensors.items():
        path, _, tensor = name.rpartition(".")
        key = peft_key(name, model_type, path in embedding_paths)
        out[key] = value.T if TENSOR_TABLE[tensor][2] else value
    if tied_head is not None and len(embedding_paths) == 1:
        (path,) = embedding_paths
        out[f"{PEFT_PREFIX}{tied_head}.lora_A.weight"] = adapter_tensors[f"{path}.lora_b"]
        out[f"{PEFT_PREFIX}{tied_head}.lora_B.weight"] = adapter_tensors[f"{path}.lora_a"]
    return out


def from_peft_state(peft_tensors: dict[str, Any], model_type: str | None
                    ) -> tuple[dict[str, mx.array], list[str]]:
    """PEFT's saved tensors -> ({`<mlx path>.lora_a|lora_b|m`: mx.array}, [PEFT keys that are no adapter tensor]).

    The leftovers are e.g. the copy of the base embedding PEFT saves beside an embedding adapter.
    """
    out, leftover = {}, []
    for key, value in peft_tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            leftover.append(key)
            continue
        tensor = _FROM_PEFT[match["kind"]]
        value = value if isinstance(value, mx.array) else mx.array(value)
        path = hf_to_mlx(match["path"], model_type)
        # Contiguous copies: a strided (transposed) view would send BLAS down a different kernel,
        # and results would differ in the last bits from the tensors that were saved.
        out[f"{path}.{tensor}"] = mx.contiguous(value.T) if TENSOR_TABLE[tensor][2] else value
    return out, leftover


def layers_pattern_of(paths) -> str | None:
    """The block container name shared by `paths` (`model.layers.3.mlp` -> "layers"), or None."""
    found = {m.group(1) for p in paths for m in [re.search(rf"(?:^|\.)({'|'.join(LAYER_CONTAINERS)})\.\d+\.", p)] if m}
    return found.pop() if len(found) == 1 else None


def peft_config_dict(lora_config: LoraConfig, base_model_name_or_path: str, target_module_names: list[str], *,
                     model_type: str | None = None, num_blocks: int | None = None,
                     layers_pattern: str | None = None, tie_embedding_adapters: bool = False,
                     revision: str | None = None) -> dict[str, Any]:
    """A PEFT `adapter_config.json` dict for `lora_config`.

    target_module_names: what PEFT should match, in HF naming (short names like "q_proj" or full
    module paths); the caller picks them so PEFT selects exactly the adapted modules.
    `last_n_layers` becomes explicit `layers_to_transform` indices and needs `num_blocks`.
    tie_embedding_adapters: the model ties its output head to an adapted input embedding; PEFT
    then needs `ensure_weight_tying` to apply the embedding adapter to the head as mlxlora does.
    """
    cfg = lora_config
    layers = cfg.layers_to_transform
    if cfg.last_n_layers is not None:
        if num_blocks is None:
            raise AdapterError("last_n_layers: the number of blocks is needed to write layers_to_transform")
        layers = list(range(max(0, num_blocks - cfg.last_n_layers), num_blocks))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": cfg.r,
        "lora_alpha": _number(cfg.lora_alpha),
        "lora_dropout": cfg.lora_dropout,
        "target_modules": list(target_module_names),
        "layers_to_transform": layers,
        "layers_pattern": layers_pattern if layers is not None else None,
        "rank_pattern": {mlx_to_hf(k, model_type): v for k, v in cfg.rank_pattern.items()},
        "alpha_pattern": {mlx_to_hf(k, model_type): _number(v) for k, v in cfg.alpha_pattern.items()},
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "bias": cfg.bias,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "lora_bias": False,
        "ensure_weight_tying": bool(tie_embedding_adapters),
    }


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


# Fields that change the math (or the saved tensors) in ways mlxlora does not implement:
# field -> the values that are fine.
_UNSUPPORTED: dict[str, tuple] = {
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "alora_invocation_tokens": (None, [], ()),
    "use_qalora": (False, None),
    "layer_replication": (None, []),
    "modules_to_save": (None, []),
    "trainable_token_indices": (None, [], {}),
    "exclude_modules": (None, [], ""),
    "megatron_config": (None, {}),
    "use_bdlora": (None, False),
}
# Fields that describe how training started or where it ran, not what the adapter computes.
_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "megatron_core", "runtime_config", "qalora_group_size", "loftq_config", "eva_config",
            "corda_config", "lora_ga_config", "velora_config", "monteclora_config", "arrow_config",
            "kasa_config", "ensure_weight_tying", "init_lora_weights", "layers_pattern"}
_FIELDS = {"r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "rank_pattern",
           "alpha_pattern", "use_rslora", "use_dora", "bias", "target_parameters"}
# init_lora_weights values that also rewrite the base weights (the adapter alone is not the whole change)
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "eva", "lora_ga", "mica")


def _check_peft_fields(d: dict[str, Any]) -> None:
    if d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type: {d.get('peft_type')!r} adapters are not supported; only LORA")
    for name, ok in _UNSUPPORTED.items():
        if name in d and d[name] not in ok:
            raise AdapterError(f"{name}: {d[name]!r} is a PEFT LoRA variant mlxlora does not support")
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise AdapterError(f"init_lora_weights: {init!r} also changes the base weights; convert the adapter "
                           "to plain LoRA in PEFT first (save_pretrained(path_initial_model_for_weight_conversion=...))")
    pattern = d.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    bad = [p for p in patterns if p not in LAYER_CONTAINERS]
    if bad:
        raise AdapterError(f"layers_pattern: {bad} is not supported; blocks are found under {'/'.join(LAYER_CONTAINERS)}")
    unknown = sorted(k for k, v in d.items() if k not in _FIELDS | _IGNORED | set(_UNSUPPORTED) and v)
    if unknown:
        raise AdapterError(f"{', '.join(unknown)}: unknown PEFT field(s) with non-default values")


def lora_config_from_peft(d: dict[str, Any], model_type: str | None = None) -> LoraConfig:
    """Read a PEFT `adapter_config.json` dict into a LoraConfig.

    Raises AdapterError naming the field for variants mlxlora does not implement (lora_bias,
    target_parameters, PiSSA/LoftQ/... init, aLoRA, DoRA on embeddings, modules_to_save, ...).
    """
    _check_peft_fields(d)
    targets, params = d.get("target_modules"), list(d.get("target_parameters") or [])
    if targets is None and params:
        targets = []
    if targets is None:
        raise AdapterError("target_modules: missing; mlxlora needs the adapted module names")
    if isinstance(targets, str):
        if targets != ALL_LINEAR and renames(model_type):
            raise AdapterError(f"target_modules: a regex cannot be translated to mlx-lm names for {model_type}")
    else:
        targets = sorted(hf_to_mlx(t, model_type) for t in targets)
    if d.get("use_dora") and not isinstance(targets, str) and any(t.split(".")[-1] in EMBEDDING_NAMES for t in targets):
        raise AdapterError("use_dora: DoRA on an embedding layer is not supported by mlxlora")
    layers = d.get("layers_to_transform")
    rank_pattern = {hf_to_mlx(k, model_type): v for k, v in (d.get("rank_pattern") or {}).items()}
    alpha_pattern = {hf_to_mlx(k, model_type): v for k, v in (d.get("alpha_pattern") or {}).items()}
    if params:
        if isinstance(targets, str):
            raise AdapterError(f"target_modules: {targets!r} with target_parameters is not supported; list the modules")
        mt = experts.model_type_of_peft(d, model_type)
        mine = {p: experts.mlx_paths(p, mt) for p in params}
        targets = sorted(set(targets) | {q for paths in mine.values() for q in paths})
        # Each expert parameter's own rank/alpha, as PEFT resolves it, first (PEFT's first match wins).
        exact = {"|".join(re.escape(q) for q in paths): experts.peft_rank_alpha(d, p) for p, paths in mine.items()}
        rank_pattern = {**{k: r for k, (r, _) in exact.items()}, **rank_pattern}
        alpha_pattern = {**{k: a for k, (_, a) in exact.items()}, **alpha_pattern}
    kwargs = dict(
        r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
        target_modules=targets, layers_to_transform=None if layers in (None, []) else layers,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        use_rslora=bool(d.get("use_rslora", False)), use_dora=bool(d.get("use_dora", False)),
        bias=d.get("bias", "none"))
    try:
        return LoraConfig(**kwargs)
    except ConfigError as e:
        raise AdapterError(str(e)) from None


# ---------------------------------------------------------------- folders

def accepts(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read(folder: Path, *, config: LoraConfig | None = None, model_type: str | None = None,
         fmt: str = "peft") -> AdapterRecord:
    """A PEFT folder as an AdapterRecord. config: the exact LoraConfig when known (mlxlora.json), else
    read from adapter_config.json. Raises AdapterError naming the file for unsupported variants, tensors
    that are no LoRA tensor, and PEFT's base-weight copies that do not fit their embedding adapter."""
    folder = Path(folder)
    peft_cfg = read_json(folder / CONFIG_FILE)
    if config is None:
        try:
            config = lora_config_from_peft(peft_cfg, model_type)
        except AdapterError as e:
            raise AdapterError(f"{folder / CONFIG_FILE}: {e}") from None
    weights = folder / WEIGHTS_FILE
    raw = read_safetensors(weights)
    expert_tensors = {}
    if peft_cfg.get("target_parameters"):
        try:
            expert_tensors, used = experts.from_peft(raw, peft_cfg, config, experts.model_type_of_peft(peft_cfg, model_type),
                                                     PEFT_PREFIX)
        except AdapterError as e:
            raise AdapterError(f"{weights}: {e}") from None
        raw = {k: v for k, v in raw.items() if k not in set(used)}
    tensors, leftover = from_peft_state(raw, model_type)
    tensors.update(expert_tensors)
    embeddings = {hf_to_mlx(k.split(".lora_embedding_")[0].removeprefix(PEFT_PREFIX), model_type)
                  for k in raw if ".lora_embedding_" in k}
    tied = _drop_tied_head_copies(tensors, embeddings)
    bad = [f"{k} {tuple(raw[k].shape)}" for k in leftover if not _is_saved_base(k, raw[k], tensors, embeddings,
                                                                                 model_type)]
    if bad:
        raise AdapterError(f"{weights}: tensors that are no LoRA tensor of this adapter: {', '.join(sorted(bad))}")
    return AdapterRecord.from_tensors(
        config, tensors, embeddings, format=fmt, path=folder, weights=weights,
        model_type=experts.model_type_of_peft(peft_cfg, model_type) if expert_tensors else model_type,
        base_model=peft_cfg.get("base_model_name_or_path"), source_config=peft_cfg,
        tied_head=tied or bool(peft_cfg.get("ensure_weight_tying")) or None)


def _drop_tied_head_copies(tensors: dict, embeddings: set[str]) -> bool:
    """Remove PEFT's view of a tied embedding adapter from the head (lm_head.lora_a == embedding lora_b.T,
    lm_head.lora_b == embedding lora_a.T; ensure_weight_tying saves both). True if there was one."""
    a, b = tensors.get("lm_head.lora_a"), tensors.get("lm_head.lora_b")
    for emb in embeddings:
        ea, eb = tensors.get(f"{emb}.lora_a"), tensors.get(f"{emb}.lora_b")
        if any(x is None for x in (a, b, ea, eb)) or a.shape != eb.T.shape or b.shape != ea.T.shape:
            continue
        if mx.array_equal(a, eb.T).item() and mx.array_equal(b, ea.T).item():
            del tensors["lm_head.lora_a"], tensors["lm_head.lora_b"]
            return True
    return False


def _is_saved_base(key: str, value, tensors: dict, embeddings: set[str], model_type) -> bool:
    """PEFT saves the base weight beside an embedding adapter (`<path>.base_layer.weight`, also the tied
    head's): accept it when its shape is the adapted embedding's (num_embeddings, dims)."""
    if not key.endswith(".base_layer.weight") or not embeddings:
        return False
    path = hf_to_mlx(key[len(PEFT_PREFIX):-len(".base_layer.weight")], model_type)
    owners = [path] if path in embeddings else sorted(embeddings) if path.split(".")[-1] == "lm_head" else []
    return any(tuple(value.shape) == (tensors[f"{e}.lora_a"].shape[0], tensors[f"{e}.lora_b"].shape[1])
               for e in owners if f"{e}.lora_a" in tensors and f"{e}.lora_b" in tensors)


def write(record: AdapterRecord, folder: Path) -> None:
    """adapter_config.json + adapter_model.safetensors for `record` into `folder` (an empty staging folder).

    target_modules: record.peft_targets when a model named them, else the full module paths (which PEFT
    matches exactly). A tied head with an adapted embedding is written as PEFT's ensure_weight_tying does.
    """
    model_type = record.model_type
    moe = [p for p in record.module_paths if record.layers[p].experts]
    dense = [p for p in record.module_paths if not record.layers[p].experts]
    hf_paths = [mlx_to_hf(p, model_type) for p in dense]
    tied = bool(record.embeddings) and bool(record.tied_head)
    cfg = peft_config_dict(record.config, record.base_model, record.peft_targets or sorted(hf_paths),
                           model_type=model_type, num_blocks=record.num_blocks,
                           layers_pattern=layers_pattern_of(hf_paths), tie_embedding_adapters=tied)
    tensors = to_peft_state({k: v for k, v in record.tensors().items() if k.rpartition(".")[0] not in moe},
                            model_type, record.embeddings, "lm_head" if tied else None)
    if moe:  # PEFT's target_parameters, with each parameter's rank and alpha spelled out first
        found, params, ranks, alphas = experts.to_peft(record, moe)
        tensors.update({PEFT_PREFIX + k: v for k, v in found.items()})
        cfg["target_parameters"] = params
        cfg["rank_pattern"] = {**{k: r for k, r in ranks.items()}, **cfg["rank_pattern"]}
        cfg["alpha_pattern"] = {**{k: _number(a) for k, a in alphas.items()}, **cfg["alpha_pattern"]}
    mx.save_safetensors(str(folder / WEIGHTS_FILE), tensors, metadata={"format": "pt"})
    # Top-level keys sorted; patterns keep their order (PEFT applies the first key that matches).
    (folder / CONFIG_FILE).write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "PICKLE_WEIGHTS", "accepts", "read", "write", "PEFT_PREFIX", "TENSOR_TABLE", "peft_key", "to_peft_state", "from_peft_state", "peft_config_dict",
           "lora_config_from_peft", "layers_pattern_of"]
