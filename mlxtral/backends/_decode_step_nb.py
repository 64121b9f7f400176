"""numba side of :mod:`mlxtral.backends.decode_step`: one token through every layer in one call.

Each step is the kernel the layer-by-layer path calls for it (``rms_norm``, ``run_decode`` for
q/k/v, the output projection and the experts' two halves, ``rope_row``, ``fill_attend`` on the
pool or the serial ``attend``, the router's F32 row dot, ``top_k_softmax``), with the same inputs
and, where NumPy did the arithmetic (residual adds, the rank-order combine), the same float32
operations in the same order: the bits of ``NumpyBackend._layers`` at T = 1, without its ~100 us
of Python a layer. ``decode_batch`` is the same pass for several sequences, a token each.
A layer is made of ``attention_layer``, ``route``, ``gate_up``, ``down`` and ``combine``;
``decode_part`` (and by rows ``decode_down``) run them a layer a call for an expert-parallel rank,
whose layers wait for a collective between their experts and their combine; ``batch_part`` /
``batch_down`` / ``batch_combine`` are the same for ``decode_batch``, which is built from them.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit

from mlxtral.backends._kernels_ir import ptr_f32, ptr_u16
from mlxtral.backends._kernels_nb import (
    _CACHE,
    F_SIZE,
    MAX_CHUNKS,
    R_KIND,
    R_OUT,
    R_SIZE,
    R_TWIN,
    R_W,
    R_W2,
    R_X0,
    _float_dot,
    attend,
    attend_f16,
    execute,
    fill_attend,
    fill_attend_row,
    rms_norm,
    rope_row,
    run_decode,
    run_job,
    task,
    top_k_softmax,
)

# a layer's row of the plan (int64): addresses of its norms and its router (0: a dense model)
P_ATTN_NORM, P_FFN_NORM, P_ROUTER = 0, 1, 2
P_SIZE = 3
# a product's row of a run_decode table (activation row, weight, up weight, row bytes, rows, rows
# a work item), then its block kind, and its rows a work item at 2 .. STREAM_T tokens and at more
D_X, D_W, D_W2, D_RB, D_NOUT, D_CH, D_KIND, D_CH2, D_CH3 = 0, 1, 2, 3, 4, 5, 6, 7, 8
D_SIZE = 9
# an expert's row of the experts table: gate, up, down addresses; kinds, row bytes and rows a work
# item of gate/up (one kind for both) and of down; then those rows at 2 .. STREAM_T tokens, and more
X_G, X_U, X_D, X_KGU, X_KD, X_RBGU, X_RBD, X_CHGU, X_CHD = 0, 1, 2, 3, 4, 5, 6, 7, 8
X_CHGU2, X_CHD2, X_CHGU3, X_CHD3 = 9, 10, 11, 12
# then where down is cut in two (ops.down_split; 0: whole) and the byte offset of its second half
X_SPLIT, X_BOFF = 13, 14
X_SIZE = 15


@njit(cache=_CACHE, nogil=True, inline="always")
def quantized(kind, exact):
    """Block kinds take int8 activations unless ``exact``; float kinds (F32, F16, BF16) never."""
    return not exact and kind != 3 and kind != 4 and kind != 5


@njit(cache=_CACHE, nogil=True)
def run_kinds(ctl, X, exact, swiglu, desc, out):
    """``run_decode`` of the products of desc [n, D_SIZE] into out [their rows, end to end], one
    job per run of products of one kind (a Q4_K_M layer's q and k, then its Q6_K v)."""
    n = desc.shape[0]
    i = off = 0
    while i < n:
        kind = desc[i, D_KIND]
        j, rows = i, 0
        while j < n and desc[j, D_KIND] == kind:
            rows += desc[j, D_NOUT]
            j += 1
        run_decode(ctl, X, quantized(kind, exact), kind, swiglu, desc[i:j], out[off : off + rows])
        i, off = j, off + rows


@njit(cache=_CACHE, nogil=True)
def f16_bits(src, dst):
    """float32 src [n] -> IEEE half bits dst [n] (uint16), rounded to nearest even as NumPy's
    ``astype(np.float16)`` (``npy_floatbits_to_halfbits``): overflow to signed inf, underflow
    to subnormals and signed zero, NaN kept a NaN."""
    u = src.view(np.uint32)
    for i in range(src.shape[0]):
        f = np.uint32(u[i])
        sgn = np.uint32((f & np.uint32(0x80000000)) >> np.uint32(16))
        fe = f & np.uint32(0x7F800000)
        fs = f & np.uint32(0x007FFFFF)
        if fe >= np.uint32(0x47800000):  # inf, NaN, or too large: signed inf (NaN stays NaN)
            h = np.uint32(0x7C00)
            if fe == np.uint32(0x7F800000) and fs != 0:
                h = np.uint32(0x7C00) + (fs >> np.uint32(13))
                if h == np.uint32(0x7C00):
                    h += np.uint32(1)
        elif fe <= np.uint32(0x38000000):  # a subnormal half or signed zero
            if fe < np.uint32(0x33000000):
                h = np.uint32(0)
            else:
                e = fe >> np.uint32(23)
                sig = (np.uint32(0x00800000) + fs) >> (np.uint32(113) - e)
                if (sig & np.uint32(0x3FFF)) != np.uint32(0x1000) or (f & np.uint32(0x7FF)) != 0:
                    sig += np.uint32(0x1000)
                h = sig >> np.uint32(13)
        else:
            sig = fs
            if (sig & np.uint32(0x3FFF)) != np.uint32(0x1000):
                sig += np.uint32(0x1000)
            h = (sig >> np.uint32(13)) + ((fe - np.uint32(0x38000000)) >> np.uint32(13))
        dst[i] = np.uint16(sgn + h)


@njit(cache=_CACHE, nogil=True)
def store_and_attend(ka, va, f16, shape, li, p0, k, v, q, window, att, pool, ctl, table):
    """Write position p0's k / v [KV, hd] into layer li of the cache at addresses ka / va (shape
    [L, KV, ctx, hd], float32, or with ``f16`` float16 bits as NumPy casts them), then attend
    q [1, H, hd] over it into att [1, H, hd]: on the pool, or serially, as ``kernels.attend``."""
    if f16:
        kh = carray(ptr_u16(ka), shape)
        vh = carray(ptr_u16(va), shape)
        for j in range(k.shape[0]):
            f16_bits(k[j], kh[li, j, p0])
            f16_bits(v[j], vh[li, j, p0])
        if pool:
            execute(ctl, table, fill_attend(table, q, kh[li], vh[li], p0, window, att, True))
        else:
            attend_f16(q, kh[li], vh[li], p0, window, att)
    else:
        kf = carray(ptr_f32(ka), shape)
        vf = carray(ptr_f32(va), shape)
        kf[li, :, p0, :] = k
        vf[li, :, p0, :] = v
        if pool:
            execute(ctl, table, fill_attend(table, q, kf[li], vf[li], p0, window, att, False))
        else:
            attend(q, kf[li], vf[li], p0, window, att)


@njit(cache=_CACHE, nogil=True)
def attention_layer(ctl, h, P, qkv, wo, li, ka, va, f16, shape, p0, window, cos, sin, eps, exact, pool,
                    x, y, att, o, table):
    """Layer li's attention block on the token's hidden state h [1, dim], in place: the norm,
    q/k/v (run_decode tables qkv [3, D_SIZE]), RoPE at p0, k / v into layer li of the cache (see
    ``store_and_attend``), attention, the output projection (wo [1, D_SIZE]) and the residual.
    x [1, dim], y [nq + 2 nkv], att [1, H, hd], o [dim], table [1, F_SIZE]: scratch."""
    dim = h.shape[1]
    KV, hd = shape[1], shape[3]
    nq, nkv = qkv[0, D_NOUT], qkv[1, D_NOUT]
    rms_norm(h, carray(ptr_f32(P[P_ATTN_NORM]), (dim,)), eps, x)
    run_kinds(ctl, x, exact, False, qkv, y)
    q = y[:nq].reshape((1, nq // hd, hd))
    k = y[nq : nq + nkv].reshape((KV, hd))
    v = y[nq + nkv :].reshape((KV, hd))
    rope_row(q[0], cos, sin, p0)
    rope_row(k, cos, sin, p0)
    store_and_attend(ka, va, f16, shape, li, p0, k, v, q, window, att, pool, ctl, table)
    run_kinds(ctl, att.reshape((1, nq)), exact, False, wo, o)
    for d in range(dim):
        h[0, d] += o[d]


@njit(cache=_CACHE, nogil=True)
def route(h, P, eps, x, logits, idx, w):
    """The FFN's norm of h [1, dim] into x, and (a MoE layer) the router: the token's top
    idx [1, top] experts and their weights w [1, top] (a dense layer keeps expert 0, weight 1)."""
    dim, E = h.shape[1], logits.shape[1]
    rms_norm(h, carray(ptr_f32(P[P_FFN_NORM]), (dim,)), eps, x)
    if P[P_ROUTER] != 0:  # the router's F32 rows, as kernels.linear dots them
        for e in range(E):
            logits[0, e] = _float_dot(3, P[P_ROUTER] + e * dim * 4, x.ctypes.data, dim)
        top_k_softmax(logits, idx.shape[1], idx, w)


@njit(cache=_CACHE, nogil=True)
def gate_up(ctl, x, X, idx, mine, counts, hidden, exact, gu):
    """silu(gate) * up of the token's experts idx [1, top] (X [E, X_SIZE] their layer's rows of
    the experts table) that this process holds (``mine`` [E]) on x [1, dim], rank order, into
    rows of gu [top * hidden]; returns how many. counts [E] += 1 for every expert the token uses."""
    top = idx.shape[1]
    desc = np.empty((top, D_SIZE), dtype=np.int64)
    n = 0
    for j in range(top):
        e = idx[0, j]
        counts[e] += 1
        if not mine[e]:
            continue
        R = X[e]
        desc[n, D_X], desc[n, D_W], desc[n, D_W2], desc[n, D_KIND] = 0, R[X_G], R[X_U], R[X_KGU]
        desc[n, D_RB], desc[n, D_NOUT], desc[n, D_CH] = R[X_RBGU], hidden, R[X_CHGU]
        n += 1
    run_kinds(ctl, x, exact, True, desc[:n], gu)
    return n


@njit(cache=_CACHE, nogil=True)
def down_tasks(ctl, X, exact, dt, s, boff, out):
    """``run_tasks`` of down projections dt [n, R_SIZE] on X [P, hidden] into out (zeros where no
    task writes), each cut at column ``s`` as ``ops.down_experts`` cuts it (0: whole): its first
    half on X[:, :s], its second on X[:, s:] against its weight ``boff[i]`` bytes on (the offset
    of column s in a row of its block type), out = lo + hi. Equal halves run in one job, X's halves
    stacked [2P, s] and each second half the twin of its first (a row's halves read together);
    unequal ones in two."""
    n = dt.shape[0]
    if n == 0:
        return
    if s == 0:
        run_tasks(ctl, X, exact, False, dt, out)
        return
    P, H = X.shape
    m = out.shape[0]
    buf = np.zeros(2 * m, dtype=np.float32)  # [lo | hi]
    hi = dt.copy()
    for i in range(n):
        hi[i, R_W] += boff[i]
        hi[i, R_W2] += boff[i]
        hi[i, R_OUT] += m
    if 2 * s == H:
        X2 = np.empty((2 * P, s), dtype=np.float32)
        X2[:P] = X[:, :s]
        X2[P:] = X[:, s:]
        both = np.empty((2 * n, R_SIZE), dtype=np.int64)
        for i in range(n):
            hi[i, R_X0] += P
            hi[i, R_TWIN] = 1
            both[2 * i] = dt[i]
            both[2 * i + 1] = hi[i]
        run_tasks(ctl, X2, exact, False, both, buf)
    else:
        run_tasks(ctl, np.ascontiguousarray(X[:, :s]), exact, False, dt, buf)
        run_tasks(ctl, np.ascontiguousarray(X[:, s:]), exact, False, hi, buf)
    for i in range(m):
        out[i] = buf[i] + buf[m + i]


@njit(cache=_CACHE, nogil=True)
def down(ctl, gu, X, idx, mine, dout, exact, dn):
    """The down projections (``dout`` rows each) of the token's experts this process holds, on
    gu [n, hidden] (``gate_up``'s rows, rank order): expert rank j's output in row j of
    dn [top * dout]; the other ranks' rows 0 (another process fills them)."""
    top = idx.shape[1]
    dt = np.empty((top, R_SIZE), dtype=np.int64)
    boff = np.empty(top, dtype=np.int64)
    n = cut = 0
    for j in range(top):
        e = idx[0, j]
        if not mine[e]:
            continue
        R = X[e]
        task(dt[n], n, 1, R[X_D], R[X_D], R[X_RBD], dout, R[X_KD], n * dout, R[X_CHD])
        cut, boff[n] = R[X_SPLIT], R[X_BOFF]  # cut: the same for every expert (down_split of the width)
        n += 1
    down_tasks(ctl, gu[:n], exact, dt[:n], cut, boff[:n], dn[: n * dout])  # [n, dout]
    if n < top:  # spread to rank order, from the last (row n - 1 -> j >= n - 1)
        for j in range(top - 1, -1, -1):
            if mine[idx[0, j]]:
                n -= 1
                if n != j:
                    dn[j * dout : (j + 1) * dout] = dn[n * dout : (n + 1) * dout]
            else:
                dn[j * dout : (j + 1) * dout] = 0.0


@njit(cache=_CACHE, nogil=True)
def combine(h, dn, w):
    """:func:`batch_combine` for one token, whose expert outputs dn [top * dim] are in rank order
    (weights w [1, top], h [1, dim])."""
    batch_combine(h, dn, w, np.arange(w.shape[1]).reshape(1, w.shape[1]))


@njit(cache=_CACHE, nogil=True)
def decode_layers(ctl, threads, h, plan, qkv, wo, experts, hidden, top, ka, va, f16, shape, p0, window,
                  cos, sin, counts, eps, exact):
    """The token's hidden state h [1, dim] through every layer at position ``p0``, in place.

    plan [L, P_SIZE]; qkv [L, 3, D_SIZE] and wo [L, 1, D_SIZE]: run_decode tables of q/k/v and
    the output projection; experts [L, E, X_SIZE]: each expert's weights; ``hidden`` their
    width, ``top`` the experts a token uses (a dense model: E = top = 1, no router). ka / va the
    addresses of the cache's k / v, ``shape`` [L, KV, ctx, hd], float32 or (``f16``) float16:
    position p0 is written. cos / sin [P, rd/2] the rotary
    tables; counts [L, E] the tokens each expert saw (incremented); window 0: none."""
    mine = np.ones(experts.shape[1], dtype=np.bool_)
    idx = np.zeros((1, top), dtype=np.int64)
    w = np.ones((1, top), dtype=np.float32)
    gu = np.empty(top * hidden, dtype=np.float32)
    dn = np.empty(top * h.shape[1], dtype=np.float32)
    for li in range(plan.shape[0]):
        decode_part(ctl, threads, h, plan, qkv, wo, experts, hidden, ka, va, f16, shape, p0, window,
                    cos, sin, counts, eps, exact, li, False, mine, idx, w, gu, dn, True)
        combine(h, dn, w)
    return h


@njit(cache=_CACHE, nogil=True)
def decode_part(ctl, threads, h, plan, qkv, wo, experts, hidden, ka, va, f16, shape, p0, window,
                cos, sin, counts, eps, exact, li, first, mine, idx, w, gu, dn, down_too):
    """A layer of ``decode_layers`` up to its experts' outputs, for expert parallel: with ``first``,
    first the previous layer's combine (dn and w, dn completed by the other processes); then,
    if li < L, layer li's attention, routing (into idx / w [1, top]), gate and up of the experts
    this process holds (``mine`` [E]) into gu [top * hidden] and, with ``down_too``, their down
    projections into dn [top * dim] in rank order, 0 where another process's expert goes (by
    rows, :func:`decode_down` runs them on every process's gate/up columns put together)."""
    L, dim = plan.shape[0], h.shape[1]
    if first:
        combine(h, dn, w)
    if li >= L:
        return h
    KV, hd = shape[1], shape[3]
    nq, nkv = qkv[0, 0, D_NOUT], qkv[0, 1, D_NOUT]
    x = np.empty((1, dim), dtype=np.float32)  # a normed hidden state
    y = np.empty(nq + 2 * nkv, dtype=np.float32)  # q | k | v
    att = np.empty((1, nq // hd, hd), dtype=np.float32)
    o = np.empty(dim, dtype=np.float32)  # the attention's output projection
    logits = np.empty((1, experts.shape[1]), dtype=np.float32)
    table = np.empty((1, F_SIZE), dtype=np.int64)
    pool_attention = threads > 1 and 1 < KV <= MAX_CHUNKS  # as kernels.attend chooses
    P = plan[li]
    attention_layer(ctl, h, P, qkv[li], wo[li], li, ka, va, f16, shape, p0, window, cos, sin, eps, exact,
                    pool_attention, x, y, att, o, table)
    idx[0, :] = 0  # a dense model's one expert, weight 1
    w[0, :] = 1.0
    route(h, P, eps, x, logits, idx, w)
    n = gate_up(ctl, x, experts[li], idx, mine, counts[li], hidden, exact, gu)
    if down_too:
        down(ctl, gu[: n * hidden].reshape((n, hidden)), experts[li], idx, mine, dim, exact, dn)
    # read by address while execute ran: used after it, so numba frees none of them before
    table[0, 0] = table[0, 0]
    att[0, 0, 0] = att[0, 0, 0]
    return h


@njit(cache=_CACHE, nogil=True)
def decode_down(ctl, experts, li, idx, mine, gu, dout, exact, dn):
    """Expert parallel by rows: layer li's down projections (this process's ``dout`` rows of each)
    of the token's experts idx [1, top] on gu [top, hidden] (every process's gate/up columns put
    together) into dn [top * dout], rank order."""
    down(ctl, gu, experts[li], idx, mine, dout, exact, dn)


# ---- several sequences, a token each ------------------------------------------------------------
@njit(cache=_CACHE, nogil=True, inline="always")
def chunk_rows(T, ch1, ch2, ch3, stream_t):
    """Rows a work item at T tokens, as ``kernels._winfo`` picks them (1; 2 .. stream_t; more)."""
    return ch1 if T == 1 else (ch2 if T <= stream_t else ch3)


@njit(cache=_CACHE, nogil=True)
def run_tasks(ctl, X, exact, swiglu, desc, out):
    """Tasks of several tokens each (``tasks_job`` rows desc [n, R_SIZE]): one ``run_job`` per run of
    tasks of one kind, X quantized once for it, row by row (as ``kernels._Job`` quantizes each
    task's rows: the same bits)."""
    n = desc.shape[0]
    i = 0
    while i < n:
        kind = desc[i, R_KIND]
        j = i
        while j < n and desc[j, R_KIND] == kind:
            j += 1
        run_job(ctl, X, quantized(kind, exact), kind, swiglu, desc[i:j], out)
        i = j


@njit(cache=_CACHE, nogil=True)
def products(desc, T, stream_t, tasks):
    """A layer's run_decode rows desc [n, D_SIZE] -> tasks_job rows ``tasks`` [n, R_SIZE]: every
    product on rows 0 .. T of one X, outputs [T, rows] end to end."""
    off = 0
    for i in range(desc.shape[0]):
        d = desc[i]
        task(tasks[i], 0, T, d[D_W], d[D_W2], d[D_RB], d[D_NOUT], d[D_KIND], off,
             chunk_rows(T, d[D_CH], d[D_CH2], d[D_CH3], stream_t))
        off += T * d[D_NOUT]


@njit(cache=_CACHE, nogil=True)
def store_and_attend_rows(ka, va, f16, L, ctx, li, p0, k, v, q, window, att, pool, ctl, table):
    """``store_and_attend`` for B sequences, one query row each: row b's k / v [B, KV, hd] into its
    own cache (addresses ka[b] / va[b], [L, KV, ctx[b], hd]) at position p0[b], then its q [B, H, hd]
    over that cache into att [B, H, hd]: every row in one pool job, or serially."""
    B, KV, hd = k.shape
    first = 0
    for b in range(B):
        shape = (L, KV, ctx[b], hd)
        p = p0[b]
        if f16:
            kh = carray(ptr_u16(ka[b]), shape)
            vh = carray(ptr_u16(va[b]), shape)
            for j in range(KV):
                f16_bits(k[b, j], kh[li, j, p])
                f16_bits(v[b, j], vh[li, j, p])
            if pool:
                first = fill_attend_row(table, b, first, q[b : b + 1], kh[li], vh[li], p, window,
                                        att[b : b + 1], True)
            else:
                attend_f16(q[b : b + 1], kh[li], vh[li], p, window, att[b : b + 1])
        else:
            kf = carray(ptr_f32(ka[b]), shape)
            vf = carray(ptr_f32(va[b]), shape)
            kf[li, :, p, :] = k[b]
            vf[li, :, p, :] = v[b]
            if pool:
                first = fill_attend_row(table, b, first, q[b : b + 1], kf[li], vf[li], p, window,
                                        att[b : b + 1], False)
            else:
                attend(q[b : b + 1], kf[li], vf[li], p, window, att[b : b + 1])
    if pool:
        execute(ctl, table, first)


@njit(cache=_CACHE, nogil=True)
def decode_batch(ctl, threads, h, plan, qkv, wo, experts, hidden, top, ka, va, f16, KV, hd, ctx, p0, window,
                 cos, sin, counts, eps, exact, stream_t):
    """``decode_layers`` for B sequences, a token each: h [B, dim] their hidden states, in place;
    sequence b at position p0[b] of its own cache (addresses ka[b] / va[b], [L, KV, ctx[b], hd],
    float32 or with ``f16`` float16, every one alike). Each product runs once on all B rows
    (q/k/v, the output projection), each expert on the rows routed to it (its weights stream
    once for the batch). A row's arithmetic is its own decode step's (the kernels are
    batch-invariant) and each token's experts combine in rank order, so row b gets the bits
    ``decode_layers`` gives it alone. ``stream_t``: ``kernels._STREAM_T``."""
    B, dim = h.shape
    E = experts.shape[1]
    mine = np.ones(E, dtype=np.bool_)
    idx = np.zeros((B, top), dtype=np.int64)
    w = np.ones((B, top), dtype=np.float32)
    slot = np.zeros((B, top), dtype=np.int64)
    n_e = np.zeros(E, dtype=np.int64)
    gu = np.empty(B * top * hidden, dtype=np.float32)
    dn = np.empty(B * top * dim, dtype=np.float32)
    for li in range(plan.shape[0]):
        batch_part(ctl, threads, h, plan, qkv, wo, experts, hidden, ka, va, f16, KV, hd, ctx, p0, window,
                   cos, sin, counts, eps, exact, stream_t, li, False, mine, idx, w, slot, n_e, gu, dn, True)
        batch_combine(h, dn, w, slot)
    return h


@njit(cache=_CACHE, nogil=True)
def batch_combine(h, dn, w, slot):
    """``combine`` for B rows: row b's (token, rank) outputs are rows slot[b, j] of dn [B * top * dim]
    (grouped by expert); ops.combine's y_0 + sum_j>0 w_j (y_j - y_0), then the residual."""
    B, dim = h.shape
    top = w.shape[1]
    for b in range(B):
        s0 = slot[b, 0] * dim
        for d in range(dim):
            m = dn[s0 + d]
            for j in range(1, top):
                m += w[b, j] * (dn[slot[b, j] * dim + d] - dn[s0 + d])
            h[b, d] += m


@njit(cache=_CACHE, nogil=True)
def batch_part(ctl, threads, h, plan, qkv, wo, experts, hidden, ka, va, f16, KV, hd, ctx, p0, window,
               cos, sin, counts, eps, exact, stream_t, li, first, mine, idx, w, slot, n_e, gu, dn, down_too):
    """A layer of ``decode_batch`` up to its experts' outputs (``decode_part`` for B sequences): with
    ``first``, first the previous layer's combine (``batch_combine``: dn, w and slot, dn completed by
    the other processes); then, if li < L, layer li's attention for every row, routing (into idx /
    w [B, top]), the (token, rank) pairs grouped by expert (row slot[b, j] of the group, n_e [E] the
    pairs of each expert), the gate and up of the experts this process holds (``mine`` [E]) into
    those rows of gu [B * top * hidden] and, with ``down_too``, their down projections into rows of
    dn [B * top * dim], 0 where another process's expert goes (by rows, :func:`batch_down` runs
    them on every process's gate/up columns put together)."""
    B, dim = h.shape
    L, E = plan.shape[0], experts.shape[1]
    if first:
        batch_combine(h, dn, w, slot)
    if li >= L:
        return h
    top = idx.shape[1]
    nq, nkv = qkv[0, 0, D_NOUT], qkv[0, 1, D_NOUT]
    H = nq // hd
    x = np.empty((B, dim), dtype=np.float32)  # the normed hidden states
    y = np.empty(B * (nq + 2 * nkv), dtype=np.float32)  # q [B, nq] | k [B, nkv] | v [B, nkv]
    att = np.empty((B, H, hd), dtype=np.float32)
    o = np.empty(B * dim, dtype=np.float32)  # the attention's output projection [B, dim]
    logits = np.empty((B, E), dtype=np.float32)
    xe = np.empty((B * top, dim), dtype=np.float32)  # x's rows grouped by expert, ascending
    start = np.zeros(E, dtype=np.int64)
    pt3 = np.empty((3, R_SIZE), dtype=np.int64)
    pt1 = np.empty((1, R_SIZE), dtype=np.int64)
    gt = np.empty((E, R_SIZE), dtype=np.int64)
    dt = np.empty((E, R_SIZE), dtype=np.int64)
    table = np.empty((B, F_SIZE), dtype=np.int64)
    pool_attention = threads > 1  # as kernels.attend_runs chooses for several sequences
    P = plan[li]
    rms_norm(h, carray(ptr_f32(P[P_ATTN_NORM]), (dim,)), eps, x)
    products(qkv[li], B, stream_t, pt3)
    run_tasks(ctl, x, exact, False, pt3, y)
    q = y[: B * nq].reshape((B, H, hd))
    k = y[B * nq : B * (nq + nkv)].reshape((B, KV, hd))
    v = y[B * (nq + nkv) :].reshape((B, KV, hd))
    for b in range(B):
        rope_row(q[b], cos, sin, p0[b])
        rope_row(k[b], cos, sin, p0[b])
    store_and_attend_rows(ka, va, f16, L, ctx, li, p0, k, v, q, window, att, pool_attention, ctl, table)
    products(wo[li], B, stream_t, pt1)
    run_tasks(ctl, att.reshape((B, nq)), exact, False, pt1, o)
    for b in range(B):
        for d in range(dim):
            h[b, d] += o[b * dim + d]
    rms_norm(h, carray(ptr_f32(P[P_FFN_NORM]), (dim,)), eps, x)
    idx[:, :] = 0  # a dense model's one expert, weight 1
    w[:, :] = 1.0
    if P[P_ROUTER] != 0:  # the router's F32 rows, as kernels.linear dots them
        for b in range(B):
            for e in range(E):
                logits[b, e] = _float_dot(3, P[P_ROUTER] + e * dim * 4, x.ctypes.data + b * dim * 4, dim)
        top_k_softmax(logits, top, idx, w)
    # group the (token, rank) pairs by expert, each expert's tokens in order (as kernels get them)
    n_e[:] = 0
    for b in range(B):
        for j in range(top):
            n_e[idx[b, j]] += 1
    s = 0
    for e in range(E):
        start[e] = s
        s += n_e[e]
        counts[li, e] += n_e[e]
    for b in range(B):
        for j in range(top):
            e = idx[b, j]
            slot[b, j] = start[e]
            xe[start[e]] = x[b]
            start[e] += 1
    ne = cut = 0
    boff = np.empty(E, dtype=np.int64)
    for e in range(E):
        T = n_e[e]
        r0 = start[e] - T  # its rows r0 .. r0 + T of xe
        if T == 0:
            continue
        if not mine[e]:  # another process's expert: its rows of dn are 0 (the sum fills them)
            if down_too:
                dn[r0 * dim : (r0 + T) * dim] = 0.0
            continue
        X = experts[li, e]
        task(gt[ne], r0, T, X[X_G], X[X_U], X[X_RBGU], hidden, X[X_KGU], r0 * hidden,
             chunk_rows(T, X[X_CHGU], X[X_CHGU2], X[X_CHGU3], stream_t))
        task(dt[ne], r0, T, X[X_D], X[X_D], X[X_RBD], dim, X[X_KD], r0 * dim,
             chunk_rows(T, X[X_CHD], X[X_CHD2], X[X_CHD3], stream_t))
        cut, boff[ne] = X[X_SPLIT], X[X_BOFF]
        ne += 1
    run_tasks(ctl, xe, exact, True, gt[:ne], gu)
    if down_too:
        down_tasks(ctl, gu.reshape((B * top, hidden)), exact, dt[:ne], cut, boff[:ne], dn[: B * top * dim])
    # read by address while execute ran: used after it, so numba frees none of them before
    table[0, 0] = table[0, 0]
    att[0, 0, 0] = att[0, 0, 0]
    return h


@njit(cache=_CACHE, nogil=True)
def batch_down(ctl, experts, li, n_e, mine, gu, dout, exact, stream_t, dn):
    """Expert parallel by rows, B sequences: layer li's down projections (this process's ``dout`` rows
    of each) of the pairs ``batch_part`` grouped by expert (n_e [E] each expert's), on gu
    [B * top, hidden] (every process's gate/up columns put together) into dn [B * top * dout]."""
    E = n_e.shape[0]
    dt = np.empty((E, R_SIZE), dtype=np.int64)
    ne = cut = 0
    boff = np.empty(E, dtype=np.int64)
    r0 = 0
    for e in range(E):
        T = n_e[e]
        if T > 0 and mine[e]:
            X = experts[li, e]
            task(dt[ne], r0, T, X[X_D], X[X_D], X[X_RBD], dout, X[X_KD], r0 * dout,
                 chunk_rows(T, X[X_CHD], X[X_CHD2], X[X_CHD3], stream_t))
            cut, boff[ne] = X[X_SPLIT], X[X_BOFF]
            ne += 1
        r0 += T
    down_tasks(ctl, gu, exact, dt[:ne], cut, boff[:ne], dn[: gu.shape[0] * dout])
