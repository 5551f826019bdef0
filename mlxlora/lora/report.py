"""What a run adapted, said at start-up: adapters by module kind, and what it left out.

`summary(model)` counts the adapter layers by kind (attention / MLP / experts / router / embedding /
other) from their paths; `not_adapted(model)` lists the linear-like modules in the blocks that have
adapters which mlxlora did not wrap (an expert bank such as mlx-lm's SwitchLinear, MLA's MultiLinear,
BitNet's BitLinear), so a run never "works" while silently training a fraction of the model.
`dead_adapters(grads)` names adapters whose first gradient is all zero.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .layers import ADAPTER_TYPES, EMBEDDING_TYPES, LINEAR_TYPES, LoRAEmbedding
from .surgery import adapter_layers, block_index

KINDS = ("attention", "MLP", "experts", "router", "embedding", "other")
# (kind, how a path is recognised): the last name, or any name of the path. First match wins.
ROUTER_NAMES = {"gate", "router", "wg", "shared_expert_gate", "moe_gate", "gate_network"}
EXPERT_PARTS = {"experts", "switch_mlp", "expert", "routed_experts"}
ATTENTION_PARTS = {"self_attn", "attn", "attention", "self_attention", "cross_attn", "mixer_attn", "linear_attn",
                   "attn_layer"}
ATTENTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "wq", "wk", "wv", "wo", "c_attn",
                   "query_key_value", "Wqkv", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}
MLP_PARTS = {"mlp", "ffn", "feed_forward", "shared_expert", "shared_experts", "shared_mlp", "dense_mlp"}
MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "w1", "w2", "w3", "c_fc"}


def kind_of(path: str, module: nn.Module | None = None) -> str:
    """The kind of the module at `path` (one of KINDS)."""
    if isinstance(module, (LoRAEmbedding,) + EMBEDDING_TYPES):
        return "embedding"
    parts = path.split(".")
    last = parts[-1]
    if last in ROUTER_NAMES or (len(parts) > 1 and parts[-2] in ROUTER_NAMES):  # granitemoe: router.layer
        return "router"
    if EXPERT_PARTS & set(parts[:-1]):
        return "experts"
    if ATTENTION_PARTS & set(parts[:-1]) or last in ATTENTION_NAMES:
        return "attention"
    if MLP_PARTS & set(parts[:-1]) or last in MLP_NAMES:
        return "MLP"
    return "other"


def summary(model: nn.Module) -> dict[str, int]:
    """{kind: number of adapter layers} for the kinds present, in KINDS order."""
    counts = {k: 0 for k in KINDS}
    for path, layer in adapter_layers(model):
        counts[kind_of(path, layer)] += 1
    return {k: n for k, n in counts.items() if n}


def _linear_like(module: nn.Module) -> bool:
    """A leaf that multiplies by a >= 2-D weight of its own (Linear-shaped but maybe not nn.Linear)."""
    w = module.get("weight") if isinstance(module, dict) else None
    return (isinstance(w, mx.array) and w.ndim >= 2 and not isinstance(module, EMBEDDING_TYPES)
            and not any(isinstance(v, nn.Module) for v in module.values()))


def not_adapted(model: nn.Module) -> list[tuple[str, str]]:
    """(path, type name) of linear-like modules in blocks that have adapters, not wrapped and not a
    type mlxlora adapts (Linear / QuantizedLinear / Embedding), in model order."""
    adapted = [p for p, _ in adapter_layers(model)]
    blocks = {block_index(p) for p in adapted}
    inside = tuple(p + "." for p in adapted)
    out = []
    for path, m in model.named_modules():
        if (path.startswith(inside) or isinstance(m, ADAPTER_TYPES + LINEAR_TYPES) or not _linear_like(m)
                or block_index(path) not in blocks):
            continue
        out.append((path, type(m).__name__))
    return sorted(out, key=lambda pt: (block_index(pt[0]) or 0, pt[0]))


def describe(model: nn.Module) -> list[str]:
    """The start-up lines: what was adapted by kind, then one warning line per unadapted module type."""
    counts = summary(model)
    lines = ["adapted: " + ", ".join(f"{n} {k}" for k, n in counts.items())]
    by_type: dict[str, list[str]] = {}
    for path, name in not_adapted(model):
        by_type.setdefault(name, []).append(path)
    for name, paths in by_type.items():
        leaves = sorted({p.split(".")[-1] for p in paths})
        lines.append(f"warning: {len(paths)} {name} module(s) in the adapted blocks are not adapted "
                     f"({', '.join(leaves)}; e.g. {paths[0]}): mlxlora cannot wrap {name}, so they stay frozen")
    return lines


def dead_adapters(grads: dict) -> list[str]:
    """Adapter layer paths whose gradient (a tree of lora_a / lora_b / m) is all zero."""
    layers: dict[str, bool] = {}
    for key, g in tree_flatten(grads):
        path = key.rsplit(".", 1)[0]
        layers[path] = layers.get(path, False) or bool(mx.any(g != 0).item())
    return sorted(p for p, alive in layers.items() if not alive)
