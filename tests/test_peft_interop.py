"""Real-peer interop: mlxlora <-> transformers + PEFT (torch, CPU), logits compared on tiny models.

Direction 1: mlx-lm model -> export_hf -> transformers logits == mlx logits; mlxlora adapter ->
save_adapter -> peft.PeftModel.from_pretrained logits == mlxlora logits.
Direction 2: peft.get_peft_model adapter -> save_pretrained -> load_adapter logits == PEFT logits,
and save_adapter again gives PEFT's tensors bit for bit and an equivalent config.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

import tiny
from mlxlora import LoraConfig, get_lora_model
from mlxlora.adapters import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from mlxlora.models.hf_export import export_hf
from mlxlora.formats.peft import lora_config_from_peft
from mlxlora.lora.surgery import adapter_layers

pytestmark = pytest.mark.peer

ARCHS = ["llama", "qwen2", "phi3", "gemma2"]
IDS = [[5, 17, 33, 100, 200, 7, 9, 250, 3, 64]]
TOL = 1e-4


def attention_targets(arch):
    return ["qkv_proj"] if arch == "phi3" else ["q_proj", "v_proj"]


# name -> LoraConfig kwargs (targets filled per architecture); the same cases run in both directions.
def cases(arch):
    attn = attention_targets(arch)
    return {
        "attn": dict(r=4, lora_alpha=8, target_modules=attn),
        "all-linear": dict(r=4, lora_alpha=16, target_modules="all-linear"),
        "dora": dict(r=4, lora_alpha=8, target_modules=attn + ["down_proj"], use_dora=True),
        "rslora": dict(r=8, lora_alpha=4, target_modules=attn + ["o_proj"], use_rslora=True, layers_to_transform=[1]),
        "rank-pattern": dict(r=8, lora_alpha=8, target_modules="all-linear", rank_pattern={"o_proj": 2},
                             alpha_pattern={r"layers\.0\.mlp\.down_proj": 32}),
        "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]),
        # PEFT can only select these exactly by full module paths
        "regex": dict(r=4, lora_alpha=8, target_modules=r"model\.layers\.0\.(self_attn|mlp)\.\w+_proj"),
        "paths": dict(r=2, lora_alpha=8, target_modules=["model.layers.1.mlp.down_proj", "o_proj"]),
    }


CASE_NAMES = list(cases("llama"))


@pytest.fixture(scope="module")
def peers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    return torch, transformers, peft


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (mlx-lm folder, exported transformers folder)."""
    root = tmp_path_factory.mktemp("interop")
    out = {}
    for arch in ARCHS:
        src = tiny.make_model(root / arch / "mlx", arch)
        model, config = load_model(src)
        out[arch] = (src, export_hf(model, config, src, root / arch / "hf"))
    return out


def hf_model(peers, folder):
    torch, transformers, _ = peers
    # eager attention: gemma2's logit soft-capping is only applied there
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def torch_logits(peers, model) -> np.ndarray:
    torch = peers[0]
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)))


randomize = tiny.randomize_adapters


def randomize_peft(peers, model):
    torch = peers[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # lora_A/B, lora_embedding_A/B, lora_magnitude_vector
                p.copy_(p * (1 + 0.1 * torch.randn_like(p)) if "magnitude" in name else 0.1 * torch.randn_like(p))


def max_diff(a, b) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_base_matches_mlx(arch, exported, peers):
    src, hf_dir = exported[arch]
    model, _ = load_model(src)
    diff = max_diff(mlx_logits(model), torch_logits(peers, hf_model(peers, hf_dir)))
    print(f"{arch} base max|diff| {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_mlxlora_adapter_loads_in_peft(arch, case, exported, peers, tmp_path):
    src, hf_dir = exported[arch]
    model, _ = load_model(src)
    get_lora_model(model, LoraConfig(**cases(arch)[case]))
    randomize(model)
    out = save_adapter(model, tmp_path / "adapter", base_model=str(hf_dir))
    peft_model = peers[2].PeftModel.from_pretrained(hf_model(peers, hf_dir), str(out)).eval()
    base = mlx_logits(load_model(src)[0])
    ours = mlx_logits(model)
    assert max_diff(base, ours) > 1e-2  # the adapter changes the outputs
    diff = max_diff(ours, torch_logits(peers, peft_model))
    print(f"{arch}/{case} mlxlora->peft max|diff| {diff:.2e}")
    assert diff <= TOL


def peft_config(peers, arch, case, tied: bool):
    kw = dict(cases(arch)[case])
    if "embed_tokens" in kw["target_modules"] and tied:
        kw["ensure_weight_tying"] = True  # PEFT adapts the tied head only then (as mlxlora always does)
    return peers[2].LoraConfig(task_type="CAUSAL_LM", **kw)


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_loads_in_mlxlora(arch, case, exported, peers, tmp_path):
    from safetensors.numpy import load_file

    src, hf_dir = exported[arch]
    base = hf_model(peers, hf_dir)
    tied = bool(base.config.tie_word_embeddings)
    peft_model = peers[2].get_peft_model(base, peft_config(peers, arch, case, tied))
    randomize_peft(peers, peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = torch_logits(peers, peft_model)

    model = load_adapter(load_model(src)[0], tmp_path / "peft")
    diff = max_diff(mlx_logits(model), theirs)
    print(f"{arch}/{case} peft->mlxlora max|diff| {diff:.2e}")
    assert diff <= TOL

    # ... and saved again by mlxlora: PEFT's adapter tensors bit for bit, an equivalent config.
    out = save_adapter(model, tmp_path / "again", base_model=str(hf_dir))
    peft_tensors, ours = load_file(tmp_path / "peft" / WEIGHTS_FILE), load_file(out / WEIGHTS_FILE)
    extra = set(peft_tensors) - set(ours)  # PEFT's copies of the base embedding / tied head weight
    assert all(k.endswith("base_layer.weight") for k in extra), extra
    assert set(ours) <= set(peft_tensors)
    for key, value in ours.items():
        assert value.dtype == peft_tensors[key].dtype and np.array_equal(value, peft_tensors[key]), key
    theirs_cfg = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    ours_cfg = json.loads((out / CONFIG_FILE).read_text())
    a, b = lora_config_from_peft(theirs_cfg), lora_config_from_peft(ours_cfg)
    a.target_modules = b.target_modules = None  # PEFT writes names as given, we the adapted short names
    assert a == b
    for key in ("r", "lora_alpha", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        assert theirs_cfg[key] == ours_cfg[key], key
    again = load_adapter(load_model(src)[0], out)
    assert [p for p, _ in adapter_layers(again)] == [p for p, _ in adapter_layers(model)]
    assert np.array_equal(mlx_logits(again), mlx_logits(model))


def test_peft_tied_embedding_without_weight_tying_is_refused(exported, peers, tmp_path):
    from mlxlora.errors import AdapterError

    src, hf_dir = exported["qwen2"]
    peft_model = peers[2].get_peft_model(hf_model(peers, hf_dir), peers[2].LoraConfig(
        r=4, target_modules=["embed_tokens"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_model(src)[0]
    with pytest.raises(AdapterError, match="ensure_weight_tying"):
        load_adapter(model, tmp_path / "peft")
    assert not adapter_layers(model)
