"""mlx-lm adapter folders, against the real peer: mlxlora -> export_mlx_lm -> mlx_lm.load / generate / CLI
give mlxlora's logits and text; adapters trained by mlx-lm itself load into mlxlora with mlx-lm's logits."""

import json
import os
import re
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load, load_model, save_config

import tiny
from mlxlora import LoraConfig, get_lora_model
from mlxlora.adapters import load_adapter, save_adapter
from mlxlora.adapters import export_mlx_lm
from mlxlora.formats.mlx_lm import import_mlx_lm
from mlxlora.errors import AdapterError
from mlxlora.lora.layers import DoRALinear, LoRAEmbedding, LoRALinear
from mlxlora.lora.surgery import adapter_layers

pytestmark = pytest.mark.peer

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9, 250, 3, 64]])
TOL = 1e-5


@pytest.fixture(scope="module")
def dirs(tiny_dirs):
    return tiny_dirs  # the session's tiny llama / qwen2 folders (read-only)


def logits(model):
    return np.array(model(IDS).astype(mx.float32))


def ours(model_dir, config, seed=1):
    """A tiny base wrapped by mlxlora with non-zero random adapters (and perturbed DoRA magnitudes)."""
    model, tokenizer = load(str(model_dir))
    get_lora_model(model, config)
    tiny.randomize_adapters(model, seed)
    model.eval()
    return model, tokenizer


# name -> (arch, LoraConfig, expected (keys, num_layers) in adapter_config.json or None to skip that check)
EXPORT_CASES = {
    "qv": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
           (["self_attn.q_proj", "self_attn.v_proj"], -1)),
    "all-linear-last-block": ("llama", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", last_n_layers=1),
                              (["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"], 1)),
    "first-block-only": ("llama", LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0]),
                         (["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"], -1)),
    "rank-and-alpha-pattern": ("llama", LoraConfig(r=8, lora_alpha=8, target_modules="all-linear",
                                                   rank_pattern={"o_proj": 2},
                                                   alpha_pattern={r"layers\.0\.mlp\.down_proj": 32}), None),
    "rslora": ("qwen2", LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "up_proj"], use_rslora=True), None),
    "embedding-tied": ("qwen2", LoraConfig(r=4, target_modules=["embed_tokens", "down_proj"]),
                       (["mlp.down_proj", "model.embed_tokens"], -1)),
    "embedding-and-head": ("llama", LoraConfig(r=4, target_modules=["embed_tokens", "lm_head", "q_proj"]),
                           (["self_attn.q_proj", "lm_head", "model.embed_tokens"], -1)),
    "dora": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
             None),
    "dora-last-block": ("qwen2", LoraConfig(r=2, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                            last_n_layers=1), None),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_mlx_lm_with_equal_logits(dirs, tmp_path, case):
    arch, config, expected = EXPORT_CASES[case]
    model, _ = ours(dirs[arch], config)
    save_adapter(model, tmp_path / "ours", base_model="tiny")
    out = export_mlx_lm(tmp_path / "ours", tmp_path / "mlx-lm")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == ("dora" if config.use_dora else "lora") and cfg["model"] == "tiny"
    if expected is not None:
        assert (cfg["lora_parameters"]["keys"], cfg["num_layers"]) == expected
    peer, _ = load(str(dirs[arch]), adapter_path=str(out))
    assert np.abs(logits(peer) - logits(model)).max() <= TOL
    # and back: mlxlora reads the exported folder into the same numbers
    back, _ = load(str(dirs[arch]))
    load_adapter(back, out)
    assert np.abs(logits(back) - logits(model)).max() <= TOL


def test_rank_pattern_is_padded_and_scale_folded(dirs, tmp_path):
    _, config, _ = EXPORT_CASES["rank-and-alpha-pattern"]
    model, _ = ours(dirs["llama"], config)
    save_adapter(model, tmp_path / "ours", base_model="tiny")
    out = export_mlx_lm(tmp_path / "ours", tmp_path / "mlx-lm")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 8 and cfg["lora_parameters"]["scale"] == 1.0
    w = mx.load(str(out / "adapters.safetensors"))
    layers = dict(adapter_layers(model))
    o = "model.layers.1.self_attn.o_proj"
    assert w[f"{o}.lora_a"].shape == (64, 8) and not mx.any(w[f"{o}.lora_a"][:, 2:]).item()
    assert mx.array_equal(w[f"{o}.lora_a"][:, :2], layers[o].lora_a).item()
    down = "model.layers.0.mlp.down_proj"  # alpha 32 / r 8 = scale 4 -> lora_b * 4
    assert np.allclose(np.array(w[f"{down}.lora_b"]), 4 * np.array(layers[down].lora_b), rtol=1e-6, atol=0)


def test_generate_and_cli_give_mlxloras_text(dirs, tmp_path):
    import mlx_lm

    model, tokenizer = ours(dirs["llama"], EXPORT_CASES["qv"][1], seed=7)
    save_adapter(model, tmp_path / "ours", base_model="tiny")
    out = export_mlx_lm(tmp_path / "ours", tmp_path / "mlx-lm")
    peer, peer_tok = load(str(dirs["llama"]), adapter_path=str(out))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)

    def tokens(m, tok):
        return [r.token for r in mlx_lm.stream_generate(m, tok, ids, max_tokens=8)]

    assert tokens(peer, peer_tok) == tokens(model, tokenizer)
    want = mlx_lm.generate(model, tokenizer, ids, max_tokens=8)
    assert mlx_lm.generate(peer, peer_tok, ids, max_tokens=8) == want
    base, base_tok = load(str(dirs["llama"]))
    assert tokens(base, base_tok) != tokens(model, tokenizer)  # the adapter changes the text
    assert mlx_lm.generate(base, base_tok, ids, max_tokens=8) != want
    # the real CLI, greedy by default, chat template applied as above
    res = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(dirs["llama"]),
                          "--adapter-path", str(out), "--prompt", "hi", "--max-tokens", "8"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                         env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert res.returncode == 0, res.stderr[-2000:]
    printed = re.search(r"^={10}\n(.*)\n={10}$", res.stdout, re.S | re.M)
    assert printed is not None and printed[1] == want, res.stdout


# ---------------------------------------------------------------- adapters written by mlx-lm

def mlx_lm_trained(model_dir, out, kind="lora", num_layers=-1, keys=None, rank=4, scale=3.0, steps=4):
    """Train a few Adam steps the way mlx_lm.lora does and save adapters.safetensors + adapter_config.json."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load_model(model_dir)
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        params["keys"] = keys
    linear_to_lora_layers(model, num_layers, params, use_dora=kind == "dora")
    opt = optim.Adam(learning_rate=2e-2)

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y).mean()

    step = nn.value_and_grad(model, loss_fn)
    for _ in range(steps):
        _, grads = step(model, IDS[:, :-1], IDS[:, 1:])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config({"model": str(model_dir), "fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": params,
                 "batch_size": 4, "iters": steps, "learning_rate": 2e-2, "seed": 0}, out / "adapter_config.json")
    model.eval()
    return model


TRAINED_CASES = {  # name -> (arch, kind, num_layers, keys, rank, scale, expected (target_modules, last_n_layers))
    "lora-all-blocks-default-keys": ("llama", "lora", -1, None, 4, 3.0, None),
    "lora-last-block": ("qwen2", "lora", 1, ["self_attn.q_proj", "mlp.down_proj"], 2, 10.0,
                        (["mlp.down_proj", "self_attn.q_proj"], 1)),
    "lora-with-head": ("llama", "lora", 2, ["self_attn.v_proj", "lm_head"], 4, 0.5,
                       (["self_attn.v_proj", "lm_head"], None)),
    "lora-embedding-tied": ("qwen2", "lora", 2, ["self_attn.o_proj", "model.embed_tokens"], 4, 2.0, None),
    "dora-last-block": ("llama", "dora", 1, ["self_attn.q_proj", "self_attn.v_proj"], 4, 2.0, None),
}


@pytest.mark.parametrize("case", list(TRAINED_CASES))
def test_mlx_lm_trained_adapter_imports_with_equal_logits(dirs, tmp_path, case):
    arch, kind, num_layers, keys, rank, scale, expected = TRAINED_CASES[case]
    peer = mlx_lm_trained(dirs[arch], tmp_path / "a", kind, num_layers, keys, rank, scale)
    trained = {k: v for k, v in tree_flatten(peer.trainable_parameters()) if k.endswith("lora_b")}
    assert all(mx.any(v != 0).item() for v in trained.values())  # training moved every lora_b
    config, tensors = import_mlx_lm(tmp_path / "a")
    assert (config.r, config.lora_alpha, config.use_dora) == (rank, scale * rank, kind == "dora")
    assert config.scale_for("x") == pytest.approx(scale, rel=1e-15)
    if expected is not None:
        assert (config.target_modules, config.last_n_layers) == expected
    model, _ = load_model(dirs[arch])
    load_adapter(model, tmp_path / "a")
    model.eval()
    assert np.abs(logits(model) - logits(peer)).max() <= TOL
    base, _ = load_model(dirs[arch])
    assert np.abs(logits(base) - logits(peer)).max() > 1e-3  # the adapter matters
    wanted = {DoRALinear} if kind == "dora" else {LoRALinear, LoRAEmbedding}
    assert {type(m) for _, m in adapter_layers(model)} <= wanted


@pytest.mark.parametrize("written", ["missing", "lora"])
def test_dora_found_from_magnitude_tensors(dirs, tmp_path, written):
    """mlx-lm-lora / mlx-tune write DoRA folders whose fine_tune_type is missing or says lora."""
    peer = mlx_lm_trained(dirs["llama"], tmp_path / "a", "dora", 1, ["self_attn.q_proj"])
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    if written == "missing":
        del cfg["fine_tune_type"]
    else:
        cfg["fine_tune_type"] = "lora"
    cfg_file.write_text(json.dumps(cfg))
    assert import_mlx_lm(tmp_path / "a")[0].use_dora
    model, _ = load_model(dirs["llama"])
    load_adapter(model, tmp_path / "a")
    assert all(isinstance(m, DoRALinear) for _, m in adapter_layers(model))
    assert np.abs(logits(model) - logits(peer)).max() <= TOL


def test_mlx_lm_folder_round_trip_is_bit_exact(dirs, tmp_path):
    mlx_lm_trained(dirs["qwen2"], tmp_path / "a", "lora", 1, ["self_attn.k_proj", "mlp.up_proj"], rank=2, scale=7.5)
    export_mlx_lm(tmp_path / "a", tmp_path / "b")
    a, b = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    ca, cb = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in "ab")
    assert cb["num_layers"] == 1 and cb["lora_parameters"] == {
        "rank": 2, "scale": 7.5, "dropout": 0.0, "keys": ["mlp.up_proj", "self_attn.k_proj"]}
    assert sorted(ca["lora_parameters"]["keys"]) == cb["lora_parameters"]["keys"]


def test_bad_mlx_lm_folders_are_clear_errors(dirs, tmp_path):
    mlx_lm_trained(dirs["llama"], tmp_path / "a", "lora", 1, ["self_attn.q_proj"], steps=1)
    cfg_file, weights = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapters.safetensors"
    cfg, tensors = json.loads(cfg_file.read_text()), mx.load(str(weights))

    def expect(match, new_cfg=cfg, new_tensors=tensors):
        cfg_file.write_text(json.dumps(new_cfg))
        mx.save_safetensors(str(weights), new_tensors)
        with pytest.raises(AdapterError, match=match) as err:
            load_adapter(load_model(dirs["llama"])[0], tmp_path / "a")
        assert "\n" not in str(err.value)

    expect("fine_tune_type 'full' .*mlx_lm fuse", dict(cfg, fine_tune_type="full"))
    expect(r"reads 'scale'.*not 'alpha'", dict(cfg, lora_parameters={"rank": 4, "alpha": 16}))
    q = "model.layers.1.self_attn.q_proj"
    expect(f"missing {q}.lora_b", new_tensors={f"{q}.lora_a": tensors[f"{q}.lora_a"]})
    expect("one is per expert \\(SwitchLinear\\)", new_tensors=dict(tensors, **{f"{q}.lora_a": mx.zeros((2, 4, 64))}))
    expect(r"q_proj.lora_a is \(2, 64, 4\), the model needs \(64, 4\)",  # per-expert pairs on a dense layer
           new_tensors=dict(tensors, **{f"{q}.lora_a": mx.zeros((2, 4, 64)), f"{q}.lora_b": mx.zeros((2, 64, 4))}))
    expect("no lora_a/lora_b/m tensor", new_tensors=dict(tensors, **{f"{q}.weight": mx.zeros((64, 64))}))
    # a base it does not fit: every problem listed, the model left unwrapped
    mx.save_safetensors(str(weights), tensors)
    cfg_file.write_text(json.dumps(cfg))
    small, _ = load_model(tiny.make_model(tmp_path / "small", "llama", hidden_size=32, num_hidden_layers=2))
    with pytest.raises(AdapterError, match=r"2 problem\(s\).*lora_a is \(64, 4\), the model needs \(32, 4\)"):
        load_adapter(small, tmp_path / "a")
    assert not adapter_layers(small) and not hasattr(small, "lora_config")


def test_export_refuses_to_overwrite(dirs, tmp_path):
    model, _ = ours(dirs["llama"], EXPORT_CASES["qv"][1])
    save_adapter(model, tmp_path / "ours", base_model="tiny")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match="--force"):
        export_mlx_lm(tmp_path / "ours", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    export_mlx_lm(tmp_path / "ours", tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapters.safetensors"]


# ---------------------------------------------------------------- CLI

run = tiny.run_cli


def test_cli_export_adapter_mlx_lm_and_peft(dirs, tmp_path):
    model, _ = ours(dirs["llama"], EXPORT_CASES["dora"][1])
    save_adapter(model, tmp_path / "ours", base_model="tiny")
    res = run("export-adapter", tmp_path / "ours", "--to", "mlx-lm", tmp_path / "m")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "adapters.safetensors").is_file() and str(tmp_path / "m") in res.output
    before = (tmp_path / "m" / "adapters.safetensors").read_bytes()
    res = run("export-adapter", tmp_path / "ours", "--to", "mlx-lm", tmp_path / "m")
    assert res.exit_code == 1 and "--force" in res.output and len(res.output.strip().splitlines()) == 1
    assert (tmp_path / "m" / "adapters.safetensors").read_bytes() == before
    assert run("export-adapter", tmp_path / "ours", "--to", "mlx-lm", tmp_path / "m", "--force").exit_code == 0
    # mlx-lm -> PEFT needs the base to name PEFT's targets
    res = run("export-adapter", tmp_path / "m", "--to", "peft", tmp_path / "p")
    assert res.exit_code == 1 and "--model" in res.output and not (tmp_path / "p").exists()
    res = run("export-adapter", tmp_path / "m", "--to", "peft", tmp_path / "p", "--model", dirs["llama"])
    assert res.exit_code == 0, res.output
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "p").iterdir()}
    back, _ = load_model(dirs["llama"])
    load_adapter(back, tmp_path / "p")
    assert np.abs(logits(back) - logits(model)).max() <= TOL


def test_cli_convert_hf_folder(dirs, tmp_path):
    res = run("convert", "--model", dirs["llama"], "--out", tmp_path / "q4", "-q", "4", "--q-group-size", 32)
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    q4, _ = load(str(tmp_path / "q4"))
    base, _ = load(str(dirs["llama"]))
    got = q4.model.layers[0].self_attn.q_proj  # mlx-lm's quantization, bit for bit
    assert isinstance(got, nn.QuantizedLinear) and (got.bits, got.group_size) == (4, 32)
    w = base.model.layers[0].self_attn.q_proj.weight
    want = mx.dequantize(*mx.quantize(w, group_size=32, bits=4), group_size=32, bits=4)
    assert mx.array_equal(mx.dequantize(got.weight, got.scales, got.biases, group_size=32, bits=4), want).item()
    assert 0 < np.abs(logits(q4) - logits(base)).max() < 1.0
    res = run("convert", "--model", dirs["llama"], "--out", tmp_path / "q4")
    assert res.exit_code == 1 and "--force" in res.output
    res = run("convert", "--model", dirs["llama"], "--out", tmp_path / "q4", "--dtype", "float16", "--force")
    assert res.exit_code == 0, res.output
    f16 = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    assert all(v.dtype == mx.float16 for v in f16.values())
    assert "quantization" not in json.loads((tmp_path / "q4" / "config.json").read_text())
