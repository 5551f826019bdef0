"""MoE parameter shapes for the planner: expert matrices as mlx-lm holds them (one SwitchLinear per
projection, E experts stacked), read from safetensors headers or built from a config.

Headers come in two layouts: mlx-lm's own (`…switch_mlp.gate_proj.weight` (E, out, in)) and the
per-expert one transformers writes (`…mlp.experts.3.gate_proj.weight`, Mixtral's `w1/w2/w3`), which
mlx-lm's sanitize stacks into the first; both give the same matrices here.
"""

from __future__ import annotations

import re

# per-expert header names -> (mlx-lm's switch layer under the MoE module, projection)
_PER_EXPERT = re.compile(r"^(?P<moe>.+)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def stack_per_expert(headers: dict[str, dict]) -> dict[str, dict]:
    """Headers with per-expert 2-D weights replaced by one (E, out, in) entry per switch layer."""
    groups: dict[str, list] = {}
    out = {}
    for name, h in headers.items():
        m = _PER_EXPERT.match(name)
        if m is None or len(h["shape"]) != 2:
            out[name] = h
            continue
        proj = _MIXTRAL.get(m["proj"], m["proj"])
        groups.setdefault(f"{m['moe']}.switch_mlp.{proj}.weight", []).append(h)
    for name, hs in groups.items():
        out[name] = {"dtype": hs[0]["dtype"], "shape": [len(hs), *hs[0]["shape"]]}
    return out


def moe_layers(config: dict) -> dict | None:
    """The MoE layout of a qwen3_moe / mixtral config: {"module", "experts", "per_token", "hidden",
    "sparse": block indices with experts}; None for a dense model (or an MoE type not modelled here)."""
    mt, n = config.get("model_type"), int(config.get("num_hidden_layers", 0))
    if mt == "qwen3_moe":
        skip, step = set(config.get("mlp_only_layers") or []), int(config.get("decoder_sparse_step", 1) or 1)
        sparse = [i for i in range(n) if i not in skip and (i + 1) % step == 0]
        return {"module": "mlp", "experts": int(config["num_experts"]), "per_token": int(config["num_experts_per_tok"]),
                "hidden": int(config["moe_intermediate_size"]), "sparse": sparse}
    if mt == "mixtral":
        return {"module": "block_sparse_moe", "experts": int(config.get("num_local_experts", 8)),
                "per_token": int(config.get("num_experts_per_tok", 2)), "hidden": int(config["intermediate_size"]),
                "sparse": list(range(n))}
    return None


def moe_block(moe: dict, D: int) -> list[tuple[str, int, int, int]]:
    """(path under the block, input, output, experts) of one MoE block's router and switch layers."""
    E, Im, mod = moe["experts"], moe["hidden"], moe["module"]
    return [(f"{mod}.gate", D, E, 0), (f"{mod}.switch_mlp.gate_proj", D, Im, E),
            (f"{mod}.switch_mlp.up_proj", D, Im, E), (f"{mod}.switch_mlp.down_proj", Im, D, E)]


def per_token(config: dict) -> int | None:
    """Experts each token is routed to (num_experts_per_tok), or None."""
    k = config.get("num_experts_per_tok")
    return int(k) if k else None


__all__ = ["stack_per_expert", "moe_layers", "moe_block", "per_token"]
