"""Per-architecture tables for GGUF import: llama.cpp's tensor names -> mlx-lm's, the metadata
keys -> config.json, and the few transforms llama.cpp's converter applied (convert_hf_to_gguf.py):
Q/K rows permuted for the llama family, gemma's norm weights stored as 1 + w, phi3's fused
qkv and gate_up kept fused (mlx-lm's phi3 has the same layers), MoE experts stacked as mlx-lm's
switch_mlp stacks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LAYER = "model.layers.{n}"
# GGUF module -> mlx-lm module, shared by every architecture here (the suffix .weight/.bias,
# and MLX's .scales/.biases, is carried over).
COMMON = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "blk.{n}.attn_norm": f"{LAYER}.input_layernorm",
    "blk.{n}.attn_q": f"{LAYER}.self_attn.q_proj", "blk.{n}.attn_k": f"{LAYER}.self_attn.k_proj",
    "blk.{n}.attn_v": f"{LAYER}.self_attn.v_proj", "blk.{n}.attn_output": f"{LAYER}.self_attn.o_proj",
    "blk.{n}.ffn_norm": f"{LAYER}.post_attention_layernorm",
    "blk.{n}.ffn_gate": f"{LAYER}.mlp.gate_proj", "blk.{n}.ffn_up": f"{LAYER}.mlp.up_proj",
    "blk.{n}.ffn_down": f"{LAYER}.mlp.down_proj",
}
QK_NORM = {"blk.{n}.attn_q_norm": f"{LAYER}.self_attn.q_norm",
           "blk.{n}.attn_k_norm": f"{LAYER}.self_attn.k_norm"}
# gemma2/3 norm both sides of attention and of the MLP.
SANDWICH = {"blk.{n}.post_attention_norm": f"{LAYER}.post_attention_layernorm",
            "blk.{n}.ffn_norm": f"{LAYER}.pre_feedforward_layernorm",
            "blk.{n}.post_ffw_norm": f"{LAYER}.post_feedforward_layernorm"}
EXPERTS = {"blk.{n}.ffn_gate_inp": f"{LAYER}.mlp.gate",  # the router, (n_expert, hidden)
           "blk.{n}.ffn_gate_exps": f"{LAYER}.mlp.switch_mlp.gate_proj",  # (n_expert, out, in)
           "blk.{n}.ffn_up_exps": f"{LAYER}.mlp.switch_mlp.up_proj",
           "blk.{n}.ffn_down_exps": f"{LAYER}.mlp.switch_mlp.down_proj"}
SHARED_EXPERT = {"blk.{n}.ffn_gate_shexp": f"{LAYER}.mlp.shared_expert.gate_proj",
                 "blk.{n}.ffn_up_shexp": f"{LAYER}.mlp.shared_expert.up_proj",
                 "blk.{n}.ffn_down_shexp": f"{LAYER}.mlp.shared_expert.down_proj",
                 "blk.{n}.ffn_gate_inp_shexp": f"{LAYER}.mlp.shared_expert_gate"}
PHI3 = {"blk.{n}.attn_qkv": f"{LAYER}.self_attn.qkv_proj", "blk.{n}.ffn_up": f"{LAYER}.mlp.gate_up_proj"}
MOE_HPARAMS = {"num_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
               "moe_intermediate_size": "expert_feed_forward_length"}


@dataclass(frozen=True)
class Arch:
    """One `general.architecture`: its mlx-lm/HF identity and what llama.cpp changed on the way."""

    model_type: str
    architectures: tuple
    names: dict = field(default_factory=lambda: dict(COMMON))
    rope_theta: float = 10000.0  # the HF default when the file has no rope.freq_base
    permuted_qk: bool = False  # llama.cpp interleaved each head's rotary halves (LlamaModel.permute)
    norm_offset: float = 0.0  # llama.cpp stored every norm weight as w + norm_offset
    hparams: dict = field(default_factory=dict)  # extra config key -> GGUF key after "{arch}."
    fixed: dict = field(default_factory=dict)  # config entries the architecture implies
    bare: tuple = ()  # GGUF modules that are one mlx-lm parameter (no .weight): attention sinks


def _table(*parts: dict) -> dict:
    out = {}
    for part in parts:
        out.update(part)
    return out


GPT_OSS = {"blk.{n}.post_attention_norm": f"{LAYER}.post_attention_layernorm",
           "blk.{n}.attn_sinks": f"{LAYER}.self_attn.sinks", "blk.{n}.ffn_gate_inp": f"{LAYER}.mlp.router",
           "blk.{n}.ffn_gate_exps": f"{LAYER}.mlp.experts.gate_proj",
           "blk.{n}.ffn_up_exps": f"{LAYER}.mlp.experts.up_proj",
           "blk.{n}.ffn_down_exps": f"{LAYER}.mlp.experts.down_proj"}
GEMMA_NAMES = _table({k: v for k, v in COMMON.items() if k != "blk.{n}.ffn_norm"}, SANDWICH)
ARCHS = {
    "llama": Arch("llama", ("LlamaForCausalLM",), permuted_qk=True),
    "qwen2": Arch("qwen2", ("Qwen2ForCausalLM",), rope_theta=1000000.0),
    "qwen3": Arch("qwen3", ("Qwen3ForCausalLM",), _table(COMMON, QK_NORM), rope_theta=1000000.0),
    "qwen2moe": Arch("qwen2_moe", ("Qwen2MoeForCausalLM",), _table(COMMON, EXPERTS, SHARED_EXPERT),
                     rope_theta=1000000.0, fixed={"decoder_sparse_step": 1, "mlp_only_layers": [],
                                                  "norm_topk_prob": False},
                     hparams=dict(MOE_HPARAMS, shared_expert_intermediate_size=
                                  "expert_shared_feed_forward_length")),
    "qwen3moe": Arch("qwen3_moe", ("Qwen3MoeForCausalLM",), _table(COMMON, QK_NORM, EXPERTS),
                     rope_theta=1000000.0, hparams=MOE_HPARAMS,
                     fixed={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}),
    "gemma": Arch("gemma", ("GemmaForCausalLM",), norm_offset=1.0),
    "gemma2": Arch("gemma2", ("Gemma2ForCausalLM",), GEMMA_NAMES, norm_offset=1.0,
                   hparams={"attn_logit_softcapping": "attn_logit_softcapping",
                            "final_logit_softcapping": "final_logit_softcapping",
                            "sliding_window": "attention.sliding_window"}),
    "gemma3": Arch("gemma3_text", ("Gemma3ForCausalLM",), _table(GEMMA_NAMES, QK_NORM),
                   rope_theta=1000000.0, norm_offset=1.0,
                   hparams={"sliding_window": "attention.sliding_window",
                            "final_logit_softcapping": "final_logit_softcapping",
                            "rope_local_base_freq": "rope.freq_base_swa"},
                   # llama.cpp's gemma3 hard-codes these (llama-model.cpp, LLM_ARCH_GEMMA3)
                   fixed={"sliding_window_pattern": 6, "rope_local_base_freq": 10000.0}),
    "phi3": Arch("phi3", ("Phi3ForCausalLM",), _table(COMMON, PHI3),
                 hparams={"sliding_window": "attention.sliding_window",
                          "original_max_position_embeddings": "rope.scaling.original_context_length"}),
    "gpt-oss": Arch("gpt_oss", ("GptOssForCausalLM",),
                    _table({k: v for k, v in COMMON.items() if "ffn" not in k}, GPT_OSS),
                    rope_theta=150000.0, bare=("blk.{n}.attn_sinks",),
                    hparams={"num_local_experts": "expert_count", "num_experts_per_tok": "expert_used_count",
                             "sliding_window": "attention.sliding_window"}),
}
# gemma2/gemma3 27B scale queries by hidden/heads, the others by head_dim (llama.cpp decides
# by the model's size, and so by its layer count).
QUERY_SCALE_BY_HIDDEN = {"gemma2": 46, "gemma3": 62}


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unmapped."""
    module, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", module)
    key = f"blk.{{n}}.{m[2]}" if m else module
    hf = ARCHS[arch].names.get(key)
    if hf is None:
        return None
    hf = hf.format(n=m[1] if m else "")
    return hf if key in ARCHS[arch].bare and suffix == "weight" else f"{hf}.{suffix}"


def arch_config(arch: str, meta: dict, config: dict) -> None:
    """Add the architecture's own config.json entries (after the common hparams)."""
    info = ARCHS[arch]
    for key, gguf_key in info.hparams.items():
        if (value := meta.get(f"{arch}.{gguf_key}")) is not None:
            config[key] = value
    for key, value in info.fixed.items():
        config.setdefault(key, value)
    if info.model_type.startswith("gemma") or info.model_type in ("qwen3", "qwen3_moe", "gpt_oss"):
        config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    if arch in QUERY_SCALE_BY_HIDDEN:
        by_hidden = config["num_hidden_layers"] == QUERY_SCALE_BY_HIDDEN[arch]
        config["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"]
                                           if by_hidden else config["head_dim"])
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if arch == "gemma3" and isinstance(pattern, list) and False in pattern:  # per layer: sliding?
        config["sliding_window_pattern"] = pattern.index(False) + 1
    elif arch == "gemma3" and isinstance(pattern, int):
        config["sliding_window_pattern"] = pattern
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        config["model_type"], config["architectures"] = "mistral", ["MistralForCausalLM"]
    rotary = meta.get(f"{arch}.rope.dimension_count")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if arch == "phi3" and rotary and rotary != head_dim:
        config["partial_rotary_factor"] = rotary / head_dim
