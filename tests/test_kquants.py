"""K-quant quantizers (mlxtral.quant.kquants through ggml.quantize) against llama.cpp's bytes.

The golden fixture tests/data/kquant_golden.npz holds llama.cpp's output for
tests/kquant_inputs.golden_inputs(); benchmarks/make_kquant_golden.py wrote it (and compares on
larger random sets). No llama.cpp is needed here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kquant_inputs import digest, golden_inputs

from mlxtral.quant import ggml, kquants
from mlxtral.quant.dequant import dequantize_blocks

FIXTURE = Path(__file__).parent / "data" / "kquant_golden.npz"
TYPES = kquants.KQUANT_TYPES
# relative RMSE on standard normal data (llama.cpp's quantizers give 0.296, 0.151, 0.071, 0.036, 0.018)
RMSE_BOUND = {"Q2_K": 0.31, "Q3_K": 0.16, "Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019}


def _sq_err(x: np.ndarray, blocks: np.ndarray, qtype: str) -> np.ndarray:
    """Squared error per super-block: x [n, 256], blocks [n, type_size] -> float64 [n]."""
    with np.errstate(all="ignore"):
        d = dequantize_blocks(blocks, qtype, x.shape).astype(np.float64)
    return ((d - x.astype(np.float64)) ** 2).sum(axis=1)


@pytest.fixture(scope="module")
def golden():
    data = np.load(FIXTURE)
    x = golden_inputs()
    assert str(data["inputs_sha256"]) == digest(x), "kquant_inputs.py no longer builds the fixture's inputs"
    return x, data


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_match_llamacpp(golden, qtype):
    x, data = golden
    ref = data[qtype]
    got = ggml.quantize(x, qtype)
    assert got.shape == ref.shape and got.dtype == np.uint8
    same = (got == ref).all(axis=1)
    assert same.mean() >= 0.999, f"{qtype}: {same.mean():.2%} of blocks identical"
    bad = ~same
    if bad.any():  # float summation order may flip a rare rounding: never a worse block
        assert (_sq_err(x[bad], got[bad], qtype) <= _sq_err(x[bad], ref[bad], qtype)).all()


@pytest.mark.parametrize("qtype", TYPES)
def test_round_trip_error(qtype):
    x = np.random.default_rng(1).standard_normal((32, 1024)).astype(np.float32)
    q = ggml.quantize(x, qtype)
    y = dequantize_blocks(q, qtype, x.shape)
    assert ggml.relative_rmse(x, y) < RMSE_BOUND[qtype]
    # the super-block scale is the largest sub-block scale: the extreme weight of a block comes back
    # within one quantization step of its sub-block
    assert np.abs(y - x).max() < 0.5 * np.abs(x).max()


def test_more_bits_less_error():
    x = np.random.default_rng(2).standard_t(4, (16, 512)).astype(np.float32)
    errs = [ggml.relative_rmse(x, dequantize_blocks(ggml.quantize(x, t), t, x.shape)) for t in TYPES]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("qtype", TYPES)
def test_zeros_and_constants(qtype):
    x = np.zeros((3, 256), np.float32)
    x[1] = 0.75
    x[2, :128] = -2.0
    y = dequantize_blocks(ggml.quantize(x, qtype), qtype, x.shape)
    assert (y[0] == 0).all()
    np.testing.assert_allclose(y[1:], x[1:], atol=0.02 * 2.0)


@pytest.mark.parametrize("qtype", TYPES)
def test_shapes_out_and_chunks(qtype):
    rng = np.random.default_rng(3)
    bs, ts = 256, kquants.BLOCK_BYTES[qtype]
    # more than one working chunk (ggml.CHUNK_ELEMS weights), 3-D, float64 input
    x = rng.standard_normal((3, 50, 768))
    q = ggml.quantize(x, qtype)
    assert q.shape == (3, 50, 768 // bs * ts) == ggml.quantized_shape(x.shape, qtype)
    # blocks are independent: row by row gives the same bytes
    flat = x.reshape(-1, 768).astype(np.float32)
    np.testing.assert_array_equal(q.reshape(-1, q.shape[-1])[7], ggml.quantize(flat[7], qtype))
    # out=: a preallocated array, also a non-contiguous view
    out = np.zeros_like(q)
    assert ggml.quantize(x, qtype, out=out) is out
    np.testing.assert_array_equal(out, q)
    big = np.zeros((150, 2 * q.shape[-1]), np.uint8)
    view = big[:, : q.shape[-1]]
    ggml.quantize(x.reshape(150, 768), qtype, out=view)
    np.testing.assert_array_equal(view, q.reshape(150, -1))
    assert (big[:, q.shape[-1] :] == 0).all()
    # float16 input equals its float32 values
    h = x[0].astype(np.float16)
    np.testing.assert_array_equal(ggml.quantize(h, qtype), ggml.quantize(h.astype(np.float32), qtype))
    assert ggml.quantize(np.zeros((0, 256), np.float32), qtype).shape == (0, ts)
    # ggml.dequantize reads them back (gguf.quants), as dequant.dequantize_blocks
    np.testing.assert_array_equal(ggml.dequantize(q, qtype), dequantize_blocks(q, qtype, x.shape))


@pytest.mark.parametrize("qtype", TYPES)
def test_errors(qtype):
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml.quantize(np.zeros((4, 320), np.float32), qtype)
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml.quantize(np.zeros(128, np.float32), qtype)
    with pytest.raises(ValueError, match="out must be"):
        ggml.quantize(np.zeros((2, 256), np.float32), qtype, out=np.zeros((2, 7), np.uint8))
    with pytest.raises(ValueError, match="out must be"):
        ggml.quantize(np.zeros((2, 256), np.float32), qtype,
                      out=np.zeros((2, kquants.BLOCK_BYTES[qtype]), np.int8))
    with pytest.raises(ValueError, match="not a K-quant"):
        kquants.quantize_blocks(np.zeros((1, 256), np.float32), "Q4_0", np.zeros((1, 18), np.uint8))
    assert qtype in ggml.QUANTIZABLE


def test_half_rounding_matches_numpy():
    rng = np.random.default_rng(4)
    v = np.concatenate([
        rng.standard_normal(20000) * np.exp2(rng.integers(-30, 20, 20000)),
        np.float32([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                    2.0**-14, 2.0**-14 - 2.0**-25, 6.1e-5]),
    ]).astype(np.float32)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16)
    for f, h in zip(v, want, strict=True):
        bits, val = kquants._to_half(f)
        assert bits == int(h.view(np.uint16)) and (val == np.float32(h))


def test_nearest_int_matches_c_bit_trick():
    """ggml's nearest_int adds 1.5 * 2**23 and reads the mantissa bits: exact rounding in range,
    wrapped values beyond (reached only by degenerate blocks, and reproduced)."""
    rng = np.random.default_rng(5)
    f = np.concatenate([rng.uniform(-100, 100, 2000), np.arange(-8, 8) + 0.5,
                        rng.uniform(-1e9, 1e9, 2000), [4194303.0, -4194303.0, 4194304.5, 1e30, -1e30]])
    f = f.astype(np.float32)
    val = (f + np.float32(12582912.0)).astype(np.float32)
    want = (val.view(np.int32).astype(np.int64) & 0x007FFFFF) - 0x00400000
    got = np.array([kquants._nint(x) for x in f])
    np.testing.assert_array_equal(got, want)
