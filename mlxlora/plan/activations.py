"""Activation memory of one micro-batch, term by term: what each block keeps for its backward, the
backward's working set, the logits, and float copies of quantized weights (coefficients measured on
mlx 0.32's CPU backend)."""

from __future__ import annotations

import math

from ..lora.quant import CHUNK_ELEMENTS
from ..lora.surgery import block_index
from ..loss.attention import score_elements
from ..loss.chunked import CHUNK_COPIES, CHUNKABLE, chunk_rows
from ..loss.head import padded_rows
from ..models.moe_shapes import per_token
from ..models.shapes import Matrix, ModelShapes, dims


# -- activations ------------------------------------------------------------------------------
# Which tensor an adapter in each projection makes autodiff keep (lora_a's gradient needs its input).
ROLES = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
         "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
         "down_proj": "mlp_out"}


# What a block keeps beyond a llama block, in (T, D), (T, I) and P-sized tensors, measured (mlx 0.32):
# gemma2 has two more RMSNorms, tanh soft-capping of the attention scores and a GELU (tanh) MLP.
BLOCK_EXTRA = {"gemma2": (2.5, 2, 1)}


def _blocks(adapted: list[tuple[Matrix, int]], n_blocks: int, dora: bool, k: int = 1):
    """Per block: roles of its adapters, Σ rank (+ Σ out with DoRA), Σ out; and the lowest block
    the backward reaches (0 with an adapted embedding, n_blocks when none). k: experts per token."""
    roles: dict[int, set] = {}
    extra: dict[int, int] = {}
    outs: dict[int, int] = {}
    first = n_blocks
    for m, r in adapted:
        i = block_index(m.path)
        if i is None:
            first = 0 if m.kind == "embedding" else first
            continue
        first = min(first, i)
        roles.setdefault(i, set()).add(ROLES.get(m.path.rpartition(".")[2], "attn_in"))
        # experts: x·lora_a is kept once per (token, routed expert)
        extra[i] = extra.get(i, 0) + r * (k if m.experts else 1) + (m.rows if dora else 0)
        outs[i] = outs.get(i, 0) + m.rows
    return roles, extra, outs, first


def _kept(d: dict, model_type: str | None, B: int, L: int, roles: set, extra: int, P: int) -> int:
    """Elements one block keeps for its backward at batch B, length L. roles: its adapters' ROLES;
    extra: Σ rank (+ Σ out with DoRA) over its adapters; P: attention scores per head (all blocks)."""
    T, D, I, H = B * L, d["hidden_size"], d["intermediate_size"], d["num_attention_heads"]
    q, kv = H * d["head_dim"], d["num_key_value_heads"] * d["head_dim"]
    e = (T * D                   # block input: the first RMSNorm's backward
         + T * D                 # residual after attention: the second RMSNorm's backward
         + T * q                 # queries after RoPE and scaling: backward of Q·Kᵀ
         + 2 * T * kv            # keys and values after RoPE: backward of Q·Kᵀ and P·V
         + B * H * P             # softmax probabilities (mlx trains with the unfused SDPA)
         + 4 * T * I)            # SwiGLU: gate, sigmoid(gate), silu(gate), up
    xd, xi, xp = BLOCK_EXTRA.get(model_type, (0, 0, 0))
    e += int(xd * T * D + xi * T * I + xp * B * H * P)
    e += T * D if "attn_in" in roles else 0    # normed block input: the q/k/v adapters' input
    e += T * q if "attn_out" in roles else 0   # attention output: the o_proj adapter's input
    e += T * D if "mlp_in" in roles else 0     # normed residual: the gate/up adapters' input
    e += T * I if "mlp_out" in roles else 0    # SwiGLU output: the down_proj adapter's input
    return e + T * extra                       # x·lora_a per adapter (lora_b's gradient); DoRA: the


def _working_set(d: dict, B: int, L: int, mlp: bool, outs: dict[int, int], dora: bool, P: int) -> float:
    """Elements the backward of one block holds next to what is kept: gradients and temporaries.

    Measured with mlx 0.32 (CPU) on llama-like blocks: ~17.5 (T, D) buffers (residual-stream and
    projection gradients, RoPE/transposes), 3 (T, I) (+3 with MLP adapters), 2 P-sized (softmax
    backward; P: scores per head of the largest attention block), 4 (T, kv) (GQA key/value gradients
    before the head sum); DoRA: 2 (T, out) per adapter.
    """
    T, D, I, H = B * L, d["hidden_size"], d["intermediate_size"], d["num_attention_heads"]
    kv = d["num_key_value_heads"] * d["head_dim"]
    return (17.5 * T * D + (6 if mlp else 3) * T * I + 2 * B * H * P + 4 * T * kv
            + (2 * T * max(outs.values()) if dora else 0))


UNBLOCKED = {"gemma2"}  # model types whose attention does not go through scaled_dot_product_attention


def chunk_copies(chunks: int) -> float:
    """(rows, V) float32 buffers the chunked loss holds at its peak, by its number of chunks: mlx allocates the
    outputs of the chunks it has queued, so few chunks hold fewer copies. Measured on the head alone (compiled
    value_and_grad, V 49,152 and 151,936): 4.1 at 3 chunks, 6.3-6.4 at 8-9, 7.2 at 43 (about 8 - 12 / chunks); one
    chunk is the plain loss (3.8-3.95). 6 / chunks, not 12, keeps whole training steps from being under-predicted:
    planned / measured 0.98, 1.09, 1.04 on bench cases a-c (8 copies: 1.04, 1.15, 1.04). CHUNK_COPIES is also
    the bound the loss sizes its chunks by."""
    return max(4.0, CHUNK_COPIES - 6 / max(chunks, 1))


def _logits_bytes(T: int, V: int, act_bytes: int, config: dict, memory_bytes: int | None = None,
                  chunked: bool = True) -> int:
    """Logits (T, V) in float32 for the loss, kept for logsumexp's backward, then softmax and the
    logits' gradient, plus one temporary of the same size (measured: 3.8-3.95 copies). T: the rows
    the head projects (head.py: only the target tokens, rounded up to a level).

    A model the chunked loss handles (loss/chunked.py) holds one chunk of chunk_rows(V, memory) tokens
    instead: CHUNK_COPIES (rows, V) float32 buffers, plus per-token vectors and the hidden rows' gradient.
    chunked False: a loss that takes whole logits (GRPO's completion log-probs)."""
    if chunked and config.get("model_type") in CHUNKABLE:
        rows = min(T, chunk_rows(V, memory_bytes))
        return int(chunk_copies(math.ceil(T / rows)) * rows * V * 4) + rows * V * act_bytes * (act_bytes != 4) + 4 * T * 4
    logits = 4 * T * V * 4 + (T * V * act_bytes if act_bytes != 4 else 0)
    if config.get("final_logit_softcapping"):  # tanh(logits / c) * c keeps its tanh (not measured)
        logits += T * V * 4
    return logits


def activation_terms(shapes: ModelShapes, adapted: list[tuple[Matrix, int]], batch_size: int, seq_len: int,
                     grad_checkpoint: bool = False, act_bytes: int = 4, dora: bool = False,
                     cpu_dequant: bool = False, loss_fraction: float = 1.0,
                     memory_bytes: int | None = None, chunked_loss: bool = True) -> dict[str, int]:
    """Bytes of activation memory at the peak of one micro-batch (forward + backward), term by term.

    A decoder-only block (RMSNorm, attention, SwiGLU MLP) at the worst case: every sample padded to
    `seq_len`. Blocks below the lowest adapted one keep nothing (no gradient reaches them).
    `cpu_dequant`: the CPU backend (quantized layers run dequantize+matmul; attention is blocked). `loss_fraction`: the
    share of the batch's tokens that carry loss (1.0, the worst case, unless known). `memory_bytes`: the
    machine's memory, which sizes the chunked loss's chunk (loss/chunked.chunk_rows).
    """
    d = dims(shapes.config)
    B, L, T = batch_size, seq_len, batch_size * seq_len
    D, N = d["hidden_size"], d["num_hidden_layers"]
    V = next((m.rows for m in shapes.matrices if m.kind == "embedding"), d["vocab_size"])
    roles, extra, outs, first = _blocks(adapted, N, dora, per_token(shapes.config) or 1)
    reached = range(first, N)
    model_type = shapes.config.get("model_type")
    # attention.py blocks causal attention on CPU; gemma2 computes its own soft-capped scores
    p_all, p_block = score_elements(L, blocked=cpu_dequant and model_type not in UNBLOCKED)
    kept = {i: _kept(d, model_type, B, L, roles.get(i, set()), extra.get(i, 0), p_all) for i in reached}
    mlp = {i for i, r in roles.items() if r & {"mlp_in", "mlp_out"}}
    work = int(_working_set(d, B, L, bool(mlp), outs, dora, p_block) * act_bytes) if reached else 0
    logits = _logits_bytes(padded_rows(math.ceil(T * loss_fraction), T), V, act_bytes, shapes.config, memory_bytes,
                           chunked_loss)
    if not grad_checkpoint:  # everything kept is alive when the backward starts
        terms = {"kept for backward": sum(kept.values()) * act_bytes,
                 "backward working set": work, "logits and their gradient": logits}
    else:
        # Checkpointing keeps each block's input: measured (mlx 0.32) ~3 (T, D) buffers per block. Two
        # phases: the loss's backward (logits alive), then blocks recomputed one at a time; the peak is
        # the larger phase. Recomputed activations are freed block by block (train/step.checkpointed_call
        # makes each block's adapter gradients come first; before that, each block with MLP adapters
        # held two (T, I) more until the end of the backward).
        inputs = len(reached) * 3 * T * D * act_bytes
        block = max(kept.values(), default=0) * act_bytes
        if block > logits:
            terms = {"block inputs (checkpointed)": inputs, "one recomputed block": block}
        else:
            terms = {"block inputs (checkpointed)": inputs, "logits and their gradient": logits}
        terms["backward working set"] = work
    if cpu_dequant or dora:
        terms.update(_dequantized(shapes, adapted, reached, grad_checkpoint, cpu_dequant, dora, act_bytes))
    return terms


def _dequantized(shapes, adapted, reached, grad_checkpoint, cpu_dequant, dora, act_bytes) -> dict[str, int]:
    """Float copies of quantized weights. DoRA's forward needs its adapted layers' float weight on any
    backend, kept from a block's forward to its backward. The CPU dequantize+matmul path (quant.py)
    dequantizes again in the backward, a slice of at most CHUNK_ELEMENTS weights at a time; mx.dequantize
    holds twice its output while it runs (measured, mlx 0.32 CPU)."""
    dora_mats = [a for a, _ in adapted] if dora else []
    per_block = [sum(m.rows * m.cols for m in shapes.matrices if m.bits and block_index(m.path) == i
                     and any(a is m for a in dora_mats)) for i in reached]
    n = max(per_block, default=0) if grad_checkpoint else sum(per_block)
    if cpu_dequant:  # quantized experts are dequantized whole (E, out, in) for one gather_mm
        n += 2 * max((m.size if m.experts else min(CHUNK_ELEMENTS, m.size) for m in shapes.matrices if m.bits),
                     default=0)
    return {"dequantized weights": n * act_bytes} if n else {}
