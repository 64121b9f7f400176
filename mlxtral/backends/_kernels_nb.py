"""numba side of :mod:`mlxtral.backends.kernels`: job tables, the chunk runner, the worker loop.

Everything works on addresses held in an int64 job table (one row per task, fields ``F_*``), so the
spinning worker threads, which never return to Python between jobs, can run any task.
"""
from __future__ import annotations

import math

import numpy as np
from numba import carray, njit

from mlxtral.backends._kernels_iq import K_IQ4_NL, K_IQ4_XS, K_Q5_0, K_Q5_1, dequant_block_row
from mlxtral.backends._kernels_iq import run_rows as iq_run_rows
from mlxtral.backends._kernels_iq import run_rows_exact as iq_run_rows_exact
from mlxtral.backends._kernels_ir import (
    FORCED_GENERIC,
    NTOK,
    X_OFFSET,
    atomic_add,
    atomic_cas,
    atomic_load,
    atomic_store,
    cpu_pause,
    cpu_yield,
    dot2_iq4_nl,
    dot2_q4_1,
    dot2_q5_0,
    dot2_q5_1,
    dot2_q8_0,
    dot3_iq4_nl,
    dot3_q4_1,
    dot3_q5_0,
    dot3_q5_1,
    dot3_q8_0,
    dot4_iq4_nl,
    dot4_q4_1,
    dot4_q5_0,
    dot4_q5_1,
    dot4_q8_0,
    dot_bf16,
    dot_f16,
    dot_f32,
    dot_iq4_nl,
    dot_q4_1,
    dot_q5_0,
    dot_q5_1,
    dot_q8_0,
    f16_row,
    half_to_f32,
    ptr_f32,
    ptr_i64,
    ptr_u8,
    ptr_u16,
)
from mlxtral.backends._kernels_kq import K_Q2_K, KQ_FIRST, quantize_q8k
from mlxtral.backends._kernels_kq import run_rows as kq_run_rows
from mlxtral.backends._kernels_kq import run_rows_exact as kq_run_rows_exact
from mlxtral.backends._kernels_kq import run_rows_twins as kq_run_rows_twins
from mlxtral.backends._kernels_tile import kq_run_rows as kq_tile_rows
from mlxtral.backends._kernels_tile import kq_tiles
from mlxtral.backends._kernels_tile import run_rows as q4_0_run_rows
from mlxtral.backends._kernels_tile import run_rows_twins as q4_0_run_rows_twins

# job table fields
F_KIND, F_MODE, F_QUANT, F_W, F_W2, F_ROWBYTES, F_NOUT, F_NIN, F_T = 0, 1, 2, 3, 4, 5, 6, 7, 8
F_X, F_XQ, F_XD, F_XS, F_OUT, F_OSTRIDE, F_CHUNK, F_FIRST = 9, 10, 11, 12, 13, 14, 15, 16
F_XG = 17  # K-quant prefill: the q8_K activations grouped for the tiles (_kernels_tile.kq_group_acts)
# a task's twin, or -1: the second half of a cut down product (ops.down_split), whose rows run in
# this task's work items beside its own (a row's two halves read one after the other), no items of
# its own
F_PAIR = 18
F_SIZE = 19
# an attention task (kernels.attend): one work item per (query row, KV head); its fields in the table
K_ATTN = 15
# addresses: q [T, H, hd] f32, the cache's k/v [KV, ctx, hd], out [T, H, hd]
A_Q, A_K, A_V, A_OUT = F_X, F_W, F_W2, F_OUT
A_H, A_HD, A_KV, A_CTX = F_NOUT, F_NIN, F_XS, F_ROWBYTES
A_P0, A_WINDOW, A_F16 = F_XQ, F_XD, F_QUANT  # the first query's position, the window (0: none), f16 cache

# control block (int64 words; hot words on their own cache lines)
CTL_W = 0  # seq << 40 | nchunks << 20 | next chunk
CTL_DONE = 8  # chunks finished
CTL_TABLE, CTL_NTASK, CTL_SEQ = 16, 17, 18
CTL_QUIT = 24
CTL_PARK = 25  # set by the caller: idle workers go to sleep now (before a multi-threaded BLAS call)
CTL_SLEEP = 32  # one flag per worker, set by a worker that went to sleep
MAX_WORKERS = 256  # sleep flags in the block: a pool never has more workers (worker_loop checks too)
CTL_SIZE = CTL_SLEEP + MAX_WORKERS
MAX_CHUNKS = (1 << 20) - 1
YIELD_AFTER = 4000  # pauses (~100 us) of waiting before sched_yield() in the spin loops
PAUSES_PER_US = 20.0  # refined by calibrate_pause()

# numba's cache index keys on this file, the IR's hash and the CPU, not on the path chosen in
# _kernels_ir: a forced lower path (MLXTRAL_KERNEL_ISA) must neither load nor write the host's entries.
_CACHE = not FORCED_GENERIC


@njit(cache=_CACHE, nogil=True, inline="always")
def round_half(v):
    """float32 -> the nearest float16 value (ties to even), as float32; overflow -> +-inf."""
    a = abs(np.float64(v))
    if a == 0.0 or a != a:
        return np.float32(v)
    if a < 6.103515625e-05:  # float16 subnormals: multiples of 2**-24
        r = np.rint(a * 16777216.0) / 16777216.0
    else:
        _, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1): 11 significant bits
        q = math.ldexp(1.0, e - 11)
        r = np.rint(a / q) * q
        if r > 65504.0:
            r = np.inf
    return np.float32(r if v >= 0 else -r)


# by kind: what the IR adds to a block kind's codes to dot them unsigned (``_kernels_ir.X_OFFSET``,
# by name); the activations then carry -offset * each 4 values' sum (``xo``). 0: the kind has a min
# (``xs``), or is not a 32-block kind.
_BLOCK_NAME = {0: "q4_0", 1: "q4_1", 2: "q8_0", K_Q5_0: "q5_0", K_Q5_1: "q5_1", K_IQ4_NL: "iq4_nl"}
X_OFFSETS = tuple(X_OFFSET.get(_BLOCK_NAME.get(kind, ""), 0) for kind in range(K_IQ4_XS + 1))


@njit(cache=_CACHE, nogil=True, inline="always")
def x_offset(kind):
    return X_OFFSETS[kind]


@njit(cache=_CACHE, nogil=True)
def quantize_x(x, offset):
    """float32 [T, n] (n % 32 == 0) -> int8 [T, n], scales [T, n/32], and the weights' constant
    part: with ``offset`` > 0, ``xo`` int32 [T, n/4] = -offset * (the sum of each 4 consecutive q),
    else ``xs`` float32 [T, n/32] = float16(d * sum(q)) (q8_1's ``s``, for Q4_1 / Q5_1's min);
    either returned as a float32 array (``xo`` its int32 bits).

    As llama.cpp's q8_0 / q8_1 activation blocks: q = rint(x * 127 / amax), the scale amax / 127
    stored as float16 (here: rounded to it), so our integer dots see the same numbers.
    """
    T, n = x.shape
    nb = n // 32
    xq = np.empty((T, n), dtype=np.int8)
    xd = np.empty((T, nb), dtype=np.float32)
    xs = np.empty((T, n // 4 if offset > 0 else nb), dtype=np.float32)
    xo = xs.view(np.int32)
    for t in range(T):
        for b in range(nb):
            amax = np.float32(0.0)
            for j in range(32):
                v = abs(x[t, b * 32 + j])
                if v > amax:
                    amax = v
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            s = 0
            for j in range(32):
                q = np.int32(np.rint(x[t, b * 32 + j] * inv))
                xq[t, b * 32 + j] = q
                s += q
            xd[t, b] = round_half(d)
            if offset > 0:
                for j in range(8):  # the 4 activations of vpdpbusd's lane j
                    k = b * 32 + 4 * j
                    lane = np.int32(xq[t, k]) + np.int32(xq[t, k + 1]) + np.int32(xq[t, k + 2])
                    xo[t, b * 8 + j] = -offset * (lane + np.int32(xq[t, k + 3]))
            else:
                xs[t, b] = round_half(d * np.float32(s))
    return xq, xd, xs


@njit(cache=_CACHE, nogil=True, inline="always")
def _h(w, o):
    return half_to_f32(np.uint16(w[o]) | (np.uint16(w[o + 1]) << np.uint16(8)))


@njit(cache=_CACHE, nogil=True)
def _dequant_row(kind, wa, n, buf):
    """One weight row at address ``wa`` -> float32 ``buf[:n]``."""
    nb = n // 32
    if kind >= K_Q5_0:  # Q5_0, Q5_1, IQ4_NL
        dequant_block_row(kind, wa, n, buf)
    elif kind == 0:
        w = carray(ptr_u8(wa), (nb * 18,))
        for b in range(nb):
            d = _h(w, b * 18)
            for j in range(16):
                q = w[b * 18 + 2 + j]
                buf[b * 32 + j] = np.float32(np.int32(q & 15) - 8) * d
                buf[b * 32 + 16 + j] = np.float32(np.int32(q >> 4) - 8) * d
    elif kind == 1:
        w = carray(ptr_u8(wa), (nb * 20,))
        for b in range(nb):
            d = _h(w, b * 20)
            m = _h(w, b * 20 + 2)
            for j in range(16):
                q = w[b * 20 + 4 + j]
                buf[b * 32 + j] = np.float32(q & 15) * d + m
                buf[b * 32 + 16 + j] = np.float32(q >> 4) * d + m
    elif kind == 2:
        w = carray(ptr_u8(wa), (nb * 34,))
        for b in range(nb):
            d = _h(w, b * 34)
            for j in range(32):
                buf[b * 32 + j] = np.float32(np.int8(w[b * 34 + 2 + j])) * d
    elif kind == 3:
        w = carray(ptr_f32(wa), (n,))
        for i in range(n):
            buf[i] = w[i]
    elif kind == 4:
        w = carray(ptr_u16(wa), (n,))
        for i in range(n):
            buf[i] = half_to_f32(w[i])
    else:
        w = carray(ptr_u16(wa), (n,))
        u = buf[:n].view(np.uint32)
        for i in range(n):
            u[i] = np.uint32(w[i]) << np.uint32(16)


@njit(cache=_CACHE, nogil=True)
def _float_dot(kind, wa, xa, n):
    """Row at ``wa`` (F32/F16/BF16) . float32 x at ``xa``, n elements."""
    if kind == 3:
        s = dot_f32(wa, xa, n)
    elif kind == 4:
        s = dot_f16(wa, xa, n)
    else:
        s = dot_bf16(wa, xa, n)
    n16 = n // 16 * 16
    if n16 < n:
        x = carray(ptr_f32(xa), (n,))
        if kind == 3:
            w = carray(ptr_f32(wa), (n,))
            for i in range(n16, n):
                s += w[i] * x[i]
        else:
            w16 = carray(ptr_u16(wa), (n,))
            for i in range(n16, n):
                if kind == 4:
                    s += half_to_f32(w16[i]) * x[i]
                else:
                    s += _bf(w16[i]) * x[i]
    return s


@njit(cache=_CACHE, nogil=True, inline="always")
def _bf(bits):
    a = np.empty(1, dtype=np.uint32)
    a[0] = np.uint32(bits) << np.uint32(16)
    return a.view(np.float32)[0]


@njit(cache=_CACHE, nogil=True)
def _block_dot(kind, wa, xq, xd, xs, nb):
    if kind == 1:
        return dot_q4_1(wa, xq, xd, xs, nb)
    if kind == K_Q5_0:
        return dot_q5_0(wa, xq, xd, xs, nb)
    if kind == K_Q5_1:
        return dot_q5_1(wa, xq, xd, xs, nb)
    if kind == K_IQ4_NL:
        return dot_iq4_nl(wa, xq, xd, xs, nb)
    return dot_q8_0(wa, xq, xd, xs, nb)


@njit(cache=_CACHE, nogil=True)
def _block_dot4(kind, wa, xq, xd, xs, nb, xqs, xds):
    """One weight row . NTOK (= 4) token rows: a 4-tuple of floats."""
    if kind == 1:
        return dot4_q4_1(wa, xq, xd, xs, nb, xqs, xds)
    if kind == K_Q5_0:
        return dot4_q5_0(wa, xq, xd, xs, nb, xqs, xds)
    if kind == K_Q5_1:
        return dot4_q5_1(wa, xq, xd, xs, nb, xqs, xds)
    if kind == K_IQ4_NL:
        return dot4_iq4_nl(wa, xq, xd, xs, nb, xqs, xds)
    return dot4_q8_0(wa, xq, xd, xs, nb, xqs, xds)


@njit(cache=_CACHE, nogil=True)
def _block_dot3(kind, wa, xq, xd, xs, nb, xqs, xds):
    """One weight row . 3 token rows, as a 4-tuple (the last 0)."""
    if kind == 1:
        a, b, c = dot3_q4_1(wa, xq, xd, xs, nb, xqs, xds)
    elif kind == K_Q5_0:
        a, b, c = dot3_q5_0(wa, xq, xd, xs, nb, xqs, xds)
    elif kind == K_Q5_1:
        a, b, c = dot3_q5_1(wa, xq, xd, xs, nb, xqs, xds)
    elif kind == K_IQ4_NL:
        a, b, c = dot3_iq4_nl(wa, xq, xd, xs, nb, xqs, xds)
    else:
        a, b, c = dot3_q8_0(wa, xq, xd, xs, nb, xqs, xds)
    return a, b, c, np.float32(0.0)


@njit(cache=_CACHE, nogil=True)
def _block_dot2(kind, wa, xq, xd, xs, nb, xqs, xds):
    """One weight row . 2 token rows, as a 4-tuple (the last two 0)."""
    if kind == 1:
        a, b = dot2_q4_1(wa, xq, xd, xs, nb, xqs, xds)
    elif kind == K_Q5_0:
        a, b = dot2_q5_0(wa, xq, xd, xs, nb, xqs, xds)
    elif kind == K_Q5_1:
        a, b = dot2_q5_1(wa, xq, xd, xs, nb, xqs, xds)
    elif kind == K_IQ4_NL:
        a, b = dot2_iq4_nl(wa, xq, xd, xs, nb, xqs, xds)
    else:
        a, b = dot2_q8_0(wa, xq, xd, xs, nb, xqs, xds)
    return a, b, np.float32(0.0), np.float32(0.0)


@njit(cache=_CACHE, nogil=True, inline="always")
def _block_dotn(kind, n, wa, xq, xd, xs, nb, xqs, xds):
    """One weight row . ``n`` (2 .. NTOK) token rows: a 4-tuple, the first ``n`` meaningful."""
    if n == 4:
        return _block_dot4(kind, wa, xq, xd, xs, nb, xqs, xds)
    if n == 3:
        return _block_dot3(kind, wa, xq, xd, xs, nb, xqs, xds)
    return _block_dot2(kind, wa, xq, xd, xs, nb, xqs, xds)


@njit(cache=_CACHE, nogil=True, inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(cache=_CACHE, nogil=True, inline="always")
def q8k_kind(kind):
    """Kinds whose activations are q8_K superblocks: the K-quants and IQ4_XS."""
    return (kind >= KQ_FIRST and kind <= K_Q2_K) or kind == K_IQ4_XS


@njit(cache=_CACHE, nogil=True)
def run_chunk(table, c):
    """Compute work item ``c`` of a job: ``F_CHUNK`` output rows of one task, all its tokens (and
    the same rows of its twin)."""
    ti = 0
    while ti + 1 < table.shape[0] and table[ti + 1, F_FIRST] <= c:
        ti += 1
    if table[ti, F_KIND] == K_ATTN:
        attend_item(table[ti], c - table[ti, F_FIRST])
        return
    ch = table[ti, F_CHUNK]
    r0 = (c - table[ti, F_FIRST]) * ch
    r1 = min(r0 + ch, table[ti, F_NOUT])
    tw = table[ti, F_PAIR]
    if tw < 0:
        task_rows(table, ti, r0, r1)
        return
    if not twin_rows(table, ti, tw, r0, r1):  # several tokens: the item's rows of one, then the other
        task_rows(table, ti, r0, r1)
        task_rows(table, tw, r0, r1)


@njit(cache=_CACHE, nogil=True)
def twin_rows(table, ti, tw, r0, r1):
    """One token's rows ``r0..r1`` of task ``ti`` and of its twin ``tw`` with a row's two halves
    read one after the other: each task's values are the bits :func:`task_rows` gives it alone
    (the same row dots, in another order of rows). False where this does not apply (several
    tokens, fused, IQ4_XS, exact block kinds): the caller runs the item's rows of one, then of the other."""
    kind = table[ti, F_KIND]
    quant = table[ti, F_QUANT] != 0
    if table[ti, F_T] != 1 or table[ti, F_MODE] == 1 or kind == K_IQ4_XS:
        return False
    wa, rb, n = table[ti, F_W], table[ti, F_ROWBYTES], table[ti, F_NIN]
    wb, rbb, nb_ = table[tw, F_W], table[tw, F_ROWBYTES], table[tw, F_NIN]
    if rbb != rb:
        return False
    out = carray(ptr_f32(table[ti, F_OUT]), (table[ti, F_NOUT],))
    outb = carray(ptr_f32(table[tw, F_OUT]), (table[tw, F_NOUT],))
    xq, xd, xs = table[ti, F_XQ], table[ti, F_XD], table[ti, F_XS]
    xqb, xdb, xsb = table[tw, F_XQ], table[tw, F_XD], table[tw, F_XS]
    if q8k_kind(kind):
        if not quant:
            return False
        kq_run_rows_twins(kind, wa, rb, n, r0, r1, xq, xd, xs, out, wb, nb_, xqb, xdb, xsb, outb)
    elif kind == 0 and quant:
        q4_0_run_rows_twins(wa, rb, n, r0, r1, xq, xd, xs, out, wb, nb_, xqb, xdb, xsb, outb)
    elif quant:
        nb, nbb = n // 32, nb_ // 32
        for r in range(r0, r1):
            out[r] = _block_dot(kind, wa + r * rb, xq, xd, xs, nb)
            outb[r] = _block_dot(kind, wb + r * rb, xqb, xdb, xsb, nbb)
    elif kind == 3 or kind == 4 or kind == 5:
        xa, xb = table[ti, F_X], table[tw, F_X]
        for r in range(r0, r1):
            out[r] = _float_dot(kind, wa + r * rb, xa, n)
            outb[r] = _float_dot(kind, wb + r * rb, xb, nb_)
    else:
        return False
    return True


@njit(cache=_CACHE, nogil=True)
def task_rows(table, ti, r0, r1):
    """Output rows ``r0..r1`` of task ``ti`` of a job table, all its tokens."""
    kind = table[ti, F_KIND]
    swig = table[ti, F_MODE] == 1
    quant = table[ti, F_QUANT] != 0
    wa = table[ti, F_W]
    wa2 = table[ti, F_W2]
    rb = table[ti, F_ROWBYTES]
    nout = table[ti, F_NOUT]
    n = table[ti, F_NIN]
    T = table[ti, F_T]
    os_ = table[ti, F_OSTRIDE]
    out = carray(ptr_f32(table[ti, F_OUT]), ((T - 1) * os_ + nout,))
    xa = table[ti, F_X]
    if kind == K_IQ4_XS:  # _kernels_iq: q8_K activations, or float32 ones in exact mode
        if quant:
            iq_run_rows(swig, wa, wa2, rb, n, T, r0, r1, table[ti, F_XQ], table[ti, F_XD], out, os_)
        else:
            iq_run_rows_exact(swig, wa, wa2, rb, n, T, r0, r1, xa, out, os_)
        return
    if q8k_kind(kind):  # K-quants (_kernels_kq): q8_K activations, or float32 ones in exact mode
        if quant and kq_tiles(T):  # 16-row tiles (_kernels_tile): the same bits
            kq_tile_rows(kind, swig, wa, wa2, rb, n, T, r0, r1, table[ti, F_XQ], table[ti, F_XD],
                         table[ti, F_XS], table[ti, F_XG], out, os_)
        elif quant:
            kq_run_rows(kind, swig, wa, wa2, rb, n, T, r0, r1, table[ti, F_XQ], table[ti, F_XD],
                        table[ti, F_XS], out, os_)
        else:
            kq_run_rows_exact(kind, swig, wa, wa2, rb, n, T, r0, r1, xa, out, os_)
        return
    if kind == 0 and quant:  # Q4_0: whole-block sums, 16 rows in the vector lanes (_kernels_tile)
        q4_0_run_rows(swig, wa, wa2, rb, n, T, r0, r1, table[ti, F_XQ], table[ti, F_XD], table[ti, F_XS],
                      out, os_)
        return
    if quant:
        # Batch invariance: the multi-token dots sum each token's blocks in exactly ``dot_*``'s
        # order, so a token gets the same bits in a group of 2 to 4 or alone (decode).
        nb = n // 32
        xq, xd, xs = table[ti, F_XQ], table[ti, F_XD], table[ti, F_XS]
        xss = n if x_offset(kind) > 0 else nb * 4  # bytes per token: xo int32 [n/4], or xs float [nb]
        t0 = 0
        while T - t0 >= 2:  # each weight block unpacked once for up to NTOK (= 4) tokens
            k = min(NTOK, T - t0)
            xqt, xdt, xst = xq + t0 * n, xd + t0 * nb * 4, xs + t0 * xss
            for r in range(r0, r1):  # the rows r0..r1 (~16 KB) stay in L1 across the tokens
                g = _block_dotn(kind, k, wa + r * rb, xqt, xdt, xst, nb, n, nb * 4)
                if swig:
                    u = _block_dotn(kind, k, wa2 + r * rb, xqt, xdt, xst, nb, n, nb * 4)
                    for j in range(k):
                        out[(t0 + j) * os_ + r] = _silu_mul(g[j], u[j])
                else:
                    for j in range(k):
                        out[(t0 + j) * os_ + r] = g[j]
            t0 += k
        if t0 < T:  # one token: decode, or a group's last
            xqt, xdt, xst = xq + t0 * n, xd + t0 * nb * 4, xs + t0 * xss
            for r in range(r0, r1):
                g = _block_dot(kind, wa + r * rb, xqt, xdt, xst, nb)
                if swig:
                    u = _block_dot(kind, wa2 + r * rb, xqt, xdt, xst, nb)
                    g = _silu_mul(g, u)
                out[t0 * os_ + r] = g
    elif kind == 3 or ((kind == 4 or kind == 5) and T == 1):  # F32 at any T, F16/BF16 decode: in place
        for t in range(T):
            xt = xa + t * n * 4
            for r in range(r0, r1):
                g = _float_dot(kind, wa + r * rb, xt, n)
                if swig:
                    g = _silu_mul(g, _float_dot(kind, wa2 + r * rb, xt, n))
                out[t * os_ + r] = g
    else:
        # exact / prefill on 16-bit floats: a row to float32 once (exact), then every token; the
        # float dot on it sums in the order of dot_f16 / dot_bf16 on the row as it lies (decode)
        buf = np.empty(n, dtype=np.float32)
        buf2 = np.empty(n if swig else 1, dtype=np.float32)
        ba, ba2 = buf.ctypes.data, buf2.ctypes.data
        for r in range(r0, r1):
            _dequant_row(kind, wa + r * rb, n, buf)
            if swig:
                _dequant_row(kind, wa2 + r * rb, n, buf2)
            for t in range(T):
                g = _float_dot(3, ba, xa + t * n * 4, n)
                if swig:
                    g = _silu_mul(g, _float_dot(3, ba2, xa + t * n * 4, n))
                out[t * os_ + r] = g


@njit(cache=_CACHE, nogil=True)
def _claim(ctl, table, seq):
    while True:
        w = atomic_load(ctl, CTL_W)
        if (w >> 40) != seq:
            return
        total = (w >> 20) & MAX_CHUNKS
        c = w & MAX_CHUNKS
        if c >= total:
            return
        if atomic_cas(ctl, CTL_W, w, w + 1):
            run_chunk(table, c)
            atomic_add(ctl, CTL_DONE, 1)


@njit(cache=_CACHE, nogil=True)
def execute(ctl, table, nchunks):
    """Run a job on the calling thread plus every spinning worker; returns when it is done."""
    seq = (ctl[CTL_SEQ] + 1) & ((1 << 23) - 1)
    ctl[CTL_SEQ] = seq
    ctl[CTL_TABLE] = table.ctypes.data
    ctl[CTL_NTASK] = table.shape[0]
    atomic_store(ctl, CTL_DONE, 0)
    atomic_store(ctl, CTL_W, (seq << 40) | (nchunks << 20))
    _claim(ctl, table, seq)
    spins = 0
    while atomic_load(ctl, CTL_DONE) < nchunks:
        spins += 1
        if spins < YIELD_AFTER:
            cpu_pause()
        else:  # a worker holding a chunk was preempted: give the CPU back
            cpu_yield()
    return 0


@njit(cache=_CACHE, nogil=True)
def worker_loop(ctl, wid, spin_iters):
    """A worker: spin for jobs; return 1 to quit, 0 after ``spin_iters`` idle pauses (to sleep).
    A worker id with no sleep flag in ``ctl`` quits at once: nothing is ever written past the block."""
    if wid < 0 or CTL_SLEEP + wid >= ctl.shape[0]:
        return 1
    myseq = -1  # a worker just woken joins the job in progress (_claim checks its seq)
    idle = 0
    while True:
        w = atomic_load(ctl, CTL_W)
        s = w >> 40
        if s != myseq:
            myseq = s
            ntask = atomic_load(ctl, CTL_NTASK)
            table = carray(ptr_i64(ctl[CTL_TABLE]), (ntask, F_SIZE))
            _claim(ctl, table, s)
            idle = 0
            continue
        if atomic_load(ctl, CTL_QUIT) != 0:
            return 1
        if atomic_load(ctl, CTL_PARK) != 0:
            atomic_store(ctl, CTL_SLEEP + wid, 1)
            return 0
        idle += 1
        if idle < YIELD_AFTER:
            cpu_pause()
        else:  # idle for a while: stay ready, but let other processes run
            cpu_yield()
        if idle > spin_iters:
            atomic_store(ctl, CTL_SLEEP + wid, 1)
            return 0


@njit(cache=_CACHE, nogil=True)
def spin_pauses(n):
    for _ in range(n):
        cpu_pause()
    return n


_EMPTY_I8 = np.zeros((1, 1), dtype=np.int8)
_EMPTY_F32 = np.zeros((1, 1), dtype=np.float32)


@njit(cache=_CACHE, nogil=True)
def prep_x(x, quant, kind):
    """The activations a task of ``kind`` reads: int8 blocks when ``quant`` else placeholders."""
    if quant:
        return quantize_x(x, x_offset(kind))
    return (np.zeros((1, 1), dtype=np.int8), np.zeros((1, 1), dtype=np.float32),
            np.zeros((1, 1), dtype=np.float32))


@njit(cache=_CACHE, nogil=True)
def fill_task(table, i, kind, swiglu, quant, wa, wa2, rb, nout, nin, x, xq, xd, xs, xg, out, ch, first):
    """Row ``i`` of a job table; returns the chunk index after this task's chunks."""
    table[i, F_KIND] = kind
    table[i, F_MODE] = 1 if swiglu else 0
    table[i, F_QUANT] = 1 if quant else 0
    table[i, F_W] = wa
    table[i, F_W2] = wa2
    table[i, F_ROWBYTES] = rb
    table[i, F_NOUT] = nout
    table[i, F_NIN] = nin
    table[i, F_T] = x.shape[0]
    table[i, F_X] = x.ctypes.data
    table[i, F_XQ] = xq.ctypes.data
    table[i, F_XD] = xd.ctypes.data
    table[i, F_XS] = xs.ctypes.data  # xo or xs (quantize_x)
    table[i, F_XG] = xg.ctypes.data
    table[i, F_OUT] = out.ctypes.data
    table[i, F_OSTRIDE] = out.strides[0] // 4
    table[i, F_CHUNK] = ch
    table[i, F_FIRST] = first
    table[i, F_PAIR] = -1
    return first + (nout + ch - 1) // ch


@njit(cache=_CACHE, nogil=True)
def pair_task(table, i, first):
    """Make task ``i`` the twin of task ``i - 1`` (same rows, same tokens): its rows run in the
    other's work items (:func:`run_chunk`), so it has none of its own. ``first``: the chunk index
    after task ``i - 1``'s chunks (returned, as :func:`fill_task` returns)."""
    table[i - 1, F_PAIR] = i
    table[i, F_FIRST] = first
    return first


@njit(cache=_CACHE, nogil=True)
def run_one(ctl, kind, swiglu, quant, wa, wa2, rb, nout, nin, x, out, ch):
    """A one-task job (``linear`` / ``swiglu``) in a single call. The weights come as addresses
    (``wa``, ``wa2``; rows ``rb`` bytes apart): one compiled specialization, not one per weight
    dtype and writability (each a ~1 MB copy of every kernel, ~5 MB of memory loaded)."""
    table = np.empty((1, F_SIZE), dtype=np.int64)
    xq, xd, xs = prep_x(x, quant, kind)
    xg = np.zeros(1, dtype=np.uint8)  # (K-quants go through kernels._Job)
    nchunks = fill_task(table, 0, kind, swiglu, quant, wa, wa2, rb, nout, nin, x, xq, xd, xs, xg, out, ch, 0)
    execute(ctl, table, nchunks)
    # numba frees an array after its last use in this function: these three are read (by address)
    # while execute runs, so they must be used after it
    xq[0, 0] = xq[0, 0]
    xd[0, 0] = xd[0, 0]
    xs[0, 0] = xs[0, 0]
    return out


# a task's row of a tasks_job table: its first row of X and token count, weight, up weight, row
# bytes, rows, rows a work item, block kind, and where its output [T, rows] starts in out (floats);
# then 1 if it is the twin of the task before it (``pair_task``), else 0
R_X0, R_T, R_W, R_W2, R_RB, R_NOUT, R_CH, R_KIND, R_OUT, R_TWIN = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9
R_SIZE = 10


@njit(cache=_CACHE, nogil=True)
def run_decode(ctl, X, quant, kind, swiglu, desc, out):
    """One token against several weights of one block kind in a single call (a decode step's q/k/v,
    its experts' gate/up pairs, their down projections): the job ``kernels._Job`` would build,
    without its per-task Python. Task i: row ``desc[i, 0]`` of X [R, nin] against the weight at
    ``desc[i, 1]`` (and ``desc[i, 2]``, the up half with ``swiglu``; rows ``desc[i, 3]`` bytes
    apart, ``desc[i, 4]`` of them, ``desc[i, 5]`` a work item) into ``out`` [sum of the rows], the
    tasks' outputs end to end. Every row of X is quantized once, on its own (as ``quantize_x`` /
    ``quantize_q8k`` do per token), so each task sees the bits it sees alone."""
    n = desc.shape[0]
    tasks = np.empty((n, R_SIZE), dtype=np.int64)
    off = 0
    for i in range(n):
        task(tasks[i], desc[i, 0], 1, desc[i, 1], desc[i, 2], desc[i, 3], desc[i, 4], kind, off, desc[i, 5])
        off += desc[i, 4]
    run_job(ctl, X, quant, kind, swiglu, tasks, out)
    return out


@njit(cache=_CACHE, nogil=True, inline="always")
def task(t, x0, T, wa, wa2, rb, nout, kind, out, ch):
    """Fill ``t``, a tasks_job row."""
    t[R_X0], t[R_T], t[R_W], t[R_W2], t[R_RB] = x0, T, wa, wa2, rb
    t[R_NOUT], t[R_KIND], t[R_OUT], t[R_CH], t[R_TWIN] = nout, kind, out, ch, 0


@njit(cache=_CACHE, nogil=True)
def run_job(ctl, X, quant, kind, swiglu, tasks, out):
    """``tasks_job`` with X's rows quantized for ``kind`` (when ``quant``), each on its own (as
    ``quantize_x`` / ``quantize_q8k`` do per token): q8_K superblocks for the K-quants and IQ4_XS
    (tiles only start past the tokens these jobs take), int8 blocks for the rest."""
    if quant and q8k_kind(kind):
        kq, kd, ks = quantize_q8k(X)
        tasks_job(ctl, X, quant, kind, swiglu, tasks, out, kq, kd, ks)
    else:
        xq, xd, xs = prep_x(X, quant, kind)
        tasks_job(ctl, X, quant, kind, swiglu, tasks, out, xq, xd, xs)


@njit(cache=_CACHE, nogil=True)
def tasks_job(ctl, X, quant, kind, swiglu, tasks, out, xq, xd, xs):
    """One job of tasks of one ``kind`` on X [R, nin] and its quantized rows xq / xd / xs (alive for
    the whole call): task i is rows ``tasks[i, R_X0]`` .. + ``tasks[i, R_T]`` of X against its
    weight into out[tasks[i, R_OUT]:] as [T, rows]."""
    n = tasks.shape[0]
    nin = X.shape[1]
    xg = np.zeros(1, dtype=np.uint8)
    table = np.empty((n, F_SIZE), dtype=np.int64)
    nchunks = 0
    for i in range(n):
        t = tasks[i]
        x0, T, nout, o0 = t[R_X0], t[R_T], t[R_NOUT], t[R_OUT]
        q0, qn = (x0, T) if quant else (0, 1)  # (placeholders when not quantized)
        o = out[o0 : o0 + T * nout].reshape((T, nout))
        first = nchunks
        nchunks = fill_task(table, i, kind, swiglu, quant, t[R_W], t[R_W2], t[R_RB], nout, nin,
                            X[x0 : x0 + T], xq[q0 : q0 + qn], xd[q0 : q0 + qn], xs[q0 : q0 + qn], xg, o,
                            t[R_CH], nchunks)
        if t[R_TWIN] and i > 0:
            nchunks = pair_task(table, i, first)
    execute(ctl, table, nchunks)
    table[0, 0] = table[0, 0]  # read by address while execute ran: used after it, so not freed before


@njit(cache=_CACHE, nogil=True, inline="always")
def _softmax_weights(sc, n, m):
    """Scores ``sc[:n]`` (maximum ``m``) -> exp(sc - m) in place; returns 1 / their sum.

    No fastmath here nor in the attention kernels around it: with it, LLVM reassociated this sum
    and the value accumulation differently depending on whether ``attend_one`` was inlined into
    ``attend``, which depends on what the process compiled before, so a process that compiled the
    kernels and one that loaded them from numba's disk cache gave different logits (up to 0.016 on
    a bench model). In a fixed order they agree, and measured no slower."""
    tot = np.float32(0.0)
    for s in range(n):
        e = np.exp(sc[s] - m)
        sc[s] = e
        tot += e
    return np.float32(1.0) / tot


@njit(cache=_CACHE, nogil=True, inline="always")
def _keep_score(sc, mx, g, s, acc):
    """Query head g's score for key s, and its running maximum."""
    sc[g, s] = acc
    if acc > mx[g]:
        mx[g] = acc


@njit(cache=_CACHE, nogil=True, inline="always")
def _score_key(q, kv, kr, s, sc, mx, scale):
    """Key s's row kr [hd] (float32, contiguous) against each query head g of KV head ``kv``:
    q . k (``dot_f32`` on the first hd // 16 * 16, then the tail) times ``scale`` -> sc[g, s], and
    g's running maximum in mx[g]."""
    hd = q.shape[1]
    G = mx.shape[0]
    hd16 = hd // 16 * 16
    ka = kr.ctypes.data
    for g in range(G):
        qh = q[kv * G + g]
        acc = dot_f32(ka, qh.ctypes.data, hd)  # the first hd16 elements, vectorized
        for d in range(hd16, hd):
            acc += qh[d] * kr[d]
        acc *= scale
        _keep_score(sc, mx, g, s, acc)


@njit(cache=_CACHE, nogil=True, inline="always")
def _group_weights(sc, mx, inv, out, kv, n):
    """Each query head g of KV head ``kv``: its ``n`` scores -> softmax weights (1 / their sum in
    inv[g]); its output row zeroed for the values' pass."""
    G = mx.shape[0]
    for g in range(G):
        inv[g] = _softmax_weights(sc[g], n, mx[g])
        o = out[kv * G + g]
        for d in range(o.shape[0]):
            o[d] = np.float32(0.0)


@njit(cache=_CACHE, nogil=True, inline="always")
def _add_values4(sc, inv, out, kv, s, v0, v1, v2, v3):
    """Value rows s..s+3 [hd] (float32), weighted by each query head's softmax, into its output
    row: one pass over o for the four (a quarter of the o traffic)."""
    G = inv.shape[0]
    for g in range(G):
        i = inv[g]
        p0, p1, p2, p3 = sc[g, s] * i, sc[g, s + 1] * i, sc[g, s + 2] * i, sc[g, s + 3] * i
        o = out[kv * G + g]
        for d in range(o.shape[0]):
            o[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d]


@njit(cache=_CACHE, nogil=True, inline="always")
def _add_values1(sc, inv, out, kv, s, vr):
    """Value row s [hd] (float32) into each query head's output row (the rows past a multiple of 4)."""
    G = inv.shape[0]
    for g in range(G):
        p = sc[g, s] * inv[g]
        o = out[kv * G + g]
        for d in range(o.shape[0]):
            o[d] += p * vr[d]


@njit(cache=_CACHE, nogil=True)
def attend_kv(q, k, v, lo, hi, out, kv):
    """Decode attention of one query row for the query heads of KV head ``kv``: q [H, hd] f32,
    k/v [KV, ctx, hd] f32 (the cache), keys lo..hi-1 -> out[kv * G .. (kv + 1) * G] [G, hd]
    (G = H / KV). One pass over the keys scores all G heads (each key row read once for them),
    one pass over the values accumulates them; per head the arithmetic is a head's own, in key
    order (the dot per key, the softmax, the values four keys at a time), whatever the grouping
    or the thread."""
    H, hd = q.shape
    G = H // k.shape[0]
    scale = np.float32(1.0 / np.sqrt(hd))
    n = hi - lo
    sc = np.empty((G, n), dtype=np.float32)
    mx = np.empty(G, dtype=np.float32)
    inv = np.empty(G, dtype=np.float32)
    n4 = n // 4 * 4
    for g in range(G):
        mx[g] = np.float32(-np.inf)
    for s in range(n):
        _score_key(q, kv, k[kv, lo + s], s, sc, mx, scale)
    _group_weights(sc, mx, inv, out, kv, n)
    vs = v[kv, lo:hi]  # [n, hd]
    for s in range(0, n4, 4):  # four value rows per pass over o (a quarter of the o traffic)
        _add_values4(sc, inv, out, kv, s, vs[s], vs[s + 1], vs[s + 2], vs[s + 3])
    for s in range(n4, n):
        _add_values1(sc, inv, out, kv, s, vs[s])


@njit(cache=_CACHE, nogil=True, inline="always")
def _f16_to(bits, row, hd8):
    """A cache row of float16 ``bits`` [hd] -> float32 ``row`` [hd], exactly (eight a step)."""
    f16_row(bits.ctypes.data, row.ctypes.data, hd8)
    for d in range(hd8, bits.shape[0]):
        row[d] = half_to_f32(bits[d])


@njit(cache=_CACHE, nogil=True)
def attend_kv_f16(q, k, v, lo, hi, out, kv):
    """``attend_kv`` on a float16 cache given as uint16 bits: k/v [KV, ctx, hd] read in place (no
    float32 copy of the cache per step). Each key and value row is converted to float32 once
    (exactly) for the G query heads, then ``attend_kv``'s steps: the bits ``attend_kv`` gives on the
    cache converted to float32."""
    H, hd = q.shape
    G = H // k.shape[0]
    scale = np.float32(1.0 / np.sqrt(hd))
    n = hi - lo
    sc = np.empty((G, n), dtype=np.float32)
    mx = np.empty(G, dtype=np.float32)
    inv = np.empty(G, dtype=np.float32)
    row = np.empty(hd, dtype=np.float32)  # a key or value row in float32
    hd8 = hd // 8 * 8
    for g in range(G):
        mx[g] = np.float32(-np.inf)
    for s in range(n):
        _f16_to(k[kv, lo + s], row, hd8)
        _score_key(q, kv, row, s, sc, mx, scale)
    _group_weights(sc, mx, inv, out, kv, n)
    n4 = n // 4 * 4
    vb = np.empty((4, hd), dtype=np.float32)  # four value rows in float32
    for s in range(0, n4, 4):  # as attend_kv: four value rows per pass over o
        for j in range(4):
            _f16_to(v[kv, lo + s + j], vb[j], hd8)
        _add_values4(sc, inv, out, kv, s, vb[0], vb[1], vb[2], vb[3])
    for s in range(n4, n):
        _f16_to(v[kv, lo + s], row, hd8)
        _add_values1(sc, inv, out, kv, s, row)


@njit(cache=_CACHE, nogil=True)
def attend_one(q, k, v, lo, hi, out):
    """Decode attention of one query row: q [H, hd] f32, k/v [KV, ctx, hd] f32 (the cache), keys
    lo..hi-1 -> out [H, hd]. GQA: head h reads KV head h // (H / KV); each KV head's heads by
    ``attend_kv``."""
    for kv in range(k.shape[0]):
        attend_kv(q, k, v, lo, hi, out, kv)
    return out


@njit(cache=_CACHE, nogil=True)
def attend_one_f16(q, k, v, lo, hi, out):
    """``attend_one`` on a float16 cache given as uint16 bits (read in place)."""
    for kv in range(k.shape[0]):
        attend_kv_f16(q, k, v, lo, hi, out, kv)
    return out


@njit(cache=_CACHE, nogil=True)
def attend_item(row, i):
    """Work item ``i`` of an attention task ``row``: query row i // KV, the heads of KV head i % KV."""
    H, hd, KV, ctx = row[A_H], row[A_HD], row[A_KV], row[A_CTX]
    t, kv = i // KV, i % KV
    hi = row[A_P0] + t + 1
    lo = max(0, hi - row[A_WINDOW]) if row[A_WINDOW] > 0 else 0
    q = carray(ptr_f32(row[A_Q] + t * H * hd * 4), (H, hd))
    out = carray(ptr_f32(row[A_OUT] + t * H * hd * 4), (H, hd))
    if row[A_F16] != 0:
        attend_kv_f16(q, carray(ptr_u16(row[A_K]), (KV, ctx, hd)), carray(ptr_u16(row[A_V]), (KV, ctx, hd)),
                      lo, hi, out, kv)
    else:
        attend_kv(q, carray(ptr_f32(row[A_K]), (KV, ctx, hd)), carray(ptr_f32(row[A_V]), (KV, ctx, hd)),
                  lo, hi, out, kv)


@njit(cache=_CACHE, nogil=True)
def fill_attend(table, q, k, v, p0, window, out, f16):
    """Row 0 of a one-task job: the attention of queries q [T, H, hd] at positions p0.. over the
    C-contiguous cache k/v [KV, ctx, hd] (float32, or with ``f16`` float16 as uint16) into
    out [T, H, hd]; returns its number of work items (T * KV)."""
    return fill_attend_row(table, 0, 0, q, k, v, p0, window, out, f16)


@njit(cache=_CACHE, nogil=True)
def fill_attend_row(table, i, first, q, k, v, p0, window, out, f16):
    """``fill_attend`` into row ``i`` of a job table, its work items numbered from ``first``;
    returns the number after them (several sequences' attention in one job)."""
    T, H, hd = q.shape
    KV, ctx = k.shape[0], k.shape[1]
    row = table[i]
    row[:] = 0
    row[F_KIND] = K_ATTN
    row[A_Q], row[A_K], row[A_V], row[A_OUT] = q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data
    row[A_H], row[A_HD], row[A_KV], row[A_CTX] = H, hd, KV, ctx
    row[A_P0], row[A_WINDOW], row[A_F16] = p0, window, 1 if f16 else 0
    row[F_T], row[F_FIRST] = T, first
    return first + T * KV


@njit(cache=_CACHE, nogil=True)
def attend(q, k, v, p0, window, out):
    """Causal attention of T query rows at positions p0..p0+T-1: q [T, H, hd] f32, k/v the cache
    [KV, ctx, hd] f32 already holding positions 0..p0+T-1 -> out [T, H, hd]. Each row is
    ``attend_one`` over its own keys (``window`` > 0: the last ``window``), so prefill and decode
    (T = 1, this same function) run one arithmetic per query: batch invariance."""
    for t in range(q.shape[0]):
        hi = p0 + t + 1
        lo = max(0, hi - window) if window > 0 else 0
        attend_one(q[t], k, v, lo, hi, out[t])
    return out


@njit(cache=_CACHE, nogil=True)
def attend_f16(q, k, v, p0, window, out):
    """``attend`` on a float16 cache given as uint16 bits (read in place)."""
    for t in range(q.shape[0]):
        hi = p0 + t + 1
        lo = max(0, hi - window) if window > 0 else 0
        attend_one_f16(q[t], k, v, lo, hi, out[t])
    return out


@njit(cache=_CACHE, nogil=True)
def top_k_softmax(logits, k, idx, w):
    """Top-k routing of every row: logits [T, E] float32 -> idx [T, k] (the k largest, ties to the
    lower id, NaN last: a stable descending sort's first k) and w [T, k] float32 = exp(l - l_top)
    over their sum, summed in rank order. One loop per row, so the same arithmetic at any T."""
    T, E = logits.shape
    for t in range(T):
        row = logits[t]
        for j in range(k):
            best = -1
            for e in range(E):
                taken = False
                for i in range(j):
                    if idx[t, i] == e:
                        taken = True
                if taken:
                    continue
                v = row[e]
                if best < 0 or v > row[best] or (row[best] != row[best] and v == v):
                    best = e
            idx[t, j] = best
        top = row[idx[t, 0]]
        tot = np.float32(0.0)
        for j in range(k):
            ej = np.exp(row[idx[t, j]] - top)
            w[t, j] = ej
            tot = ej if j == 0 else tot + ej
        for j in range(k):
            w[t, j] = w[t, j] / tot


@njit(cache=_CACHE, nogil=True)
def rms_norm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, float32 [T, n] (one call).

    The sum of squares in one written order (eight running sums, element i into sum i % 8, then
    paired), no fastmath: the bits cannot depend on whether LLVM inlined this into a caller (the
    decode step's one call, ``_decode_step_nb``) or compiled it on its own."""
    T, n = x.shape
    n8 = n // 8 * 8
    for t in range(T):
        xt = x[t]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
        for i in range(0, n8, 8):
            s0 += xt[i] * xt[i]
            s1 += xt[i + 1] * xt[i + 1]
            s2 += xt[i + 2] * xt[i + 2]
            s3 += xt[i + 3] * xt[i + 3]
            s4 += xt[i + 4] * xt[i + 4]
            s5 += xt[i + 5] * xt[i + 5]
            s6 += xt[i + 6] * xt[i + 6]
            s7 += xt[i + 7] * xt[i + 7]
        for i in range(n8, n):
            s0 += xt[i] * xt[i]
        ss = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
        r = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        ot = out[t]
        for i in range(n):
            ot[i] = xt[i] * r * w[i]
    return out


@njit(cache=_CACHE, nogil=True)
def rope_row(x, cos, sin, p):
    """Rotary embedding of every head of one position, in place: x [heads, hd] float32, pair i
    (x[2i], x[2i+1]) for i < cos.shape[1] (the rotated dims / 2) turned by the angle of position
    ``p`` (cos / sin [P, rd/2]): the complex product (a + ib)(c + is), each part rounded once."""
    half = cos.shape[1]
    for hh in range(x.shape[0]):
        r = x[hh]
        for i in range(half):
            a, b = r[2 * i], r[2 * i + 1]
            c, s = cos[p, i], sin[p, i]
            r[2 * i] = a * c - b * s
            r[2 * i + 1] = a * s + b * c


@njit(cache=_CACHE, nogil=True)
def rope(x, cos, sin, pos):
    """``rope_row`` of each token: x [T, heads, hd] float32 at positions pos [T] (int64)."""
    for t in range(x.shape[0]):
        rope_row(x[t], cos, sin, pos[t])
    return x
