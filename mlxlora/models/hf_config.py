"""config.json as transformers 5 writes it -> the keys mlx-lm 0.32 reads.

transformers 5 moved `rope_theta` (and `rope_scaling`, `partial_rotary_factor`) into a
`rope_parameters` dict, per layer type for models with sliding and full attention (gemma3:
{"sliding_attention": {...}, "full_attention": {...}}), and names the expert count of several MoE
models `num_local_experts` where mlx-lm's modules read `num_experts`. mlx-lm builds most models from
the flat keys and silently falls back to a default (rope θ 10,000) or stops ("missing 2 required
positional arguments: 'num_experts' and 'rope_theta'") when they are absent.

`normalize` returns the keys to add, computed from a copy; the user's file is never written. A key
the config already has is never replaced, so a folder in the old form loads exactly as before.
"""

from __future__ import annotations

# rope_parameters field -> flat key mlx-lm reads (the rest of a non-default dict becomes rope_scaling).
ROPE_FIELDS = {"rope_theta": "rope_theta", "partial_rotary_factor": "partial_rotary_factor"}
# rope_parameters per layer type (transformers 5) -> the flat theta key mlx-lm reads for that layer type.
LAYER_TYPE_THETA = {"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"}
# transformers 5 key -> mlx-lm key, copied when only the first is present.
RENAMES = {"num_local_experts": "num_experts"}
# model_type -> {flat key from rope_parameters: the name that model's mlx-lm module reads}.
MODEL_KEYS = {"gpt_neox": {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}}


def _rope_keys(rope: dict) -> dict:
    """Flat keys for one rope_parameters dict: rope_theta, partial_rotary_factor, rope_scaling."""
    out = {flat: rope[k] for k, flat in ROPE_FIELDS.items() if k in rope}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k not in ROPE_FIELDS} | {"type": kind}
    return out


def normalize(config: dict) -> dict:
    """The keys to add to `config` (and to its nested text_config) so mlx-lm reads it as intended.

    Returns {} for a config in the form mlx-lm expects. Never changes `config` itself.
    """
    add: dict = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope:
        if all(isinstance(v, dict) for v in rope.values()):  # per layer type
            for layer_type, flat in LAYER_TYPE_THETA.items():
                if "rope_theta" in rope.get(layer_type, {}):
                    add[flat] = rope[layer_type]["rope_theta"]
            full = rope.get("full_attention", {})
            add.update({k: v for k, v in _rope_keys(full).items() if k != "rope_theta"})
        else:
            add.update(_rope_keys(rope))
    for flat, name in MODEL_KEYS.get(config.get("model_type"), {}).items():
        if flat in add:
            add[name] = add[flat]
    for new, old in RENAMES.items():
        if new in config:
            add[old] = config[new]
    add = {k: v for k, v in add.items() if config.get(k) is None}  # a null key counts as absent
    text = config.get("text_config")
    if isinstance(text, dict):
        inner = normalize(text)
        if inner:
            add["text_config"] = {**text, **inner}
    return add
