"""Gradient checkpointing: the same loss and adapter gradients as without it, compiled or not."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlora import LoraConfig
from mlxlora.lora.surgery import get_lora_model
from mlxlora.loss import loss_sums
from mlxlora.models import load_base
from mlxlora.train.step import grad_checkpoint_blocks

import tiny


def _grads(folder, targets, ckpt, compiled):
    model = load_base(str(folder)).model
    get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    tiny.randomize_adapters(model)
    if ckpt:
        assert grad_checkpoint_blocks(model) == len(model.layers)
    vg = nn.value_and_grad(model, loss_sums)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(3, tiny.VOCAB_SIZE, (2, 48)), dtype=mx.int32)
    batch = (x, x, mx.array((rng.random((2, 48)) > 0.3).astype(np.float32)))

    def fn(*b):
        (loss, _), g = vg(model, *b)
        return loss, g

    if compiled:
        fn = partial(mx.compile, inputs=[model.state], outputs=[model.state])(fn)
    loss, g = fn(*batch)
    mx.eval(loss, g)
    return loss.item(), dict(tree_flatten(g))


@pytest.mark.parametrize("arch,targets", [("llama", ["down_proj", "up_proj"]), ("gemma2", "all-linear")])
@pytest.mark.parametrize("compiled", [False, True])
def test_checkpointed_grads_equal_plain(arch, targets, compiled, tmp_path):
    folder = tiny.make_model(tmp_path / arch, arch)
    l0, g0 = _grads(folder, targets, False, compiled)
    l1, g1 = _grads(folder, targets, True, compiled)
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert g0.keys() == g1.keys() and len(g0) >= 4
    for k, v in g0.items():
        np.testing.assert_allclose(np.array(g1[k]), np.array(v), rtol=1e-5, atol=1e-7, err_msg=k)
        assert np.abs(np.array(v)).max() > 0, k  # every adapter gets a gradient
