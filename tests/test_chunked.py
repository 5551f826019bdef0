"""The chunked cross-entropy equals the plain full-logits loss: loss and every adapter gradient."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlora import LoraConfig
from mlxlora.lora.surgery import get_lora_model
from mlxlora.loss import chunked, loss_sums
from mlxlora.loss.head import target_rows
from mlxlora.loss.tokens import token_logprobs
from mlxlora.models import load_base

import tiny

GEMMA3 = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64,
              num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=16,
              sliding_window=8, sliding_window_pattern=2, max_position_embeddings=512)


def _batch(seed=0, B=3, L=40):
    rng = np.random.default_rng(seed)
    x = rng.integers(3, tiny.VOCAB_SIZE, (B, L)).astype(np.int32)
    y = rng.integers(3, tiny.VOCAB_SIZE, (B, L)).astype(np.int32)
    m = np.zeros((B, L), np.float32)
    for b in range(B):
        m[b, int(rng.integers(1, L // 3)):int(rng.integers(L // 2, L))] = 1
    return x, y, m


def _model(tmp_path, arch, quantize, targets, tied=None, monkeypatch=None):
    overrides = {} if tied is None else {"tie_word_embeddings": tied}
    if arch == "gemma3_text":  # not in tiny.ARCHS (every test looping over it would get it): for this test only
        monkeypatch.setitem(tiny.ARCHS, "gemma3_text", GEMMA3)
    folder = tiny.make_model(tmp_path / arch, arch, quantize=quantize, **overrides)
    model = load_base(str(folder)).model
    get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    tiny.randomize_adapters(model)
    return model


def _compare(model, batch, rtol=1e-5, train=False):
    """train: the training form (gradient formed in the forward); else the recomputing VJP."""
    vg = nn.value_and_grad(model, loss_sums)
    (plain, n), g_plain = vg(model, *batch, chunk=0)
    (chunk, n2), g_chunk = vg(model, *batch, train=train)
    assert n.item() == n2.item()
    assert chunk.item() == pytest.approx(plain.item(), rel=rtol)
    a, b = dict(tree_flatten(g_plain)), dict(tree_flatten(g_chunk))
    assert a.keys() == b.keys() and a
    for k, v in a.items():
        v, w = np.array(v), np.array(b[k])
        # relative to the gradient's own scale: float32 sums taken in another order
        assert np.abs(w - v).max() <= rtol * max(np.abs(v).max(), 1e-30) * 10, k
        assert np.linalg.norm(w - v) <= rtol * np.linalg.norm(v), k
    return a


CASES = [
    ("llama", None, "all-linear", None),                      # untied lm_head
    ("llama", None, ["q_proj", "down_proj", "lm_head"], None),  # LoRA on the head itself
    ("llama", 4, ["v_proj", "lm_head"], None),                # quantized head under LoRA
    ("qwen3", None, "all-linear", True),                      # tied embedding as head
    ("qwen3", None, ["q_proj", "embed_tokens"], True),        # LoRA on the tied embedding
    ("qwen3", 4, ["o_proj", "embed_tokens"], True),           # quantized tied embedding + LoRA
    ("gemma2", None, ["up_proj", "embed_tokens"], None),      # final-logit soft-capping
    ("gemma2", 4, "all-linear", None),
    ("gemma3_text", None, ["gate_proj", "embed_tokens"], None),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("arch,quantize,targets,tied", CASES)
def test_chunked_loss_and_grads_equal_plain(arch, quantize, targets, tied, train, tmp_path, monkeypatch):
    model = _model(tmp_path, arch, quantize, targets, tied, monkeypatch)
    assert chunked.head_parts(model) is not None
    x, y, m = _batch()
    batch = [mx.array(a) for a in (x, y, m)]
    # small chunks so every batch spans several, with a ragged last one (40 * 3 = 120 tokens)
    monkeypatch.setattr(chunked, "chunk_rows", lambda vocab, memory_bytes=None: 16)
    grads = _compare(model, batch, train=train)
    if "lm_head" in targets or "embed_tokens" in targets:
        assert any(k.startswith(("lm_head", "model.embed_tokens")) for k in grads)
    # the head only at loss rows, then chunked
    _compare(model, [*batch, None, mx.array(target_rows(m))], train=train)


@pytest.mark.parametrize("train", [False, True])
def test_a_wrong_chunk_boundary_is_caught(train, tmp_path, monkeypatch):
    """Chunks (0, 16), (15, 31), (32, 48), ...: token 15 twice, token 31 never; the comparison must fail."""
    model = _model(tmp_path, "qwen3", None, ["q_proj", "embed_tokens"], True)
    x, y, m = _batch()
    batch = [mx.array(a) for a in (x, y, m)]
    monkeypatch.setattr(chunked, "chunk_rows", lambda vocab, memory_bytes=None: 16)
    real = chunked.chunk_bounds

    def wrong(n, rows):
        out = real(n, rows)
        out[1] = (out[1][0] - 1, out[1][1] - 1)
        return out

    monkeypatch.setattr(chunked, "chunk_bounds", wrong)
    with pytest.raises(AssertionError):
        _compare(model, batch, train=train)


def test_chunk_rows_scale_with_vocab_and_memory():
    assert chunked.chunk_rows(262_144, 16 << 30) * 262_144 <= (16 << 30) // chunked.MEMORY_SHARE // (chunked.CHUNK_COPIES * 4)
    assert chunked.chunk_rows(49_152, 16 << 30) > chunked.chunk_rows(262_144, 16 << 30)
    assert 4 * chunked.chunk_rows(262_144, 16 << 30) <= chunked.chunk_rows(262_144, 64 << 30) < 4 * (40 + 8)
    assert chunked.chunk_rows(10**9, 1 << 20) == 8


def test_token_logprobs_match_log_softmax(tmp_path):
    model = _model(tmp_path, "gemma2", None, ["q_proj"])
    x, y, _ = _batch()
    lp = token_logprobs(model, mx.array(x), mx.array(y), chunk=16)
    ref = nn.log_softmax(model(mx.array(x)).astype(mx.float32), axis=-1)
    ref = mx.take_along_axis(ref, mx.array(y)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.array(lp), np.array(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use", ["train", "logprob", "eval"])
def test_only_about_one_chunk_of_logits_is_alive_at_a_time(use):
    # 64 chunks of 16 rows over a 50,000-token head: the full logits would be 64 chunks' worth. Before the
    # chunks were chained (each one's hidden rows wait for the previous one's results), mlx ran them side by
    # side and the peak grew with the number of chunks.
    V, D, N, rows = 50_000, 32, 1024, 16
    head = nn.Embedding(V, D)
    head.weight = mx.random.normal((V, D)) * 0.1
    head.freeze()
    h, t, w = mx.random.normal((N, D)), mx.random.randint(0, V, (N,)), mx.ones((N,))
    if use == "train":
        fn = mx.compile(mx.value_and_grad(lambda h: chunked.masked_ce_sum(head, "as_linear", h, t, w, rows=rows)))
    elif use == "logprob":
        fn = mx.compile(mx.value_and_grad(lambda h: chunked.token_ce(head, "as_linear", h, t, rows=rows).sum()))
    else:
        fn = lambda h: chunked.token_ce(head, "as_linear", h, t, rows=rows)  # noqa: E731
    mx.eval(head.parameters(), h, t, w)
    static = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn(h))
    chunk, small = rows * V * 4, 8 * N * D * 4  # one chunk's float32 logits; (N, D)-sized arrays
    copies = (mx.get_peak_memory() - static - small) / chunk
    assert copies <= chunked.CHUNK_COPIES + (3 if use == "logprob" else 0), copies
