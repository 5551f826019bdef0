"""Blocked causal attention: the same loss and gradients as MLX's full attention, packed or not."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlora import LoraConfig
from mlxlora.loss import attention
from mlxlora.models import load_base
from mlxlora.loss.packed import segment_mask
from mlxlora.loss import loss_sums
from mlxlora.lora.surgery import get_lora_model

import tiny


def test_blocked_sdpa_equals_full_attention():
    mx.random.seed(0)
    q, k, v = mx.random.normal((2, 4, 300, 16)), mx.random.normal((2, 2, 300, 16)), mx.random.normal((2, 2, 300, 16))
    full = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    assert attention.n_blocks(300) == 2
    np.testing.assert_allclose(np.array(attention.blocked_sdpa(q, k, v, 0.25, "causal")), np.array(full), atol=1e-5)
    seg = mx.array(np.repeat([[1, 2, 3]], 100, axis=1).reshape(1, 300).repeat(2, 0))
    m = segment_mask(seg)  # packing's (B, 1, L, L) mask: causal within each sample
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m)
    np.testing.assert_allclose(np.array(attention.blocked_sdpa(q, k, v, 0.25, m)), np.array(ref), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("packed", [False, True])
def test_training_loss_and_grads_unchanged(arch, packed, tmp_path, monkeypatch):
    monkeypatch.setattr(attention, "MIN_BLOCK", 32)  # 200 tokens -> 6 blocks, the last one shorter
    model = load_base(str(tiny.make_model(tmp_path / arch, arch))).model
    get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tiny.randomize_adapters(model)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(3, tiny.VOCAB_SIZE, (2, 200)), dtype=mx.int32)
    m = mx.array((rng.random((2, 200)) > 0.3).astype(np.float32))
    batch = [x, x, m] + ([mx.array(np.repeat([1, 2, 3, 4], 50)[None].repeat(2, 0), dtype=mx.int32)] if packed else [])
    vg = nn.value_and_grad(model, loss_sums)
    (l_blocked, _), g_blocked = vg(model, *batch)  # on this CPU machine loss_sums blocks the attention
    calls = []
    monkeypatch.setattr(attention, "blocked_sdpa", lambda *a: calls.append(1) or attention.mx.fast.scaled_dot_product_attention(
        a[0], a[1], a[2], scale=a[3], mask=a[4]))
    (l_full, _), g_full = vg(model, *batch)
    assert calls, "the blocked path was not taken"
    assert l_blocked.item() == pytest.approx(l_full.item(), rel=1e-5)
    full = dict(tree_flatten(g_full))
    for k, v in tree_flatten(g_blocked):
        ref = np.array(full[k])  # summation order differs: compare against the tensor's scale
        np.testing.assert_allclose(np.array(v), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=k)
    import mlx_lm.models.base as base  # the model modules' attention is restored after each loss

    assert getattr(__import__(type(model).__module__, fromlist=["x"]).scaled_dot_product_attention,
                   "mlxlora_original", None) is None and base.scaled_dot_product_attention is not None
