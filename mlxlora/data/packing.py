"""Sequence packing: several samples per row, with per-token segment ids so attention stays apart.

This module plans rows and pads them (numpy); the forward pass of a packed batch is loss/packed.py,
whose mask lets every sample attend only to itself. The loss mask is kept per sample, so the loss is
the same as unpacked (tests/test_conformance.py checks this per architecture). Only architectures in PACKABLE
are packed; packing_refusal says why another is not (hybrid state, absolute positions, a mask it ignores).
"""

from __future__ import annotations

import numpy as np

from .rows import Sample

# model_type values whose packed loss was checked equal to each sample alone, two packed rows with one
# sample longer than the sliding window (tests/conformance.py packing_equal, run for all of these by
# tests/test_conformance.py).
PACKABLE = {
    "Klear", "afmoe", "apertus", "bailing_moe", "bailing_moe_v3", "cohere", "cohere2", "dbrx", "deepseek",
    "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe",
    "gear", "gemma", "gemma3", "gemma3_text", "gemma3n", "gemma4", "gemma4_text", "glm", "glm4", "glm4_moe",
    "glm4_moe_lite", "gpt_neox", "gpt_oss", "gptj", "granite", "granitemoe", "helium", "hunyuan",
    "hunyuan_v1_dense", "internlm2", "internlm3", "kimi_k25", "kimi_vl", "laguna", "lille-130m", "llama",
    "llama4_text", "mellum", "mimo", "mimo_v2_flash", "minicpm", "minicpm3", "minimax", "ministral3",
    "mistral", "mistral3", "mistral4", "mixtral", "muse_glimmer", "nanbeige", "nanochat", "nemotron",
    "nemotron-nas", "olmo2", "olmo3", "olmoe", "openelm", "phi", "phi3", "phimoe", "phixtral", "pixtral",
    "plamo", "plamo3", "qwen", "qwen2", "qwen2_moe", "qwen2_vl", "qwen3", "qwen3_moe", "qwen3_vl",
    "qwen3_vl_moe", "seed_oss", "smollm3", "solar_open", "spark2_5", "stablelm", "starcoder2", "step3p5",
    "talkie", "telechat3", "youtu_llm",
}
# Hybrid models: linear-attention / state-space blocks carry a state from one position to the next,
# so a packed sample would start from the previous sample's state.
HYBRID = {
    "bailing_hybrid", "bailing_moe_linear", "granitemoehybrid", "jamba", "kimi_k3", "kimi_linear", "lfm2",
    "lfm2-vl", "lfm2_moe", "longcat_flash_ngram", "mamba", "mamba2", "nemotron_h", "olmo_hybrid", "plamo2",
    "qwen3_5", "qwen3_5_moe", "qwen3_next", "recurrent_gemma", "rwkv7",
}
HYBRID_REASON = "its linear-attention / state-space blocks carry state across positions, so packed samples would leak"
# Architectures whose packed loss differs or whose attention does not take the packed mask.
NOT_PACKABLE = {
    "gemma2": "its attention broadcasts a (B, 1, L, L) mask wrongly (packed loss differs)",
    "gpt2": "absolute position embeddings (a packed sample starts at a later position)",
    "gpt_bigcode": "absolute position embeddings (a packed sample starts at a later position)",
}
OTHER_REASON = "its attention does not take mlxlora's packed (segment) mask"


def packing_refusal(model_type: str | None) -> str | None:
    """Why `model_type` is not packed (one phrase), or None when packing is supported."""
    if model_type in PACKABLE:
        return None
    if model_type in HYBRID:
        return HYBRID_REASON
    return NOT_PACKABLE.get(model_type, OTHER_REASON)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices grouped into rows of at most `capacity` tokens.

    lengths are the per-sample token counts (len(ids) - 1, what a row holds). Deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def epoch_packed_batches(lengths: list[int], capacity: int, batch_size: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Rows packed once, then grouped into batches of `batch_size` rows in an order seeded by (seed, epoch)."""
    rows = pack_rows(lengths, capacity)
    rng = np.random.default_rng([seed, epoch, 7])
    perm = rng.permutation(len(rows)).tolist()
    rows = [rows[i] for i in perm]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def collate_packed(samples: list[Sample], rows: list[list[int]], pad_multiple: int, pad_id: int):
    """(inputs, targets, loss_mask, segments), each (B, L) numpy; segments count from 1, 0 is padding."""
    width = max(sum(len(samples[i].ids) - 1 for i in row) for row in rows)
    width = -(-width // pad_multiple) * pad_multiple
    B = len(rows)
    inputs = np.full((B, width), pad_id, np.int32)
    targets = np.full((B, width), pad_id, np.int32)
    mask = np.zeros((B, width), np.float32)
    segments = np.zeros((B, width), np.int32)
    for b, row in enumerate(rows):
        pos = 0
        for seg, i in enumerate(row, start=1):
            ids, m = samples[i].ids, samples[i].mask
            n = len(ids) - 1
            inputs[b, pos:pos + n] = ids[:-1]
            targets[b, pos:pos + n] = ids[1:]
            mask[b, pos:pos + n] = m[1:]
            segments[b, pos:pos + n] = seg
            pos += n
    return inputs, targets, mask, segments


def padding_fraction(lengths: list[int], batches: list, packed: bool, pad_multiple: int) -> float:
    """Fraction of the batch area that is padding, for a batch plan (rows of indices)."""
    real = area = 0
    for batch in batches:
        rows = batch if packed else [[i] for i in batch]
        sizes = [sum(lengths[i] for i in row) for row in rows]
        width = -(-max(sizes) // pad_multiple) * pad_multiple
        real += sum(sizes)
        area += width * len(rows)
    return 1 - real / max(area, 1)
