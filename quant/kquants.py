"""GGUF K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), bit-exact ports of llama.cpp's.

llama.cpp's ``ggml_quantize_chunk`` without an importance matrix calls ``quantize_q*_K``, which for
``quant_weights == NULL`` runs the reference row functions ``quantize_row_q*_K_ref`` of
``ggml/src/ggml-quants.c`` (with ``make_qkx2_quants``, ``make_q3_quants``, ``make_qx_quants`` and
``nearest_int``). This module runs the same float32 operations in the same order (numba, no
fast-math, so no reassociation and no FMA contraction: libggml-base is built for baseline x86-64,
without FMA), the same float16 rounding of ``d``/``dmin`` (round to nearest even) and the same
integer wrap-arounds, so its bytes equal llama.cpp's (checked against its library and a committed
golden fixture).

Super-blocks of 256 weights along a row; byte layouts (offsets in a block):

- ``Q2_K`` (84 B): scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), f16 d, f16 dmin.
- ``Q3_K`` (110 B): hmask[32], qs[64] (low 2 bits), scales[12] (16 x 6 bits), f16 d.
- ``Q4_K`` (144 B): f16 d, f16 dmin, scales[12] (8 x 6-bit scale and min), qs[128] (4 bits).
- ``Q5_K`` (176 B): f16 d, f16 dmin, scales[12], qh[32] (5th bit), qs[128] (low 4 bits).
- ``Q6_K`` (210 B): ql[128], qh[64], int8 scales[16], f16 d.

Speed: the costly searches (``make_qkx2_quants``' 16-21 trial scales per sub-block, ``make_qx_quants``'
19) run over many sub-blocks at once, one per SIMD lane (``*_lanes``), with per lane exactly the C
code's operations in its order; sub-blocks whose rounding arguments could leave ``nearest_int``'s
exact range (degenerate ranges, subnormals) are redone by the scalar port. ~150-250 MB/s of float32
per thread on the 2-core dev machine (llama.cpp's own: 65-370 MB/s), see
benchmarks/bench_quantize.py. Non-finite inputs give meaningless blocks (in llama.cpp too; ours then
still equal its bytes).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

QK_K = 256
KQUANT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

_F = np.float32
_MAGIC = _F(12582912.0)  # 1.5 * 2**23: nearest_int's rounding constant
_EPS = _F(1e-15)  # GROUP_MAX_EPS
_ZERO = _F(0.0)
_ONE = _F(1.0)


# ---- scalar helpers (float32 semantics of the C code) -------------------------------------

@njit(cache=True, nogil=True, error_model="numpy")
def _nint_slow(f):
    """``nearest_int`` for |f| > 4194303 or NaN: the C bit trick, reproduced on the float's bits."""
    buf = np.empty(1, np.float32)
    buf[0] = f + _MAGIC
    i = np.int64(buf.view(np.int32)[0])
    return (i & 0x007FFFFF) - 0x00400000


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _nint(f):
    """ggml's ``nearest_int`` of a float32: round half to even in range, the bit trick beyond."""
    if abs(f) <= 4194303.0:
        return np.int64(np.rint(f))
    return _nint_slow(f)


@njit(cache=True, nogil=True, error_model="numpy")
def _to_half(v):
    """float32 -> (float16 bits, its value as float32), round to nearest even like ggml."""
    neg = math.copysign(1.0, v) < 0.0
    a = abs(np.float64(v))
    if a != a:
        return (0xFE00 if neg else 0x7E00), np.float32(np.nan)
    if a < 6.103515625e-05:  # subnormal range: multiples of 2**-24
        m = np.rint(a * 16777216.0)
        bits = np.int64(m)
        val = m / 16777216.0
    elif a == np.inf:
        bits = 0x7C00
        val = np.inf
    else:
        mant, e = math.frexp(a)  # a = mant * 2**e, mant in [0.5, 1)
        m = np.rint(mant * 2048.0)  # 1024..2048
        bits = ((e + 14) << 10) + np.int64(m) - 1024
        if bits >= 0x7C00:
            bits = 0x7C00
            val = np.inf
        else:
            val = math.ldexp(m, e - 11)
    if neg:
        bits |= 0x8000
        val = -val
    return bits, np.float32(val)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _put_half(out, off, bits):
    out[off] = bits & 0xFF
    out[off + 1] = (bits >> 8) & 0xFF


@njit(cache=True, nogil=True, error_model="numpy")
def _make_qkx2(x, n, nmax, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """``make_qkx2_quants`` -> (scale, the_min); fills ``L[:n]`` (``x``: float32 [n])."""
    fnmax = np.float32(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > _ZERO:
        mn = _ZERO
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _ZERO, -mn
    iscale = fnmax / (mx - mn)
    scale = _ONE / iscale
    best_error = _ZERO
    for i in range(n):
        li = _nint(iscale * (x[i] - mn))
        li = max(0, min(nmax, li))
        L[i] = li
        diff = scale * np.float32(li) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fnmax) / (mx - mn)
        sum_l = _ZERO
        sum_l2 = _ZERO
        sum_xl = _ZERO
        for i in range(n):
            li = _nint(iscale * (x[i] - mn))
            li = max(0, min(nmax, li))
            Laux[i] = li
            w = weights[i]
            fl = np.float32(li)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _ZERO:
                this_min = _ZERO
                this_scale = sum_xl / sum_l2
            cur_error = _ZERO
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, nogil=True, error_model="numpy")
def _qkx2_lanes(x, w, nmax, rmin, rdelta, nstep, use_mad, L, scale_out, min_out):
    """``make_qkx2_quants`` on G sub-blocks at once, one per SIMD lane (same float32 operations
    per lane as :func:`_make_qkx2`).

    x, w: float32 [n, G] (sub-block g is column g); fills L float32 [n, G] (the levels) and
    scale_out / min_out float32 [G]. Lanes where the fast path could differ from the C code (a
    degenerate range, or a rounding argument beyond ``nearest_int``'s exact range) are redone with
    the scalar :func:`_make_qkx2`.
    """
    n, G = x.shape
    fnmax = np.float32(nmax)
    mn = x[0].copy()
    mx = x[0].copy()
    sum_w = w[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, n):
        xi = x[i]
        wi = w[i]
        for g in range(G):
            v = xi[g]
            mn[g] = v if v < mn[g] else mn[g]
            mx[g] = v if v > mx[g] else mx[g]
            sum_w[g] += wi[g]
            sum_x[g] += wi[g] * v
    lo = mn.copy()  # the data minimum: |x - min| <= max(|max - min|, |lo - min|)
    safe = np.empty(G, np.bool_)
    isc = np.empty(G, np.float32)
    scale = np.empty(G, np.float32)
    best = np.zeros(G, np.float32)
    for g in range(G):
        if mn[g] > _ZERO:
            mn[g] = _ZERO
        isc[g] = fnmax / (mx[g] - mn[g])
        scale[g] = _ONE / isc[g]
        bound = abs(isc[g]) * max(abs(mx[g] - mn[g]), abs(lo[g] - mn[g]))
        safe[g] = mx[g] != mn[g] and bound <= 4194303.0
    for i in range(n):
        xi = x[i]
        wi = w[i]
        Li = L[i]
        for g in range(G):
            v = xi[g]
            q = np.rint(isc[g] * (v - mn[g]))
            q = q if q > _ZERO else _ZERO
            q = q if q < fnmax else fnmax
            Li[g] = q
            diff = scale[g] * q + mn[g] - v
            diff = abs(diff) if use_mad else diff * diff
            best[g] += wi[g] * diff
    if nstep >= 1:
        Laux = np.empty((n, G), np.float32)
        sl = np.empty(G, np.float32)
        sl2 = np.empty(G, np.float32)
        sxl = np.empty(G, np.float32)
        ts = np.empty(G, np.float32)
        tm = np.empty(G, np.float32)
        cur = np.empty(G, np.float32)
        ok = np.empty(G, np.bool_)
        for step in range(nstep + 1):
            num = rmin + rdelta * np.float32(step) + fnmax
            for g in range(G):
                isc[g] = num / (mx[g] - mn[g])
                bound = abs(isc[g]) * max(abs(mx[g] - mn[g]), abs(lo[g] - mn[g]))
                safe[g] = safe[g] and bound <= 4194303.0
                sl[g] = _ZERO
                sl2[g] = _ZERO
                sxl[g] = _ZERO
                cur[g] = _ZERO
            for i in range(n):
                xi = x[i]
                wi = w[i]
                Ai = Laux[i]
                for g in range(G):
                    v = xi[g]
                    q = np.rint(isc[g] * (v - mn[g]))
                    q = q if q > _ZERO else _ZERO
                    q = q if q < fnmax else fnmax
                    Ai[g] = q
                    wq = wi[g] * q
                    sl[g] += wq
                    sl2[g] += wq * q
                    sxl[g] += wq * v
            for g in range(G):
                D = sum_w[g] * sl2[g] - sl[g] * sl[g]
                ok[g] = D > _ZERO
                a = (sum_w[g] * sxl[g] - sum_x[g] * sl[g]) / D
                b = (sl2[g] * sum_x[g] - sl[g] * sxl[g]) / D
                if b > _ZERO:
                    b = _ZERO
                    a = sxl[g] / sl2[g]
                ts[g] = a
                tm[g] = b
            for i in range(n):
                xi = x[i]
                wi = w[i]
                Ai = Laux[i]
                for g in range(G):
                    diff = ts[g] * Ai[g] + tm[g] - xi[g]
                    diff = abs(diff) if use_mad else diff * diff
                    cur[g] += wi[g] * diff
            for g in range(G):
                take = ok[g] and cur[g] < best[g]
                ok[g] = take
                if take:
                    best[g] = cur[g]
                    scale[g] = ts[g]
                    mn[g] = tm[g]
            for i in range(n):
                Ai = Laux[i]
                Li = L[i]
                for g in range(G):
                    Li[g] = Ai[g] if ok[g] else Li[g]
    for g in range(G):
        scale_out[g] = scale[g]
        min_out[g] = -mn[g]
    if not safe.all():
        xs = np.empty(n, np.float32)
        ws = np.empty(n, np.float32)
        Ls = np.empty(n, np.int64)
        La = np.empty(n, np.int64)
        for g in range(G):
            if safe[g]:
                continue
            for i in range(n):
                xs[i] = x[i, g]
                ws[i] = w[i, g]
            s, m = _make_qkx2(xs, n, nmax, ws, Ls, La, rmin, rdelta, nstep, use_mad)
            scale_out[g] = s
            min_out[g] = m
            for i in range(n):
                L[i, g] = np.float32(Ls[i])


@njit(cache=True, nogil=True, error_model="numpy")
def _make_q3(x, L):
    """``make_q3_quants(16, 4, x, L, do_rmse=true)`` -> scale; fills ``L[:16]`` with 0..7."""
    n = 16
    nmax = 4
    mx = _ZERO
    amax = _ZERO
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < _EPS:
        for i in range(n):
            L[i] = 0
        return _ZERO
    iscale = np.float32(-nmax) / mx
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        li = _nint(iscale * x[i])
        li = max(-nmax, min(nmax - 1, li))
        L[i] = li
        w = x[i] * x[i]
        fl = np.float32(li)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fL = np.float32(L[i])
            slx = sumlx - w * x[i] * fL
            if slx > _ZERO:
                sl2 = suml2 - w * fL * fL
                new_l = _nint(x[i] * sl2 / slx)
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > _ZERO and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > _ZERO else _ZERO


# ---- block quantizers (x: float32 [nb, 256], out: uint8 [nb, type_size]) ------------------

CHUNK_BLOCKS = 64  # super-blocks fitted together (lanes: 512 for Q4_K/Q5_K, 1024 for Q2_K)


@njit(cache=True, nogil=True, error_model="numpy")
def _fit_subblocks(xs, n, nmax, rmin, nstep, q2_weights):
    """Sub-block fits of super-blocks ``xs`` float32 [nb, 256] (sub-blocks of ``n``) ->
    (levels int64 [nb, 256], scales float32 [nb, 256 // n], mins float32 [nb, 256 // n]).

    Weights as in llama.cpp: ``|x|`` for Q2_K (absolute error), else ``sqrt(mean x^2) + |x|``.
    """
    nb = xs.shape[0]
    nsub = QK_K // n
    G = nb * nsub
    x = _to_lanes(xs, n)
    w = np.empty((n, G), np.float32)
    if q2_weights:
        for i in range(n):
            w[i] = np.abs(x[i])
    else:
        s2 = np.zeros(G, np.float32)
        for i in range(n):
            xi = x[i]
            for g in range(G):
                s2[g] += xi[g] * xi[g]
        av = np.empty(G, np.float32)
        for g in range(G):
            av[g] = np.sqrt(s2[g] / np.float32(n))
        for i in range(n):
            xi = x[i]
            wi = w[i]
            for g in range(G):
                wi[g] = av[g] + abs(xi[g])
    Lf = np.empty((n, G), np.float32)
    sc = np.empty(G, np.float32)
    mi = np.empty(G, np.float32)
    _qkx2_lanes(x, w, nmax, rmin, _F(0.1), nstep, q2_weights, Lf, sc, mi)
    return _from_lanes(Lf, nb), sc.reshape(nb, nsub), mi.reshape(nb, nsub)


@njit(cache=True, nogil=True, error_model="numpy")
def _to_lanes(xs, n):
    """float32 [nb, 256] -> [n, nb * 256 // n]: sub-block g of n weights in column g."""
    nb = xs.shape[0]
    nsub = QK_K // n
    x = np.empty((n, nb * nsub), np.float32)
    for b in range(nb):
        for j in range(nsub):
            for i in range(n):
                x[i, b * nsub + j] = xs[b, j * n + i]
    return x


@njit(cache=True, nogil=True, error_model="numpy")
def _from_lanes(Lf, nb):
    """Levels float32 [n, G] (lanes) -> int64 [nb, 256] (block order)."""
    n = Lf.shape[0]
    nsub = QK_K // n
    L = np.empty((nb, QK_K), np.int64)
    for b in range(nb):
        for j in range(nsub):
            for i in range(n):
                L[b, j * n + i] = np.int64(Lf[i, b * nsub + j])
    return L


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _q6_level(f):
    """``MAX(-32, MIN(31, nearest_int(f)))`` as float32 for the arguments ``make_qx_quants`` can
    meet: finite ones are within +-33; NaN gives 0 and +-inf -4194304 in the C code (-> -32)."""
    q = np.rint(f)
    q = q if q == q else _ZERO
    q = q if abs(q) != np.inf else _F(-32.0)
    q = q if q > _F(-32.0) else _F(-32.0)
    return q if q < _F(31.0) else _F(31.0)


@njit(cache=True, nogil=True, error_model="numpy")
def _qx_lanes(x, L, scale_out):
    """``make_qx_quants(16, 32, x, L, rmse_type=1, NULL)`` on G sub-blocks at once, one per lane.

    x: float32 [16, G]; fills L float32 [16, G] (levels 0..63) and scale_out float32 [G]. With
    ``|max| >= GROUP_MAX_EPS`` every finite rounding argument is at most ~33 in magnitude, inside
    ``nearest_int``'s exact range (:func:`_q6_level` mimics it on NaN and inf), so no lane needs a
    scalar path.
    """
    n, G = x.shape
    nmax = _F(32.0)
    mx = np.zeros(G, np.float32)
    amax = np.zeros(G, np.float32)
    for i in range(n):
        xi = x[i]
        for g in range(G):
            ax = abs(xi[g])
            big = ax > amax[g]
            amax[g] = ax if big else amax[g]
            mx[g] = xi[g] if big else mx[g]
    isc = np.empty(G, np.float32)
    sumlx = np.zeros(G, np.float32)
    suml2 = np.zeros(G, np.float32)
    for g in range(G):
        isc[g] = -nmax / mx[g]
    for i in range(n):
        xi = x[i]
        Li = L[i]
        for g in range(G):
            v = xi[g]
            q = _q6_level(isc[g] * v)
            Li[g] = q + nmax
            w = v * v
            sumlx[g] += w * v * q
            suml2[g] += w * q * q
    scale = np.empty(G, np.float32)
    best = np.empty(G, np.float32)
    for g in range(G):
        scale[g] = sumlx[g] / suml2[g] if suml2[g] != _ZERO else _ZERO
        best[g] = scale[g] * sumlx[g]
    take = np.empty(G, np.bool_)
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(nmax + _F(0.1) * np.float32(step))
        for g in range(G):
            isc[g] = num / mx[g]
            sumlx[g] = _ZERO
            suml2[g] = _ZERO
        for i in range(n):
            xi = x[i]
            for g in range(G):
                v = xi[g]
                q = _q6_level(isc[g] * v)
                w = v * v
                sumlx[g] += w * v * q
                suml2[g] += w * q * q
        anyt = False
        for g in range(G):
            t = suml2[g] > _ZERO and sumlx[g] * sumlx[g] > best[g] * suml2[g]
            take[g] = t
            anyt |= t
            if t:
                scale[g] = sumlx[g] / suml2[g]
                best[g] = scale[g] * sumlx[g]
        if anyt:
            for i in range(n):
                xi = x[i]
                Li = L[i]
                for g in range(G):
                    if take[g]:
                        q = _q6_level(isc[g] * xi[g])
                        Li[g] = q + nmax
    for g in range(G):
        if amax[g] < _EPS:
            scale[g] = _ZERO
            for i in range(n):
                L[i, g] = _ZERO
        scale_out[g] = scale[g]


@njit(cache=True, nogil=True, error_model="numpy")
def q2_k_blocks(xs, out):
    """``quantize_row_q2_K_ref``: xs float32 [nb, 256] -> out uint8 [nb, 84]."""
    for b0 in range(0, xs.shape[0], CHUNK_BLOCKS):
        Ls, scs, mis = _fit_subblocks(xs[b0 : b0 + CHUNK_BLOCKS], 16, 3, _F(-0.5), 15, True)
        for bb in range(Ls.shape[0]):
            _q2_k_finish(xs[b0 + bb], out[b0 + bb], Ls[bb], scs[bb], mis[bb])


@njit(cache=True, nogil=True, error_model="numpy")
def _q2_k_finish(x, y, L, scales, mins):
    """One Q2_K block from its 16 sub-block fits: x float32 [256], y uint8 [84], L int64 [256]."""
    q4scale = _F(15.0)
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(16):
        s = scales[j]
        m = mins[j]
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    if max_scale > _ZERO:
        iscale = q4scale / max_scale
        for j in range(16):
            y[j] = _nint(iscale * scales[j]) & 0xFF
        dbits, dval = _to_half(max_scale / q4scale)
    else:
        for j in range(16):
            y[j] = 0
        dbits, dval = _to_half(_ZERO)
    if max_min > _ZERO:
        iscale = q4scale / max_min
        for j in range(16):
            y[j] = (np.int64(y[j]) | (_nint(iscale * mins[j]) << 4)) & 0xFF
        mbits, mval = _to_half(max_min / q4scale)
    else:
        mbits, mval = _to_half(_ZERO)
    _put_half(y, 80, dbits)
    _put_half(y, 82, mbits)
    for j in range(16):
        d = dval * np.float32(np.int64(y[j]) & 0xF)
        if d == _ZERO:
            continue
        dm = mval * np.float32(np.int64(y[j]) >> 4)
        for i in range(16):
            li = _nint((x[16 * j + i] + dm) / d)
            L[16 * j + i] = max(0, min(3, li))
    for j in range(0, QK_K, 128):
        for i in range(32):
            y[16 + j // 4 + i] = (L[j + i] | (L[j + i + 32] << 2) | (L[j + i + 64] << 4)
                                  | (L[j + i + 96] << 6))


@njit(cache=True, nogil=True, error_model="numpy")
def q3_k_blocks(xs, out):
    """``quantize_row_q3_K_ref``: xs float32 [nb, 256] -> out uint8 [nb, 110]."""
    L = np.empty(QK_K, np.int64)
    scales = np.empty(16, np.float32)
    for b in range(xs.shape[0]):
        x = xs[b]
        y = out[b]
        max_scale = _ZERO
        amax = _ZERO
        for j in range(16):
            s = _make_q3(x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16])
            scales[j] = s
            if abs(s) > amax:
                amax = abs(s)
                max_scale = s
        for k in range(96, 108):
            y[k] = 0
        if max_scale != _ZERO:
            iscale = _F(-32.0) / max_scale
            for j in range(16):
                li = _nint(iscale * scales[j]) & 0xFF
                if li >= 128:  # int8_t conversion
                    li -= 256
                li = max(-32, min(31, li)) + 32
                if j < 8:
                    y[96 + j] = li & 0xF
                else:
                    y[96 + j - 8] |= (li & 0xF) << 4
                y[96 + 8 + j % 4] |= (li >> 4) << (2 * (j // 4))
            dbits, dval = _to_half(_ONE / iscale)
        else:
            dbits, dval = _to_half(_ZERO)
        _put_half(y, 108, dbits)
        for j in range(16):
            sc = (np.int64(y[96 + j]) & 0xF) if j < 8 else (np.int64(y[96 + j - 8]) >> 4)
            sc = (sc | (((np.int64(y[96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
            d = dval * np.float32(sc)
            if d == _ZERO:
                continue
            for i in range(16):
                li = _nint(x[16 * j + i] / d)
                L[16 * j + i] = max(-4, min(3, li)) + 4
        for k in range(32):
            y[k] = 0
        for j in range(QK_K):
            if L[j] > 3:
                y[j % 32] |= 1 << (j // 32)
                L[j] -= 4
        for j in range(0, QK_K, 128):
            for i in range(32):
                y[32 + j // 4 + i] = (L[j + i] | (L[j + i + 32] << 2) | (L[j + i + 64] << 4)
                                      | (L[j + i + 96] << 6))


@njit(cache=True, nogil=True, error_model="numpy")
def _k4_scales(y, scales, mins):
    """Q4_K/Q5_K: 6-bit sub-block scales and mins from the fits, f16 ``d`` and ``dmin``.

    Returns the float32 values of ``d`` and ``dmin`` (after float16 rounding).
    """
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = _F(63.0) / max_scale if max_scale > _ZERO else _ZERO
    inv_min = _F(63.0) / max_min if max_min > _ZERO else _ZERO
    for j in range(8):
        ls = min(63, _nint(inv_scale * scales[j]) & 0xFF)
        lm = min(63, _nint(inv_min * mins[j]) & 0xFF)
        if j < 4:
            y[4 + j] = ls
            y[4 + j + 4] = lm
        else:
            y[4 + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            y[4 + j - 4] |= (ls >> 4) << 6
            y[4 + j] |= (lm >> 4) << 6
    dbits, dval = _to_half(max_scale / _F(63.0))
    mbits, mval = _to_half(max_min / _F(63.0))
    _put_half(y, 0, dbits)
    _put_half(y, 2, mbits)
    return dval, mval


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _scale_min_k4(j, y):
    """``get_scale_min_k4`` on the 12 scale bytes at ``y[4:16]``."""
    if j < 4:
        return np.int64(y[4 + j]) & 63, np.int64(y[4 + j + 4]) & 63
    sc = (np.int64(y[4 + j + 4]) & 0xF) | ((np.int64(y[4 + j - 4]) >> 6) << 4)
    m = (np.int64(y[4 + j + 4]) >> 4) | ((np.int64(y[4 + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, nogil=True, error_model="numpy")
def _k4_requant(x, y, L, dval, mval, nmax):
    """Q4_K/Q5_K: levels 0..nmax of x float32 [256] against the stored 6-bit scales and mins."""
    for j in range(8):
        sc, m = _scale_min_k4(j, y)
        d = dval * np.float32(sc)
        if d == _ZERO:
            continue
        dm = mval * np.float32(m)
        for i in range(32):
            li = _nint((x[32 * j + i] + dm) / d)
            L[32 * j + i] = max(0, min(nmax, li))


@njit(cache=True, nogil=True, error_model="numpy")
def q4_k_blocks(xs, out):
    """``quantize_row_q4_K_ref``: xs float32 [nb, 256] -> out uint8 [nb, 144]."""
    for b0 in range(0, xs.shape[0], CHUNK_BLOCKS):
        Ls, scs, mis = _fit_subblocks(xs[b0 : b0 + CHUNK_BLOCKS], 32, 15, _F(-1.0), 20, False)
        for bb in range(Ls.shape[0]):
            x = xs[b0 + bb]
            y = out[b0 + bb]
            L = Ls[bb]
            dval, mval = _k4_scales(y, scs[bb], mis[bb])
            _k4_requant(x, y, L, dval, mval, 15)
            for j in range(0, QK_K, 64):
                for i in range(32):
                    y[16 + j // 2 + i] = L[j + i] | (L[j + i + 32] << 4)


@njit(cache=True, nogil=True, error_model="numpy")
def q5_k_blocks(xs, out):
    """``quantize_row_q5_K_ref``: xs float32 [nb, 256] -> out uint8 [nb, 176]."""
    for b0 in range(0, xs.shape[0], CHUNK_BLOCKS):
        Ls, scs, mis = _fit_subblocks(xs[b0 : b0 + CHUNK_BLOCKS], 32, 31, _F(-0.5), 15, False)
        for bb in range(Ls.shape[0]):
            x = xs[b0 + bb]
            y = out[b0 + bb]
            L = Ls[bb]
            dval, mval = _k4_scales(y, scs[bb], mis[bb])
            _k4_requant(x, y, L, dval, mval, 31)
            _q5_k_pack(y, L)


@njit(cache=True, nogil=True, error_model="numpy")
def _q5_k_pack(y, L):
    """Q5_K: levels L int64 [256] (0..31) -> qh (5th bits) and qs (low nibbles) of y."""
    for k in range(16, 48):
        y[k] = 0
    m1 = 1
    m2 = 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                y[16 + j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                y[16 + j] |= m2
            y[48 + n // 2 + j] = l1 | (l2 << 4)
        m1 <<= 2
        m2 <<= 2


@njit(cache=True, nogil=True, error_model="numpy")
def q6_k_blocks(xs, out):
    """``quantize_row_q6_K_ref``: xs float32 [nb, 256] -> out uint8 [nb, 210]."""
    for b0 in range(0, xs.shape[0], CHUNK_BLOCKS):
        xc = xs[b0 : b0 + CHUNK_BLOCKS]
        nb = xc.shape[0]
        Lf = np.empty((16, nb * 16), np.float32)
        sc = np.empty(nb * 16, np.float32)
        _qx_lanes(_to_lanes(xc, 16), Lf, sc)
        Ls = _from_lanes(Lf, nb)
        for bb in range(nb):
            _q6_k_finish(xc[bb], out[b0 + bb], Ls[bb], sc[bb * 16 : bb * 16 + 16])


@njit(cache=True, nogil=True, error_model="numpy")
def _q6_k_finish(x, y, L, scales):
    """One Q6_K block from its 16 sub-block fits: x float32 [256], y uint8 [210], L int64 [256]."""
    max_scale = _ZERO
    max_abs_scale = _ZERO
    for ib in range(16):
        s = scales[ib]
        if abs(s) > max_abs_scale:
            max_abs_scale = abs(s)
            max_scale = s
    if max_abs_scale < _EPS:
        for k in range(210):
            y[k] = 0
        return
    iscale = _F(-128.0) / max_scale
    dbits, dval = _to_half(_ONE / iscale)
    _put_half(y, 208, dbits)
    for ib in range(16):
        y[192 + ib] = min(127, _nint(iscale * scales[ib])) & 0xFF
    for j in range(16):
        sc = np.int64(y[192 + j])
        if sc >= 128:
            sc -= 256
        d = dval * np.float32(sc)
        if d == _ZERO:
            continue
        for i in range(16):
            li = _nint(x[16 * j + i] / d)
            L[16 * j + i] = max(-32, min(31, li)) + 32
    for j in range(0, QK_K, 128):
        ql = j // 2
        qh = 128 + j // 4
        for i in range(32):
            q1 = L[j + i] & 0xF
            q2 = L[j + i + 32] & 0xF
            q3 = L[j + i + 64] & 0xF
            q4 = L[j + i + 96] & 0xF
            y[ql + i] = q1 | (q3 << 4)
            y[ql + i + 32] = q2 | (q4 << 4)
            y[qh + i] = ((L[j + i] >> 4) | ((L[j + i + 32] >> 4) << 2) | ((L[j + i + 64] >> 4) << 4)
                         | ((L[j + i + 96] >> 4) << 6))


_KERNELS = {
    "Q2_K": q2_k_blocks,
    "Q3_K": q3_k_blocks,
    "Q4_K": q4_k_blocks,
    "Q5_K": q5_k_blocks,
    "Q6_K": q6_k_blocks,
}


def quantize_blocks(blocks: np.ndarray, qtype: str, out: np.ndarray) -> None:
    """float32 ``[n, 256]`` super-blocks -> ``out`` uint8 ``[n, type_size]`` of ``qtype``."""
    if qtype not in _KERNELS:
        raise ValueError(f"not a K-quant type: {qtype}; supported: {', '.join(KQUANT_TYPES)}")
    x = np.ascontiguousarray(blocks, dtype=np.float32).reshape(-1, QK_K)  # [n, 256]
    if out.shape != (x.shape[0], BLOCK_BYTES[qtype]) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {(x.shape[0], BLOCK_BYTES[qtype])}, got {out.dtype} {out.shape}")
    if out.flags.c_contiguous:
        _KERNELS[qtype](x, out)
    else:
        tmp = np.empty(out.shape, np.uint8)
        _KERNELS[qtype](x, tmp)
        out[...] = tmp
