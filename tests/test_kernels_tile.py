"""Q4_0's kernels (``mlxtral.backends._kernels_tile``): the one arithmetic of its docstring, checked
bit for bit against an independent NumPy model of it, through every path this host takes (16-row
dots where the rows lie, 1 to ``DOT16_PASS`` tokens a pass; repacked tiles at 8 / 4 / 2 / 1 tokens where
the host tiles (with VNNI, or the portable path: ``test_kernel_isa`` forces it); single rows) and any
row range."""
from __future__ import annotations

import numpy as np
import pytest

from mlxtral.backends import kernels

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba path disabled")


def q4_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Raw Q4_0 blocks: every nibble, finite scales."""
    nb = n // 32
    w = rng.integers(0, 256, (rows, nb, 18), dtype=np.uint8)
    d = (rng.standard_normal((rows, nb)) * 0.02).astype(np.float16)
    w[:, :, :2] = d.view(np.uint8).reshape(rows, nb, 2)
    return w.reshape(rows, nb * 18)


def model(w: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """For each block in order: s = sum (q - 8) x exactly, acc = fma(float(s), d * xd, acc) in
    float32 (the fma through float64: the product of two float32 is exact there, and these sums
    stay far inside float64's precision for the test's magnitudes)."""
    rows = w.shape[0]
    T, n = xq.shape
    nb = n // 32
    wb = w.reshape(rows, nb, 18)
    d = wb[:, :, :2].copy().view(np.float16).reshape(rows, nb).astype(np.float32)
    q = wb[:, :, 2:].astype(np.int64)
    codes = np.concatenate([q & 15, q >> 4], axis=2) - 8  # [rows, nb, 32]
    out = np.zeros((T, rows), np.float32)
    for t in range(T):
        s = np.einsum("rbk,bk->rb", codes, xq[t].reshape(nb, 32).astype(np.int64))
        acc = np.zeros(rows, np.float32)
        for b in range(nb):
            scale = d[:, b] * xd[t, b]  # float32 multiply
            acc = (s[:, b].astype(np.float64) * scale.astype(np.float64) + acc).astype(np.float32)
        out[t] = acc
    return out


@pytest.mark.parametrize("rows,n", [(37, 224), (48, 1024), (16, 32), (5, 96)])
@pytest.mark.parametrize("T", [1, 2, 3, 7, 8, 13, 41])
def test_every_path_is_the_model(rows, n, T):
    from numba import carray, njit

    from mlxtral.backends import _kernels_ir as ir
    from mlxtral.backends import _kernels_tile as tile
    from mlxtral.backends._kernels_nb import quantize_x

    @njit
    def run(w, xq, xd, xo, res, r0, r1, swig):
        o = carray(ir.ptr_f32(res.ctypes.data), (res.size,))
        tile.run_rows(swig, w.ctypes.data, w.ctypes.data, w.shape[1], xq.shape[1], xq.shape[0], r0, r1,
                      xq.ctypes.data, xd.ctypes.data, xo.ctypes.data, o, res.shape[1])

    rng = np.random.default_rng(rows * 1000 + n + T)
    w = q4_rows(rng, rows, n)
    x = rng.standard_normal((T, n)).astype(np.float32)
    xq, xd, xo = quantize_x(x, ir.X_OFFSET["q4_0"])
    want = model(w, xq, xd)
    got = np.full((T, rows), np.nan, np.float32)
    cut = min(rows, 3)  # row ranges that do not start on a tile
    run(w, xq, xd, xo, got, 0, cut, False)
    run(w, xq, xd, xo, got, cut, rows, False)
    assert np.array_equal(got, want), np.abs(got - want).max()
    whole = np.full((T, rows), np.nan, np.float32)
    run(w, xq, xd, xo, whole, 0, rows, False)
    assert np.array_equal(whole, want)
    swig = np.full((T, rows), np.nan, np.float32)
    run(w, xq, xd, xo, swig, 0, rows, True)  # gate = up = w: silu(want) * want, by the same silu
    assert np.array_equal(swig, silu_mul(want))


def silu_mul(v: np.ndarray) -> np.ndarray:
    from numba import njit

    from mlxtral.backends._kernels_tile import _silu_mul

    @njit
    def f(a, out):
        for i in range(a.size):
            out.flat[i] = _silu_mul(a.flat[i], a.flat[i])

    out = np.empty_like(v)
    f(v, out)
    return out


def test_chunks_are_whole_tiles():
    from mlxtral.backends import _kernels_tile as tile
    from mlxtral.qtensor import QTensor

    assert kernels._TILE == tile.ROWS
    for rows, n in ((3584, 1024), (1024, 3584), (32000, 4096), (40, 64)):
        w = QTensor("Q4_0", (rows, n), np.zeros((rows, n // 32 * 18), np.uint8))
        for T in (1, 2, 64):
            assert kernels._chunk_rows(w, T) % tile.ROWS == 0
