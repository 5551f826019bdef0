"""Logits only at target rows: same loss and gradients as the full head, for every head kind."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxlora import LoraConfig
from mlxlora.loss.head import LEVELS, find_head, only_rows, target_rows
from mlxlora.models import load_base
from mlxlora.loss import loss_sums
from mlxlora.lora.surgery import get_lora_model

import tiny


def _batch(seed=0, B=3, L=24):
    rng = np.random.default_rng(seed)
    x = rng.integers(3, tiny.VOCAB_SIZE, (B, L)).astype(np.int32)
    y = rng.integers(3, tiny.VOCAB_SIZE, (B, L)).astype(np.int32)
    m = np.zeros((B, L), np.float32)
    for b in range(B):  # a prompt, then loss on the rest of a row of varying length
        n = int(rng.integers(L // 2, L))
        m[b, int(rng.integers(1, n // 2)):n] = 1
    m[0, 0] = 1  # position 0 is a target too: padding must not reuse it
    return x, y, m


def test_target_rows_pads_with_a_position_without_loss():
    _, _, m = _batch()
    rows = target_rows(m)
    flat = m.reshape(-1)
    assert rows is not None and len(rows) % -(-m.size // LEVELS) == 0 and len(rows) < m.size
    assert sorted(rows[:int(flat.sum())]) == list(np.flatnonzero(flat))
    assert flat[rows[int(flat.sum()):]].sum() == 0  # padded rows carry no loss
    assert target_rows(np.ones((2, 16), np.float32)) is None  # text data: nothing to save


@pytest.mark.parametrize("arch,quantize,targets", [
    ("llama", None, "all-linear"),                 # separate lm_head
    ("llama", None, ["q_proj", "v_proj", "lm_head"]),  # LoRA on the head itself
    ("qwen2", 4, "all-linear"),                    # tied, quantized embedding as head
    ("gemma2", None, "all-linear"),                # tied head + final logit soft-capping
    ("phi3", None, "all-linear"),
])
def test_rows_loss_and_grads_equal_full_head(arch, quantize, targets, tmp_path):
    model = load_base(str(tiny.make_model(tmp_path / arch, arch, quantize=quantize))).model
    get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    tiny.randomize_adapters(model)
    assert find_head(model) is not None
    x, y, m = _batch()
    rows = mx.array(target_rows(m))
    batch = [mx.array(a) for a in (x, y, m)]
    vg = nn.value_and_grad(model, partial(loss_sums, chunk=0))  # the plain loss (test_chunked: the chunked one)
    (l_full, n_full), g_full = vg(model, *batch)
    (l_rows, n_rows), g_rows = vg(model, *batch, None, rows)
    assert n_rows.item() == n_full.item() == m.sum()
    assert l_rows.item() == pytest.approx(l_full.item(), rel=1e-5)
    flat_full, flat_rows = dict(tree_items(g_full)), dict(tree_items(g_rows))
    assert flat_full.keys() == flat_rows.keys()
    for k, v in flat_full.items():
        # float32 sums in another order: an entry near 0 among entries ~20 moves by ~1e-6 of their scale
        scale = max(1.0, float(np.abs(np.array(v)).max()))
        np.testing.assert_allclose(np.array(flat_rows[k]), np.array(v), rtol=1e-4, atol=1e-6 * scale, err_msg=k)
    with only_rows(rows):  # the head really projected only the selected rows
        assert model(batch[0]).shape == (1, rows.size, tiny.VOCAB_SIZE)
    # Outside only_rows the swapped head is the plain head: full (B, L, V) logits.
    with only_rows(None):
        assert model(batch[0]).shape == (*x.shape, tiny.VOCAB_SIZE)


def tree_items(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_packed_batch_with_rows_equals_full_head(tmp_path):
    """A packed batch (segment mask) with the head at loss rows gives the packed full-head loss."""
    from mlxlora.data import Sample
    from mlxlora.data.packing import collate_packed, pack_rows

    model = load_base(str(tiny.make_model(tmp_path / "m", "llama"))).model
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(6):
        n = int(rng.integers(6, 30))
        samples.append(Sample(rng.integers(3, tiny.VOCAB_SIZE, n).tolist(), [False] * (n // 2) + [True] * (n - n // 2)))
    packed = pack_rows([len(s.ids) - 1 for s in samples], capacity=64)
    x, y, m, seg = collate_packed(samples, packed, 8, 0)
    rows = target_rows(m)
    assert rows is not None
    full = loss_sums(model, *(mx.array(a) for a in (x, y, m, seg)), chunk=0)
    for chunk in (0, None):  # plain and chunked loss, head at loss rows only
        sel = loss_sums(model, *(mx.array(a) for a in (x, y, m, seg, rows)), chunk=chunk)
        assert sel[1].item() == full[1].item() and sel[0].item() == pytest.approx(full[0].item(), rel=1e-5)
