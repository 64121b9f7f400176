"""Every FFN down product is the sum of two fixed halves (``ops.down_split``), so that two
processes holding a half each (expert parallel by rows on 2 ranks) add them as one process does.

Exact checks: the cut product equals its two halves computed alone and added in float32, at any
token count and for every kernel kind; each half equals what a rank computes on its own contiguous
copy of those columns (another row stride, activations quantized on their own); the cut FFN
(gate/up in two row halves, down's two halves as twin tasks) equals the FFN computed piece by
piece. Within float32 tolerance: the cut product against the dequantized matmul.
"""
from __future__ import annotations

import numpy as np
import pytest
from test_batch_invariance import float_tensor
from tiny_models import random_gguf_blocks

from mlxtral.backends import kernels, ops
from mlxtral.qtensor import QTensor

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba path disabled")

KINDS = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "IQ4_NL", "Q4_K", "Q6_K", "Q2_K", "IQ4_XS", "F32", "F16", "BF16"]


def weight(qtype: str, rows: int, cols: int, seed: int) -> QTensor:
    rng = np.random.default_rng(seed)
    if qtype in ("F32", "F16", "BF16"):
        return float_tensor((rng.standard_normal((rows, cols)) * 0.1).astype(np.float32), qtype)
    return QTensor(qtype, (rows, cols), random_gguf_blocks(qtype, (rows, cols), rng).reshape(rows, -1))


def test_where_the_cut_falls() -> None:
    assert ops.down_split(14336) == 7168  # Mixtral: equal halves on a K-quant superblock
    assert ops.down_split(3584) == 1792 and ops.down_split(512) == 256
    assert ops.down_split(96) == 32 and ops.down_split(128) == 64  # 32-blocks when 256 does not divide
    assert ops.down_split(32) == 0 and ops.down_split(48) == 0  # too narrow: not cut


@pytest.mark.parametrize("qtype", KINDS)
@pytest.mark.parametrize("T", [1, 3, 9, 40])
def test_cut_product_is_its_halves_added(qtype: str, T: int) -> None:
    w = weight(qtype, 48, 512, seed=1)
    x = np.random.default_rng(2).standard_normal((T, 512)).astype(np.float32)
    s, lo_w, hi_w = ops.down_halves(w)  # type: ignore[misc]
    assert s == 256 and lo_w.shape == hi_w.shape == (48, 256)
    lo = ops.linear(np.ascontiguousarray(x[:, :s]), lo_w)
    hi = ops.linear(np.ascontiguousarray(x[:, s:]), hi_w)
    (got,) = ops.down_experts([x], [w])
    np.testing.assert_array_equal(got, lo + hi)
    # each half as a rank computes it: its own contiguous copy of the columns (another row stride)
    own = QTensor(qtype, lo_w.shape, np.ascontiguousarray(hi_w.data))
    np.testing.assert_array_equal(ops.linear(np.ascontiguousarray(x[:, s:]), own), hi)
    ref = x @ w.dequantize().T
    np.testing.assert_allclose(got, ref, rtol=0.05, atol=0.05 * np.abs(ref).max())


@pytest.mark.parametrize("T", [1, 2, 8, 33])
def test_cut_ffn_equals_its_pieces(T: int) -> None:
    """Two experts (Q4_0 and Q4_K, as mixed files have them), hidden 512, dim 64."""
    xs = [np.random.default_rng(3 + i).standard_normal((T, 64)).astype(np.float32) for i in range(2)]
    gates = [weight(q, 512, 256 if q == "Q4_K" else 64, 10 + i) for i, q in enumerate(("Q4_0", "Q4_K"))]
    ups = [weight(q, 512, 256 if q == "Q4_K" else 64, 20 + i) for i, q in enumerate(("Q4_0", "Q4_K"))]
    downs = [weight(q, 64, 512, 30 + i) for i, q in enumerate(("Q4_0", "Q4_K"))]
    xs[1] = np.random.default_rng(9).standard_normal((T, 256)).astype(np.float32)
    got = ops.ffn_experts(xs, gates, ups, downs)
    for x, g, u, d, y in zip(xs, gates, ups, downs, got, strict=True):
        h = ops.swiglu_experts([x], [g], [u])[0]  # [T, 512], the whole rows at once
        (want,) = ops.down_experts([h], [d])
        np.testing.assert_array_equal(y, want)


def test_uncut_widths_take_the_plain_product() -> None:
    w = weight("Q8_0", 16, 32, seed=4)
    x = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
    assert ops.down_halves(w) is None
    np.testing.assert_array_equal(ops.down_experts([x], [w])[0], ops.linear(x, w))


def test_column_windows() -> None:
    w = weight("Q4_K", 4, 512, seed=6)
    lo = w.col_range(0, 256)
    assert lo.shape == (4, 256) and lo.data.shape == (4, 144) and lo.data.base is not None  # a view
    np.testing.assert_array_equal(lo.dequantize(), w.dequantize()[:, :256])
    with pytest.raises(ValueError, match="256-blocks"):
        w.col_range(0, 128)
    with pytest.raises(ValueError, match="columns"):
        w.col_range(0, 600)
