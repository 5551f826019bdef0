"""The conformance checks run per architecture of tests/arch_configs.py (test_conformance.py and
scripts/conformance.py both call `check`).

Every check goes through mlxlora's API on a tiny random model: wrap all-linear with non-zero lora_b,
forward, loss + adapter gradients, a few compiled training steps (mlxlora's Stepper), save -> load,
float fuse, DoRA, 4-bit QLoRA, head-only-at-loss and packing. `check` returns a Row: for each column
"ok" or the reason it is refused or fails. A model that fails inside mlx-lm itself (the plain model,
without adapters, fails the same way) is reported as such, not hidden.
"""

from __future__ import annotations

import importlib
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import arch_configs as A
import tiny
from mlxlora import LoraConfig
from mlxlora.adapters import load_adapter, save_adapter
from mlxlora.data.packing import collate_packed, pack_rows, packing_refusal
from mlxlora.errors import MlxloraError
from mlxlora.formats import gguf_lora
from mlxlora.lora.quant import use_fast_cpu_path
from mlxlora.lora.surgery import adapter_layers, fuse_model, get_lora_model
from mlxlora.loss import loss_sums
from mlxlora.loss.head import find_head, target_rows
from mlxlora.loss.packed import packed_logits
from mlxlora.models.load import quantize_model
from mlxlora.train.step import Stepper

OK = "ok"
COLUMNS = ("train", "QLoRA", "DoRA", "packing", "PEFT parity", "fuse", "GGUF LoRA export")
L = 16  # tokens per row


@dataclass
class Row:
    """What one architecture passed: column -> "ok" or the reason; plus what the checks noticed."""

    arch: str
    cells: dict = field(default_factory=dict)
    mlx_lm_failure: str | None = None   # the plain model fails inside mlx-lm
    dead: list = field(default_factory=list)  # adapters whose gradient is all zero
    head_rows: str = OK                 # head-only-at-loss equals the full head


def build(arch: str, seed: int = 0) -> nn.Module:
    """The tiny random float32 model of `arch` (same seed, same weights)."""
    cfg = A.config_for(arch)
    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    params = [(k, (mx.random.normal(v.shape) * 0.08).astype(mx.float32) if v.ndim >= 2 else v)
              for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    model.load_weights(params, strict=False)
    mx.eval(model.parameters())
    return model


def batch(seed: int = 0, B: int = 2):
    """(inputs, targets, mask) numpy (B, L): a prompt without loss, then targets."""
    rng = np.random.default_rng(seed)
    x = rng.integers(3, A.VOCAB, (B, L)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    m = np.zeros((B, L), np.float32)
    m[:, L // 3:] = 1
    return x, y, m


def _first_line(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {msg[:120]} ({Path(where.filename).name}:{where.lineno})"


def _close(a, b, tol=1e-4) -> bool:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max()))))


def _lora(**kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)


def _grads(model, arrays):
    (lsum, ntok), g = nn.value_and_grad(model, loss_sums)(model, *arrays)
    flat = dict(tree_flatten(g))
    mx.eval(lsum, flat)
    return lsum / ntok, flat


def _check_grads(loss, flat) -> list[str]:
    """Adapter layers whose gradient is all zero; raises if anything is not finite or all is zero."""
    assert np.isfinite(loss.item()), f"loss {loss.item()}"
    assert flat and all(bool(mx.isfinite(v).all()) for v in flat.values()), "non-finite gradient"
    layers = {}
    for k, v in flat.items():
        layers.setdefault(k.rsplit(".", 1)[0], []).append(float(mx.abs(v).max()))
    dead = sorted(p for p, mags in layers.items() if max(mags) == 0)
    assert len(dead) < len(layers), "every adapter gradient is zero"
    return dead


def plain_failure(arch: str) -> str | None:
    """Why the plain model (no adapters, every weight trainable) fails to run or take one compiled
    training step (mlxlora's Stepper) inside mlx-lm, or None when it works."""
    try:
        model = build(arch)
        x, y, m = (mx.array(a) for a in batch())
        mx.eval(model(x))
        model.train()
        opt = optim.Adam(learning_rate=1e-3)
        loss, _, _ = Stepper(model, opt, clip_grad=None).step([(x, y, m)])
        mx.eval(loss)
    except BaseException as e:  # noqa: B036  (an mlx-lm module may even sys.exit at import)
        if isinstance(e, KeyboardInterrupt):
            raise
        return _first_line(e)
    return None


def check_train(arch: str, tmp: Path, row: Row) -> None:
    """wrap -> forward -> grads -> steps -> save/load -> fuse, the 'train' and 'fuse' columns."""
    model = build(arch)
    x, y, m = batch()
    arrays = (mx.array(x), mx.array(y), mx.array(m))
    base_logits = model(arrays[0])
    get_lora_model(model, _lora())
    tiny.randomize_adapters(model)
    logits = model(arrays[0])
    assert bool(mx.isfinite(logits).all()), "non-finite logits"
    assert not _close(logits, base_logits, 1e-6), "the adapters do not change the output"
    loss0, flat = _grads(model, arrays)
    row.dead = _check_grads(loss0, flat)
    # head-only-at-loss: same loss as the full head
    rows = target_rows(m)
    full = loss_sums(model, *arrays)
    part = loss_sums(model, *arrays, None, mx.array(rows))
    if abs(full[0].item() - part[0].item()) > 1e-4 * max(1.0, abs(full[0].item())):
        row.head_rows = f"loss {part[0].item():.6f} != full head {full[0].item():.6f}"
    elif find_head(model) is None:
        row.head_rows = "head not recognised: full logits are used"
    # a few compiled training steps lower the loss
    model.train()
    opt = optim.Adam(learning_rate=2e-2)
    stepper = Stepper(model, opt, clip_grad=None)
    step_batch = [(*arrays, None, mx.array(rows))]
    losses = []
    for _ in range(4):
        loss, _, _ = stepper.step(step_batch)
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    logits = model(arrays[0])
    out = save_adapter(model, tmp / "adapter", base_model=arch)
    fresh = build(arch)
    load_adapter(fresh, out)
    assert _close(fresh(arrays[0]), logits, 1e-5), "save -> load changed the logits"
    row.cells["train"] = OK
    fuse_model(fresh)
    assert not adapter_layers(fresh)
    row.cells["fuse"] = OK if _close(fresh(arrays[0]), logits) else "fused logits differ"
    row.cells["GGUF LoRA export"] = check_gguf(out, tmp)


def check_gguf(adapter: Path, tmp: Path) -> str:
    from mlxlora.adapters import export_gguf_lora

    try:
        export_gguf_lora(adapter, tmp / "lora.gguf")
    except MlxloraError as e:
        msg = str(e)
        assert "\n" not in msg
        return "no llama.cpp architecture mapping (llama, mistral, qwen2, qwen3 only)"
    return OK


def check_dora(arch: str) -> str:
    model = build(arch)
    x = mx.array(batch()[0])
    get_lora_model(model, _lora(use_dora=True))
    tiny.randomize_adapters(model)
    logits = model(x)
    _check_grads(*_grads(model, tuple(mx.array(a) for a in batch())))
    fuse_model(model)
    return OK if _close(model(x), logits) else "fused DoRA logits differ"


def check_qlora(arch: str) -> str:
    model = build(arch)
    n = quantize_model(model, bits=4, group_size=32)
    if n == 0:
        return "no layer has an input width divisible by 32"
    use_fast_cpu_path(model)
    get_lora_model(model, _lora())
    tiny.randomize_adapters(model)
    _check_grads(*_grads(model, tuple(mx.array(a) for a in batch())))
    return OK


def packing_equal(arch: str) -> str:
    """Per-sample packed loss equals each sample alone: "ok" or how it differs."""
    model = build(arch)
    rng = np.random.default_rng(3)
    from mlxlora.data import Sample, collate

    # two packed rows (B > 1), one sample longer than the sliding window (16) of the windowed models
    samples = [Sample(rng.integers(3, A.VOCAB, n).tolist(), [False] * 2 + [True] * (n - 2)) for n in (21, 10, 15, 7)]
    rows = pack_rows([len(s.ids) - 1 for s in samples], capacity=30)
    assert len(rows) == 2 and all(len(r) == 2 for r in rows), rows
    x, y, m, seg = (mx.array(a) for a in collate_packed(samples, rows, 8, 0))
    try:
        ce = nn.losses.cross_entropy(packed_logits(model, x, seg).astype(mx.float32), y) * m
    except Exception as e:
        return f"the packed forward fails ({_first_line(e)})"
    for b, r in enumerate(rows):
        for s, i in enumerate(r, start=1):
            packed = float((ce[b] * (seg[b] == s)).sum())
            xi, yi, mi = (mx.array(a) for a in collate([samples[i]], [0], 1, 0))
            alone = float((nn.losses.cross_entropy(model(xi).astype(mx.float32), yi) * mi).sum())
            if abs(packed - alone) > 1e-4 * max(1.0, abs(alone)):
                return f"packed loss {packed:.4f} != alone {alone:.4f}"
    return OK


def peft_parity(arch: str) -> str:
    """The PEFT-parity cell: what tests/test_transformers5.py checks for `arch` (it runs there, with torch)."""
    import hf_twins as H

    if arch in H.HF_TWINS:
        return OK if arch not in H.PEFT_TARGETS else f"ok ({H.PEFT_TARGETS[arch][1]})"
    return H.HF_REFUSED.get(arch, "no transformers twin")


def check(arch: str) -> Row:
    """Run every check on `arch`. A failure whose plain model (no adapters) fails too is recorded as
    mlx-lm's; any other failure raises (it is mlxlora's)."""
    row = Row(arch)
    try:
        with tempfile.TemporaryDirectory() as d:
            check_train(arch, Path(d), row)
    except BaseException as e:  # noqa: B036
        if isinstance(e, KeyboardInterrupt):
            raise
        failure = plain_failure(arch)
        if failure is None:
            raise
        row.mlx_lm_failure = failure
        row.cells = {c: f"mlx-lm fails ({failure})" for c in COLUMNS}
        return row
    row.cells["DoRA"] = check_dora(arch)
    row.cells["QLoRA"] = check_qlora(arch)
    model_type = A.config_for(arch)["model_type"]
    refusal = packing_refusal(model_type)
    row.cells["packing"] = packing_equal(arch) if refusal is None else f"refused: {refusal}"
    row.cells["PEFT parity"] = peft_parity(arch)
    return row
