"""LoRA on MoE experts: LoRASwitchLinear against a per-(token, expert) reference, fuse, QLoRA, and
all-linear / router targeting on tiny qwen3_moe and mixtral models from mlx-lm."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

import tiny
from mlxlora.config import LoraConfig
from mlxlora.errors import ConfigError
from mlxlora.lora import LoRASwitchLinear
from mlxlora.lora.quant import CPUQuantizedSwitchLinear, use_fast_cpu_path
from mlxlora.lora.surgery import adapter_layers, count_parameters, find_targets, fuse_model, get_lora_model
from mlxlora.lora.switch import switch_weight
from mlxlora.models import load_base

E, IN, OUT, R, SCALE = 4, 64, 32, 4, 1.5


def _layer(quantized=False, bias=False, seed=0):
    mx.random.seed(seed)
    base = SwitchLinear(IN, OUT, E, bias=bias)
    base.weight = mx.random.normal(base.weight.shape) * 0.1
    if bias:
        base.bias = mx.random.normal(base.bias.shape) * 0.1
    if quantized:
        base = base.to_quantized(group_size=32, bits=4)
    layer = LoRASwitchLinear.from_base(base, r=R, scale=SCALE)
    layer.lora_a = mx.random.normal(layer.lora_a.shape) * 0.2
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.2  # non-zero: the update is seen
    return layer


def _reference(x, indices, w, bias, a, b):
    """Per (token, slot) with the expert's own matrices taken by indexing: x (N, in), indices (N, k)."""
    we, ae, be = w[indices], a[indices], b[indices]  # (N, k, out, in), (N, k, in, r), (N, k, r, out)
    y = mx.einsum("ni,nkoi->nko", x, we)
    y = y + SCALE * mx.einsum("nkr,nkro->nko", mx.einsum("ni,nkir->nkr", x, ae), be)
    return y + bias[indices] if bias is not None else y


def _inputs(n=10, seed=3):
    mx.random.seed(seed)
    x = mx.random.normal((n, IN))
    indices = mx.stack([mx.random.permutation(E)[:2] for _ in range(n)])  # (n, 2): two distinct experts
    return x, indices


@pytest.mark.parametrize("bias", [False, True])
def test_output_and_gradients_equal_the_per_expert_reference(bias):
    layer = _layer(bias=bias)
    x, indices = _inputs()
    w, bvec = layer.linear.weight, layer.linear.get("bias")

    def ours(a, b, x):
        layer.lora_a, layer.lora_b = a, b
        return layer(x[:, None, None, :], indices).squeeze(-2)  # as SwitchGLU calls it: (N, 1, 1, in)

    def ref(a, b, x):
        return _reference(x, indices, w, bvec, a, b)

    a, b = layer.lora_a, layer.lora_b
    assert np.allclose(ours(a, b, x), ref(a, b, x), atol=1e-5)
    cot = mx.random.normal((x.shape[0], 2, OUT))
    g_ours = mx.grad(lambda a, b, x: (ours(a, b, x) * cot).sum(), argnums=(0, 1, 2))(a, b, x)
    g_ref = mx.grad(lambda a, b, x: (ref(a, b, x) * cot).sum(), argnums=(0, 1, 2))(a, b, x)
    for go, gr in zip(g_ours, g_ref):
        assert float(mx.abs(gr).max()) > 0
        assert np.allclose(go, gr, atol=1e-4)
    # Experts no token is routed to get no gradient (nothing is computed for them).
    unused = sorted(set(range(E)) - set(np.array(indices).ravel().tolist()))
    for e in unused:
        assert float(mx.abs(g_ours[0][e]).max()) == 0


def test_sorted_path_of_switch_glu_equals_unsorted():
    # SwitchGLU sorts tokens by expert when indices.size >= 64: both paths give the same result.
    mx.random.seed(0)
    glu = SwitchGLU(IN, OUT, E)
    for name in ("gate_proj", "up_proj", "down_proj"):
        lora = LoRASwitchLinear.from_base(getattr(glu, name), r=R, scale=SCALE)
        lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.2
        setattr(glu, name, lora)
    x, indices = _inputs(n=40)  # 80 (token, slot) pairs: sorted
    big = glu(x, indices)
    small = mx.concatenate([glu(x[i:i + 8], indices[i:i + 8]) for i in range(0, 40, 8)])  # 16 pairs: unsorted
    assert np.allclose(big, small, atol=1e-5)


def test_qlora_cpu_path_equals_dequantized_reference_forward_and_backward():
    layer = _layer(quantized=True)
    use_fast_cpu_path(layer, force=True)
    assert type(layer.linear) is CPUQuantizedSwitchLinear
    x, indices = _inputs(n=24)  # 48 rows: above the decode threshold, the dequantize path runs
    w = switch_weight(layer.linear)

    def ours(a, x):
        layer.lora_a = a
        return layer(x[:, None, None, :], indices).squeeze(-2)

    a = layer.lora_a
    assert np.allclose(ours(a, x), _reference(x, indices, w, None, a, layer.lora_b), atol=1e-4)
    # The kernel path (MLX's gather_qmm) agrees with the fast path.
    kernel = QuantizedSwitchLinear.__call__(layer.linear, x[:, None, None, :], indices).squeeze(-2)
    assert np.allclose(layer.linear(x[:, None, None, :], indices).squeeze(-2), kernel, atol=1e-4)
    g = mx.grad(lambda a, x: ours(a, x).sum(), argnums=(0, 1))(a, x)
    g_ref = mx.grad(lambda a, x: _reference(x, indices, w, None, a, layer.lora_b).sum(), argnums=(0, 1))(a, x)
    for go, gr in zip(g, g_ref):
        assert np.allclose(go, gr, atol=1e-3)


@pytest.mark.parametrize("quantized", [False, True])
def test_fuse_returns_a_plain_switch_layer_with_the_same_outputs(quantized):
    layer = _layer(quantized=quantized, bias=not quantized)
    x, indices = _inputs()
    xin = x[:, None, None, :]
    want = layer(xin, indices)
    fused = layer.fuse(dequantize=True)
    assert type(fused) is SwitchLinear
    assert np.allclose(fused(xin, indices), want, atol=1e-5)
    expect = switch_weight(layer.linear) + layer.delta()
    assert np.allclose(fused.weight, expect, atol=1e-6)
    if quantized:  # naive re-quantization: same bits and group, every expert quantized again
        requant = layer.fuse()
        assert isinstance(requant, QuantizedSwitchLinear) and requant.bits == 4 and requant.group_size == 32
        for e in range(E):  # each expert is what quantizing its fused weight alone gives
            q = mx.dequantize(*mx.quantize(expect[e], 32, 4), group_size=32, bits=4)
            assert np.allclose(switch_weight(requant)[e], q, atol=1e-6)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: tiny.make_model(root / arch, arch) for arch in tiny.MOE_ARCHS}


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_all_linear_adapts_experts_not_the_router(moe_dirs, arch):
    model = load_base(str(moe_dirs[arch])).model
    paths = [p for p, _ in find_targets(model, LoraConfig(target_modules="all-linear"))]
    moe = "mlp" if arch == "qwen3_moe" else "block_sparse_moe"
    for i in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.{moe}.switch_mlp.{proj}" in paths
        assert f"model.layers.{i}.{moe}.gate" not in paths
        assert f"model.layers.{i}.self_attn.q_proj" in paths
    # The router is an explicit target.
    routers = [p for p, _ in find_targets(model, LoraConfig(target_modules=["gate"]))]
    assert routers == [f"model.layers.0.{moe}.gate", f"model.layers.1.{moe}.gate"]


def test_dora_on_experts_is_refused(moe_dirs):
    model = load_base(str(moe_dirs["qwen3_moe"])).model
    with pytest.raises(ConfigError, match="DoRA on MoE experts .*switch_mlp"):
        get_lora_model(model, LoraConfig(target_modules="all-linear", use_dora=True))


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()


@pytest.mark.parametrize("arch,quantize", [("qwen3_moe", None), ("mixtral", None), ("qwen3_moe", 4)])
def test_moe_model_trains_experts_and_fuses(tmp_path, moe_dirs, ids, arch, quantize):
    src = moe_dirs[arch] if quantize is None else tiny.make_model(tmp_path / "q", arch, quantize=quantize)
    model = load_base(str(src)).model
    base_logits = model(ids)
    get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    experts = [p for p, m in adapter_layers(model) if isinstance(m, LoRASwitchLinear)]
    assert len(experts) == 6
    assert np.allclose(model(ids), base_logits, atol=1e-5)  # lora_b starts at zero
    trainable, _ = count_parameters(model)
    assert trainable == sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    tiny.randomize_adapters(model)
    adapted = model(ids)
    assert float(mx.abs(adapted - base_logits).max()) > 1e-3
    grads = nn.value_and_grad(model, lambda ids: _loss(model, ids))(ids)[1]
    flat = dict(tree_flatten(grads))
    for p in experts:
        for k in ("lora_a", "lora_b"):
            g = flat[f"{p}.{k}"]
            assert bool(mx.all(mx.isfinite(g))) and float(mx.abs(g).max()) > 0, (p, k)
    fuse_model(model, dequantize=True)
    assert not adapter_layers(model)
    assert np.allclose(model(ids), adapted, atol=1e-4)
