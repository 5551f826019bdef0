"""GGUF tensor types -> MLX affine quantization, checked against the real peers: gguf-py's
`quantize`/`dequantize` (the reference reading of every block type) and mx.load's own GGUF reader."""

import mlx.core as mx
import numpy as np
import pytest

from gguf_blocks import code_steps, random_blocks
from mlxlora.errors import ModelError
from mlxlora.models.gguf_quants import EXACT, REQUANT_BITS, pack, read_tensor

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
ROWS, COLS = 48, 512


def _dequantized(parts, spec, dtype=mx.float32):
    """The imported layer's weights, with its stored scales widened (no compute rounding)."""
    if spec is None:
        return np.array(parts["weight"].astype(mx.float32))
    w = mx.dequantize(parts["weight"], parts["scales"].astype(dtype), parts["biases"].astype(dtype),
                      group_size=spec[0], bits=spec[1])
    return np.array(w.astype(mx.float32))


def _source(kind, seed=0):
    """Raw blocks of `kind`: gguf-py's own quantizer where it has one, random valid blocks else."""
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        w = np.random.default_rng(seed).normal(0, 0.05, (ROWS, COLS)).astype(np.float32)
        return gguf.quants.quantize(w, Q[kind])
    return random_blocks(kind, ROWS, COLS, seed)


# Max |imported - gguf-py dequantize| / max |weight|; 0 where the block scale and offset are
# themselves float16 (d, m, -8d, -16d, -128d), float16 rounding of d * sub_scale (2**-11
# relative) for the K and IQ4_XS types.
EXACT_BOUND = {"Q4_0": 0, "Q4_1": 0, "Q5_0": 0, "Q5_1": 0, "Q8_0": 0, "IQ4_NL": 0,
               "Q4_K": 2 ** -11, "Q5_K": 2 ** -11, "IQ4_XS": 2 ** -11}


@pytest.mark.peer
@pytest.mark.parametrize("kind", list(EXACT))
def test_exact_types_equal_gguf_dequantize(kind):
    for seed in (0, 1):
        raw = _source(kind, seed)
        want = gguf.quants.dequantize(raw, Q[kind])
        parts, spec = read_tensor("blk.0.attn_q.weight", kind, raw, (ROWS, COLS))
        assert spec == (32, EXACT[kind][0]) and parts["scales"].dtype == mx.float16
        assert parts["scales"].shape == (ROWS, COLS // 32)
        err = np.abs(_dequantized(parts, spec) - want).max() / np.abs(want).max()
        assert err <= EXACT_BOUND[kind], (kind, err)
        if EXACT_BOUND[kind]:  # the rounding is really there, and only float16's
            assert err > 0
            b = np.repeat(np.array(parts["biases"].astype(mx.float32)), 32, axis=1)
            bound = 2 ** -11 * (np.abs(want) + 2 * np.abs(b)) + 1e-12
            assert (np.abs(_dequantized(parts, spec) - want) <= bound).all()


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_same_triples_as_mx_load(tmp_path, kind):
    """mx.load reads these three GGUF types itself: our packing is bit-identical to MLX's."""
    raw = _source(kind)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("t.weight", raw, raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    peer = mx.load(str(tmp_path / "t.gguf"))
    parts, _ = read_tensor("t.weight", kind, raw, (ROWS, COLS))
    for name in ("weight", "scales", "biases"):
        mine, theirs = np.array(parts[name]), np.array(peer[f"t.{name}"])
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs), name


@pytest.mark.peer
@pytest.mark.parametrize("kind", list(REQUANT_BITS))
def test_sixteen_value_subblocks_are_requantized_below_the_files_rounding(kind):
    """Q2_K/Q3_K/Q6_K scale every 16 values; MLX's smallest group is 32. On random blocks
    (neighbouring sub-block scales unrelated: the hard case) the added RMS error stays under
    the file's own rounding error (RMS step/sqrt(12)); keep_float is exact to float16."""
    raw = random_blocks(kind, ROWS, COLS * 2)
    want = gguf.quants.dequantize(raw, Q[kind])
    parts, spec = read_tensor("blk.0.ffn_down.weight", kind, raw, (ROWS, COLS * 2))
    assert spec == (32, REQUANT_BITS[kind])
    err = _dequantized(parts, spec) - want
    step = code_steps(kind, raw)
    ratio = np.sqrt((err ** 2).mean() / (step ** 2 / 12).mean())
    assert 0 < ratio < 0.5, ratio  # measured: Q2_K 0.32, Q3_K 0.42, Q6_K 0.39
    parts, spec = read_tensor("blk.0.ffn_down.weight", kind, raw, (ROWS, COLS * 2), keep_float=True)
    assert spec is None and parts["weight"].dtype == mx.float16
    assert np.abs(_dequantized(parts, spec) - want).max() <= 2 ** -11 * np.abs(want).max()


@pytest.mark.peer
def test_mxfp4_is_mlx_mxfp4_exactly():
    """gpt-oss's MXFP4 blocks: gguf-py's own quantizer, then MLX's mxfp4 mode gives back its values."""
    w = np.random.default_rng(0).normal(0, 0.05, (ROWS, COLS)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q.MXFP4)
    raw[0, 0], raw[0, 17] = 0, 1  # the two smallest exponents, which llama.cpp decodes as denormals
    parts, spec = read_tensor("blk.0.ffn_up_exps.weight", "MXFP4", raw, (ROWS, COLS))
    assert spec == (32, 4, "mxfp4") and set(parts) == {"weight", "scales"}
    got = mx.dequantize(parts["weight"], parts["scales"], group_size=32, bits=4, mode="mxfp4")
    assert np.array_equal(np.array(got.astype(mx.float32)), gguf.quants.dequantize(raw, Q.MXFP4))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, (4, 128)).astype(np.uint8)
    ones, zeros = mx.ones((4, 4)), mx.zeros((4, 4))
    back = mx.dequantize(mx.array(pack(codes, bits)), ones, zeros, group_size=32, bits=bits)
    assert np.array_equal(np.array(back), codes)


def test_stacked_experts_keep_their_leading_dim():
    raw = random_blocks("Q4_K", 3 * 16, 256).reshape(3, 16, -1)
    parts, spec = read_tensor("blk.0.ffn_up_exps.weight", "Q4_K", raw, (3, 16, 256))
    assert parts["weight"].shape == (3, 16, 32) and parts["scales"].shape == (3, 16, 8)
    want = gguf.quants.dequantize(raw, Q.Q4_K)
    assert np.abs(_dequantized(parts, spec) - want).max() <= 2 ** -11 * np.abs(want).max()


@pytest.mark.parametrize("kind", ["IQ2_XXS", "TQ1_0", "Q8_K", "NVFP4"])
def test_other_types_are_one_line_errors(kind):
    with pytest.raises(ModelError, match=rf"blk\.3\.ffn_up\.weight has type {kind}.*re-quantize") as e:
        read_tensor("blk.3.ffn_up.weight", kind, np.zeros((1, 66), np.uint8), (1, 256))
    assert "\n" not in str(e.value)


def test_file_with_an_unsupported_type_names_file_tensor_and_type(tmp_path):
    from mlxlora.models.gguf import convert_gguf

    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "llama")
    for add, value in [("embedding_length", 256), ("block_count", 1), ("feed_forward_length", 4),
                       ("head_count", 4), ("layer_norm_rms_eps", 1e-5)]:
        getattr(w, f"add_{add}")(value)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 66), np.uint8), raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match=r"^iq2\.gguf: .*blk\.0\.ffn_up\.weight has type IQ2_XXS") as e:
        convert_gguf(tmp_path / "iq2.gguf", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
