"""Our NumPy quantizers against the references: gguf.quants (bytes) and mx.quantize (arrays)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from mlxtral.qtensor import QTensor
from mlxtral.quant import (
    affine_dequantize,
    affine_quantize,
    dequantize,
    dequantize_blocks,
    quantize,
    relative_rmse,
)
from mlxtral.quant import ggml as G
from mlxtral.quant.ggml import bf16_bits_to_f32, f32_to_bf16_bits

GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16"]
_T = gguf.GGMLQuantizationType


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    n = rng.standard_normal
    blk = 32
    return {
        "normal": n((24, 256)).astype(np.float32),
        "3d": n((3, 8, 128)).astype(np.float32),
        "zeros": np.zeros((4, 64), np.float32),
        "signed_zeros": np.array([[-0.0] * blk, [0.0] * 16 + [-0.0] * 16, [-0.0] + [0.0] * 31], np.float32),
        "constant": np.full((4, 64), 3.5, np.float32),
        "constant_neg": np.full((4, 64), -0.125, np.float32),
        "negative_only": -np.abs(n((8, 64))).astype(np.float32),
        "positive_only": np.abs(n((8, 64))).astype(np.float32) + 1,
        "huge": (n((8, 64)) * 1e30).astype(np.float32),
        "f16_overflow": (n((8, 64)) * 1e6).astype(np.float32),
        "tiny": (n((8, 64)) * 1e-30).astype(np.float32),
        "subnormal": (n((8, 64)) * 1e-40).astype(np.float32),
        "integers": rng.integers(-8, 8, (16, 64)).astype(np.float32),
        "halves": (rng.integers(-16, 16, (16, 64)) * 0.5).astype(np.float32),
        "ties_pos_first": np.tile(np.array([3, -3] * 16, np.float32), (2, 1)),
        "ties_neg_first": np.tile(np.array([-3, 3] * 16, np.float32), (2, 1)),
        "one_spike": np.where(np.arange(64) == 17, 100.0, 0.001).astype(np.float32)[None, :].repeat(3, 0),
        "heavy_tail": (rng.standard_t(2, (16, 128))).astype(np.float32),
    }


CASES = _cases()


def _ref(x: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(x, _T[qtype])


@pytest.mark.parametrize("qtype", GGUF_TYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_gguf_quantize_bytes_identical(case: str, qtype: str) -> None:
    x = CASES[case]
    with np.errstate(all="ignore"):
        ours = quantize(x, qtype)
    ref = _ref(x, qtype)
    if qtype != "BF16":  # gguf returns BF16 as raw bytes, we as uint16 bits
        assert ours.shape == ref.shape
    assert ours.tobytes() == ref.tobytes()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("case", ["normal", "3d", "zeros", "negative_only", "tiny", "halves", "heavy_tail"])
def test_gguf_dequantize_identical(case: str, qtype: str) -> None:
    data = _ref(CASES[case], qtype)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(data, _T[qtype])
    np.testing.assert_array_equal(dequantize(data, qtype), ref)
    np.testing.assert_array_equal(dequantize_blocks(data, qtype, ref.shape), ref)
    qt = QTensor(qtype, ref.shape, data)
    np.testing.assert_array_equal(qt.dequantize(), ref)


NATIVE_TYPES = ["Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def _random_blocks(qtype: str, n: int, seed: int, finite: bool) -> np.ndarray:
    """``n`` blocks of random bytes; with ``finite``, every f16 field a random finite half."""
    from mlxtral.qtensor import BLOCK_TYPES

    _, ts = BLOCK_TYPES[qtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n, ts), dtype=np.uint8)
    if finite:
        halves = {"Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2],
                  "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}[qtype]
        for off in halves:
            h = (rng.standard_normal(n) * 0.01).astype(np.float16)
            b[:, off : off + 2] = h.view(np.uint8).reshape(n, 2)
    return b


@pytest.mark.parametrize("qtype", NATIVE_TYPES)
@pytest.mark.parametrize("finite", [True, False])
def test_native_dequantize_equals_gguf_quants(qtype: str, finite: bool) -> None:
    # Our NumPy dequantizers give gguf.quants' (llama.cpp's reference) values bit for bit, on
    # random codes and scales (with ``finite`` False, the f16 fields take every bit pattern too:
    # infinities and NaNs propagate the same way), across chunk boundaries.
    from mlxtral.qtensor import BLOCK_TYPES

    bs, _ = BLOCK_TYPES[qtype]
    data = _random_blocks(qtype, 1100 if bs == 32 else 300, 7, finite)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(data.reshape(1, -1), gguf.GGMLQuantizationType[qtype]).reshape(-1)
        ours = dequantize_blocks(data, qtype, ref.shape)
        whole = QTensor(qtype, (data.shape[0], bs), data).dequantize().reshape(-1)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(whole, ref)


def test_dequantize_blocks_rarer_types_go_through_gguf() -> None:
    # A type without a NumPy dequantizer of ours (here TQ2_0) is read by gguf.quants.
    from mlxtral.quant.dequant import _gguf_dequantize

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.TQ2_0][1]
    data = np.zeros((2, size), np.uint8)
    np.testing.assert_array_equal(_gguf_dequantize(data, "TQ2_0", (2, 256)), np.zeros((2, 256), np.float32))
    with pytest.raises(ValueError, match="unknown GGUF type"):
        _gguf_dequantize(data, "Q9_9", (2, 256))


def test_chunking_does_not_change_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(5).standard_normal((37, 96)).astype(np.float32)
    want = {q: quantize(x, q).tobytes() for q in GGUF_TYPES}
    monkeypatch.setattr(G, "CHUNK_ELEMS", 100)  # one row (3 blocks) per chunk
    for q in GGUF_TYPES:
        assert quantize(x, q).tobytes() == want[q]
        np.testing.assert_array_equal(dequantize(quantize(x, q), q), dequantize(np.frombuffer(
            want[q], quantize(x, q).dtype).reshape(quantize(x, q).shape), q))


def test_quantize_into_out_and_from_bf16_f16_inputs() -> None:
    x = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    out = np.empty((8, 2 * 34), np.uint8)
    assert quantize(x, "Q8_0", out=out) is out
    assert out.tobytes() == _ref(x, "Q8_0").tobytes()
    h = x.astype(np.float16)
    assert quantize(h, "Q4_0").tobytes() == _ref(h.astype(np.float32), "Q4_0").tobytes()
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 33), np.float32), "Q8_0")
    with pytest.raises(ValueError):
        quantize(x, "Q6_K")


def test_bf16_bits_roundtrip_and_rounding() -> None:
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, 1e-40, 0.0, -0.0], np.float32)
    bits = f32_to_bf16_bits(x)
    ref = _ref(x, "BF16").view(np.uint16)
    np.testing.assert_array_equal(bits, ref)
    want = np.array([1.0, 1.0, 1.015625, -2.5], np.float32)
    np.testing.assert_array_equal(bf16_bits_to_f32(bits[:4]), want)


@pytest.mark.parametrize("qtype,tol", [("Q8_0", 0.01), ("Q4_1", 0.12), ("Q4_0", 0.15), ("F16", 1e-3),
                                       ("BF16", 5e-3)])
def test_relative_rmse_of_gaussian_weights(qtype: str, tol: float) -> None:
    x = np.random.default_rng(3).standard_normal((64, 512)).astype(np.float32)
    err = relative_rmse(x, dequantize(quantize(x, qtype), qtype, x.shape))
    assert 0 < err < tol


def test_relative_rmse_edges() -> None:
    z = np.zeros((2, 3), np.float32)
    assert relative_rmse(z, z) == 0.0
    assert relative_rmse(z, z + 1) == float("inf")
    a = np.ones((4, 4), np.float32)
    assert relative_rmse(a, a * 1.1) == pytest.approx(0.1, rel=1e-6)


# ---- MLX affine ---------------------------------------------------------------------------

mx = pytest.importorskip("mlx.core")

AFFINE_CASES = ["normal", "3d", "zeros", "constant", "negative_only", "positive_only", "tiny", "integers",
                "heavy_tail", "one_spike", "f16_overflow"]


def _to_mx(x: np.ndarray, dtype: str):
    a = mx.array(x)
    return a.astype({"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[dtype])


def _from_mx(a, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return np.array(a.view(mx.uint16))
    return np.array(a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_affine_matches_mx_quantize(dtype: str, bits: int, group_size: int) -> None:
    for case in AFFINE_CASES:
        x = CASES[case]
        if x.shape[-1] % group_size:
            continue
        if dtype == "bfloat16":
            x = bf16_bits_to_f32(f32_to_bf16_bits(x))  # the exact values a bf16 weight holds
        elif dtype == "float16":
            if np.abs(x).max() > 6e4:
                continue
            x = x.astype(np.float16).astype(np.float32)
        wq, s, b = mx.quantize(_to_mx(x, dtype), group_size=group_size, bits=bits)
        ow, os_, ob = affine_quantize(x, bits, group_size, dtype)
        np.testing.assert_array_equal(ow, np.array(wq), err_msg=case)
        np.testing.assert_array_equal(os_, _from_mx(s, dtype), err_msg=case)
        np.testing.assert_array_equal(ob, _from_mx(b, dtype), err_msg=case)
        deq = affine_dequantize(ow, os_, ob, bits, group_size, dtype)
        ref = np.array(mx.dequantize(wq, s, b, group_size=group_size, bits=bits).astype(mx.float32))
        if dtype == "float32":
            np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(x).max())))
        else:  # MLX dequantizes in the low-precision dtype; ours stays in float32
            ulp = 2.0 ** (-8 if dtype == "bfloat16" else -11)
            atol = 2 * ulp * float(np.abs(ref).max() + 1e-30)
            np.testing.assert_allclose(deq, ref, rtol=2 * ulp, atol=atol)


def test_affine_chunking_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlxtral.quant.affine as A

    x = np.random.default_rng(9).standard_normal((13, 256)).astype(np.float32)
    want = affine_quantize(x, 4, 64, "float32")
    monkeypatch.setattr(A, "CHUNK_ELEMS", 10)
    got = affine_quantize(x, 4, 64, "float32")
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        affine_quantize(x, 3, 64)
    with pytest.raises(ValueError):
        affine_quantize(x, 4, 48)
    with pytest.raises(ValueError):
        affine_quantize(np.zeros((2, 96), np.float32), 4, 64)


@pytest.mark.parametrize("bits,tol", [(4, 0.12), (8, 0.008)])
def test_affine_error(bits: int, tol: float) -> None:
    x = np.random.default_rng(4).standard_normal((64, 512)).astype(np.float32)
    err = relative_rmse(x, affine_dequantize(*affine_quantize(x, bits, 64, "float32"), bits, 64, "float32"))
    assert 0 < err < tol
