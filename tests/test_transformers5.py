"""Folders written by transformers 5 load in mlxlora with the same logits, and mlxlora's adapter on
them loads in PEFT with the same logits (fp32, <= 1e-4 relative).

The installed transformers (the test extra) writes the folders, so their config.json is in its own
form (rope_parameters, num_local_experts); mlxlora.models.hf_config normalises a copy at load.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

import hf_twins as H
from mlxlora import LoraConfig, get_lora_model
from mlxlora.adapters import save_adapter
from mlxlora.models import load_base
from mlxlora.models.hf_config import normalize

import tiny

pytestmark = pytest.mark.peer
TOL = 1e-4


@pytest.fixture(scope="module")
def peers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return torch, transformers, peft


def test_installed_transformers_writes_the_v5_form(peers, tmp_path):
    """The premise of the normalisation: the installed transformers writes rope_parameters and
    num_local_experts (if it ever stops, these tests would prove nothing about the renames)."""
    torch, transformers, _ = peers
    assert int(transformers.__version__.split(".")[0]) >= 5
    cfg = H.saved_config(H.hf_folder("qwen3_moe", tmp_path / "m", torch, transformers))
    assert cfg["rope_parameters"]["rope_theta"] == H.THETA and "rope_theta" not in cfg
    assert "num_local_experts" in cfg and "num_experts" not in cfg
    added = normalize(cfg)
    assert added["rope_theta"] == H.THETA and added["num_experts"] == cfg["num_local_experts"]


def test_normalize_table():
    """Per-layer-type rope (gemma3), a scaled rope, gpt_neox's names, a nested text_config; keys already
    there (or a config in the old form) are never replaced."""
    g3 = {"model_type": "gemma3_text", "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}
    assert normalize(g3) == {"rope_theta": 1e6, "rope_local_base_freq": 10000.0,
                             "rope_scaling": {"rope_type": "linear", "factor": 8.0, "type": "linear"}}
    neox = {"model_type": "gpt_neox", "rope_parameters": {"rope_theta": 500.0, "partial_rotary_factor": 0.25,
                                                           "rope_type": "default"}}
    assert normalize(neox) == {"rope_theta": 500.0, "partial_rotary_factor": 0.25, "rotary_emb_base": 500.0,
                               "rotary_pct": 0.25}
    old = {"model_type": "llama", "rope_theta": 5.0, "rope_parameters": {"rope_theta": 7.0}, "num_experts": 3,
           "num_local_experts": 4}
    assert normalize(old) == {}
    vlm = {"model_type": "qwen3_vl", "text_config": {"rope_parameters": {"rope_theta": 9.0}}}
    assert normalize(vlm) == {"text_config": {"rope_parameters": {"rope_theta": 9.0}, "rope_theta": 9.0}}


def test_load_never_writes_the_users_config(peers, tmp_path):
    torch, transformers, _ = peers
    folder = H.hf_folder("llama", tmp_path / "m", torch, transformers)
    before = (folder / "config.json").read_bytes()
    base = load_base(str(folder))
    assert base.config["rope_theta"] == H.THETA
    assert (folder / "config.json").read_bytes() == before
    # mlx-lm alone reads the same folder with its default theta: the logits differ (what users hit)
    plain, _ = load_model(folder)
    assert plain.args.rope_theta != H.THETA
    assert H.rel_diff(np.array(plain(mx.array(H.IDS))), np.array(base.model(mx.array(H.IDS)))) > 1e-3


@pytest.mark.parametrize("arch", sorted(H.HF_TWINS))
def test_base_and_peft_parity(arch, peers, tmp_path):
    torch, transformers, peft = peers
    folder = H.hf_folder(arch, tmp_path / "hf", torch, transformers)
    ref = H.hf_model(folder, torch, transformers)
    base = load_base(str(folder))
    ours = np.array(base.model(mx.array(H.IDS)).astype(mx.float32))
    diff = H.rel_diff(ours, H.torch_logits(ref, torch))
    print(f"{arch}: base rel diff {diff:.1e}")
    assert diff <= TOL
    targets = H.PEFT_TARGETS.get(arch, ("all-linear", ""))[0]
    get_lora_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    tiny.randomize_adapters(base.model)
    adapted = np.array(base.model(mx.array(H.IDS)).astype(mx.float32))
    assert H.rel_diff(adapted, ours) > 1e-3  # the adapter changes the outputs
    out = save_adapter(base.model, tmp_path / "adapter", base_model=str(folder))
    peft_model = peft.PeftModel.from_pretrained(ref, str(out)).eval()
    diff = H.rel_diff(adapted, H.torch_logits(peft_model, torch))
    print(f"{arch}: PEFT rel diff {diff:.1e}")
    assert diff <= TOL
