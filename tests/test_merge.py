"""Weighted adapter merges: cat and svd against explicit ΔW arithmetic in numpy, linear against PEFT itself."""

import json

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlxlora import LoraConfig
from mlxlora.adapters import CONFIG_FILE, load_adapter
from mlxlora.errors import AdapterError, ConfigError
from mlxlora.serve.merge import add_weighted_adapter
from mlxlora.models import load_base
from mlxlora.serve.multi import MultiAdapterModel

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9, 250, 3, 64]])
TOL = 1e-5

ADAPTERS = {  # different targets, scales (rsLoRA too) and ranks
    "x": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    "y": LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "z": LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"),
    "e": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "d": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    src = tiny.make_model(root / "llama", "llama")
    dirs = {name: tiny.make_adapter(src, root / name, cfg, seed) for seed, (name, cfg) in enumerate(ADAPTERS.items(), 1)}
    return src, dirs


@pytest.fixture
def multi(setup):
    src, dirs = setup
    m = MultiAdapterModel(load_base(str(src)).model)
    for name, d in dirs.items():
        m.load_adapter(d, name)
    return m


def dw(lora) -> np.ndarray:
    """ΔW of one layer written out: scale * lora_a @ lora_b in float64 ((in, out) for a Linear)."""
    return lora.scale * (np.array(lora.lora_a, dtype=np.float64) @ np.array(lora.lora_b, dtype=np.float64))


def weighted_sum(adapters, weights, path) -> np.ndarray:
    return sum(w * dw(a.layers[path]) for a, w in zip(adapters, weights) if path in a.layers)


def test_cat_is_exact(multi):
    adapters, weights = [multi.get_adapter(n) for n in ("x", "z", "e")], [0.7, -1.3, 0.4]
    merged = add_weighted_adapter(adapters, weights, "cat")
    assert merged.config.r == 4 + 8 + 4 and merged.config.lora_alpha == 16.0
    assert set(merged.layers) == set().union(*(a.layers for a in adapters))
    worst = 0.0
    for path, lora in merged.layers.items():
        assert lora.scale == 1.0 and lora.rank == 16
        assert lora.embedding == (path == "model.embed_tokens")
        worst = max(worst, float(np.abs(dw(lora) - weighted_sum(adapters, weights, path)).max()))
    print(f"cat: max|ΔW - Σ w ΔW_i| {worst:.1e}")
    assert worst <= TOL


def test_svd_at_full_rank_is_exact_and_truncated_is_the_best_rank_k(multi):
    adapters, weights = [multi.get_adapter(n) for n in ("x", "y", "z")], [1.0, -0.6, 0.8]
    full = add_weighted_adapter(adapters, weights, "svd", svd_rank=16)
    trunc = add_weighted_adapter(adapters, weights, "svd", svd_rank=3)
    default = add_weighted_adapter(adapters, weights, "svd")
    assert (full.config.r, trunc.config.r, default.config.r) == (16, 3, 8)  # default: the largest input rank
    worst_full = worst_trunc = 0.0
    for path in full.layers:
        target = weighted_sum(adapters, weights, path)
        worst_full = max(worst_full, float(np.abs(dw(full.layers[path]) - target).max()))
        u, s, vt = np.linalg.svd(target)
        best3 = (u[:, :3] * s[:3]) @ vt[:3]
        worst_trunc = max(worst_trunc, float(np.abs(dw(trunc.layers[path]) - best3).max()))
        assert np.abs(best3 - target).max() > 1e-3  # truncation really drops something
    print(f"svd: full rank max|diff| {worst_full:.1e}; rank 3 vs numpy truncation {worst_trunc:.1e}")
    assert worst_full <= TOL and worst_trunc <= TOL


def test_linear_of_one_adapter_is_the_weighted_adapter(multi):
    x = multi.get_adapter("x")
    for w in (0.5, -2.0):  # one adapter: sign on lora_a only, so the product is w * ΔW exactly
        merged = add_weighted_adapter([x], [w], "cat")  # PEFT falls back to linear for one adapter
        assert merged.info["combination_type"] == "linear" and merged.config.r == 4
        for path, lora in merged.layers.items():
            assert np.abs(dw(lora) - w * dw(x.layers[path])).max() <= TOL


def test_linear_has_peft_cross_terms(multi):
    x, y = multi.get_adapter("x"), multi.get_adapter("y")
    merged = add_weighted_adapter([x, y], [0.5, -1.5], "linear")
    path = "model.layers.0.self_attn.q_proj"
    sx, sy = 0.5 * x.layers[path].scale, -1.5 * y.layers[path].scale
    ax, bx = np.array(x.layers[path].lora_a), np.array(x.layers[path].lora_b)
    ay, by = np.array(y.layers[path].lora_a), np.array(y.layers[path].lora_b)
    # PEFT: A = Σ sign(w s) √|w s| A_i, B = Σ √|w s| B_i, so A @ B has cross terms and is not Σ w ΔW_i
    want = (np.sqrt(sx) * ax - np.sqrt(-sy) * ay) @ (np.sqrt(sx) * bx + np.sqrt(-sy) * by)
    got = dw(merged.layers[path])
    assert np.abs(got - want).max() <= TOL
    assert np.abs(got - weighted_sum([x, y], [0.5, -1.5], path)).max() > 1e-3
    only_x = "model.layers.0.self_attn.o_proj"  # y does not adapt o_proj: linear of x alone there
    assert np.abs(dw(merged.layers[only_x]) - 0.5 * dw(x.layers[only_x])).max() <= TOL


def test_refusals(multi):
    x, z, d = multi.get_adapter("x"), multi.get_adapter("z"), multi.get_adapter("d")
    with pytest.raises(ConfigError, match="same rank"):
        add_weighted_adapter([x, z], [1, 1], "linear")
    with pytest.raises(AdapterError, match="DoRA"):
        add_weighted_adapter([x, d], [1, 1], "cat")
    with pytest.raises(ConfigError, match="choose one of linear, cat, svd"):
        add_weighted_adapter([x, z], [1, 1], "ties")
    with pytest.raises(ConfigError, match="2 adapters but 1 weights"):
        add_weighted_adapter([x, z], [1], "cat")
    with pytest.raises(ConfigError, match="svd_rank"):
        add_weighted_adapter([x, z], [1, 1], "svd", svd_rank=0)


def test_merged_adapter_is_attached_and_saves_as_plain_lora(multi, setup, tmp_path):
    src, _ = setup
    merged = multi.add_weighted_adapter(["x", "z", "e"], [1.0, 0.5, -0.7], "xze", combination_type="cat")
    assert "xze" in multi.adapters
    multi.set_adapter("xze")
    ours = np.array(multi(IDS))
    out = multi.save_adapter("xze", tmp_path / "xze", base_model=str(src))
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg.get("use_dora", False)) == (16, 16, False)
    fresh = load_base(str(src)).model
    load_adapter(fresh, out)
    diff = float(np.abs(np.array(fresh(IDS)) - ours).max())
    print(f"merged, saved and reloaded: max|diff| {diff:.1e}")
    assert diff <= TOL
    with multi.disable_adapter():
        base = np.array(multi(IDS))
    assert np.abs(ours - base).max() > 1e-2
    assert merged.nbytes == sum(lora.lora_a.nbytes + lora.lora_b.nbytes for lora in merged.layers.values())


# ---------------------------------------------------------------- against PEFT itself

@pytest.mark.peer
@pytest.mark.parametrize("combination, svd_rank", [("linear", None), ("cat", None), ("svd", None), ("svd", 3)])
def test_matches_peft_add_weighted_adapter(combination, svd_rank, setup, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mlx_lm.utils import load_model

    from mlxlora.models.hf_export import export_hf

    src, dirs = setup
    model, config = load_model(src)
    hf_dir = export_hf(model, config, src, tmp_path / "hf")
    names, weights = ["x", "y"], [0.8, -0.5]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, str(dirs["x"]), adapter_name="x")
    pm.load_adapter(str(dirs["y"]), adapter_name="y")
    pm.add_weighted_adapter(names, weights, "m", combination_type=combination, svd_rank=svd_rank)
    pm.set_adapter("m")
    with torch.no_grad():
        theirs = pm(torch.tensor(np.array(IDS))).logits.numpy()

    multi = MultiAdapterModel(load_base(str(src)).model)
    for n in names:
        multi.load_adapter(dirs[n], n)
    multi.add_weighted_adapter(names, weights, "m", combination_type=combination, svd_rank=svd_rank)
    multi.set_adapter("m")
    ours = np.array(multi(IDS))
    with multi.disable_adapter():
        base = np.array(multi(IDS))
    diff = float(np.abs(ours - theirs).max())
    print(f"{combination} (svd_rank={svd_rank}): mlxlora vs PEFT max|diff| {diff:.1e}")
    assert np.abs(ours - base).max() > 1e-2
    assert diff <= 1e-4
