"""GGUF import per architecture: a tiny random mlx-lm model written as llama.cpp's converter
writes it (gguf-py's own tensor-name map, its Q/K permutation, gemma's 1 + w norms, stacked
experts), imported by mlxlora and run by mlx-lm; the logits must equal both the original model's
and those of transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`), the peer."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import tiny
from gguf_blocks import random_blocks
from test_gguf import _bpe_tokenizer, _llama_cpp_permute, _logits, _qwen2_tokenizer
from mlxlora.models.gguf import convert_gguf

gguf = pytest.importorskip("gguf")

BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512)
# GGUF architecture -> (mlx-lm config, GGUF metadata beyond the common keys). Sizes the installed
# transformers GGUF loader does not read from the file (gemma's query scale, MoE widths) are
# its defaults, so that both runtimes build the same model.
CASES = {
    "llama": (dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=False), {}),
    "mistral": (dict(model_type="llama", rope_theta=1000000.0, tie_word_embeddings=False), {}),
    "qwen2": (dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True), {}),
    "qwen3": (dict(model_type="qwen3", rope_theta=1000000.0, tie_word_embeddings=True, head_dim=128),
              {"key_length": 128, "value_length": 128}),
    "gemma": (dict(model_type="gemma", rope_theta=10000.0, head_dim=16), {"key_length": 16}),
    "gemma2": (dict(model_type="gemma2", rope_theta=10000.0, head_dim=256, query_pre_attn_scalar=256,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
               {"key_length": 256, "value_length": 256, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0, "sliding_window": 4096}),
    "gemma3": (dict(model_type="gemma3_text", rope_theta=1000000.0, head_dim=256, num_hidden_layers=6,
                    query_pre_attn_scalar=256, sliding_window=512, rope_local_base_freq=10000.0,
                    sliding_window_pattern=6),
               {"key_length": 256, "value_length": 256, "sliding_window": 512}),
    "phi3": (dict(model_type="phi3", rope_theta=10000.0, num_key_value_heads=4, tie_word_embeddings=False),
             {"rope_dimension_count": 16}),
    "qwen2moe": (dict(model_type="qwen2_moe", rope_theta=1000000.0, tie_word_embeddings=False,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632),
                 {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 1408,
                  "expert_shared_feed_forward_length": 5632}),
    "qwen3moe": (dict(model_type="qwen3_moe", rope_theta=1000000.0, tie_word_embeddings=False,
                      head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
                 {"key_length": 16, "value_length": 16, "expert_count": 4, "expert_used_count": 2,
                  "expert_feed_forward_length": 768}),
}
# transformers' GGUF loader reads these (GGUF_SUPPORTED_ARCHITECTURES); gemma (1) it does not,
# and a "mistral" llama file it sends to gguf-py 0.19 under an arch name gguf-py lacks.
PEER = {"llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen2moe", "qwen3moe"}
EXPERT_NAMES = {"mlp.switch_mlp.gate_proj": "ffn_gate_exps", "mlp.switch_mlp.up_proj": "ffn_up_exps",
                "mlp.switch_mlp.down_proj": "ffn_down_exps"}


def _model(config):
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    mx.random.seed(1)
    model = model_cls(args_cls.from_dict(config))
    model.load_weights([(k, mx.random.normal(v.shape) * 0.1) for k, v in tree_flatten(model.parameters())])
    return model


def _write(path, arch, config, model, tok, meta, types=None, extra=None):
    """The model as llama.cpp's convert_hf_to_gguf.py writes it: float32 tensors, or for the GGUF
    names in `types` random valid blocks of that type (not permuted: qwen/gemma files only)."""
    file_arch = "llama" if arch == "mistral" else arch
    w = gguf.GGUFWriter(str(path), file_arch)
    w.add_name("mistral" if arch == "mistral" else "tiny")  # how transformers tells mistral apart
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_eos_token_id(tiny.SPECIALS.index("<|im_end|>"))
    w.add_pad_token_id(0)  # else transformers' phi3 keeps its pad id 32000, past this vocab
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[file_arch.upper()], config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for hf, a in tree_flatten(model.parameters()):
        a = np.array(a)
        module, _, suffix = hf.rpartition(".")
        stem = next((v for k, v in EXPERT_NAMES.items() if module.endswith(k)), None)
        name = (f"blk.{hf.split('.')[2]}.{stem}.{suffix}" if stem else
                names.get_name(hf, try_suffixes=(".weight", ".bias")))
        assert name is not None, hf
        if file_arch == "llama" and module.endswith(tuple(heads)):
            a = _llama_cpp_permute(a, heads[module.rsplit(".", 1)[1]])
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            a = a + 1  # GemmaModel.modify_tensors: norms stored as 1 + w
        if name.endswith("ffn_gate_inp_shexp.weight"):
            a = a.reshape(-1)  # llama.cpp's shape {n_embd}
        kind = (types or {}).get(name.split(".")[-2])
        if kind and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0] == 0:
            raw = random_blocks(kind, int(np.prod(a.shape[:-1])), a.shape[-1], seed=len(name), peak=0.3)
            a, kind = raw.reshape(*a.shape[:-1], -1), gguf.GGMLQuantizationType[kind]
        else:
            kind = None  # rows too short for the type's blocks: float, as llama-quantize falls back
        w.add_tensor(name, a, raw_dtype=kind)
    for name, a in (extra or {}).items():
        w.add_tensor(f"{name}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def bpe():
    return _bpe_tokenizer()


@pytest.mark.peer
@pytest.mark.parametrize("arch", list(CASES))
def test_architecture_logits_match_original_and_transformers(tmp_path, bpe, arch):
    import mlx_lm

    encode, tok = bpe
    if arch.startswith("qwen"):
        encode, tok = _qwen2_tokenizer(tok)
    overrides, meta = CASES[arch]
    config = dict(BASE, vocab_size=len(tok["tokens"]), **overrides)
    model = _model(config)
    _write(tmp_path / "m.gguf", arch, config, model, tok, meta)
    ids = encode("The capital of France is Paris. Hello world! 12345")
    want = _logits(model, ids)

    loaded, _, cfg = mlx_lm.load(str(convert_gguf(tmp_path / "m.gguf", tmp_path / "mlx")), return_config=True)
    got = _logits(loaded, ids)
    scale = np.abs(want).max()  # 0.3 to 6 here
    assert np.abs(got - want).max() <= 1e-6 * scale, np.abs(got - want).max()  # 0 seen: same numbers
    for key, value in overrides.items():  # config.json carries the architecture's own keys
        if key != "model_type":
            assert cfg[key] == value, key
    if arch == "mistral":
        assert cfg["model_type"] == "mistral"
    if arch not in PEER:
        return
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        theirs = peer(torch.tensor([ids])).logits.numpy()
    # float32 round-off of two runtimes: 7.5e-8 (qwen2) to 3.3e-6 (gemma3, logits 3.6) seen
    assert np.abs(got - theirs).max() <= 1e-5 * scale, np.abs(got - theirs).max()


# llama-quantize's kind of mix (K-quants, Q8_0 embeddings, float router), exact types only.
QUANT_MIX = {"token_embd": "Q8_0", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q8_0",
             "attn_output": "IQ4_XS", "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q4_K",
             "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q5_K", "ffn_down_exps": "Q4_K"}


@pytest.mark.peer
@pytest.mark.parametrize("arch", ["gemma3", "qwen3moe"])
def test_quantized_architectures_match_transformers_dequantized(tmp_path, bpe, arch):
    """K-quant blocks (stacked experts too) stay quantized in mlxlora; transformers dequantizes
    them with gguf-py to float32. Same logits up to mlx-lm's float16 compute (relative to the largest
    logit: 3.0e-3 seen for gemma3, 4.6e-4 for qwen3moe)."""
    import mlx.nn as nn
    import mlx_lm
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    encode, tok = bpe if arch == "gemma3" else _qwen2_tokenizer(bpe[1])
    overrides, meta = CASES[arch]
    config = dict(BASE, vocab_size=len(tok["tokens"]), **dict(overrides, hidden_size=256, intermediate_size=512))
    _write(tmp_path / "q.gguf", arch, config, _model(config), tok, meta, QUANT_MIX)
    ids = encode("The capital of France is Paris. Hello world! 12345")
    loaded, _ = mlx_lm.load(str(convert_gguf(tmp_path / "q.gguf", tmp_path / "mlx")))
    quantized = {p for p, m in loaded.named_modules() if hasattr(m, "bits")}
    assert {"model.layers.1.self_attn.q_proj", "model.embed_tokens"} <= quantized
    if arch == "qwen3moe":
        assert loaded.model.layers[0].mlp.switch_mlp.up_proj.bits == 5
        assert isinstance(loaded.model.layers[0].mlp.gate, nn.Linear) and not hasattr(loaded.model.layers[0].mlp.gate, "bits")
    got = _logits(loaded, ids)
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32)
    with torch.no_grad():
        theirs = peer(torch.tensor([ids])).logits.numpy()
    err = np.abs(got - theirs).max() / np.abs(theirs).max()
    assert err <= 1e-2, err


@pytest.mark.peer
def test_phi3_longrope_factors_become_rope_scaling(tmp_path, bpe):
    """128k phi3 files carry LongRoPE as rope_factors_long/short tensors (head_dim/2 each) and the
    original context in metadata; mlx-lm's SuScaledRoPE reads them back from config.json."""
    import mlx_lm

    encode, tok = bpe
    overrides, meta = CASES["phi3"]
    scaling = {"type": "longrope", "long_factor": [1.0, 1.25, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0],
               "short_factor": [1.0, 1.0, 1.125, 1.25, 1.5, 1.75, 2.0, 2.5]}
    config = dict(BASE, vocab_size=len(tok["tokens"]), **overrides, rope_scaling=scaling,
                  original_max_position_embeddings=16)
    model = _model(config)
    extra = {f"rope_factors_{k}": np.array(scaling[f"{k}_factor"], np.float32) for k in ("long", "short")}
    _write(tmp_path / "p.gguf", "phi3", config, model, tok, dict(meta, rope_scaling_orig_ctx_len=16), extra=extra)
    loaded, _, cfg = mlx_lm.load(str(convert_gguf(tmp_path / "p.gguf", tmp_path / "mlx")), return_config=True)
    assert cfg["rope_scaling"] == scaling and cfg["original_max_position_embeddings"] == 16
    ids = encode("The capital of France is Paris. Hello world! 12345")  # longer than 16: long factors
    assert len(ids) > 16
    assert np.abs(_logits(loaded, ids) - _logits(model, ids)).max() <= 1e-6


@pytest.mark.peer
def test_gemma3_linear_rope_scaling(tmp_path, bpe):
    """Gemma 3 4B+ files say rope.scaling.type = linear, factor 8 (global layers). mlx-lm's own model
    with that scaling is the reference: transformers 5.24's GGUF loader drops the key (its logits
    then differ by 0.14 here, as much as an unscaled model's)."""
    import mlx_lm

    encode, tok = bpe
    overrides, meta = CASES["gemma3"]
    config = dict(BASE, vocab_size=len(tok["tokens"]), **overrides, rope_scaling={"rope_type": "linear", "factor": 8.0})
    model = _model(config)
    meta = dict(meta, rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=8.0)
    _write(tmp_path / "m.gguf", "gemma3", config, model, tok, meta)
    loaded, _, cfg = mlx_lm.load(str(convert_gguf(tmp_path / "m.gguf", tmp_path / "mlx")), return_config=True)
    assert cfg["rope_scaling"]["rope_type"] == "linear" and cfg["rope_scaling"]["factor"] == 8.0
    ids = encode("The capital of France is Paris. Hello world! 12345")
    want = _logits(model, ids)
    assert np.abs(_logits(loaded, ids) - want).max() <= 1e-6 * np.abs(want).max()
    del config["rope_scaling"]
    assert np.abs(_logits(_model(config), ids) - want).max() > 0.05  # the scaling does show


GPT_OSS_CONFIG = dict(model_type="gpt_oss", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      num_local_experts=4, num_experts_per_tok=2, sliding_window=8, rope_theta=150000.0,
                      max_position_embeddings=512,
                      rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "original_max_position_embeddings": 4096})
GPT_OSS_NAMES = {"self_attn.sinks": "attn_sinks", "mlp.router": "ffn_gate_inp",
                 "mlp.experts.gate_proj": "ffn_gate_exps", "mlp.experts.up_proj": "ffn_up_exps",
                 "mlp.experts.down_proj": "ffn_down_exps"}


@pytest.mark.peer
@pytest.mark.parametrize("experts", ["F32", "MXFP4"])
def test_gpt_oss(tmp_path, bpe, experts):
    """gpt-oss as llama.cpp names it (attention sinks, router and expert biases, YaRN metadata),
    experts F32 or MXFP4 (gguf-py's quantizer). The reference is mlx-lm's own model holding the
    file's values: transformers 5.24's gpt-oss GGUF loader expects `ffn_*_projs` expert names that
    llama.cpp does not write, so it is no peer here."""
    import mlx_lm

    encode, tok = bpe
    config = dict(GPT_OSS_CONFIG, vocab_size=len(tok["tokens"]))
    model = _model(config)
    w = gguf.GGUFWriter(str(tmp_path / "o.gguf"), "gpt-oss")
    for add, value in [("context_length", 512), ("embedding_length", 64), ("block_count", 2),
                       ("feed_forward_length", 64), ("head_count", 4), ("head_count_kv", 2), ("key_length", 16),
                       ("value_length", 16), ("layer_norm_rms_eps", 1e-5), ("rope_freq_base", 150000.0),
                       ("expert_count", 4), ("expert_used_count", 2), ("sliding_window", 8),
                       ("rope_scaling_type", gguf.RopeScalingType.YARN), ("rope_scaling_factor", 32.0),
                       ("rope_scaling_orig_ctx_len", 4096), ("rope_scaling_yarn_beta_fast", 32.0),
                       ("rope_scaling_yarn_beta_slow", 1.0), ("tokenizer_model", "gpt2"),
                       ("tokenizer_pre", tok["pre"]), ("token_list", tok["tokens"]),
                       ("token_types", tok["types"]), ("token_merges", tok["merges"])]:
        getattr(w, f"add_{add}")(value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, 2)
    held = {}
    for hf, a in tree_flatten(model.parameters()):
        a = np.array(a)
        layer = hf.split(".")[2] if hf.startswith("model.layers.") else None
        own = next((v for k, v in GPT_OSS_NAMES.items() if f".{k}." in f"{hf}." or hf.endswith(f".{k}")), None)
        if own:
            suffix = "weight" if hf.endswith("sinks") else hf.rsplit(".", 1)[1]
            name = f"blk.{layer}.{own}.{suffix}"
        else:
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if experts == "MXFP4" and own and own.endswith("_exps") and name.endswith(".weight"):
            raw = gguf.quants.quantize(a, gguf.GGMLQuantizationType.MXFP4)
            held[hf] = mx.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.MXFP4))
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.load_weights(list(held.items()), strict=False)
    loaded, _, cfg = mlx_lm.load(str(convert_gguf(tmp_path / "o.gguf", tmp_path / "mlx")), return_config=True)
    assert {k: cfg["rope_scaling"][k] for k in config["rope_scaling"]} == config["rope_scaling"]
    ids = encode("The capital of France is Paris. Hello world! 12345")  # longer than the window of 8
    want = _logits(model, ids)
    if experts == "MXFP4":
        assert loaded.model.layers[0].mlp.experts.up_proj.mode == "mxfp4"
    # F32: the same numbers (0 seen); MXFP4: the same weights through MLX's mxfp4 kernel (8.9e-8 seen)
    tol = 1e-6 if experts == "F32" else 1e-5
    assert np.abs(_logits(loaded, ids) - want).max() <= tol * np.abs(want).max()
