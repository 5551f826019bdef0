"""Fusing expert adapters: exact into float experts, re-quantized one expert at a time into quantized ones,
and the fused folder read back by mlx-lm."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

import tiny
from mlxlora.adapters import save_adapter
from mlxlora.config import LoraConfig
from mlxlora.fuse import fuse_model
from mlxlora.fuse.write import save_fused
from mlxlora.lora.quant import use_fast_cpu_path
from mlxlora.lora.surgery import adapter_layers, get_lora_model
from mlxlora.lora.switch import LoRASwitchLinear, switch_weight
from mlxlora.models import load_base

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9, 250, 3, 64, 65, 66]])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-fuse")
    return {"float": tiny.make_model(root / "f", "qwen3_moe"),
            "q4": tiny.make_model(root / "q4", "qwen3_moe", quantize=4)}


def _wrapped(src, zero=False):
    base = load_base(str(src))
    get_lora_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if not zero:
        tiny.randomize_adapters(base.model)
    return base


def test_float_fuse_is_exact(dirs):
    base = _wrapped(dirs["float"])
    want = base.model(IDS)
    model, cfg, report = fuse_model(base)
    assert not adapter_layers(model) and "quantization" not in cfg
    assert sum(isinstance(m, SwitchLinear) for _, m in model.named_modules()) == 6
    assert np.allclose(model(IDS), want, atol=1e-4)
    rows = [r for r in report["layers"] if r["kind"] == "experts"]
    assert len(rows) == 6 and all(r["strategy"] == "dense" and r["rel_error"] < 1e-5 for r in rows)


def test_grid_fuse_of_a_zero_adapter_leaves_quantized_experts_bit_identical(dirs):
    base = _wrapped(dirs["q4"], zero=True)
    before = {p: (m.linear.weight, m.linear.scales, m.linear.biases) for p, m in adapter_layers(base.model)
              if isinstance(m, LoRASwitchLinear)}
    model, _, _ = fuse_model(base, strategy="grid", calibration=False)
    mods = dict(model.named_modules())
    for p, (w, s, b) in before.items():
        m = mods[p]
        assert isinstance(m, QuantizedSwitchLinear)
        assert all(mx.array_equal(x, y).item() for x, y in ((m.weight, w), (m.scales, s), (m.biases, b))), p


def _dense_grid_fuse(layer, e):
    """Expert e of a quantized LoRASwitchLinear as QuantizedLinear + LoRALinear, fused by requant's "grid"."""
    import mlx.nn as nn

    from mlxlora.fuse import requant as R
    from mlxlora.lora.layers import LoRALinear

    base = layer.linear
    ql = nn.QuantizedLinear(base.input_dims, base.output_dims, bias=False, group_size=32, bits=4)
    ql.weight, ql.scales, ql.biases = base.weight[e], base.scales[e], base.biases[e]
    lora = LoRALinear.from_base(ql, r=layer.rank, scale=layer.scale)
    lora.lora_a, lora.lora_b = layer.lora_a[e], layer.lora_b[e]
    wf = np.array(lora.fuse(dequantize=True).weight)
    grid = R.target_grid(ql, wf, 4, 32, base.scales.dtype)
    q, g = R.STRATEGIES["grid"](wf, grid, None, 0.01, base.scales.dtype)
    return R.quantized_layer(ql, q, g, base.scales.dtype)


@pytest.mark.parametrize("strategy", ["naive", "grid"])
def test_quantized_experts_are_requantized_per_expert(dirs, strategy):
    base = _wrapped(dirs["q4"])
    layers = {p: m for p, m in adapter_layers(base.model) if isinstance(m, LoRASwitchLinear)}
    exact = {p: switch_weight(m.linear) + m.delta() for p, m in layers.items()}
    model, cfg, report = fuse_model(base, strategy=strategy, calibration=False)
    assert cfg["quantization"]["bits"] == 4
    mods = dict(model.named_modules())
    for p, wf in exact.items():
        fused = mods[p]
        assert isinstance(fused, QuantizedSwitchLinear) and fused.bits == 4
        wk = switch_weight(fused)
        for e in range(wf.shape[0]):
            if strategy == "naive":  # each expert is what quantizing its own fused weight gives
                want = mx.dequantize(*mx.quantize(wf[e], 32, 4), group_size=32, bits=4)
                assert np.allclose(wk[e], want, atol=1e-6)
            else:  # each expert is what the dense layers' grid fuse makes of it as a LoRALinear alone
                want = _dense_grid_fuse(layers[p], e)
                assert mx.array_equal(fused.weight[e], want.weight).item()
                assert mx.array_equal(fused.scales[e], want.scales).item()
    rows = [r for r in report["layers"] if r["kind"] == "experts"]
    assert len(rows) == 6 and all(r["bits"] == 4 and 0 < r["cosine"] <= 1 for r in rows)


def test_fused_moe_folder_loads_in_mlx_lm_with_the_same_logits(dirs, tmp_path):
    import mlx_lm

    base = _wrapped(dirs["q4"])
    model, cfg, report = fuse_model(base, strategy="grid", calibration=False)
    out = save_fused(model, cfg, dirs["q4"], tmp_path / "fused", report=report)
    loaded, _ = mlx_lm.load(str(out))
    use_fast_cpu_path(loaded)
    assert mx.array_equal(loaded(IDS), model(IDS)).item()


def test_cli_fuse_of_an_expert_adapter(dirs, tmp_path):
    src = load_base(str(dirs["float"]))
    get_lora_model(src.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tiny.randomize_adapters(src.model)
    want = src.model(IDS)
    save_adapter(src.model, tmp_path / "a", base_model=str(dirs["float"]))
    res = tiny.run_cli("fuse", "--model", dirs["float"], "--adapter", tmp_path / "a", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    fused = load_base(str(tmp_path / "out")).model
    assert np.allclose(fused(IDS), want, atol=1e-4)
    assert "quantization" not in json.loads((tmp_path / "out" / "config.json").read_text())
