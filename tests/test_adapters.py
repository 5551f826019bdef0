"""Adapter folders: bit-exact save/load round trips, PEFT names and shapes, refusing to overwrite, clear errors."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

import tiny
from mlxlora import LoraConfig, get_lora_model
from mlxlora.adapters import (CONFIG_FILE, RECORD_FILE, WEIGHTS_FILE, load_adapter, load_adapter_weights,
                              read_adapter_config, save_adapter)
from mlxlora.models.hf_export import export_hf
from mlxlora.formats.names import hf_to_mlx, mlx_to_hf
from mlxlora.formats.peft import lora_config_from_peft
from mlxlora.errors import AdapterError, ModelError
from mlxlora.lora.surgery import adapter_layers, adapter_parameters

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9, 250]])


randomize = tiny.randomize_adapters


def wrapped(path, config, seed=1, dtype=None):
    model, _ = load_model(path)
    return randomize(get_lora_model(model, config), seed, dtype)


CASES = {
    "lora-qv": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), None),
    "dora-all-linear": ("qwen2", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_dora=True), None),
    "embedding-untied": ("llama", LoraConfig(r=4, target_modules=["embed_tokens", "o_proj"]), None),
    "embedding-tied": ("qwen2", LoraConfig(r=4, target_modules=["embed_tokens", "down_proj"]), None),
    "rank-pattern": ("phi3", LoraConfig(r=8, target_modules="all-linear", rank_pattern={"qkv_proj": 2},
                                        alpha_pattern={r"layers\.1\.mlp\.down_proj": 4.0}), None),
    "rslora-last-layer": ("gemma2", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                               last_n_layers=1), None),
    "bf16-layers": ("qwen3", LoraConfig(r=4, target_modules=["k_proj", "up_proj"], layers_to_transform=[1]),
                    mx.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact(case, tiny_dirs, tmp_path):
    arch, config, dtype = CASES[case]
    model = wrapped(tiny_dirs[arch], config, dtype=dtype)
    before = adapter_parameters(model)
    out = save_adapter(model, tmp_path / "adapter", base_model=str(tiny_dirs[arch]))
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE])

    fresh, _ = load_model(tiny_dirs[arch])
    reloaded = load_adapter(fresh, out)
    after = adapter_parameters(reloaded)
    assert list(after) == list(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert mx.array_equal(after[name], value).item(), name
    assert [(p, type(m), m.scale) for p, m in adapter_layers(reloaded)] == \
        [(p, type(m), m.scale) for p, m in adapter_layers(model)]
    assert reloaded.lora_config == config
    assert mx.array_equal(reloaded(IDS), model(IDS)).item()


def test_saved_tensors_have_peft_names_and_orientation(tiny_dirs, tmp_path):
    from safetensors.numpy import load_file

    config = LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"], use_dora=False)
    model = wrapped(tiny_dirs["llama"], config)
    save_adapter(model, tmp_path / "a", base_model="tiny")
    saved = load_file(tmp_path / "a" / WEIGHTS_FILE)
    want = {"base_model.model.model.embed_tokens.lora_embedding_A": (4, tiny.VOCAB_SIZE),
            "base_model.model.model.embed_tokens.lora_embedding_B": (64, 4)}
    for i in range(2):  # v_proj: 64 -> 2 kv heads * 16 = 32
        want[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_A.weight"] = (4, 64)
        want[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_B.weight"] = (32, 4)
    assert {k: v.shape for k, v in saved.items()} == want
    assert all(v.dtype == np.float32 for v in saved.values())
    v = model.model.layers[1].self_attn.v_proj
    np.testing.assert_array_equal(saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"],
                                  np.array(v.lora_a).T)
    np.testing.assert_array_equal(saved["base_model.model.model.embed_tokens.lora_embedding_B"],
                                  np.array(model.model.embed_tokens.lora_b).T)


def test_tied_head_gets_peft_copies_of_the_embedding_adapter(tiny_dirs, tmp_path):
    from safetensors.numpy import load_file

    model = wrapped(tiny_dirs["qwen2"], LoraConfig(r=4, target_modules=["embed_tokens"]))
    save_adapter(model, tmp_path / "a", base_model="tiny")
    saved = load_file(tmp_path / "a" / WEIGHTS_FILE)
    emb = model.model.embed_tokens
    # PEFT's tied lm_head adapter (ensure_weight_tying): lora_A = embedding_B.T, lora_B = embedding_A.T
    np.testing.assert_array_equal(saved["base_model.model.lm_head.lora_A.weight"], np.array(emb.lora_b))
    np.testing.assert_array_equal(saved["base_model.model.lm_head.lora_B.weight"], np.array(emb.lora_a))
    assert json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["ensure_weight_tying"] is True
    # A head copy that disagrees with the embedding adapter is not silently dropped.
    from safetensors.numpy import save_file
    saved["base_model.model.lm_head.lora_A.weight"] = saved["base_model.model.lm_head.lora_A.weight"] + 1
    save_file(saved, tmp_path / "a" / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match="unexpected lm_head.lora_a"):
        load_adapter(load_model(tiny_dirs["qwen2"])[0], tmp_path / "a")


def test_dora_magnitude_and_config_files(tiny_dirs, tmp_path):
    from safetensors.numpy import load_file

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], use_dora=True, last_n_layers=1)
    model = wrapped(tiny_dirs["qwen2"], config)
    save_adapter(model, tmp_path / "a", base_model="org/tiny", extra={"run_record": {"steps": 3}})
    saved = load_file(tmp_path / "a" / WEIGHTS_FILE)
    m = saved["base_model.model.model.layers.1.self_attn.o_proj.lora_magnitude_vector"]
    np.testing.assert_array_equal(m, np.array(model.model.layers[1].self_attn.o_proj.m))
    assert len(saved) == 3  # only block 1
    peft_cfg = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["task_type"] == "CAUSAL_LM"
    assert peft_cfg["use_dora"] is True and peft_cfg["layers_to_transform"] == [1]
    assert peft_cfg["target_modules"] == ["o_proj"] and peft_cfg["base_model_name_or_path"] == "org/tiny"
    record = json.loads((tmp_path / "a" / RECORD_FILE).read_text())
    assert record["lora_config"]["last_n_layers"] == 1 and record["run_record"] == {"steps": 3}
    assert record["adapted_modules"] == ["model.layers.1.self_attn.o_proj"]
    # Without our record the PEFT config alone gives the same adapted layers.
    (tmp_path / "a" / RECORD_FILE).unlink()
    assert read_adapter_config(tmp_path / "a").layers_to_transform == [1]
    fresh, _ = load_model(tiny_dirs["qwen2"])
    assert mx.array_equal(load_adapter(fresh, tmp_path / "a")(IDS), model(IDS)).item()


def test_refuses_to_overwrite_without_force(tiny_dirs, tmp_path):
    model = wrapped(tiny_dirs["llama"], LoraConfig(r=2))
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(AdapterError, match=r"adapter.*--force"):
        save_adapter(model, out, base_model="tiny")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    save_adapter(model, out, base_model="tiny", force=True)
    assert not (out / "keep.txt").exists() and (out / WEIGHTS_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left behind


def test_failed_save_leaves_nothing_half_written(tiny_dirs, tmp_path, monkeypatch):
    model = wrapped(tiny_dirs["llama"], LoraConfig(r=2))
    save_adapter(model, tmp_path / "a", base_model="tiny")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def broken(path, tensors, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("mlxlora.adapters.mx.save_safetensors", broken)
    # A failed write is one line naming the folder and what was kept (no OSError traceback).
    with pytest.raises(AdapterError, match=r"a: could not write \(disk full\); .*a is unchanged"):
        save_adapter(randomize(model, seed=2), tmp_path / "a", base_model="tiny", force=True)
    with pytest.raises(AdapterError, match="could not write .*nothing was written"):
        save_adapter(model, tmp_path / "b", base_model="tiny")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_mismatched_base_lists_every_bad_tensor(tiny_dirs, tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    save_adapter(wrapped(tiny_dirs["llama"], config), tmp_path / "a", base_model="tiny")
    small = tiny.make_model(tmp_path / "small", "llama", hidden_size=32, num_hidden_layers=1)
    model, _ = load_model(small)
    with pytest.raises(AdapterError) as err:
        load_adapter(model, tmp_path / "a")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "a" / WEIGHTS_FILE) in msg
    for proj in ("q_proj", "v_proj"):
        for t in ("lora_A", "lora_B"):
            assert f"model.layers.0.self_attn.{proj}.{t}.weight is (" in msg  # wrong shape in block 0
            assert f"unexpected model.layers.1.self_attn.{proj}.lora_" in msg  # block 1 does not exist
    assert "8 problem(s)" in msg
    assert not adapter_layers(model) and not hasattr(model, "lora_config")  # left as it was


def test_missing_tensor_is_listed(tiny_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    save_adapter(wrapped(tiny_dirs["llama"], LoraConfig(r=2)), tmp_path / "a", base_model="tiny")
    f = tmp_path / "a" / WEIGHTS_FILE
    tensors = load_file(f)
    gone = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, f)
    with pytest.raises(AdapterError, match=rf"missing {gone} \(2, 64\)"):
        load_adapter(load_model(tiny_dirs["llama"])[0], tmp_path / "a")


def test_load_adapter_weights_into_wrapped_model(tiny_dirs, tmp_path):
    config = LoraConfig(r=2, target_modules="all-linear")
    model = wrapped(tiny_dirs["phi3"], config)
    save_adapter(model, tmp_path / "a", base_model="tiny")
    other = wrapped(tiny_dirs["phi3"], config, seed=7)
    load_adapter_weights(other, tmp_path / "a")
    assert mx.array_equal(other(IDS), model(IDS)).item()


def test_corrupt_files_are_one_line_errors_naming_the_file(tiny_dirs, tmp_path):
    save_adapter(wrapped(tiny_dirs["llama"], LoraConfig(r=2)), tmp_path / "a", base_model="tiny")
    weights = tmp_path / "a" / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=str(weights)) as err:
        load_adapter(load_model(tiny_dirs["llama"])[0], tmp_path / "a")
    assert "\n" not in str(err.value)
    weights.write_bytes(data[:5])
    with pytest.raises(AdapterError, match=str(weights)):
        load_adapter(load_model(tiny_dirs["llama"])[0], tmp_path / "a")
    weights.write_bytes(data)
    (tmp_path / "a" / RECORD_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match=str(tmp_path / "a" / RECORD_FILE)):
        load_adapter(load_model(tiny_dirs["llama"])[0], tmp_path / "a")


def test_missing_folder_and_files(tiny_dirs, tmp_path):
    model, _ = load_model(tiny_dirs["llama"])
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=f"{CONFIG_FILE}, {WEIGHTS_FILE}"):
        load_adapter(model, tmp_path / "empty")


@pytest.mark.parametrize("field, value", [
    ("lora_bias", True), ("target_parameters", ["experts.gate_up_proj"]), ("init_lora_weights", "pissa"),
    ("init_lora_weights", "loftq"), ("alora_invocation_tokens", [1, 2]), ("fan_in_fan_out", True),
    ("modules_to_save", ["lm_head"]), ("peft_type", "LOHA"), ("layers_pattern", "decoder"), ("some_new_field", 3),
])
def test_unsupported_peft_variants_name_the_field(field, value):
    d = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: value}
    with pytest.raises(AdapterError, match=field):
        lora_config_from_peft(d)


def test_peft_config_reading():
    d = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"],
         "layers_to_transform": [0], "rank_pattern": {"q_proj": 2}, "use_rslora": True, "init_lora_weights": "gaussian",
         "megatron_core": "megatron.core", "loftq_config": {}, "peft_version": "0.21.2"}
    cfg = lora_config_from_peft(d)
    assert cfg == LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                             rank_pattern={"q_proj": 2}, use_rslora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        lora_config_from_peft(dict(d, target_modules=["embed_tokens"], use_dora=True))


def test_dora_on_embedding_from_config_is_adapter_error(tiny_dirs, tmp_path):
    save_adapter(wrapped(tiny_dirs["llama"], LoraConfig(r=2)), tmp_path / "a", base_model="tiny")
    (tmp_path / "a" / RECORD_FILE).unlink()
    cfg = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    cfg.update(target_modules=["tok_embeddings", "q_proj"], use_dora=True)
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=rf"{CONFIG_FILE}: use_dora"):
        load_adapter(load_model(tiny_dirs["llama"])[0], tmp_path / "a")


def test_name_table():
    assert mlx_to_hf("model.layers.0.self_attn.qkv_proj", "phi3") == "model.layers.0.self_attn.qkv_proj"
    p = "language_model.model.layers.3.mlp.down_proj"
    assert mlx_to_hf(p, "gemma3") == "model.language_model.layers.3.mlp.down_proj"
    assert hf_to_mlx(mlx_to_hf(p, "gemma3"), "gemma3") == p
    assert mlx_to_hf("language_model.lm_head.weight", "gemma3") == "lm_head.weight"
    assert mlx_to_hf("language_model.lm_headx", "gemma3") == "language_model.lm_headx"


def test_export_hf_dequantizes_and_reloads_in_mlx(tmp_path):
    src = tiny.make_model(tmp_path / "q", "qwen2", quantize=4)
    model, config = load_model(src)
    out = export_hf(model, config, src, tmp_path / "hf")
    hf_config = json.loads((out / "config.json").read_text())
    assert "quantization" not in hf_config and hf_config["torch_dtype"] == "float32"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    plain, _ = load_model(out)
    np.testing.assert_allclose(np.array(plain(IDS)), np.array(model(IDS)), atol=1e-4)
    with pytest.raises(ModelError, match="--force"):
        export_hf(model, config, src, out)
    with pytest.raises(ModelError, match="not supported"):
        export_hf(model, dict(config, model_type="mamba"), src, tmp_path / "m")
