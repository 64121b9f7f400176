"""Reproducible K-quant test inputs (shared by tests/test_kquants.py and
benchmarks/make_kquant_golden.py, which writes llama.cpp's bytes for them into the golden fixture).

Only integer arithmetic and IEEE +, -, *, / (no exp/log/sin, no NumPy Generator streams, whose
results may change between platforms or versions), so every machine builds the same float32 bits;
the fixture stores their SHA-256 to prove it.
"""
from __future__ import annotations

import hashlib

import numpy as np

QK_K = 256
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(n: int, seed: int) -> np.ndarray:
    """n pseudo-random uint64 (splitmix64 of seed, seed+1, ...)."""
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _M64


def uniform(n: int, seed: int) -> np.ndarray:
    """n float64 in [0, 1) (53 random bits each)."""
    return (_splitmix64(n, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def normalish(n: int, seed: int) -> np.ndarray:
    """Approximately standard normal float64: Irwin-Hall sum of 12 uniforms minus 6."""
    u = uniform(12 * n, seed).reshape(n, 12)
    s = u[:, 0].copy()
    for k in range(1, 12):  # sequential sums: no reduction order that could vary between versions
        s += u[:, k]
    return s - 6.0


def heavy(n: int, seed: int) -> np.ndarray:
    """Heavy-tailed float64 (Cauchy-like): a normal over |normal| + 0.05."""
    return normalish(n, seed) / (np.abs(normalish(n, seed + 7919 * n)) + 0.05)


def golden_inputs(random_blocks: int = 96, heavy_blocks: int = 96, weight_blocks: int = 96) -> np.ndarray:
    """float32 [n, 256]: random normal, heavy-tailed and weight-like super-blocks, then adversarial
    ones (zeros, constants, single outliers, tiny/huge/subnormal magnitudes, one-sided, integer
    and repeated values, zero and constant sub-blocks)."""
    rows = [normalish(random_blocks * QK_K, 1).reshape(-1, QK_K),
            heavy(heavy_blocks * QK_K, 2).reshape(-1, QK_K) * 0.01]
    # weight-like: a scale per block spanning 2**-12 .. 2**6, plus a few large columns
    w = normalish(weight_blocks * QK_K, 3).reshape(-1, QK_K)
    w *= np.ldexp(1.0, (uniform(weight_blocks, 4) * 18.0).astype(np.int64) - 12)[:, None]
    cols = (uniform(8, 5) * QK_K).astype(np.int64)
    w[:, cols] *= 12.0
    rows.append(w)
    rows.append(adversarial_blocks())
    return np.concatenate(rows).astype(np.float32)


def adversarial_blocks() -> np.ndarray:
    """float64 [k, 256] of edge cases."""
    z = normalish(64 * QK_K, 11).reshape(64, QK_K)
    a = np.zeros((40, QK_K))
    a[1] = 1.0
    a[2] = -3.0
    a[3, ::7] = 1e4
    a[4] = z[4] * 1e-30
    a[5] = z[5] * 2.0**-140  # float32 subnormals
    a[6] = z[6]
    a[6, 5] = 1e6
    a[7, 128:] = z[7, 128:]
    a[8] = np.round(z[8] * 4.0)
    a[9] = z[9] * 1e5
    a[10] = np.abs(z[10])
    a[11] = -np.abs(z[11])
    a[12] = z[12] * 1e-8
    a[13, 16:32] = 0.5
    a[14] = 65504.0 * 64.0
    a[15] = np.repeat(z[15, :16], 16)
    a[16] = z[16]
    a[16, 100] = -1e6
    a[17] = z[17] + 100.0
    a[18] = z[18] - 100.0
    a[19, ::2] = 1.0
    a[19, 1::2] = -1.0
    a[20] = z[20] * 1e-20
    a[20, 0] = 1.0
    a[21] = np.where(np.arange(QK_K) % 32 < 16, 0.0, z[21])
    a[22] = np.where(np.arange(QK_K) % 16 == 3, z[22] * 100.0, z[22] * 0.01)
    a[23] = np.arange(QK_K) / 255.0
    a[24] = -np.arange(QK_K) / 255.0
    a[25] = z[25] * 3e7
    a[26] = np.round(z[26] * 2.0) / 2.0
    a[27] = z[27] * z[27] * z[27]
    a[28, :] = 1e-3
    a[28, 0] = -1e-3
    a[29] = np.abs(z[29]) * 1e-6 + 1.0
    a[30] = z[30] * 2.0**-126
    a[31] = z[31] * 1e-15
    a[32] = z[32] * 1e-14
    a[33] = np.sign(z[33]) * np.ldexp(1.0, np.round(z[33] * 4.0).astype(np.int64))
    a[34] = z[34] * 65504.0
    a[35, 200] = 1.0
    a[36, 17] = -5.0
    a[37] = np.repeat(np.round(z[37, :8] * 3.0), 32)
    a[38] = z[38] * np.where(np.arange(QK_K) < 128, 1e-4, 1.0)
    a[39] = np.tile(np.array([0.0, 0.0, 0.0, 1.0]), 64) * z[39]
    return a


def digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()
