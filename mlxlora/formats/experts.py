"""Expert (SwitchLinear) adapters <-> PEFT's `target_parameters` form (ParamWrapper, PEFT 0.21).

transformers 5 keeps an MoE block's experts as fused 3-D parameters, `mlp.experts.gate_up_proj`
(E, 2I, H) with the gate rows first, and `mlp.experts.down_proj` (E, H, I); mlx-lm keeps three
SwitchLinear layers, `switch_mlp.gate_proj` / `up_proj` (E, I, H) and `down_proj` (E, H, I).
PEFT adapts such a parameter with one pair for all experts:

    lora_A.weight (E*r, in)   row e*r + k   = expert e's A[k]   -> ours: lora_a (E, in, r)
    lora_B.weight (out, r*E)  column k*E + e = expert e's B[:, k] -> ours: lora_b (E, r, out)

and nests a wrapper per adapted parameter of a module in the order the module registers them: the
first one is innermost, so with both adapted gate_up_proj is saved under `experts.base_layer.` and
down_proj under `experts.`.

gate/up <-> gate_up_proj, exact both ways: a PEFT pair on gate_up_proj is one shared lora_a for
gate_proj and up_proj with lora_b split at row I. Separate gate and up pairs are written as one pair
of rank r_gate + r_up: lora_A stacks both A's, lora_B is block-diagonal (zeros elsewhere), the
product is the same; when the two lora_a are equal (an adapter read from PEFT) the shared form of
rank r is written again, so a round trip is bit-exact. The fused parameter gets explicit
rank_pattern / alpha_pattern entries (first in the dict: PEFT's first matching key wins).
Architectures outside EXPERT_TABLE write each switch layer as its own parameter `<path>.weight`
under mlx-lm's names (mlxlora reads it back; PEFT has no such model).
"""

from __future__ import annotations

import re

import mlx.core as mx

from ..config import LoraConfig
from ..errors import AdapterError
from .record import AdapterRecord, LayerLoRA

# model_type -> (mlx-lm's MoE module under a block, transformers' experts module under a block)
EXPERT_TABLE: dict[str, tuple[str, str]] = {
    "qwen3_moe": ("mlp.switch_mlp", "mlp.experts"),
    "qwen2_moe": ("mlp.switch_mlp", "mlp.experts"),
    "olmoe": ("mlp.switch_mlp", "mlp.experts"),
    "mixtral": ("block_sparse_moe.switch_mlp", "mlp.experts"),
}
# transformers' class in PEFT's auto_mapping -> model_type (a PEFT folder names no model_type)
CLASS_TYPES = {"Qwen3MoeForCausalLM": "qwen3_moe", "Qwen2MoeForCausalLM": "qwen2_moe",
               "OlmoeForCausalLM": "olmoe", "MixtralForCausalLM": "mixtral"}
# fused parameter -> the mlx-lm switch layers it holds, in row order; and the modules' registration order
FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
ORDER = ("gate_up_proj", "down_proj")
_PARAM = re.compile(r"^(?P<block>.*\.\d+)\.(?P<rest>.+)$")


def model_type_of_peft(peft_cfg: dict, model_type: str | None) -> str | None:
    """`model_type`, or the one PEFT's auto_mapping names (base_model_class)."""
    if model_type:
        return model_type
    cls = ((peft_cfg or {}).get("auto_mapping") or {}).get("base_model_class")
    return CLASS_TYPES.get(cls)


def hf_param(path: str, model_type: str | None) -> tuple[str, int | None]:
    """(transformers parameter, part) of an mlx-lm switch layer path: part 0/1 of gate_up_proj for
    gate_proj/up_proj, None when the parameter is the layer's alone (down_proj, or `<path>.weight`)."""
    mlx_moe, hf_moe = EXPERT_TABLE.get(model_type or "", (None, None))
    m = _PARAM.match(path)
    if mlx_moe and m and m["rest"].rpartition(".")[0] == mlx_moe:
        name = m["rest"].rpartition(".")[2]
        for fused, parts in FUSED.items():
            if name in parts:
                return f"{m['block']}.{hf_moe}.{fused}", (parts.index(name) if len(parts) > 1 else None)
    return f"{path}.weight", None


def mlx_paths(param: str, model_type: str | None) -> list[str]:
    """The mlx-lm switch layer paths a transformers expert parameter (or a suffix of one) holds."""
    mlx_moe, hf_moe = EXPERT_TABLE.get(model_type or "", EXPERT_TABLE["qwen3_moe"])
    head, _, name = param.rpartition(".")
    if name in FUSED and (head == hf_moe or head.endswith("." + hf_moe)):
        base = head[: len(head) - len(hf_moe)] + mlx_moe
        return [f"{base}.{part}" for part in FUSED[name]]
    if name == "weight":
        return [head]
    raise AdapterError(f"target_parameters: {param!r} is no expert parameter mlxlora knows "
                       f"(…{hf_moe}.gate_up_proj / down_proj, or <switch layer>.weight)")


def _key(param: str, targeted: set[str]) -> str:
    """PEFT's module key of `param` (`base_model.model.` not included): one `.base_layer` per adapted
    parameter of the same module registered after it."""
    module, _, name = param.rpartition(".")
    later = ORDER[ORDER.index(name) + 1:] if name in ORDER else ()
    return module + ".base_layer" * sum(f"{module}.{p}" in targeted for p in later)


def _to_peft(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    e, d_in, r = a.shape
    out = b.shape[2]
    return a.transpose(0, 2, 1).reshape(e * r, d_in), b.transpose(2, 1, 0).reshape(out, r * e)


def _from_peft(lora_a, lora_b, e: int) -> tuple[mx.array, mx.array]:
    r = lora_a.shape[0] // e
    a = mx.contiguous(lora_a.reshape(e, r, lora_a.shape[1]).transpose(0, 2, 1))  # (E, in, r)
    b = mx.contiguous(lora_b.reshape(lora_b.shape[0], r, e).transpose(2, 1, 0))  # (E, r, out)
    return a, b


def _fuse(pieces: list, scale: float) -> tuple[mx.array, mx.array]:
    """One (lora_a, lora_b) for a fused parameter from its parts (LayerLoRA or None), rows stacked."""
    got = [p for p in pieces if p is not None]
    e, w = got[0].lora_a.shape[0], got[0].lora_b.shape[2]  # the parts of a GLU's gate_up have one width
    bs = [p.lora_b_for(scale) if p is not None else None for p in pieces]
    shared = len(got) == len(pieces) and all(
        p.lora_a.shape == got[0].lora_a.shape and mx.array_equal(p.lora_a, got[0].lora_a).item() for p in got)
    if shared:
        return got[0].lora_a, mx.concatenate(bs, axis=2)
    if len(got) == 1:  # one part adapted: the other's rows of lora_b are zero
        return got[0].lora_a, mx.concatenate([b if b is not None else mx.zeros((e, got[0].rank, w), got[0].lora_b.dtype)
                                              for b in bs], axis=2)
    a = mx.concatenate([p.lora_a for p in got], axis=2)
    rows = []
    for p, b in zip(pieces, bs):  # block-diagonal: part i's rank meets part i's rows only
        cols = [mx.zeros((e, q.rank, w), a.dtype) if q is not p else b for q in got]
        rows.append(mx.concatenate(cols, axis=1) if p is not None else mx.zeros((e, a.shape[2], w), a.dtype))
    return a, mx.concatenate(rows, axis=2)


def to_peft(record: AdapterRecord, paths: list[str]):
    """PEFT's form of the expert layers `paths` of `record`.

    Returns ({PEFT key (no prefix): tensor}, target_parameters, {param: rank}, {param: alpha}).
    """
    cfg, model_type = record.config, record.model_type
    groups: dict[str, dict[int | None, str]] = {}
    for p in paths:
        param, part = hf_param(p, model_type)
        groups.setdefault(param, {})[part] = p
    targeted = set(groups)
    tensors, ranks, alphas = {}, {}, {}
    for param, parts in groups.items():
        scale = record.layers[parts[min(parts, key=lambda k: -1 if k is None else k)]].scale
        if None in parts:
            lora = record.layers[parts[None]]
            a, b = lora.lora_a, lora.lora_b
        else:
            names = FUSED[param.rpartition(".")[2]]
            pieces = [record.layers.get(parts[i]) if i in parts else None for i in range(len(names))]
            a, b = _fuse(pieces, scale)
        r = a.shape[2]
        key = _key(param, targeted)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = _to_peft(a, b)
        ranks[param] = r
        alphas[param] = scale * (r ** 0.5 if cfg.use_rslora else r)
    return tensors, sorted(targeted), ranks, alphas


def peft_rank_alpha(peft_cfg: dict, param: str) -> tuple[int, float]:
    """(r, lora_alpha) PEFT gives `param`: the first rank_pattern / alpha_pattern key matching its end."""
    def first(patterns, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", param):
                return value
        return default
    return (int(first(peft_cfg.get("rank_pattern"), peft_cfg.get("r", 8))),
            float(first(peft_cfg.get("alpha_pattern"), peft_cfg.get("lora_alpha", 8))))


def from_peft(raw: dict, peft_cfg: dict, config: LoraConfig, model_type: str | None, prefix: str):
    """Our tensors of the expert parameters among PEFT's saved `raw` tensors.

    peft_cfg: the file's adapter_config.json (target_parameters, and the rank of each parameter's pair).
    config: the LoraConfig the record will have; its ranks per mlx path decide how a fused pair splits
    (every part the pair's rank: shared lora_a; ranks summing to it: the block-diagonal form).
    Returns ({`<mlx path>.lora_a|lora_b`: array}, [raw keys used]). Raises AdapterError naming the parameter.
    """
    targets = list(peft_cfg.get("target_parameters") or [])
    found: dict[str, dict] = {}  # param -> {"A": key, "B": key}
    for key in raw:
        m = re.match(rf"^{re.escape(prefix)}(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<ab>[AB])\.weight$", key)
        if m is None:
            continue
        module = m["module"]
        targeted = {f"{module}.{n}" for n in (*ORDER, "weight")
                    if any(f"{module}.{n}" == t or f"{module}.{n}".endswith("." + t) for t in targets)}
        for param in targeted:
            if _key(param, targeted) == module + m["nest"]:
                found.setdefault(param, {})[m["ab"]] = key
    out, used = {}, []
    for param in sorted(found):
        pair = found[param]
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"target_parameters {param}: lora_{'B' if 'A' in pair else 'A'} is missing")
        used += [pair["A"], pair["B"]]
        r, alpha = peft_rank_alpha(peft_cfg, param)
        scale = alpha / (r ** 0.5) if peft_cfg.get("use_rslora") else alpha / r
        out.update(_split(param, _mx(raw[pair["A"]]), _mx(raw[pair["B"]]), r, scale, config, model_type))
    return out, used


def _mx(x) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(x)


def _split(param: str, lora_A, lora_B, r: int, scale: float, config: LoraConfig, model_type) -> dict:
    """Our (lora_a, lora_b) per mlx path of one PEFT pair of rank r (scale: PEFT's for the pair)."""
    paths = mlx_paths(param, model_type)
    if lora_A.shape[0] % r:
        raise AdapterError(f"{param}: lora_A has {lora_A.shape[0]} rows, not a multiple of its rank {r}")
    a, b = _from_peft(lora_A, lora_B, lora_A.shape[0] // r)
    ranks = [config.rank_alpha_for(p)[0] for p in paths]
    width, k, out = b.shape[2] // len(paths), 0, {}
    if not (all(q == r for q in ranks) or sum(ranks) == r):
        raise AdapterError(f"{param}: a pair of rank {r} does not split into {', '.join(paths)} of ranks {ranks}")
    for i, (p, q) in enumerate(zip(paths, ranks)):
        cols = slice(i * width, (i + 1) * width)
        if not _targeted(config, p):  # the other half of a gate_up pair written for one part (zero rows)
            k += 0 if q == r else q
            continue
        if q == r:  # shared lora_a (every part has the pair's rank)
            pa, pb = a, (b if len(paths) == 1 else mx.contiguous(b[:, :, cols]))
        else:  # block-diagonal: part i owns ranks k:k+q
            pa, pb = mx.contiguous(a[:, :, k:k + q]), mx.contiguous(b[:, k:k + q, cols])
            k += q
        mine = config.scale_for(p)
        if mine != scale:  # the writer folded this part's scale into lora_b: unfold it
            pb = (pb.astype(mx.float32) * (scale / mine)).astype(pb.dtype)
        out[f"{p}.lora_a"], out[f"{p}.lora_b"] = pa, pb
    return out


def _targeted(config: LoraConfig, path: str) -> bool:
    t = config.target_modules
    if isinstance(t, str):
        return t == "all-linear" or re.fullmatch(t, path) is not None
    return any(path == key or path.endswith("." + key) for key in t)


def is_expert(lora: LayerLoRA) -> bool:
    return lora.lora_a.ndim == 3


__all__ = ["EXPERT_TABLE", "CLASS_TYPES", "FUSED", "model_type_of_peft", "hf_param", "mlx_paths", "to_peft",
           "from_peft", "peft_rank_alpha", "is_expert"]
