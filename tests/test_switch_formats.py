"""Expert adapters in files: mlxlora's folder, mlx-lm's LoRASwitchLinear format (checked by mlx-lm itself),
and PEFT's target_parameters on a tiny transformers Qwen3-MoE (checked by transformers + PEFT)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import tiny
from mlxlora.adapters import export_adapter, load_adapter, save_adapter
from mlxlora.config import LoraConfig
from mlxlora.formats import read_adapter, write_adapter
from mlxlora.formats.mlx_lm import WEIGHTS_FILE as MLX_LM_WEIGHTS
from mlxlora.formats.peft import WEIGHTS_FILE
from mlxlora.lora.surgery import get_lora_model
from mlxlora.models import load_base

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9, 250, 3, 64, 65, 66]])
TOL = 1e-4


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-formats")
    return tiny.make_model(root / "qwen3_moe", "qwen3_moe")


def _adapted(src, **kw):
    model = load_base(str(src)).model
    get_lora_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **kw}))
    tiny.randomize_adapters(model)
    return model


@pytest.mark.parametrize("kw", [{}, {"rank_pattern": {"up_proj": 2}, "alpha_pattern": {"down_proj": 4}},
                                {"target_modules": ["gate_proj", "o_proj"]}])
def test_mlxlora_folder_round_trip_is_exact(tmp_path, moe, kw):
    model = _adapted(moe, **kw)
    want = model(IDS)
    save_adapter(model, tmp_path / "a", base_model=str(moe))
    again = load_base(str(moe)).model
    load_adapter(again, tmp_path / "a")
    assert mx.array_equal(again(IDS), want).item()
    mine = dict(tree_flatten(model.trainable_parameters()))
    for k, v in tree_flatten(again.trainable_parameters()):
        assert mx.array_equal(v, mine[k]).item(), k


def test_mlx_lm_loads_our_export_with_the_same_logits(tmp_path, moe):
    import mlx_lm

    model = _adapted(moe)
    want = model(IDS)
    save_adapter(model, tmp_path / "a", base_model=str(moe))
    export_adapter(tmp_path / "a", tmp_path / "x", "mlx-lm")
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert "mlp.switch_mlp.gate_proj" in cfg["lora_parameters"]["keys"] and "mlp.gate" not in cfg["lora_parameters"]["keys"]
    saved = mx.load(str(tmp_path / "x" / MLX_LM_WEIGHTS))
    assert saved["model.layers.0.mlp.switch_mlp.up_proj.lora_a"].shape == (4, 4, 64)  # mlx-lm's (E, r, in)
    peer, _ = mlx_lm.load(str(moe), adapter_path=str(tmp_path / "x"))
    assert np.allclose(peer(IDS), want, rtol=TOL, atol=TOL)
    back = load_base(str(moe)).model
    load_adapter(back, tmp_path / "x")
    assert mx.array_equal(back(IDS), want).item()


def test_an_adapter_made_by_mlx_lm_loads_with_its_logits(tmp_path, moe):
    from mlx_lm.tuner.lora import LoRASwitchLinear as PeerSwitch
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    peer, _ = load_model(moe)
    peer.freeze()
    params = {"rank": 4, "scale": 3.0, "dropout": 0.0}
    linear_to_lora_layers(peer, 2, params)  # mlx-lm's default keys: every linear, router and experts
    mx.random.seed(5)
    n_switch = 0
    for _, m in peer.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
            n_switch += isinstance(m, PeerSwitch)
    assert n_switch == 6
    want = peer(IDS)
    out = tmp_path / "peer"
    out.mkdir()
    mx.save_safetensors(str(out / MLX_LM_WEIGHTS), dict(tree_flatten(peer.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                         "lora_parameters": params}))
    ours = load_base(str(moe)).model
    load_adapter(ours, out)
    assert np.allclose(ours(IDS), want, rtol=TOL, atol=TOL)
    record = read_adapter(out)
    assert "model.layers.0.mlp.gate" in record.layers  # the router, as mlx-lm adapted it
    assert record.layers["model.layers.1.mlp.switch_mlp.down_proj"].lora_a.shape == (4, 32, 4)  # ours: (E, in, r)


# ---------------------------------------------------------------- transformers + PEFT

HF = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
          num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
          tie_word_embeddings=False, max_position_embeddings=512)


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    """A tiny transformers Qwen3-MoE saved as an HF folder that mlx-lm reads too, and the torch model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=tiny.VOCAB_SIZE, **HF)
    model = transformers.Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    folder = tmp_path_factory.mktemp("hf-moe") / "model"
    model.save_pretrained(folder)
    # transformers 5 writes num_local_experts / rope_parameters; mlx-lm 0.32 reads these keys (issue 14 section 3
    # normalises such folders at load; this test only needs a folder both can read).
    config = json.loads((folder / "config.json").read_text())
    config.update(num_experts=4, rope_theta=10000.0)
    (folder / "config.json").write_text(json.dumps(config))
    tiny.make_tokenizer(folder)
    return folder, model


def _torch_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.array(IDS))).logits.numpy()


def _close(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.peer
def test_base_logits_equal_transformers(hf_moe):
    folder, model = hf_moe
    assert _close(load_base(str(folder)).model(IDS), _torch_logits(model)) <= TOL


@pytest.mark.peer
@pytest.mark.parametrize("kw", [{}, {"target_modules": ["down_proj", "up_proj", "q_proj"], "rank_pattern": {"up_proj": 2}},
                                {"r": 8, "lora_alpha": 4, "use_rslora": True}])
def test_peft_loads_our_expert_adapter_with_the_same_logits(tmp_path, hf_moe, kw):
    import copy

    from peft import PeftModel

    folder, model = hf_moe
    ours = _adapted(folder, **kw)
    want = ours(IDS)
    save_adapter(ours, tmp_path / "a", base_model=str(folder))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] and all("experts" in p for p in cfg["target_parameters"])
    peer = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a")).eval()
    assert _close(_torch_logits(peer), want) <= TOL
    assert _close(_torch_logits(model), want) > 1e-3  # the adapter changes the logits


@pytest.mark.peer
@pytest.mark.parametrize("params", [["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], ["mlp.experts.down_proj"]])
def test_a_peft_target_parameters_adapter_loads_exactly(tmp_path, hf_moe, params):
    import copy

    import torch
    from peft import LoraConfig as PeftConfig, get_peft_model

    folder, model = hf_moe
    torch.manual_seed(3)
    peer = get_peft_model(copy.deepcopy(model), PeftConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                           target_parameters=params))
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)  # non-zero lora_B everywhere
    peer.eval()
    want = _torch_logits(peer)
    peer.save_pretrained(tmp_path / "p")
    ours = load_base(str(folder)).model
    load_adapter(ours, tmp_path / "p")
    assert _close(ours(IDS), want) <= TOL
    assert _close(_torch_logits(model), want) > 1e-3
    # Written again: PEFT's tensors bit for bit (gate/up share lora_a: the fused pair of rank r comes back).
    record = read_adapter(tmp_path / "p")
    write_adapter(record, tmp_path / "again", "peft")
    a, b = mx.load(str(tmp_path / "p" / WEIGHTS_FILE)), mx.load(str(tmp_path / "again" / WEIGHTS_FILE))
    assert sorted(a) == sorted(b)
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k


@pytest.mark.peer
def test_plan_of_the_transformers_folder_counts_its_experts(hf_moe):
    from mlxlora.lora.surgery import count_parameters
    from mlxlora.plan import plan_training

    folder, _ = hf_moe  # per-expert tensors (experts.3.gate_proj.weight), stacked by mlx-lm at load
    cfg = LoraConfig(r=4, target_modules="all-linear")
    plan = plan_training(str(folder), cfg, memory_bytes=1 << 33)
    model = load_base(str(folder)).model
    get_lora_model(model, cfg)
    assert (plan.trainable_params, plan.total_params) == count_parameters(model)
    assert plan.expert_layers == 6


def test_gguf_lora_export_refuses_expert_adapters(tmp_path, moe):
    from mlxlora.errors import AdapterError
    from mlxlora.formats import gguf_lora

    save_adapter(_adapted(moe), tmp_path / "a", base_model=str(moe))
    res = tiny.run_cli("export-adapter", tmp_path / "a", tmp_path / "x.gguf", "--to", "gguf", "--model", moe)
    tiny.one_line_error(res, "qwen3_moe")  # no llama.cpp name table for this architecture here
    with pytest.raises(AdapterError, match="adapts MoE experts.*mlxlora fuse"):  # and none for experts at all
        gguf_lora.write(read_adapter(tmp_path / "a"), tmp_path / "x.gguf", gguf_lora.base_info_for("qwen3"))
    assert not (tmp_path / "x.gguf").exists()
