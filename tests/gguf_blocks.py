"""GGUF blocks for import tests: random valid blocks of any type, and each value's rounding
step in the file (what one code step changes), both read with gguf-py only."""

from __future__ import annotations

import numpy as np

# Byte offsets of the float16 fields (d, and dmin / m) in one block of each type (ggml-common.h).
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
          "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}
# (start, end, byte that sets every code in it to 1) of the low-code bytes, for Q2_K/Q3_K/Q6_K;
# the high-code bytes (Q3_K's hmask: all set = no offset; Q6_K's qh) are held fixed.
CODES = {"Q2_K": (16, 80, 0x55, None), "Q3_K": (32, 96, 0x55, (0, 32, 0xFF)),
         "Q6_K": (0, 128, 0x11, (128, 192, 0x00))}


# Largest |code x sub-scale| of each type: a block scale of peak / PEAK keeps values within ~peak.
PEAK = {"Q4_0": 8, "Q4_1": 15, "Q5_0": 16, "Q5_1": 31, "Q8_0": 128, "Q2_K": 45, "Q3_K": 128,
        "Q4_K": 945, "Q5_K": 1953, "Q6_K": 4096, "IQ4_NL": 127, "IQ4_XS": 4064}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0, scale: float | None = None,
                  peak: float = 1.0) -> np.ndarray:
    """(rows, bytes) uint8 of random codes and sub-scales, with finite float16 block scales
    of random sign in [scale/10, scale] (default peak / PEAK[kind]): a valid tensor of `kind`
    for gguf-py's dequantize."""
    scale = peak / PEAK[kind] if scale is None else scale
    from gguf import GGMLQuantizationType, quants

    block, nbytes = quants.GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    for at in F16_AT[kind]:
        d = rng.uniform(scale / 10, scale, (rows, cols // block)) * rng.choice([-1, 1], (rows, cols // block))
        raw[..., at:at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def code_steps(kind: str, raw: np.ndarray) -> np.ndarray:
    """|value(code 1) - value(code 0)| for every value of a Q2_K/Q3_K/Q6_K tensor: the file's
    rounding step, from gguf-py's dequantize of two copies whose codes are all 0 and all 1."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    start, end, one, fixed = CODES[kind]
    blocks = raw.reshape(-1, quants.GGML_QUANT_SIZES[qtype][1])
    lo, hi = blocks.copy(), blocks.copy()
    lo[:, start:end], hi[:, start:end] = 0, one
    if fixed:
        for x in (lo, hi):
            x[:, fixed[0]:fixed[1]] = fixed[2]
    step = np.abs(quants.dequantize(hi, qtype) - quants.dequantize(lo, qtype))
    return step.reshape(raw.shape[0], -1)
