"""GGUF tensor types -> MLX affine quantization (`w = scale * q + bias`, groups of 32 along a row).

Most llama.cpp block formats are affine per 32 values, so their codes and scales carry over
exactly: Q4_0/Q4_1/Q4_K become 4-bit groups of 32, Q5_0/Q5_1/Q5_K 5-bit, Q8_0 8-bit, and the
non-linear IQ4_NL/IQ4_XS codebooks (integer levels in -127..113 times a block scale) 8-bit. The
only rounding is the block scale `d * sub_scale` stored as float16, the dtype mlx-lm computes in.
Q2_K, Q3_K and Q6_K have sub-blocks of 16 values with their own scales, finer than MLX's smallest
group (32): they are re-quantized from gguf-py's dequantized values to REQUANT_BITS (tests and
README give the error against the file's own rounding step), or kept float16 on request.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ModelError

GROUP_SIZE = 32  # every MLX group holds exactly one GGUF block or sub-block of 32 values
FLOAT_TYPES = ("F32", "F16", "BF16")
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                   np.int16)  # the IQ4 codebook (ggml-common.h kvalues_iq4nl)
REQUANT_BITS = {"Q2_K": 4, "Q3_K": 5, "Q6_K": 8}  # no exact MLX form; chosen by measured error


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as float32 (n_blocks, 1)."""
    return raw[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16k) bytes -> (n, 32k) codes: each run of 16 bytes holds 32 values, low nibbles first."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _bits_of(mask: np.ndarray, count: int) -> np.ndarray:
    """(n, m) bytes -> (n, count, m): bit b of byte i at [:, b, i]."""
    return (mask[:, None, :] >> np.arange(count, dtype=np.uint8).reshape(1, -1, 1)) & 1


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte field -> 6-bit (scale, min) per sub-block of 32, each (n, 8)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


# Each decoder: raw blocks (n, bytes) -> (codes (n, values) uint8, scales (n, groups), biases).
def _q4_0(raw):
    d = _f16(raw, 0)
    return _nibbles(raw[:, 2:]), d, -8 * d


def _q4_1(raw):
    return _nibbles(raw[:, 4:]), _f16(raw, 0), _f16(raw, 2)


def _q5(raw, at):  # Q5_0/Q5_1: a uint32 of high bits, then nibbles as Q4
    high = _bits_of(raw[:, at:at + 4], 8).transpose(0, 2, 1).reshape(-1, 32)  # bit k of the uint32
    return _nibbles(raw[:, at + 4:]) | (high << 4)


def _q5_0(raw):
    d = _f16(raw, 0)
    return _q5(raw, 2), d, -16 * d


def _q5_1(raw):
    return _q5(raw, 4), _f16(raw, 0), _f16(raw, 2)


def _q8_0(raw):
    d = _f16(raw, 0)
    return (raw[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _q4_k(raw):
    sc, mn = _k_scales(raw[:, 4:16])
    codes = (raw[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    return codes.reshape(-1, 256), _f16(raw, 0) * sc, -_f16(raw, 2) * mn


def _q5_k(raw):
    codes, scales, biases = _q4_k(np.concatenate([raw[:, :16], raw[:, 48:]], axis=1))
    high = _bits_of(raw[:, 16:48], 8).reshape(-1, 256)  # bit k of byte i: value 32k + i
    return codes | (high << 4), scales, biases


def _iq4(codes, scales):  # codebook level + 128 as an 8-bit code: scale * (code - 128)
    return (KVALUES[codes] + 128).astype(np.uint8), scales, -128 * scales


def _iq4_nl(raw):
    return _iq4(_nibbles(raw[:, 2:]), _f16(raw, 0))


def _iq4_xs(raw):
    low = (raw[:, 4:8, None] >> np.array([0, 4], np.uint8)) & 0x0F  # (n, 4, 2): sub-block 2i+j
    high = (raw[:, 2:4].copy().view(np.uint16) >> (2 * np.arange(8, dtype=np.uint16))) & 3
    ls = low.reshape(-1, 8).astype(np.int16) | (high.astype(np.int16) << 4)
    return _iq4(_nibbles(raw[:, 8:]), _f16(raw, 0) * (ls - 32))


# type -> (bits, decoder); the block sizes are gguf's GGML_QUANT_SIZES.
EXACT = {"Q4_0": (4, _q4_0), "Q4_1": (4, _q4_1), "Q5_0": (5, _q5_0), "Q5_1": (5, _q5_1),
         "Q8_0": (8, _q8_0), "Q4_K": (4, _q4_k), "Q5_K": (5, _q5_k),
         "IQ4_NL": (8, _iq4_nl), "IQ4_XS": (8, _iq4_xs)}
# MXFP4 (gpt-oss experts): 32 e2m1 codes and one e8m0 exponent, MLX's own "mxfp4" mode bit for bit.
MXFP4 = (GROUP_SIZE, 4, "mxfp4")
SUPPORTED = FLOAT_TYPES + tuple(EXACT) + tuple(REQUANT_BITS) + ("MXFP4",)


def import_spec(kind: str, keep_float: bool = False) -> tuple | None:
    """(group size, bits[, mode]) a matrix of GGUF type `kind` imports as; None when it stays float."""
    if kind == "MXFP4":
        return MXFP4
    if kind in EXACT:
        return GROUP_SIZE, EXACT[kind][0]
    if kind in REQUANT_BITS and not keep_float:
        return GROUP_SIZE, REQUANT_BITS[kind]
    return None


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) codes < 2**bits -> (..., n * bits / 32) uint32, MLX's layout: value i at bits
    [bits*i, bits*(i+1)) of the row's little-endian bit stream."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.view("<u4")
    if bits == 4:
        return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)).view("<u4")
    per = math.lcm(bits, 8) // bits  # values per whole run of bytes: 8 (3, 5 bits), 4 (6), 2 (4)...
    runs = codes.reshape(*codes.shape[:-1], -1, per)
    acc = np.zeros(runs.shape[:-1], "<u8")
    for i in range(per):
        acc |= runs[..., i].astype(np.uint64) << np.uint64(bits * i)
    packed = acc[..., None].view(np.uint8)[..., : per * bits // 8]  # little-endian bytes of each run
    return np.ascontiguousarray(packed).reshape(*codes.shape[:-1], -1).view("<u4")


def read_tensor(name: str, kind: str, data: np.ndarray, shape: tuple, quantize: bool = True,
                keep_float: bool = False) -> tuple[dict, tuple | None]:
    """One GGUF tensor -> ({"weight"} or {"weight", "scales"[, "biases"]} as mx arrays, spec).

    `shape` is the numpy shape (slowest dim first); `data` the reader's array (raw uint8 rows for
    block types). quantize=False (1-D tensors, or ones a transform rewrites) dequantizes with
    gguf-py. Raises ModelError naming the tensor for a type with no import.
    """
    import mlx.core as mx
    from gguf import GGMLQuantizationType, quants

    if kind not in SUPPORTED:
        raise ModelError(f"GGUF tensor {name} has type {kind}, which mlxlora cannot import "
                         f"(supported: {', '.join(SUPPORTED)}); re-quantize the model to one of them")
    if kind in ("F32", "F16"):
        return {"weight": mx.array(np.asarray(data).reshape(shape))}, None
    qtype = GGMLQuantizationType[kind]
    spec = import_spec(kind, keep_float) if quantize else None
    if spec is None:  # BF16 keeps its dtype; block types become float16
        dtype = mx.bfloat16 if kind == "BF16" else mx.float16
        return {"weight": mx.array(quants.dequantize(data, qtype).reshape(shape)).astype(dtype)}, None
    if kind in REQUANT_BITS:  # from gguf-py's values: the peer's own reading of the blocks
        w = mx.array(quants.dequantize(data, qtype).reshape(shape))
        q, s, b = mx.quantize(w, group_size=GROUP_SIZE, bits=spec[1])
        return {"weight": q, "scales": s.astype(mx.float16), "biases": b.astype(mx.float16)}, spec
    rows = shape[:-1]
    if kind == "MXFP4":  # llama.cpp's kvalues are 2 x e2m1 and its scale 2**(e - 128): the same value
        blocks = np.asarray(data).reshape(-1, 17)
        return {"weight": mx.array(pack(_nibbles(blocks[:, 1:]).reshape(*rows, -1), 4)),
                "scales": mx.array(np.ascontiguousarray(blocks[:, 0]).reshape(*rows, -1))}, spec
    bits, decode = EXACT[kind]
    block_bytes = quants.GGML_QUANT_SIZES[qtype][1]
    codes, scales, biases = decode(np.asarray(data).reshape(-1, block_bytes))
    scales = scales.reshape(*rows, -1).astype(np.float16)
    biases = biases.reshape(*rows, -1).astype(np.float16)
    if not (np.isfinite(scales).all() and np.isfinite(biases).all()):  # past float16's range
        scales, biases = (x.astype(np.float32) for x in decode(np.asarray(data).reshape(-1, block_bytes))[1:])
        scales, biases = scales.reshape(*rows, -1), biases.reshape(*rows, -1)
    return {"weight": mx.array(pack(codes.reshape(*rows, -1), bits)), "scales": mx.array(scales),
            "biases": mx.array(biases)}, spec
