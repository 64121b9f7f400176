"""GGUF blocks -> MLX affine groups (mlxtral.quant.gguf_affine) against gguf.quants' own decoders,
and the packed layout against MLX's ``mx.dequantize``."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from tiny_models import mlx_available, random_gguf_blocks

from mlxtral.qtensor import BLOCK_TYPES
from mlxtral.quant.affine import affine_dequantize, pack_codes, unpack_codes
from mlxtral.quant.ggml import relative_rmse
from mlxtral.quant.gguf_affine import MLX_FORM, affine_shapes, gguf_to_affine

EXACT = [t for t, (_, exact) in MLX_FORM.items() if exact]
REQUANT = [t for t, (_, exact) in MLX_FORM.items() if not exact]


def reference(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(shape)


def test_block_table_is_gguf_s() -> None:
    for t, (bs, ts) in BLOCK_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]] == (bs, ts), t


@pytest.mark.parametrize("qtype", EXACT)
def test_exact_types_equal_gguf_dequantize(qtype: str) -> None:
    """Every weight of the affine form equals gguf.quants' value (IQ4_XS: to 1 ulp, its product of
    three factors rounds in a different order)."""
    rng = np.random.default_rng(sum(map(ord, qtype)))
    shape = (6, 512)
    data = random_gguf_blocks(qtype, shape, rng)
    bits = MLX_FORM[qtype][0]
    w, s, b = gguf_to_affine(data, qtype, shape)
    assert (w.shape, s.shape) == affine_shapes(shape, qtype) == ((6, 512 * bits // 32), (6, 16))
    got = affine_dequantize(w, s, b, bits, 32, "float32")
    ref = reference(data, qtype, shape)
    if qtype == "IQ4_XS":
        np.testing.assert_allclose(got, ref, rtol=2e-7, atol=0)
    else:
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("qtype", REQUANT)
def test_sixteen_weight_types_requantized_to_8_bits(qtype: str) -> None:
    """Q2_K/Q3_K/Q6_K scale every 16 weights; MLX's groups are >= 32, so they become 8-bit groups
    of 32: close, not exact (error well under 1% of the weights' RMS on random blocks, whose
    sub-scales vary far more than real ones)."""
    rng = np.random.default_rng(7)
    shape = (8, 1024)
    data = random_gguf_blocks(qtype, shape, rng)
    assert MLX_FORM[qtype] == (8, False)
    w, s, b = gguf_to_affine(data, qtype, shape)
    got = affine_dequantize(w, s, b, 8, 32, "float32")
    err = relative_rmse(reference(data, qtype, shape), got)
    assert 0 < err < 0.01, err


def test_chunks_and_preallocated_output() -> None:
    """More blocks than one chunk, written into caller-given (stacked-expert) arrays."""
    rng = np.random.default_rng(3)
    shape = (2, 40, 16384)  # 5120 Q4_K blocks: two chunks
    data = random_gguf_blocks("Q4_K", shape, rng)
    out = (np.empty((2, 40, 2048), np.uint32), np.empty((2, 40, 512), np.float32),
           np.empty((2, 40, 512), np.float32))
    for e in range(2):
        gguf_to_affine(data[e], "Q4_K", shape[1:], out=(out[0][e], out[1][e], out[2][e]))
    got = affine_dequantize(*out, 4, 32, "float32")
    want = reference(data.reshape(80, -1), "Q4_K", (80, 16384))
    np.testing.assert_array_equal(got.reshape(-1, 16384), want)


def test_no_form_is_an_error() -> None:
    with pytest.raises(ValueError, match="no MLX affine form"):
        gguf_to_affine(np.zeros((1, 66), np.uint8), "IQ2_XXS", (1, 256))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_codes_round_trip(bits: int) -> None:
    q = np.random.default_rng(bits).integers(0, 1 << bits, (3, 5, 64), dtype=np.uint8)
    w = pack_codes(q, bits)
    assert w.dtype == np.uint32 and w.shape == (3, 5, 64 * bits // 32)
    np.testing.assert_array_equal(unpack_codes(w, bits), q)


@pytest.mark.skipif(not mlx_available(), reason="no mlx")
@pytest.mark.parametrize("qtype", list(MLX_FORM))
def test_layout_is_mlx_s(qtype: str) -> None:
    """mx.dequantize reads our words, scales and biases as we mean them (5-bit streams included)."""
    import mlx.core as mx

    data = random_gguf_blocks(qtype, (4, 256), np.random.default_rng(11))
    bits = MLX_FORM[qtype][0]
    w, s, b = gguf_to_affine(data, qtype, (4, 256))
    got = np.array(mx.dequantize(mx.array(w), mx.array(s), mx.array(b), group_size=32, bits=bits))
    np.testing.assert_allclose(got, affine_dequantize(w, s, b, bits, 32, "float32"), rtol=1e-6, atol=0)


# ---- for the NumPy kernels: Q4_K -> Q4_1, the rest -> Q8_0 ------------------------------------
def test_q4_k_to_q4_1_keeps_codes_and_rounds_only_the_scales() -> None:
    from mlxtral.quant.gguf_affine import q4_k_to_q4_1

    shape = (6, 1024)
    data = random_gguf_blocks("Q4_K", shape, np.random.default_rng(4))
    blocks = q4_k_to_q4_1(data, shape)
    assert blocks is not None and blocks.shape == (6, 1024 // 32 * 20)
    got = reference(blocks, "Q4_1", shape)
    want = reference(data, "Q4_K", shape)
    # d*sc and dmin*m rounded to float16: 2**-11 relative on each term
    np.testing.assert_allclose(got, want, rtol=0, atol=float(np.abs(want).max()) * 2**-10)
    assert relative_rmse(want, got) < 5e-4


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"])
def test_other_types_to_q8_0_are_gguf_s_q8_0_of_their_values(qtype: str) -> None:
    from mlxtral.quant.gguf_affine import to_q8_0

    shape = (5, 512)
    data = random_gguf_blocks(qtype, shape, np.random.default_rng(5))
    want = reference(data, qtype, shape)
    got = to_q8_0(data, qtype, shape)
    np.testing.assert_array_equal(got, gguf.quants.quantize(want, gguf.GGMLQuantizationType.Q8_0))
    assert relative_rmse(want, reference(got, "Q8_0", shape)) < 0.01
