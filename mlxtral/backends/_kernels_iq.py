"""IQ4_XS blocks computed where they lie, with llama.cpp's q8_K activations (``quantize_q8k``).

As ggml's ``vec_dot_iq4_xs_q8_K`` (its ``vec_dot_type`` is q8_K): per 256-weight superblock the
exact integer ``sumi = sum_j (ls_j - 32) * sum_k kvalue(q_jk) * xq_jk`` over the eight 32-weight
sub-blocks (``_kernels_ir.sb_dot_iq4_xs``: table lookup, sign trick, scale multiply), then one float
step per superblock in a fixed order::

    acc += (d * xd[b]) * sumi

A token's result is the same function of its own activations at every T: decode runs ``row_dot``,
prefill ``row_dot4`` (each weight sub-block looked up once for four tokens: the same exact integers,
then each token's float steps in ``row_dot``'s order), so batch invariance holds bit for bit.
Exact mode (``run_rows_exact``) dequantizes a row once (``dequant_row``, as ``gguf.quants``) and
takes float dots. The other three types here (Q5_0, Q5_1, IQ4_NL) are 32-weight blocks on q8_0 /
q8_1 activations: their dots are ``_kernels_ir``'s ``dot_q5_0`` .. ``dot4_iq4_nl``, run by
``_kernels_nb.run_chunk``; ``dequant_block_row`` is their exact mode.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit

from mlxtral.backends._kernels_ir import (
    FORCED_GENERIC,
    IQ4_VALUES,
    IQ4_XS_BYTES,
    NTOK,
    dot_f32,
    half_to_f32,
    ptr_f32,
    ptr_u8,
    sb_dot4_iq4_xs,
    sb_dot_iq4_xs,
)

QK_K = 256
# kinds (mlxtral.backends.kernels._KINDS): 32-weight blocks on q8_0 / q8_1 activations, then IQ4_XS
K_Q5_0, K_Q5_1, K_IQ4_NL, K_IQ4_XS = 11, 12, 13, 14
_KV = np.array(IQ4_VALUES, dtype=np.float32)

_CACHE = not FORCED_GENERIC


@njit(cache=_CACHE, nogil=True, inline="always")
def _h(w, o):
    return half_to_f32(np.uint16(w[o]) | (np.uint16(w[o + 1]) << np.uint16(8)))


@njit(cache=_CACHE, nogil=True, inline="always")
def row_dot(wa, n, xqa, xd, t):
    """The IQ4_XS row at ``wa`` . q8_K token ``t`` (codes at ``xqa``, scales ``xd``, all tokens)."""
    nb = n // QK_K
    w = carray(ptr_u8(wa), (nb * IQ4_XS_BYTES,))
    xo = xqa + t * n
    acc = np.float32(0.0)
    for b in range(nb):
        sumi = sb_dot_iq4_xs(wa + b * IQ4_XS_BYTES, xo + b * QK_K)
        acc += (_h(w, b * IQ4_XS_BYTES) * xd[t * nb + b]) * np.float32(sumi)
    return acc


@njit(cache=_CACHE, nogil=True, inline="always")
def row_dot4(wa, n, xqa, xd, t0):
    """``row_dot`` for tokens ``t0 .. t0 + 3``, each sub-block looked up once for the four; every
    token's float steps are ``row_dot``'s, in its order: the same bits as four ``row_dot`` calls."""
    nb = n // QK_K
    w = carray(ptr_u8(wa), (nb * IQ4_XS_BYTES,))
    xo = xqa + t0 * n
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for b in range(nb):
        s0, s1, s2, s3 = sb_dot4_iq4_xs(wa + b * IQ4_XS_BYTES, xo + b * QK_K, n)
        d = _h(w, b * IQ4_XS_BYTES)
        a0 += (d * xd[t0 * nb + b]) * np.float32(s0)
        a1 += (d * xd[(t0 + 1) * nb + b]) * np.float32(s1)
        a2 += (d * xd[(t0 + 2) * nb + b]) * np.float32(s2)
        a3 += (d * xd[(t0 + 3) * nb + b]) * np.float32(s3)
    return a0, a1, a2, a3


@njit(cache=_CACHE, nogil=True, inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(cache=_CACHE, nogil=True)
def run_rows(swig, wa, wa2, rb, n, T, r0, r1, xqa, xda, out, os_):
    """Output rows ``r0..r1`` of an IQ4_XS task, every token: ``out[t * os_ + r]`` = row r . token t
    (or ``silu(gate) * up`` with ``swig``); the rows (~16 KB in prefill) stay in cache across tokens."""
    nb = n // QK_K
    xd = carray(ptr_f32(xda), (T * nb,))
    t0 = 0
    while t0 + NTOK <= T:  # prefill: four tokens per pass over a row (the same bits as one by one)
        for r in range(r0, r1):
            g = row_dot4(wa + r * rb, n, xqa, xd, t0)
            if swig:
                u = row_dot4(wa2 + r * rb, n, xqa, xd, t0)
                for j in range(NTOK):
                    out[(t0 + j) * os_ + r] = _silu_mul(g[j], u[j])
            else:
                for j in range(NTOK):
                    out[(t0 + j) * os_ + r] = g[j]
        t0 += NTOK
    for t in range(t0, T):
        for r in range(r0, r1):
            g = row_dot(wa + r * rb, n, xqa, xd, t)
            if swig:
                g = _silu_mul(g, row_dot(wa2 + r * rb, n, xqa, xd, t))
            out[t * os_ + r] = g


@njit(cache=_CACHE, nogil=True)
def dequant_row(wa, n, buf):
    """One IQ4_XS row at ``wa`` -> float32 ``buf[:n]``: ``(d * (ls - 32)) * kvalue``, as gguf.quants."""
    nb = n // QK_K
    w = carray(ptr_u8(wa), (nb * IQ4_XS_BYTES,))
    for b in range(nb):
        o = b * IQ4_XS_BYTES
        d = _h(w, o)
        sh = np.int32(w[o + 2]) | (np.int32(w[o + 3]) << 8)
        for j in range(8):
            ls = ((np.int32(w[o + 4 + j // 2]) >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4)
            dl = d * np.float32(ls - 32)
            for k in range(16):
                q = w[o + 8 + 16 * j + k]
                buf[b * QK_K + 32 * j + k] = dl * _KV[q & 15]
                buf[b * QK_K + 32 * j + 16 + k] = dl * _KV[q >> 4]


@njit(cache=_CACHE, nogil=True)
def run_rows_exact(swig, wa, wa2, rb, n, T, r0, r1, xa, out, os_):
    """``run_rows`` on float32 activations at ``xa`` [T, n] (exact mode): each row dequantized once,
    then one float dot per token, the same at any T."""
    buf = np.empty(n, dtype=np.float32)
    buf2 = np.empty(n if swig else 1, dtype=np.float32)
    ba, ba2 = buf.ctypes.data, buf2.ctypes.data
    for r in range(r0, r1):
        dequant_row(wa + r * rb, n, buf)
        if swig:
            dequant_row(wa2 + r * rb, n, buf2)
        for t in range(T):
            g = dot_f32(ba, xa + t * n * 4, n)  # n % 256 == 0: no tail
            if swig:
                g = _silu_mul(g, dot_f32(ba2, xa + t * n * 4, n))
            out[t * os_ + r] = g


@njit(cache=_CACHE, nogil=True)
def dequant_block_row(kind, wa, n, buf):
    """One Q5_0 / Q5_1 / IQ4_NL row at ``wa`` -> float32 ``buf[:n]`` (exact mode), as gguf.quants."""
    nb = n // 32
    bs = 22 if kind == K_Q5_0 else 24 if kind == K_Q5_1 else 18
    w = carray(ptr_u8(wa), (nb * bs,))
    for b in range(nb):
        o = b * bs
        d = _h(w, o)
        if kind == K_IQ4_NL:
            for j in range(16):
                q = w[o + 2 + j]
                buf[b * 32 + j] = d * _KV[q & 15]
                buf[b * 32 + 16 + j] = d * _KV[q >> 4]
            continue
        m = _h(w, o + 2) if kind == K_Q5_1 else np.float32(0.0)
        qo = o + (4 if kind == K_Q5_1 else 2)
        qh = (np.uint32(w[qo]) | (np.uint32(w[qo + 1]) << np.uint32(8))
              | (np.uint32(w[qo + 2]) << np.uint32(16)) | (np.uint32(w[qo + 3]) << np.uint32(24)))
        for j in range(16):
            q = w[qo + 4 + j]
            c0 = np.int32(q & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
            c1 = np.int32(q >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
            if kind == K_Q5_0:
                buf[b * 32 + j] = d * np.float32(c0 - 16)
                buf[b * 32 + 16 + j] = d * np.float32(c1 - 16)
            else:
                buf[b * 32 + j] = d * np.float32(c0) + m
                buf[b * 32 + 16 + j] = d * np.float32(c1) + m
