"""`export-model --format gguf` / `fuse --format gguf`: a fused model as one llama.cpp GGUF file.

Checked against two readers that are not the writer: transformers' GGUF loader (its own name table and
Q/K un-permutation; logits equal to float rounding) and mlxlora's GGUF import (bit-exact for f32).
llama.cpp itself reads these files in test_llama_cpp.py.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import tiny

IDS = [[5, 60, 61, 62, 70, 80, 90, 100, 33, 34, 35, 36]]
TEXT = "Hello world 12345, it's <|im_start|>user\nnaïve café!\n\n  spaces"


def _export(src, out, gguf_type="f32"):
    from mlxlora.models import load_base
    from mlxlora.models.export_gguf import export_gguf, gguf_file_name

    base = load_base(str(src))
    folder = export_gguf(base.model, base.config, base.path, out, gguf_type)
    return base, folder / gguf_file_name(folder, gguf_type)


def _reader(path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items()}


@pytest.mark.peer
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_transformers_gguf_loader_gives_the_same_logits(tmp_path, arch):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    # transformers' qwen3 GGUF mapping ignores key_length and assumes head_dim 128 (every real Qwen3)
    src = tiny.make_bpe_model(tmp_path / "src", arch, **({"head_dim": 128} if arch == "qwen3" else {}))
    base, path = _export(src, tmp_path / "out")
    ref = np.array(base.model(mx.array(IDS)))
    peer = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        got = peer(torch.tensor(IDS)).logits.numpy()
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_round_trip_through_the_importer_is_exact(tmp_path, arch, tiny_bpe_dirs):
    from mlxlora.models import load_base
    from mlxlora.models.gguf import convert_gguf

    base, path = _export(tiny_bpe_dirs[arch], tmp_path / "out")
    back = load_base(str(convert_gguf(path, tmp_path / "back"))).model
    assert mx.array_equal(back(mx.array(IDS)), base.model(mx.array(IDS)))


def test_types_and_their_error(tmp_path, tiny_bpe_dirs):
    """1-D tensors stay F32; matrices take the type; q4_0 keeps token_embd/output at Q8_0; error grows as bits fall."""
    from gguf import quants

    from mlxlora.models.export_gguf import gguf_tensors

    errors = {}
    for t, matrix in (("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        base, path = _export(tiny_bpe_dirs["llama"], tmp_path / t, t)
        reader, meta = _reader(path)
        want = gguf_tensors(base.model, base.config)
        types = {x.name: x.tensor_type.name for x in reader.tensors}
        assert set(types) == set(want)
        for x in reader.tensors:
            expected = "F32" if len(want[x.name].shape) == 1 else matrix
            if t == "q4_0" and x.name.split(".")[0] in ("token_embd", "output"):
                expected = "Q8_0"
            assert types[x.name] == expected, (t, x.name, types[x.name])
        errors[t] = max(float(np.abs(quants.dequantize(x.data, x.tensor_type).reshape(want[x.name].shape)
                                     - want[x.name]).max()) for x in reader.tensors)
        assert meta["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[t]
    assert errors["f32"] == 0.0
    assert 0 < errors["f16"] < errors["bf16"] < errors["q8_0"] < errors["q4_0"] < 0.1, errors


def test_metadata_and_tokenizer(tmp_path, tiny_bpe_dirs):
    from tokenizers import Tokenizer

    from mlxlora.models.gguf_tokenizer import build_tokenizer

    src = tiny_bpe_dirs["llama"]
    _, path = _export(src, tmp_path / "out")
    _, meta = _reader(path)
    config = json.loads((src / "config.json").read_text())
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == config["num_hidden_layers"]
    assert meta["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert meta["llama.rope.freq_base"] == pytest.approx(config["rope_theta"])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"][:3] == tiny.SPECIALS and meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert meta["tokenizer.ggml.merges"] == ["Ġ t"] and meta["tokenizer.ggml.tokens"][-1] == "Ġt"
    assert meta["tokenizer.ggml.eos_token_id"] == tiny.SPECIALS.index("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tiny.CHATML
    rebuilt, _ = build_tokenizer(meta)
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    assert rebuilt.encode(TEXT).ids == original.encode(TEXT).ids


def test_smollm_pre_tokenizer_is_named(tmp_path):
    """SmolLM2's split rule (digits one by one, then GPT-2's) is llama.cpp's "smollm"."""
    from tokenizers import pre_tokenizers

    from mlxlora.models.export_gguf_vocab import pre_tokenizer_name

    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert pre_tokenizer_name({"pre_tokenizer": json.loads(pre.__getstate__())}, tmp_path) == "smollm"
    with pytest.warns(UserWarning, match="default"):
        assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}, tmp_path) == "default"


def test_a_bpe_vocabulary_without_merges_is_refused(tmp_path, tiny_dirs):
    from mlxlora.errors import ModelError

    with pytest.raises(ModelError, match="no merges; llama.cpp refuses"):
        _export(tiny_dirs["llama"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_modelfile():
    from mlxlora.models.modelfile import modelfile

    text = modelfile("m.gguf", tiny.CHATML, "<|endoftext|>")
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.gguf" and lines[1].startswith('TEMPLATE """{{- range .Messages }}<|im_start|>')
    assert lines[-2:] == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']
    other = modelfile("m.gguf", "{{ messages }}", "</s>")
    assert "TEMPLATE" not in other.replace("no Ollama TEMPLATE", "") and 'PARAMETER stop "</s>"' in other


def test_cli_export_model_gguf(tmp_path, tiny_bpe_dirs, cli):
    src = tmp_path / "src"
    shutil.copytree(tiny_bpe_dirs["qwen2"], src)
    out = tmp_path / "qwen-gguf"
    res = cli("export-model", "--model", src, "--format", "gguf", "--gguf-type", "q8_0", "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "qwen-gguf-q8_0.gguf"]
    assert (out / "Modelfile").read_text().startswith("FROM ./qwen-gguf-q8_0.gguf\n")
    before = (out / "qwen-gguf-q8_0.gguf").read_bytes()
    tiny.one_line_error(cli("export-model", "--model", src, "--format", "gguf", "--out", out), "--out", "--force")
    assert (out / "qwen-gguf-q8_0.gguf").read_bytes() == before
    tiny.one_line_error(cli("export-model", "--model", src, "--gguf-type", "q8_0", "--out", tmp_path / "x"),
                        "--gguf-type", "--format gguf")
    tiny.one_line_error(cli("export-model", "--model", src, "--format", "gguf", "--dtype", "float16",
                            "--out", tmp_path / "x"), "--dtype")


def test_k_quant_without_llama_quantize_says_so(tmp_path, tiny_bpe_dirs, cli, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("MLXLORA_CACHE", str(tmp_path / "cache"))
    res = cli("export-model", "--model", tiny_bpe_dirs["llama"], "--format", "gguf", "--gguf-type", "q4_k_m",
              "--out", tmp_path / "out")
    tiny.one_line_error(res, "q4_k_m", "llama-quantize", "q8_0")
    assert not (tmp_path / "out").exists()


def test_fuse_format_gguf_holds_the_adapter(tmp_path, tiny_bpe_dirs, cli):
    """A non-zero adapter fused into GGUF: the file (read back) computes what the adapted model computes."""
    from mlxlora.config import LoraConfig
    from mlxlora.inference import load_with_adapter
    from mlxlora.models import load_base
    from mlxlora.models.gguf import convert_gguf

    src = tiny_bpe_dirs["llama"]
    adapter = tiny.make_adapter(src, tmp_path / "adapter", LoraConfig(r=4, target_modules="all-linear"), seed=3)
    out = tmp_path / "fused"
    res = cli("fuse", "--model", src, "--adapter", adapter, "--format", "gguf", "--gguf-type", "f32", "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "fuse_report.json", "fused-f32.gguf"]
    adapted = load_with_adapter(str(src), str(adapter)).model(mx.array(IDS))
    plain = load_base(str(src)).model(mx.array(IDS))
    back = load_base(str(convert_gguf(out / "fused-f32.gguf", tmp_path / "back"))).model(mx.array(IDS))
    assert float(mx.abs(adapted - plain).max()) > 0.05  # the adapter matters ...
    assert float(mx.abs(back - adapted).max()) < 1e-4  # ... and the GGUF holds it
    tiny.one_line_error(cli("fuse", "--model", src, "--adapter", adapter, "--gguf-type", "f16", "--out",
                            tmp_path / "y"), "--gguf-type", "--format gguf")
