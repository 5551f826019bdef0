"""llama.cpp LoRA GGUF export, read back with the real `gguf.GGUFReader`: metadata, names, shapes, and the
delta of every layer; the Q/K permutation checked by merging the adapter into a llama.cpp-layout model file
the way llama-export-lora does (W + alpha/r * B @ A in GGUF space) and importing that with convert_gguf."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

import tiny
from mlxlora import LoraConfig, get_lora_model
from mlxlora.adapters import save_adapter
from mlxlora.models.gguf import convert_gguf, unpermute_rows
from mlxlora.adapters import export_gguf_lora
from mlxlora.formats.gguf_lora import permute_rows
from mlxlora.errors import AdapterError
from mlxlora.lora.layers import LoRAEmbedding
from mlxlora.lora.surgery import adapter_layers

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.peer

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9, 250, 3, 64]])


@pytest.fixture(scope="module")
def dirs(tiny_dirs):
    return tiny_dirs  # the session's tiny llama / qwen2 folders (read-only)


def wrapped(model_dir, config, seed=1):
    model, _ = load_model(model_dir)
    get_lora_model(model, config)
    mx.random.seed(seed)
    for _, layer in adapter_layers(model):
        layer.lora_a = mx.random.normal(layer.lora_a.shape) * 0.1
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    return model


def read(path):
    """(metadata, {tensor name: numpy array in GGUF numpy order}, {tensor name: type name})."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: np.array(t.data) for t in reader.tensors}, {t.name: t.tensor_type.name for t in reader.tensors}


def gguf_name(path, arch="llama", n=2):
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n).get_name(path + ".weight", try_suffixes=(".weight",))


CASES = {  # name -> (arch, LoraConfig)
    "llama-all-linear": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-embedding-head-patterns": ("llama", LoraConfig(
        r=4, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "q_proj", "k_proj", "down_proj"],
        rank_pattern={"k_proj": 2, "embed_tokens": 8}, alpha_pattern={"lm_head": 3, r"layers\.1\.mlp\.down_proj": 64})),
    "qwen2-rslora": ("qwen2", LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_delta_and_metadata(dirs, tmp_path, case):
    arch, config = CASES[case]
    model = wrapped(dirs[arch], config)
    save_adapter(model, tmp_path / "a", base_model="org/tiny")
    out = export_gguf_lora(tmp_path / "a", tmp_path / "lora.gguf", model_dir=dirs[arch])
    meta, tensors, types = read(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == arch and meta["general.name"] == "tiny LoRA"
    alpha = meta["adapter.lora.alpha"]
    assert isinstance(alpha, float) and alpha > 0
    assert set(types.values()) == {"F32"}
    layers = adapter_layers(model)
    assert len(tensors) == 2 * len(layers)
    cfg = json.loads((dirs[arch] / "config.json").read_text())
    worst = 0.0
    for path, layer in layers:
        name = gguf_name(path, arch)
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        r = b.shape[-1]  # llama.cpp's rank: lora_b's ne[0]
        if isinstance(layer, LoRAEmbedding):
            assert name == "token_embd.weight" and a.shape == (tiny.VOCAB_SIZE, r) and b.shape == (64, r)
            delta = alpha / r * a @ b.T  # (n_vocab, n_embd), llama.cpp's get_rows(A) then B
        else:
            (n_in, _), n_out = layer.lora_a.shape, layer.lora_b.shape[1]
            assert a.shape == (r, n_in) and b.shape == (n_out, r)
            if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
                heads = cfg["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
                b = b[unpermute_rows(n_out, heads)]  # back to HF row order
            delta = alpha / r * b @ a  # (out, in)
        worst = max(worst, np.abs(delta - np.array(layer.delta())).max())
    assert worst <= 1e-6, worst


def test_f16_tensors(dirs, tmp_path):
    model = wrapped(dirs["qwen2"], CASES["qwen2-rslora"][1])
    save_adapter(model, tmp_path / "a", base_model="tiny")
    _, tensors, types = read(export_gguf_lora(tmp_path / "a", tmp_path / "f16.gguf", dirs["qwen2"], dtype="float16"))
    assert set(types.values()) == {"F16"}
    _, f32, _ = read(export_gguf_lora(tmp_path / "a", tmp_path / "f32.gguf", dirs["qwen2"]))
    assert all(np.array_equal(tensors[k], f32[k].astype(np.float16)) for k in f32)


def test_permutation_is_llama_cpps():
    w = np.random.default_rng(0).normal(size=(48, 5))
    for heads in (1, 2, 4, 6):  # the definition in convert_hf_to_gguf.py LlamaModel.permute
        want = w.reshape(heads, 2, 48 // heads // 2, 5).swapaxes(1, 2).reshape(48, 5)
        assert np.array_equal(w[permute_rows(48, heads)], want)
        assert np.array_equal(want[unpermute_rows(48, heads)], w)  # the GGUF importer's inverse


def _tiny_vocab():
    from tokenizers import pre_tokenizers

    tokens = tiny.SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
    return tokens, [3 if t in tiny.SPECIALS else 1 for t in tokens]


def write_merged_gguf(path, model_dir, lora_file=None):
    """The tiny llama in llama.cpp's layout (Q/K rows permuted), with the LoRA file merged the way
    llama-export-lora does: W += alpha / r * lora_b @ lora_a in GGUF's own tensor order."""
    model, _ = load_model(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    meta, lora, _ = read(lora_file) if lora_file else ({}, {}, {})
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    tokens, types = _tiny_vocab()
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_eos_token_id(tiny.SPECIALS.index("<|im_end|>"))
    for hf, value in tree_flatten(model.parameters()):
        name = gguf_name(hf.removesuffix(".weight"))
        value = np.array(value)
        if name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            value = value[permute_rows(value.shape[0], heads)]
        if name + ".lora_a" in lora:
            a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
            scale = meta["adapter.lora.alpha"] / b.shape[-1]
            value = value + scale * (a @ b.T if name == "token_embd.weight" else b @ a)
        w.add_tensor(name, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_merged_into_llama_cpp_layout_gives_mlxloras_logits(dirs, tmp_path):
    model = wrapped(dirs["llama"], CASES["llama-embedding-head-patterns"][1])
    save_adapter(model, tmp_path / "a", base_model="tiny")
    lora = export_gguf_lora(tmp_path / "a", tmp_path / "lora.gguf", dirs["llama"])
    base_file = write_merged_gguf(tmp_path / "base.gguf", dirs["llama"])
    merged_file = write_merged_gguf(tmp_path / "merged.gguf", dirs["llama"], lora)
    # llama.cpp's load-time checks (llama-adapter.cpp), on ggml's ne (GGUFReader's tensor.shape)
    ne = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(base_file).tensors}
    lora_ne = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(lora).tensors}
    for name in {n.rsplit(".", 1)[0] for n in lora_ne}:
        a, b, w = lora_ne[name + ".lora_a"], lora_ne[name + ".lora_b"], ne[name]
        if name == "token_embd.weight":
            assert (w[0], w[1]) == (b[1], a[1])
        else:
            assert (w[0], w[1], a[1]) == (a[0], b[1], b[0])
    # the file's own permuted Q weights plus the adapter's delta are the permuted adapted weights
    _, base_t, _ = read(base_file)
    _, merged_t, _ = read(merged_file)
    q = dict(adapter_layers(model))["model.layers.1.self_attn.q_proj"]
    w_hf = np.array(q.linear.weight) + np.array(q.delta())
    assert np.abs(merged_t["blk.1.attn_q.weight"][unpermute_rows(64, 4)] - w_hf).max() <= 1e-6
    assert not np.allclose(merged_t["blk.1.attn_q.weight"], base_t["blk.1.attn_q.weight"], atol=1e-3)
    want = np.array(model(IDS))
    for name, file in (("merged", merged_file), ("base", base_file)):
        folder = convert_gguf(file, tmp_path / name)
        got = np.array(load_model(folder)[0](IDS))
        diff = np.abs(got - want).max()
        assert diff <= 1e-4 if name == "merged" else diff > 1e-2, (name, diff)


def test_gguf_model_as_base_gives_the_same_file(dirs, tmp_path):
    model = wrapped(dirs["llama"], CASES["llama-all-linear"][1])
    save_adapter(model, tmp_path / "a", base_model="tiny")
    from_folder = export_gguf_lora(tmp_path / "a", tmp_path / "x.gguf", dirs["llama"])
    from_gguf = export_gguf_lora(tmp_path / "a", tmp_path / "y.gguf", write_merged_gguf(tmp_path / "m.gguf", dirs["llama"]))
    assert from_folder.read_bytes() == from_gguf.read_bytes()


def test_refusals_are_clear(dirs, tmp_path):
    dora = wrapped(dirs["llama"], LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    save_adapter(dora, tmp_path / "dora", base_model="tiny")
    with pytest.raises(AdapterError, match="no DoRA"):
        export_gguf_lora(tmp_path / "dora", tmp_path / "x.gguf", dirs["llama"])
    tied = wrapped(dirs["qwen2"], LoraConfig(r=2, target_modules=["embed_tokens", "v_proj"]))
    save_adapter(tied, tmp_path / "tied", base_model="tiny")
    with pytest.raises(AdapterError, match="tied to the output head"):
        export_gguf_lora(tmp_path / "tied", tmp_path / "x.gguf", dirs["qwen2"])
    q = wrapped(dirs["llama"], LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(q, tmp_path / "q", base_model="tiny")
    with pytest.raises(AdapterError, match="permutation; give --model"):
        export_gguf_lora(tmp_path / "q", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    (tmp_path / "x.gguf").write_bytes(b"mine")
    with pytest.raises(AdapterError, match="--force"):
        export_gguf_lora(tmp_path / "q", tmp_path / "x.gguf", dirs["llama"])
    assert (tmp_path / "x.gguf").read_bytes() == b"mine"
    export_gguf_lora(tmp_path / "q", tmp_path / "x.gguf", dirs["llama"], force=True)
    assert read(tmp_path / "x.gguf")[0]["adapter.type"] == "lora"
    # qwen2 needs no permutation: its recorded model_type is enough
    v = wrapped(dirs["qwen2"], LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(v, tmp_path / "v", base_model="tiny")
    assert read(export_gguf_lora(tmp_path / "v", tmp_path / "v.gguf"))[0]["general.architecture"] == "qwen2"


run = tiny.run_cli


def test_cli_export_gguf_and_convert_gguf(dirs, tmp_path):
    model = wrapped(dirs["llama"], CASES["llama-all-linear"][1])
    save_adapter(model, tmp_path / "a", base_model="tiny")
    res = run("export-adapter", tmp_path / "a", "--to", "gguf", tmp_path / "lora.gguf", "--model", dirs["llama"])
    assert res.exit_code == 0, res.output
    assert read(tmp_path / "lora.gguf")[0]["general.type"] == "adapter"
    res = run("export-adapter", tmp_path / "a", "--to", "gguf", tmp_path / "lora.gguf", "--model", dirs["llama"])
    assert res.exit_code == 1 and "--force" in res.output
    # convert: a .gguf model -> MLX folder (re-quantized to 4 bits, GGUF's group of 32)
    model_file = write_merged_gguf(tmp_path / "m.gguf", dirs["llama"])
    res = run("convert", "--model", model_file, "--out", tmp_path / "mlx", "-q", "4")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    res = run("convert", "--model", model_file, "--out", tmp_path / "mlx")
    assert res.exit_code == 1 and "--force" in res.output
    res = run("convert", "--model", model_file, "--out", tmp_path / "mlx2", "--q-group-size", 64)
    assert res.exit_code == 1 and "--q-group-size" in res.output and not (tmp_path / "mlx2").exists()
    res = run("convert", "--model", model_file, "--out", tmp_path / "mlx", "--force")
    assert res.exit_code == 0, res.output
    assert "quantization" not in json.loads((tmp_path / "mlx" / "config.json").read_text())
