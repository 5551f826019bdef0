"""LoRA / DoRA / embedding layers against numpy references; surgery; parameter counts."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlora import LoraConfig, get_lora_model
from mlxlora.errors import ConfigError
from mlxlora.lora.layers import DoRALinear, LoRAEmbedding, LoRALinear, lora_scale
from mlxlora.lora.quant import CPUQuantizedLinear, dequantize_weight, use_fast_cpu_path
from mlxlora.lora.surgery import count_parameters, find_targets


def _nonzero_b(layer, seed=1):
    mx.random.seed(seed)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    return layer


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_linear_matches_numpy(quantized):
    mx.random.seed(0)
    base = nn.Linear(64, 48, bias=True)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    layer = _nonzero_b(LoRALinear.from_base(base, r=4, scale=lora_scale(4, 8.0)))
    x = mx.random.normal((3, 5, 64))
    w = np.array(dequantize_weight(base) if quantized else base.weight)
    a, b, xs = np.array(layer.lora_a), np.array(layer.lora_b), np.array(x)
    ref = xs @ w.T + np.array(base.bias) + 2.0 * (xs @ a) @ b
    np.testing.assert_allclose(np.array(layer(x)), ref, atol=2e-5)
    assert layer.lora_a.shape == (64, 4) and layer.lora_b.shape == (4, 48)


def test_zero_lora_b_is_bit_identical():
    mx.random.seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear.from_base(base, r=8, scale=2.0)
    x = mx.random.normal((2, 7, 32))
    assert np.array_equal(np.array(layer(x)), np.array(base(x)))


def test_scales_follow_peft():
    assert lora_scale(16, 32) == 2.0
    assert lora_scale(16, 32, use_rslora=True) == 8.0
    cfg = LoraConfig(r=16, lora_alpha=32, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 8})
    assert cfg.rank_alpha_for("model.layers.0.self_attn.q_proj") == (4, 32.0)
    assert cfg.scale_for("model.layers.0.self_attn.q_proj") == 8.0
    assert cfg.scale_for("model.layers.0.self_attn.v_proj") == 0.5


def test_dora_matches_numpy_and_fuses():
    mx.random.seed(0)
    base = nn.Linear(32, 24, bias=True)
    layer = _nonzero_b(DoRALinear.from_base(base, r=4, scale=2.0))
    layer.m = layer.m * 1.3
    x = mx.random.normal((2, 3, 32))
    w, a, b = np.array(base.weight), np.array(layer.lora_a), np.array(layer.lora_b)
    adapted = w + 2.0 * b.T @ a.T
    norm = np.linalg.norm(adapted, axis=1)
    ref = (np.array(layer.m) / norm) * (np.array(x) @ adapted.T) + np.array(base.bias)
    np.testing.assert_allclose(np.array(layer(x)), ref, atol=2e-5)
    np.testing.assert_allclose(np.array(layer.fuse()(x)), ref, atol=2e-5)


def test_dora_at_init_equals_base():
    mx.random.seed(0)
    base = nn.Linear(32, 24)
    layer = DoRALinear.from_base(base, r=4, scale=2.0)
    x = mx.random.normal((2, 32))
    np.testing.assert_allclose(np.array(layer(x)), np.array(base(x)), atol=1e-5)


def test_embedding_lora_lookup_and_tied_head():
    mx.random.seed(0)
    emb = nn.Embedding(50, 16)
    layer = LoRAEmbedding.from_base(emb, r=4, scale=2.0)
    layer.lora_a = mx.random.normal(layer.lora_a.shape)
    ids = mx.array([[1, 5, 49]])
    delta = 2.0 * np.array(layer.lora_a) @ np.array(layer.lora_b)
    full = np.array(emb.weight) + delta
    np.testing.assert_allclose(np.array(layer(ids)), full[[1, 5, 49]][None], atol=1e-5)
    h = mx.random.normal((1, 3, 16))
    np.testing.assert_allclose(np.array(layer.as_linear(h)), np.array(h) @ full.T, atol=1e-4)
    np.testing.assert_allclose(np.array(layer.fuse()(ids)), full[[1, 5, 49]][None], atol=1e-5)


def test_lora_fuse_exact_for_float_base():
    mx.random.seed(0)
    base = nn.Linear(32, 16, bias=True)
    layer = _nonzero_b(LoRALinear.from_base(base, r=4, scale=2.0))
    x = mx.random.normal((4, 32))
    fused = layer.fuse()
    assert type(fused) is nn.Linear
    np.testing.assert_allclose(np.array(fused(x)), np.array(layer(x)), atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 64 * 7])  # default, or slices of 7 output rows (5 slices, last of 4)
def test_cpu_fast_path_equals_quantized_matmul_and_grads(chunk, monkeypatch):
    from mlxlora.lora import quant

    if chunk:
        monkeypatch.setattr(quant, "CHUNK_ELEMENTS", chunk)
    mx.random.seed(0)
    q = nn.QuantizedLinear.from_linear(nn.Linear(64, 32, bias=True), group_size=32, bits=4)
    x = mx.random.normal((2, 10, 64))  # 20 rows: the dequantize path (MIN_ROWS_FOR_DEQUANT = 16)
    ref = q(x)
    holder = nn.Sequential(q)
    assert use_fast_cpu_path(holder, force=True) == 1 and type(holder.layers[0]) is CPUQuantizedLinear
    np.testing.assert_allclose(np.array(holder(x)), np.array(ref), atol=1e-4)
    w = np.array(dequantize_weight(q))
    c = mx.random.normal(ref.shape)
    for grad in (mx.grad(lambda x: (holder(x) * c).sum()), mx.compile(mx.grad(lambda x: (holder(x) * c).sum()))):
        np.testing.assert_allclose(np.array(grad(x)), np.array(c) @ w, atol=1e-4)  # d/dx sum(c * x W^T) = c W


def _tiny_llama(layers=4, quant=False):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=layers, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=80,
                           tie_word_embeddings=False)
    mx.random.seed(0)
    m = llama.Model(args)
    if quant:
        nn.quantize(m, group_size=32, bits=4)
    return m


@pytest.mark.parametrize("quant", [False, True])
def test_trainable_count_equals_formula(quant):
    m = _tiny_llama(quant=quant)
    get_lora_model(m, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    # q_proj: 64 -> 64, v_proj: 64 -> 32 (2 kv heads of 16); trainable = sum r * (in + out)
    expected = 4 * (8 * (64 + 64) + 8 * (64 + 32))
    trainable, total = count_parameters(m)
    assert trainable == expected
    assert total > trainable
    names = {k for k, _ in tree_flatten(m.trainable_parameters())}
    assert all(k.endswith((".lora_a", ".lora_b")) for k in names)


def test_only_adapter_parameters_get_gradients():
    m = _tiny_llama()
    get_lora_model(m, LoraConfig(r=4, target_modules="all-linear"))
    for _, layer in m.named_modules():
        if isinstance(layer, LoRALinear):
            _nonzero_b(layer)
    x = mx.array([[1, 2, 3, 4]])
    loss = lambda model: model(x).sum()  # noqa: E731
    grads = nn.value_and_grad(m, loss)(m)[1]
    flat = dict(tree_flatten(grads))
    assert flat and all(k.endswith((".lora_a", ".lora_b")) for k in flat)
    assert all(float(mx.abs(v).sum()) > 0 for v in flat.values())


def test_targeting_rules():
    m = _tiny_llama(layers=4)
    paths = lambda cfg: [p for p, _ in find_targets(m, cfg)]  # noqa: E731
    assert len(paths(LoraConfig(target_modules="all-linear"))) == 4 * 7  # lm_head excluded
    assert paths(LoraConfig(target_modules=["q_proj"], last_n_layers=1)) == ["model.layers.3.self_attn.q_proj"]
    assert paths(LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 2])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    assert paths(LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    assert paths(LoraConfig(target_modules=["model.layers.2.mlp.gate_proj"])) == ["model.layers.2.mlp.gate_proj"]
    with pytest.raises(ConfigError, match="matched no layer.*q_proj"):
        find_targets(m, LoraConfig(target_modules=["query"]))
    with pytest.raises(ConfigError, match="no block"):
        find_targets(m, LoraConfig(layers_to_transform=[7]))


def test_rank_pattern_applies_per_module():
    m = _tiny_llama(layers=2)
    get_lora_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                 rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, use_rslora=True))
    q0, q1 = m.model.layers[0].self_attn.q_proj, m.model.layers[1].self_attn.q_proj
    assert q0.rank == 8 and q1.rank == 2
    assert math.isclose(q0.scale, 16 / math.sqrt(8)) and math.isclose(q1.scale, 16 / math.sqrt(2))


@pytest.mark.parametrize("bad, field", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(lora_alpha=0), "lora_alpha"), (dict(lora_dropout=1.5), "lora_dropout"),
    (dict(target_modules=[]), "target_modules"), (dict(target_modules="(["), "target_modules"),
    (dict(bias="all"), "bias"), (dict(rank_pattern={"q": 0}), "rank_pattern"),
])
def test_lora_config_validation_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        LoraConfig(**bad)
