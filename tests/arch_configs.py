"""One tiny random config per text architecture module of the installed mlx-lm (the conformance table).

COMMON holds the keys most architectures share (hidden 64, 2 blocks, vocab 256, 4 experts of which 2
are active); ARCHS maps every `mlx_lm.models` module that builds a language model to the keys it
needs on top (a vision/omni wrapper gets its text part as `text_config`). OUT_OF_SCOPE names the
modules that are not a text architecture, with the reason. tests/test_conformance.py and
scripts/conformance.py both read this table.
"""

from __future__ import annotations

import copy

VOCAB = 256

COMMON = dict(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
    layer_norm_eps=1e-5, layer_norm_epsilon=1e-5, norm_eps=1e-5, tie_word_embeddings=False,
    attention_bias=False, mlp_bias=False, use_bias=False,
    # MoE
    num_experts=4, num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1, num_shared_experts=1,
    moe_intermediate_size=32, shared_expert_intermediate_size=64, first_k_dense_replace=1,
    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, routed_scaling_factor=1.0,
    n_group=1, topk_group=1, moe_layer_freq=1,
    # MLA
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    partial_rotary_factor=0.5, sliding_window=16,
)

# Not text architectures: helpers of the package (no Model), or a model that needs a package mlx-lm
# itself does not install.
OUT_OF_SCOPE = {
    "activations": "helper module (no Model)", "base": "helper module (no Model)",
    "bitlinear_layers": "helper module (no Model)", "cache": "helper module (no Model)",
    "gated_delta": "helper module (no Model)", "mla": "helper module (no Model)",
    "pipeline": "helper module (no Model)", "rope_utils": "helper module (no Model)",
    "ssm": "helper module (no Model)", "switch_layers": "helper module (no Model)",
    "prism_hadamard_qwen35": "a pre-quantized, Hadamard-rotated 2-bit pack of qwen3_5 (loads only its own pack "
                             "files); the architecture is covered by qwen3_5",
}

ARCHS: dict[str, dict] = {
    # dense decoders that need nothing beyond COMMON
    **{a: {} for a in (
        "Klear", "bailing_moe", "bailing_moe_v3", "cohere", "deepseek", "deepseek_v3", "deepseek_v32", "deepseek_v41",
        "dots1", "ernie4_5", "falcon_h1", "gemma", "gemma2", "glm", "glm4", "glm4_moe_lite", "helium",
        "hunyuan_v1_dense", "internlm2", "internlm3", "iquestloopcoder", "laguna", "llama", "mimo",
        "muse_glimmer", "nanbeige", "nanochat", "olmo2", "olmoe", "phi", "phi3", "phimoe", "plamo3", "qwen2",
        "qwen2_moe", "qwen3", "qwen3_moe", "seed_oss", "smollm3", "solar_open", "starcoder2", "talkie",
        "telechat3", "youtu_llm", "mixtral")},
    "olmo": dict(d_model=64, n_layers=2, mlp_hidden_size=256, n_heads=4, embedding_size=VOCAB),
    "afm7": dict(hidden_dim=64, num_layers=2, num_kv_reuse_layers=1, num_heads=4, num_kv_heads=2),
    "afmoe": dict(layer_types=["sliding_attention", "full_attention"], num_dense_layers=1, mup_enabled=False),
    "apertus": dict(post_norm=False, qk_norm=True),
    "baichuan_m1": dict(sliding_window_layers=[0], conv_window=2),
    "bailing_hybrid": dict(layer_group_size=2, group_norm_size=1, first_k_dense_replace=0),
    "bailing_moe_linear": dict(layer_group_size=2, group_norm_size=1),
    "bitnet": {},
    "cohere2": dict(sliding_window_pattern=2),
    "dbrx": dict(d_model=64, n_layers=2, n_heads=4,
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0)),
    "deepseek_v2": dict(rope_scaling=dict(factor=1.0, mscale_all_dim=0, original_max_position_embeddings=256,
                                          beta_fast=32, beta_slow=1, mscale=1.0, type="yarn")),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1,
                         moe_num_shared_experts=1),
    "exaone": dict(num_layers=2),
    "exaone4": dict(rope_scaling=None, sliding_window_pattern="LG"),
    "exaone_moe": dict(layer_types=["sliding_attention", "full_attention"], is_moe_layer=[False, True]),
    "gear": dict(layer_types=["sliding_attention", "full_attention"]),
    "gemma3n": dict(num_kv_shared_layers=0, vocab_size_per_layer_input=VOCAB, rope_local_base_freq=10000.0,
                    final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"],
                    activation_sparsity_pattern=[0.0, 0.0], hidden_size_per_layer_input=8, altup_num_inputs=2,
                    altup_coef_clip=120.0, altup_correct_scale=True, altup_active_idx=0, laurel_rank=8),
    "muse_spark": dict(post_norm_eps=1e-5, rope_parameters=dict(rope_theta=10000.0), layer_rope_theta=[10000.0, 0],
                       layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
                       output_multiplier=1.0, num_local_experts=4, moe_hidden_size=32,
                       num_shared_experts=0, mlp_layer_types=["sparse", "sparse"]),
    "kimi_k3": dict(linear_attn_config=dict(kda_layers=[1], full_attn_layers=[2], num_heads=4, head_dim=16,
                                            short_conv_kernel_size=4),
                    num_experts_per_token=2, first_k_dense_replace=1, hidden_act="situ"),
    "qwen3_5": dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=2),
    "gemma3_text": dict(sliding_window_pattern=2, query_pre_attn_scalar=16),
    "gemma4_text": dict(sliding_window_pattern=2, layer_types=["sliding_attention", "full_attention"],
                        num_kv_shared_layers=0, hidden_size_per_layer_input=0, global_head_dim=16),
    "glm4_moe": dict(rope_scaling=None, use_qk_norm=True),
    "glm_moe_dsa": dict(index_head_dim=16, index_n_heads=2, index_topk=4, topk_method="noaux_tc",
                        scoring_func="sigmoid", rope_parameters=dict(rope_theta=10000.0, rope_type="default")),
    "gpt2": dict(n_ctx=256, n_embd=64, n_head=4, n_layer=2, n_positions=256),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_inner=128, n_head=4, n_positions=256),
    "gpt_neox": dict(rotary_emb_base=10000.0, rotary_pct=0.5),
    "gpt_oss": dict(num_local_experts=4, intermediate_size=32, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "gptj": dict(n_embd=64, n_head=4, n_layer=2, n_positions=256, rotary_dim=8),
    "granite": dict(logits_scaling=2.0, attention_multiplier=0.25, embedding_multiplier=2.0, residual_multiplier=0.5),
    "granitemoe": dict(logits_scaling=2.0, attention_multiplier=0.25, embedding_multiplier=2.0,
                       residual_multiplier=0.5, num_local_experts=4, intermediate_size=32),
    "granitemoehybrid": dict(logits_scaling=2.0, attention_multiplier=0.25, embedding_multiplier=2.0,
                             residual_multiplier=0.5, layer_types=["mamba", "attention"], num_local_experts=4,
                             shared_intermediate_size=64, intermediate_size=32, mamba_n_heads=4, mamba_d_head=32,
                             mamba_proj_bias=False, mamba_d_state=16, mamba_d_conv=4, mamba_n_groups=1,
                             mamba_conv_bias=True),
    "hunyuan": dict(rope_scaling=dict(alpha=1.0, factor=1.0, type="dynamic"), moe_topk=2, num_shared_expert=1, use_mixed_mlp_moe=True, use_qk_norm=True, use_cla=False,
                    cla_share_factor=1, moe_intermediate_size=32),
    "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2,
                  mamba_d_conv=4, mamba_d_state=16, mamba_expand=2, intermediate_size=64),
    "kimi_linear": dict(linear_attn_config=dict(kda_layers=[1], full_attn_layers=[2], num_heads=4, head_dim=16),
                        model_max_length=256, num_experts_per_token=2, first_k_dense_replace=1),
    "lfm2": dict(conv_bias=False, conv_L_cache=3, block_dim=64, block_ff_dim=128, block_multiple_of=32,
                 block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False, full_attn_idxs=[1]),
    "lfm2_moe": dict(use_expert_bias=True, num_dense_layers=1, conv_bias=False, conv_L_cache=3, full_attn_idxs=[1]),
    "lille-130m": dict(block_size=256, n_embd=64, n_head=4, n_kv_heads=2, n_layer=2),
    "llama4_text": dict(attention_chunk_size=16, rope_scaling=None, intermediate_size_mlp=128, intermediate_size=32, no_rope_layers=[1, 0], use_qk_norm=True,
                        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2),
    "longcat_flash": dict(attention_method="MLA", zero_expert_type="identity", ffn_hidden_size=128, moe_topk=2,
                          expert_ffn_hidden_size=32, zero_expert_num=1, num_layers=1, mla_scale_q_lora=True,
                          mla_scale_kv_lora=True),
    "longcat_flash_ngram": dict(ffn_hidden_size=128, moe_topk=2, expert_ffn_hidden_size=32, zero_expert_num=1,
                                num_layers=1, mla_scale_q_lora=True, mla_scale_kv_lora=True,
                                ngram_vocab_size_ratio=2, emb_neighbor_num=2, emb_split_num=2),
    "mamba": dict(state_size=8, conv_kernel=4, use_conv_bias=True, time_step_rank=4, tie_word_embeddings=True),
    "mamba2": dict(num_heads=4, head_dim=32, state_size=16, n_groups=1, conv_kernel=4, use_conv_bias=True,
                   time_step_limit=[0.0, 1e9], time_step_rank=8, tie_word_embeddings=True),
    "mellum": dict(layer_types=["sliding_attention", "full_attention"],
                   rope_parameters=dict(sliding_attention=dict(rope_theta=10000.0),
                                        full_attention=dict(rope_theta=10000.0))),
    "mimo_v2_flash": dict(hybrid_layer_pattern=[1, 0], moe_layer_freq=[0, 1], add_swa_attention_sink_bias=True,
                          add_full_attention_sink_bias=False, sliding_window_size=16, topk_method="noaux_tc",
                          scoring_func="sigmoid", layernorm_epsilon=1e-5, swa_rope_theta=10000.0,
                          swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16, swa_v_head_dim=16),
    "minicpm": dict(dim_model_base=32, scale_depth=1.4, scale_emb=2.0),
    "minicpm3": dict(dim_model_base=32, scale_depth=1.4, scale_emb=2.0,
                     rope_scaling=dict(original_max_position_embeddings=256, short_factor=[1.0] * 4,
                                       long_factor=[1.0] * 4, type="longrope")),
    "minimax": dict(num_local_experts=4, shared_intermediate_size=0, rotary_dim=8, intermediate_size=32),
    "ministral3": dict(rope_parameters=dict(rope_theta=10000.0, rope_type="default", llama_4_scaling_beta=0.1,
                                            original_max_position_embeddings=256)),
    "mistral4": dict(rope_scaling=dict(factor=1.0, mscale_all_dim=0, original_max_position_embeddings=256,
                                       beta_fast=32, beta_slow=1, mscale=1.0, type="yarn"),
                     rope_parameters=dict(rope_theta=10000.0, rope_type="default", llama_4_scaling_beta=0.1,
                                          original_max_position_embeddings=256)),
    "nemotron": dict(hidden_act="relu2"),
    "nemotron-nas": dict(block_configs=[
        dict(attention=dict(n_heads_in_group=2), ffn=dict(ffn_mult=1.0)),
        dict(attention=dict(no_op=True), ffn=dict(ffn_mult=1.5))]),
    "nemotron_h": dict(mamba_num_heads=4, mamba_head_dim=16, mamba_proj_bias=False, ssm_state_size=16,
                       conv_kernel=4, n_groups=1, use_conv_bias=True, hybrid_override_pattern=["M", "*", "-"],
                       time_step_limit=[0.0, 1e9]),
    "olmo3": dict(layer_types=["sliding_attention", "full_attention"]),
    "olmo_hybrid": dict(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                        linear_value_head_dim=16, linear_conv_kernel_dim=4, linear_allow_neg_eigval=True,
                        layer_types=["linear_attention", "full_attention"]),
    "openelm": dict(num_transformer_layers=2, model_dim=64, ffn_dim_divisor=32, num_query_heads=[4, 4],
                    num_kv_heads=[2, 2], ffn_multipliers=[1.0, 2.0]),
    "phi3small": dict(dense_attention_every_n_layers=1, ff_intermediate_size=128, gegelu_limit=20.0,
                      mup_width_multiplier=1.0, blocksparse_block_size=32),
    "phixtral": dict(num_vocab=VOCAB, model_dim=64, num_heads=4, num_layers=2, rotary_dim=8, num_local_experts=4),
    "plamo": dict(n_shared_head=2),
    "plamo2": dict(hidden_size_per_head=16, attention_window_size=16, mamba_d_state=8, mamba_num_heads=4,
                   mamba_chunk_size=16, intermediate_size=128),
    "qwen": dict(kv_channels=16, intermediate_size=256),
    "qwen3_next": dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=2),
    "recurrent_gemma": dict(conv1d_width=4, logits_soft_cap=30.0, attention_window_size=16,
                            block_types=["recurrent", "attention"], lru_width=64),
    "rwkv7": dict(head_dim=16, a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=8, decay_low_rank_dim=8),
    "spark2_5": dict(rope_parameters=dict(sliding_attention=dict(rope_theta=10000.0, rope_type="default"),
                                          full_attention=dict(rope_theta=10000.0, rope_type="default")),
                     layer_types=["sliding_attention", "full_attention"]),
    "stablelm": dict(use_qkv_bias=False),
    "step3p5": dict(num_attention_groups=2, moe_num_experts=4, moe_top_k=2, moe_intermediate_size=32,
                    share_expert_dim=32, layer_types=["sliding_attention", "full_attention"], moe_layers_enum="1"),
}

_TEXT_QWEN35 = ARCHS["qwen3_5"]

# Vision / omni wrappers: mlx-lm builds their language model from `text_config` (the vision tower is
# dropped at load); the text part is what is adapted.
TEXT_OF = {
    "gemma3": ("gemma3_text", {}), "gemma3n": ("gemma3n", {}), "gemma4": ("gemma4_text", {}),
    "kimi_k25": ("deepseek_v3", {}), "kimi_k3": ("kimi_k3", {}), "kimi_vl": ("deepseek_v3", {}),
    "lfm2-vl": ("lfm2", {}), "llama4": ("llama4_text", dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0])), "minimax_m3_vl": ("minimax_m3_vl", dict(moe_layer_freq=[0, 1], dense_intermediate_size=128,
                                             intermediate_size=32, num_local_experts=4, shared_intermediate_size=32)),
    "mistral3": ("ministral3", {}), "muse_spark": ("muse_spark", {}), "pixtral": ("llama", {}),
"qwen2_vl": ("qwen2", {}), "qwen3_5": ("qwen3_5", {}),
    "qwen3_5_moe": ("qwen3_5_moe", _TEXT_QWEN35), "qwen3_vl": ("qwen3", {}), "qwen3_vl_moe": ("qwen3_moe", {}),
}
_TEXT = copy.deepcopy(ARCHS)
for _wrapper, (_text, _extra) in TEXT_OF.items():
    ARCHS[_wrapper] = dict(text_config=dict(_TEXT.get(_text, {}), model_type=_text, **_extra))


def config_for(arch: str) -> dict:
    """The full config.json dict of `arch`'s tiny model (a fresh copy)."""
    entry = copy.deepcopy(ARCHS[arch])
    if "text_config" in entry:
        text = dict(copy.deepcopy(COMMON), **entry["text_config"])
        return dict(model_type=arch, vocab_size=VOCAB, **{k: v for k, v in entry.items() if k != "text_config"},
                    text_config=text)
    return dict(copy.deepcopy(COMMON), model_type=arch, **entry)
