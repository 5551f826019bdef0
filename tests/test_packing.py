"""Packing: a packed batch gives each sample the same loss as running it alone."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxlora.data import Sample, collate
from mlxlora.models import load_base
from mlxlora.data.packing import PACKABLE, collate_packed, epoch_packed_batches, pack_rows, padding_fraction
from mlxlora.loss.packed import packed_logits

import tiny


def _samples(n=7, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(5, 40))
        ids = rng.integers(3, tiny.VOCAB_SIZE, L).tolist()
        mask = [False] * (L // 3) + [True] * (L - L // 3)
        out.append(Sample(ids, mask))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_packed_per_sample_loss_equals_alone(arch, tmp_path):
    assert arch in PACKABLE
    model = load_base(str(tiny.make_model(tmp_path / arch, arch))).model
    samples = _samples()
    rows = pack_rows([len(s.ids) - 1 for s in samples], capacity=96)
    assert len(rows) < len(samples)  # several samples share a row
    x, y, m, seg = (mx.array(a) for a in collate_packed(samples, rows, 8, 0))
    ce = nn.losses.cross_entropy(packed_logits(model, x, seg).astype(mx.float32), y) * m
    for b, row in enumerate(rows):
        for s, i in enumerate(row, start=1):
            packed = float((ce[b] * (seg[b] == s)).sum())
            xi, yi, mi = (mx.array(a) for a in collate([samples[i]], [0], 1, 0))
            alone = float((nn.losses.cross_entropy(model(xi).astype(mx.float32), yi) * mi).sum())
            assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5), (arch, i)


def test_pack_rows_respects_capacity_and_uses_each_sample_once():
    lengths = [30, 5, 17, 64, 2, 40, 33, 8]
    rows = pack_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    b1 = epoch_packed_batches(lengths, 64, 2, seed=1, epoch=0)
    assert b1 == epoch_packed_batches(lengths, 64, 2, seed=1, epoch=0)
    assert padding_fraction(lengths, b1, True, 8) < padding_fraction(lengths, [[i] for i in range(8)], False, 8) + 1


def test_training_with_packing_resumes_bit_exact(tmp_path):
    """Packed training is deterministic across an interrupt + resume (as unpacked training is)."""
    import os
    import signal

    from safetensors.numpy import load_file

    from mlxlora import LoraConfig, TrainConfig
    from mlxlora.train import TrainingStopped, train

    model = tiny.make_model(tmp_path / "m", "llama")
    rows = [{"text": "word " * n} for n in (2, 30, 3, 25, 4, 40, 5, 8, 12, 6, 50, 3)]
    data = tiny.write_data(tmp_path / "d", rows)
    cfg = lambda out: TrainConfig(model=str(model), data=str(data), adapter_path=str(out), iters=8,  # noqa: E731
                                  batch_size=2, grad_accum=2, lr=3e-3, pack=True, save_every=100, seed=1,
                                  lora=LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    full = train(cfg(tmp_path / "full"))
    assert full.steps == 8

    def stop(st):
        if st.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    import pytest as _pytest
    with _pytest.raises(TrainingStopped):
        train(cfg(tmp_path / "part"), callbacks=[stop])
    train(cfg(tmp_path / "part"), resume=str(tmp_path / "part"))
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
