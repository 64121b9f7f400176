"""K-quant blocks (Q2_K .. Q6_K) computed where they lie, with llama.cpp's q8_K activations.

As ggml-cpu's per-type traits (``vec_dot`` + ``vec_dot_type``; :data:`KQ_TYPES` is our table):
every K-quant row is dotted with activations quantized by :func:`quantize_q8k`
(``quantize_row_q8_K_ref`` bit for bit: per 256-superblock a float32 scale ``d = max / -127``,
int8 codes, int16 sums per 16 codes), the dot integer per superblock, then one float step per
superblock, as ``ggml_vec_dot_qN_K_q8_K``:

    acc += xd[b] * (d[b] * sum(code * scale * xq)  -  dmin[b] * sum_g min[g] * bsums[g])

The inner loop is LLVM IR generated per type (``sb_dot``): the scale bytes decoded with ggml's
32-bit masks, the codes of each 32-weight chunk extracted with constant shifts and masks, and with
AVX2 (or AVX-512) the llama.cpp recipe: unsigned codes (Q6_K's and Q3_K's offsets of -32 / -4 taken
out and put back as ``offset * sum(scale * bsum)``) times int8 activations by ``vpmaddubsw``, then
``vpmaddwd`` with the scales; without AVX2, portable vector IR. Both integer sums are exact, so
every path (AVX2, portable, any thread count) gives bit-identical floats.

Decode dots each row where it lies (``row_dot_direct``); a few tokens with AVX2 too, each
superblock's bits taken apart once for up to 4 of them (``sb_dotn``); prefill's 16-row tiles
(``_kernels_tile``) start from ``u8_pack``'s unpacked superblocks (unsigned codes, scales and mins
per 16 weights). All give the same integers and take the same float steps in the same order, so a
token's result never depends on the tokens beside it (batch invariance); exact mode
(``run_rows_exact``) dequantizes a row once (``unpack_row`` / ``dequant_row``) and takes float
dots. Kinds are the numbers of :data:`mlxtral.backends.kernels._KINDS` (``KQ_FIRST`` on).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from mlxtral.backends._kernels_ir import (
    FORCED_GENERIC,
    HAVE_AVX2,
    HAVE_NEONDOT,
    HAVE_VNNI,
    ISA,
    _dot_u8s8,
    dot_f32,
    half_to_f32,
    prefetch_ahead,
    ptr_f32,
    ptr_u8,
)

QK_K = 256
K_Q4_K, K_Q6_K, K_Q5_K, K_Q3_K, K_Q2_K = 6, 7, 8, 9, 10
KQ_FIRST = K_Q4_K
# kind -> (type name, bytes per 256-weight superblock); the traits table's storage column
KQ_TYPES = {K_Q4_K: ("Q4_K", 144), K_Q6_K: ("Q6_K", 210), K_Q5_K: ("Q5_K", 176), K_Q3_K: ("Q3_K", 110),
            K_Q2_K: ("Q2_K", 84)}

_CACHE = not FORCED_GENERIC

# ---- two vector inner loops, in LLVM IR (numba's own vectorizer does not find them) -------------
_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V = 32  # lanes: one 32-weight chunk; LLVM splits into what the CPU has (AVX-512, AVX2, NEON...)


def _vec(ty: ir.Type) -> ir.VectorType:
    return ir.VectorType(ty, _V)


def _get(mod: ir.Module, name: str, build) -> ir.Function:
    try:
        return mod.get_global(name)
    except KeyError:
        return build(mod, name)


def _madd32(b: ir.IRBuilder, q: ir.Value, x: ir.Value) -> ir.Value:
    """32 int16 codes times 32 int8 activations -> <32 x i32> products (the portable path)."""
    return b.mul(b.sext(q, _vec(_i32)), b.sext(x, _vec(_i32)))


def _reduce(b: ir.IRBuilder, acc: ir.Value) -> ir.Value:
    ty = acc.type
    red = _get(b.module, f"llvm.vector.reduce.add.v{ty.count}i32",
               lambda m, nm: ir.Function(m, ir.FunctionType(_i32, [ty]), nm))
    return b.call(red, [acc])


def _pair_sums(b: ir.IRBuilder, p: ir.Value) -> ir.Value:
    """<2n x iK> -> <n x iK>: lane i = p[2i] + p[2i+1]."""
    n = p.type.count
    ev = b.shuffle_vector(p, p, ir.Constant(ir.VectorType(_i32, n // 2), list(range(0, n, 2))))
    od = b.shuffle_vector(p, p, ir.Constant(ir.VectorType(_i32, n // 2), list(range(1, n, 2))))
    return b.add(ev, od)


def _pmadd(b: ir.IRBuilder, u: ir.Value, x: ir.Value) -> ir.Value:
    """``vpmaddubsw``: <32 x i8> unsigned u times signed x -> <16 x i16> pair sums (off x86 the
    same in portable IR: the callers' pairs never saturate)."""
    v32i8, v16i16 = _vec(_i8), ir.VectorType(_i16, 16)
    if not HAVE_AVX2:
        return _pair_sums(b, b.mul(b.zext(u, _vec(_i16)), b.sext(x, _vec(_i16))))
    fn = _get(b.module, "llvm.x86.avx2.pmadd.ub.sw",
              lambda m, nm: ir.Function(m, ir.FunctionType(v16i16, [v32i8, v32i8]), nm))
    return b.call(fn, [u, x])


def _madd16(b: ir.IRBuilder, a: ir.Value, c: ir.Value) -> ir.Value:
    """``vpmaddwd``: <16 x i16> . <16 x i16> -> <8 x i32> pair sums (exact for our operands; off
    x86 the same in portable IR)."""
    v16i16, v8i32 = ir.VectorType(_i16, 16), ir.VectorType(_i32, 8)
    if not HAVE_AVX2:
        v16i32 = ir.VectorType(_i32, 16)
        return _pair_sums(b, b.mul(b.sext(a, v16i32), b.sext(c, v16i32)))
    fn = _get(b.module, "llvm.x86.avx2.pmadd.wd",
              lambda m, nm: ir.Function(m, ir.FunctionType(v8i32, [v16i16, v16i16]), nm))
    return b.call(fn, [a, c])


def _acc_scaled(b: ir.IRBuilder, acc: ir.Value | None, pairs: ir.Value, sc: ir.Value) -> ir.Value:
    """acc + ``pairs`` (<16 x i16>) times their scales ``sc``, summed by two into <8 x i32>: one
    ``vpdpwssd`` with VNNI, else ``vpmaddwd`` + add (the same exact integers)."""
    v8i32 = ir.VectorType(_i32, 8)
    if HAVE_VNNI:
        fn = _get(b.module, "llvm.x86.avx512.vpdpwssd.256",
                  lambda m, nm: ir.Function(m, ir.FunctionType(v8i32, [v8i32] * 3), nm))
        acc0 = _c(v8i32, 0) if acc is None else acc
        return b.call(fn, [acc0, b.bitcast(pairs, v8i32), b.bitcast(sc, v8i32)])
    p = _madd16(b, pairs, sc)
    return p if acc is None else b.add(acc, p)


def _bsum_dot(b: ir.IRBuilder, v: ir.Value, bs: ir.Value) -> ir.Value:
    """sum_g v_g * bsum_g over the 16 groups (<16 x i16> each; scales or mins times activation
    sums, |product| < 2**17): one ``vpmaddwd`` to 8 lanes, then their sum."""
    return _reduce(b, _madd16(b, v, bs))


def _finish_sums(b: ir.IRBuilder, acc: ir.Value, scales: ir.Value, mins: ir.Value | None, ba: ir.Value,
                 off: int) -> ir.Value:
    """``sb_dot``'s result from the integer accumulator ``acc`` (<8 x i32>): sumi (its sum, plus
    ``off * sum_g scale_g * bsum_g`` for a codes' offset: Q6_K -32, Q3_K -4) in the low 32 bits,
    ``summ = sum_g min_g * bsum_g`` in the high ones; bsums (<16 x i16>) at address ``ba``."""
    v16i16 = ir.VectorType(_i16, 16)
    sumi = _reduce(b, acc)
    bs = b.load(b.inttoptr(ba, v16i16.as_pointer()), align=2) if off or mins is not None else None
    if off:
        sumi = b.add(sumi, b.mul(_bsum_dot(b, scales, bs), _c(_i32, off)))
    res = b.zext(sumi, _i64)
    if mins is not None:
        res = b.or_(res, b.shl(b.sext(_bsum_dot(b, mins, bs), _i64), _c(_i64, 32)))
    return res


# (A offset, A shift, A mask, B offset, B shift, B mask, B shift left, offset) of 32-weight chunk k
# (0..7) of a superblock: code = ((A[l] >> sa) & ma) + (((B[l] >> sb) & mb) << shl) + off, as ggml's
# dequantize_row_qN_K lays the bits out.
def _chunk_params(kind: int, k: int) -> tuple[int, ...]:
    c, hf, kk = k // 2, k // 4, k % 4
    if kind == K_Q4_K:
        return 16 + c * 32, 4 * (k % 2), 15, 0, 0, 0, 0, 0
    if kind == K_Q5_K:
        return 48 + c * 32, 4 * (k % 2), 15, 16, k, 1, 4, 0
    if kind == K_Q6_K:
        return hf * 64 + (kk % 2) * 32, 4 * (kk // 2), 15, 128 + hf * 32, 2 * kk, 3, 4, -32
    if kind == K_Q3_K:
        return 32 + hf * 32, 2 * kk, 3, 0, k, 1, 2, -4
    return 16 + hf * 32, 2 * kk, 3, 0, 0, 0, 0, 0  # Q2_K


def _load(b: ir.IRBuilder, wp: ir.Value, off: int, ty: ir.Type) -> ir.Value:
    return b.load(b.bitcast(b.gep(wp, [ir.Constant(_i64, off)]), ty.as_pointer()), align=1)


def _c(ty: ir.Type, v: int) -> ir.Constant:
    return ir.Constant(ty, v) if not isinstance(ty, ir.VectorType) else ir.Constant(ty, [v] * ty.count)


def _scales(b: ir.IRBuilder, wp: ir.Value, kind: int) -> tuple[ir.Value, ir.Value | None, list[int]]:
    """(a <16 x i16> of integer scales, a <16 x i16> of mins per 16 weights or None, and per lane of
    a 16-weight group the index into the scales vector): the scale bytes of one superblock decoded
    as ggml does (Q4_K/Q5_K and Q3_K's 6-bit fields with 32-bit word masks)."""
    v16i8, v16i16, v4i32 = ir.VectorType(_i8, 16), ir.VectorType(_i16, 16), ir.VectorType(_i32, 4)

    def words(ws: list[ir.Value]) -> ir.Value:
        v = ir.Constant(v4i32, ir.Undefined)
        for i, x in enumerate(ws):
            v = b.insert_element(v, x, ir.Constant(_i32, i))
        return b.zext(b.bitcast(v, v16i8), v16i16)

    def m32(v: ir.Value, mask: int) -> ir.Value:
        return b.and_(v, _c(_i32, mask))

    if kind in (K_Q4_K, K_Q5_K):
        u0, u1, u2 = (_load(b, wp, off, _i32) for off in (4, 8, 12))
        sl = m32(u0, 0x3F3F3F3F)
        sh = b.or_(m32(u2, 0x0F0F0F0F), b.shl(m32(b.lshr(u0, _c(_i32, 6)), 0x03030303), _c(_i32, 4)))
        ml = m32(u1, 0x3F3F3F3F)
        mh = b.or_(m32(b.lshr(u2, _c(_i32, 4)), 0x0F0F0F0F),
                   b.shl(m32(b.lshr(u1, _c(_i32, 6)), 0x03030303), _c(_i32, 4)))
        sm = words([sl, sh, ml, mh])  # scales of the 8 sub-blocks of 32, then their mins
        mins = b.shuffle_vector(sm, sm, ir.Constant(ir.VectorType(_i32, 16), [8 + g // 2 for g in range(16)]))
        return sm, mins, [g // 2 for g in range(16)]
    if kind == K_Q6_K:
        return b.sext(_load(b, wp, 192, v16i8), v16i16), None, list(range(16))
    if kind == K_Q3_K:
        a0, a1, t = (_load(b, wp, off, _i32) for off in (96, 100, 104))

        def hi2(shift: int) -> ir.Value:
            return b.shl(m32(b.lshr(t, _c(_i32, shift)), 0x03030303), _c(_i32, 4))

        w = [b.or_(m32(a0, 0x0F0F0F0F), hi2(0)), b.or_(m32(a1, 0x0F0F0F0F), hi2(2)),
             b.or_(m32(b.lshr(a0, _c(_i32, 4)), 0x0F0F0F0F), hi2(4)),
             b.or_(m32(b.lshr(a1, _c(_i32, 4)), 0x0F0F0F0F), hi2(6))]
        return b.sub(words(w), _c(v16i16, 32)), None, list(range(16))
    raw = b.zext(_load(b, wp, 0, v16i8), v16i16)  # Q2_K: scale | min << 4 per 16 weights
    return b.and_(raw, _c(v16i16, 15)), b.lshr(raw, _c(v16i16, 4)), list(range(16))


def _build_superblock(mod: ir.Module, name: str, kind: int, dot: bool) -> ir.Function:
    """One superblock at ``w``, scales decoded here. ``dot``: i64 sb_dot(w, x, bs) = the integer dot
    ``sum(code * scale * x)`` over int8 ``x`` (low 32 bits) and ``sum(min * bsum)`` over the int16
    sums ``bs`` (high 32 bits); else void sb_codes(w, out, _): the 256 scaled codes as int16 at
    ``out``, then the 16 mins (zeros without mins). Shifts and masks are constants per chunk."""
    ret = _i64 if dot else ir.VoidType()
    fn = ir.Function(mod, ir.FunctionType(ret, [_i64] * 3), name)
    fn.linkage = "internal"
    wa, oa, ba = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    wp = b.inttoptr(wa, _i8.as_pointer())
    if dot:  # decode streams rows through here (sb_codes is exact mode's, on a row it just read)
        prefetch_ahead(b, wp, _c(_i64, 0), KQ_TYPES[kind][1])
    svec, mins, lane = _scales(b, wp, kind)
    if dot and (HAVE_AVX2 or HAVE_NEONDOT):
        return _superblock_dot_avx2(b, fn, wp, kind, svec, mins, lane)
    acc = None
    for k in range(8):
        ao, sa, ma, bo, sb, mb, shl, off = _chunk_params(kind, k)
        code = b.and_(b.lshr(b.zext(_load(b, wp, ao, _vec(_i8)), _vec(_i16)), _c(_vec(_i16), sa)),
                      _c(_vec(_i16), ma))
        if mb:
            hi = b.and_(b.lshr(b.zext(_load(b, wp, bo, _vec(_i8)), _vec(_i16)), _c(_vec(_i16), sb)),
                        _c(_vec(_i16), mb))
            code = b.add(code, b.shl(hi, _c(_vec(_i16), shl)))
        if off:
            code = b.add(code, _c(_vec(_i16), off))
        sc = b.shuffle_vector(svec, svec, ir.Constant(ir.VectorType(_i32, _V),
                                                      [lane[2 * k]] * 16 + [lane[2 * k + 1]] * 16))
        q = b.mul(code, sc)
        if dot:
            xp = b.inttoptr(b.add(oa, _c(_i64, 32 * k)), _vec(_i8).as_pointer())
            p = _madd32(b, q, b.load(xp, align=1))
            acc = p if acc is None else b.add(acc, p)
        else:
            b.store(q, b.inttoptr(b.add(oa, _c(_i64, 64 * k)), _vec(_i16).as_pointer()), align=2)
    v16i16, v16i32 = ir.VectorType(_i16, 16), ir.VectorType(_i32, 16)
    if not dot:
        mv = mins if mins is not None else ir.Constant(v16i16, [0] * 16)
        b.store(mv, b.inttoptr(b.add(oa, _c(_i64, 512)), v16i16.as_pointer()), align=2)
        b.ret_void()
        return fn
    sumi = b.zext(_reduce(b, acc), _i64)
    if mins is None:
        b.ret(sumi)
        return fn
    bs = b.sext(b.load(b.inttoptr(ba, v16i16.as_pointer()), align=2), v16i32)
    summ = _reduce(b, b.mul(b.zext(mins, v16i32), bs))
    b.ret(b.or_(sumi, b.shl(b.sext(summ, _i64), _c(_i64, 32))))
    return fn


def _codes_avx2(b: ir.IRBuilder, wp: ir.Value, kind: int) -> list:
    """The superblock at ``wp``'s unsigned codes (0..63: each code minus its offset), one <32 x i8>
    per 32-weight chunk, their bits taken apart with constant shifts and masks."""
    v32i8 = _vec(_i8)
    us = []
    for k in range(8):
        ao, sa, ma, bo, sb, mb, shl, _ = _chunk_params(kind, k)
        u = b.and_(b.lshr(_load(b, wp, ao, v32i8), _c(v32i8, sa)), _c(v32i8, ma))
        if mb:
            hi = b.and_(b.lshr(_load(b, wp, bo, v32i8), _c(v32i8, sb)), _c(v32i8, mb))
            u = b.add(u, b.shl(hi, _c(v32i8, shl)))
        us.append(u)
    return us


def _superblock_dot_avx2(b: ir.IRBuilder, fn: ir.Function, wp: ir.Value, kind: int, svec: ir.Value,
                         mins: ir.Value | None, lane: list[int]) -> ir.Function:
    """``sb_dot`` as llama.cpp's AVX2 K-quant dots: unsigned codes u (0..63, the code minus its
    offset) times int8 x by ``vpmaddubsw`` (int16 pairs, |pair| <= 16002: no saturation), then
    ``vpmaddwd`` with the pairs' scales; the offset comes back as ``off * sum(scale * bsum)``. On
    ARM (``neondot``) the same sums of 4 by ``sdot`` (codes below 64 are valid signed bytes), times
    their scales, as llama.cpp's ARM K-quant dots."""
    _, oa, ba = fn.args
    full = b.shuffle_vector(svec, svec, ir.Constant(ir.VectorType(_i32, 16), lane))
    b.ret(_sums(b, _codes_avx2(b, wp, kind), full, mins, [oa], [ba], kind)[0])
    return fn


U8_BYTES = 320  # an unpacked superblock (prefill, AVX2): 256 unsigned codes, 16 scales, 16 mins (int16)


def _build_u8_pack(mod: ir.Module, name: str, kind: int) -> ir.Function:
    """void u8_pack(w, p, _): the superblock at ``w`` unpacked at ``p`` (``U8_BYTES``: its unsigned
    codes, then the scale and the min of each 16 weights, int16) for the prefill tiles
    (``_kernels_tile``): the codes' bits are taken apart once per row, not once per token."""
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [_i64] * 3), name)
    fn.linkage = "internal"
    a0, a1, _ = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    v32i8, v16i16 = _vec(_i8), ir.VectorType(_i16, 16)
    v16i32 = ir.VectorType(_i32, 16)
    wp, pp = b.inttoptr(a0, _i8.as_pointer()), b.inttoptr(a1, _i8.as_pointer())
    prefetch_ahead(b, wp, _c(_i64, 0), KQ_TYPES[kind][1])  # prefill reads each row here once
    svec, mins, lane = _scales(b, wp, kind)
    full = b.shuffle_vector(svec, svec, ir.Constant(v16i32, lane))
    b.store(full, b.bitcast(b.gep(pp, [_c(_i64, 256)]), v16i16.as_pointer()), align=1)
    b.store(mins if mins is not None else ir.Constant(v16i16, [0] * 16),
            b.bitcast(b.gep(pp, [_c(_i64, 288)]), v16i16.as_pointer()), align=1)
    for k, u in enumerate(_codes_avx2(b, wp, kind)):
        b.store(u, b.bitcast(b.gep(pp, [_c(_i64, 32 * k)]), v32i8.as_pointer()), align=1)
    b.ret_void()
    return fn


def _sums(b: ir.IRBuilder, us: list, full: ir.Value, mins: ir.Value | None, xas: list, bas: list,
          kind: int) -> list:
    """``sb_dot``'s two sums (sumi low 32 bits, summ high) of a superblock's unsigned codes ``us``
    (``_codes_avx2``), its 16 scales ``full`` (<16 x i16>, one per 16 weights) and mins, against
    each token's q8_K codes at ``xas[t]`` and bsums at ``bas[t]``: the codes and their scales are
    taken apart and shuffled once for all the tokens."""
    v32i8, v16i32 = _vec(_i8), ir.VectorType(_i32, 16)
    off = _chunk_params(kind, 0)[7]
    accs: list = [None] * len(xas)
    v8i32 = ir.VectorType(_i32, 8)
    for k, u in enumerate(us):
        sc = b.shuffle_vector(full, full, ir.Constant(v16i32, [2 * k] * 8 + [2 * k + 1] * 8))
        if HAVE_NEONDOT:  # the scale of each sum of 4 (lanes 0-3: group 2k, 4-7: group 2k + 1)
            lanes = ir.Constant(v8i32, [2 * k] * 4 + [2 * k + 1] * 4)
            sc4 = b.sext(b.shuffle_vector(full, full, lanes), v8i32)
        for t, xa in enumerate(xas):
            x = b.load(b.inttoptr(b.add(xa, _c(_i64, 32 * k)), v32i8.as_pointer()), align=1)
            if HAVE_NEONDOT:  # lane j: bytes 4j..4j+3 (as the pairs of pairs below), times its scale
                p = b.mul(_dot_u8s8(b, u, x), sc4)
                accs[t] = p if accs[t] is None else b.add(accs[t], p)
            else:
                accs[t] = _acc_scaled(b, accs[t], _pmadd(b, u, x), sc)
    return [_finish_sums(b, acc, full, mins, ba, off) for acc, ba in zip(accs, bas, strict=True)]


def _build_sb_dotn(mod: ir.Module, name: str, kind: int, nt: int) -> ir.Function:
    """void sb_dotn(w, x, bs, x_stride, bs_stride, out): ``sb_dot`` of the superblock at ``w``
    (read where it lies) for ``nt`` tokens (codes ``x_stride`` bytes apart, bsums ``bs_stride``),
    nt int64 at ``out``: its codes and scales taken apart once for all of them, the same integers."""
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [_i64] * 6), name)
    fn.linkage = "internal"
    wa, xa, ba, xs, bstr, oa = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    wp = b.inttoptr(wa, _i8.as_pointer())
    prefetch_ahead(b, wp, _c(_i64, 0), KQ_TYPES[kind][1])  # rows stream through here, as in decode
    svec, mins, lane = _scales(b, wp, kind)
    full = b.shuffle_vector(svec, svec, ir.Constant(ir.VectorType(_i32, 16), lane))
    xas = [b.add(xa, b.mul(xs, _c(_i64, t))) for t in range(nt)]
    bas = [b.add(ba, b.mul(bstr, _c(_i64, t))) for t in range(nt)]
    op = b.inttoptr(oa, _i64.as_pointer())
    for t, v in enumerate(_sums(b, _codes_avx2(b, wp, kind), full, mins, xas, bas, kind)):
        b.store(v, b.gep(op, [_c(_i64, t)]))
    b.ret_void()
    return fn


def _make_u8_pack(kind: int):
    name = f"mlxtral_kq_u8_pack_{kind}"

    @intrinsic
    def u8(typingctx, a, o, bs):
        sig = types.void(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            builder.call(_get(builder.module, name, lambda m, nm: _build_u8_pack(m, nm, kind)), list(args))
            return context.get_dummy_value()

        return sig, codegen

    return u8


SB_NT = 4  # tokens one sb_dotn call takes at most (8: 10% faster at 8 tokens, ~10 MB more peak RSS of code)


@intrinsic
def sb_dotn(typingctx, kind, nt, w, o, bs, xs, bstr, out):
    """``sb_dot`` of the superblock at ``w`` for ``nt`` (1 .. SB_NT) tokens (codes at ``o``,
    ``xs`` bytes apart; bsums at ``bs``, ``bstr`` apart) -> nt int64 at ``out``. One switch on
    (kind, nt) to the function generated for them."""
    sig = types.void(*([types.int64] * 8))

    def codegen(context, builder, signature, args):
        fn = builder.function
        end = fn.append_basic_block("sb_dotn_end")
        key = builder.add(builder.mul(args[0], _c(_i64, 8)), args[1])
        sw = builder.switch(key, end)
        for k in KQ_TYPES:
            for n in range(1, SB_NT + 1):
                bb = fn.append_basic_block(f"sb_dotn_{k}_{n}")
                sw.add_case(_c(_i64, 8 * k + n), bb)
                with builder.goto_block(bb):
                    f = _get(builder.module, f"mlxtral_kq_sb_dot{n}_{k}",
                             lambda m, nm, k=k, n=n: _build_sb_dotn(m, nm, k, n))
                    builder.call(f, list(args[2:]))
                    builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen


u8_pack_q4k, u8_pack_q5k, u8_pack_q6k = (_make_u8_pack(k) for k in (K_Q4_K, K_Q5_K, K_Q6_K))
u8_pack_q3k, u8_pack_q2k = _make_u8_pack(K_Q3_K), _make_u8_pack(K_Q2_K)


def _make_superblock(kind: int, dot: bool):
    name = f"mlxtral_kq_sb_{'dot' if dot else 'codes'}_{kind}_{ISA}"

    @intrinsic
    def sb(typingctx, w, o, bs):
        sig = (types.int64 if dot else types.void)(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            r = builder.call(_get(builder.module, name, lambda m, nm: _build_superblock(m, nm, kind, dot)),
                             list(args))
            return r if dot else context.get_dummy_value()

        return sig, codegen

    return sb


sb_dot_q4k, sb_codes_q4k = _make_superblock(K_Q4_K, True), _make_superblock(K_Q4_K, False)
sb_dot_q5k, sb_codes_q5k = _make_superblock(K_Q5_K, True), _make_superblock(K_Q5_K, False)
sb_dot_q6k, sb_codes_q6k = _make_superblock(K_Q6_K, True), _make_superblock(K_Q6_K, False)
sb_dot_q3k, sb_codes_q3k = _make_superblock(K_Q3_K, True), _make_superblock(K_Q3_K, False)
sb_dot_q2k, sb_codes_q2k = _make_superblock(K_Q2_K, True), _make_superblock(K_Q2_K, False)


@njit(cache=_CACHE, nogil=True, inline="always")
def _h(w, o):
    return half_to_f32(np.uint16(w[o]) | (np.uint16(w[o + 1]) << np.uint16(8)))


@njit(cache=_CACHE, nogil=True)
def quantize_q8k(x):
    """float32 [T, n] (n % 256 == 0) -> q8_K: int8 codes [T, n], float32 d [T, n/256], int16 sums
    per 16 codes [T, n/16]; ``quantize_row_q8_K_ref`` bit for bit (its ``nearest_int`` rounds half
    to even, as ``rint``)."""
    T, n = x.shape
    nb = n // QK_K
    xq = np.empty((T, n), dtype=np.int8)
    xd = np.empty((T, nb), dtype=np.float32)
    bs = np.empty((T, n // 16), dtype=np.int16)
    for t in range(T):
        for b in range(nb):
            o = b * QK_K
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(QK_K):
                v = x[t, o + j]
                a = abs(v)
                if a > amax:
                    amax = a
                    mx = v
            if amax == 0:
                xd[t, b] = 0
                for j in range(QK_K):
                    xq[t, o + j] = 0
                for g in range(16):
                    bs[t, b * 16 + g] = 0
                continue
            iscale = np.float32(-127.0) / mx
            for j in range(QK_K):
                q = np.rint(iscale * x[t, o + j])
                xq[t, o + j] = np.int8(min(np.float32(127.0), q))
            for g in range(16):
                s = 0
                for j in range(16):
                    s += np.int32(xq[t, o + g * 16 + j])
                bs[t, b * 16 + g] = s
            xd[t, b] = np.float32(1.0) / iscale
    return xq, xd, bs


@njit(cache=_CACHE, nogil=True, inline="always")
def _tb(kind):
    return 144 if kind == K_Q4_K else 176 if kind == K_Q5_K else 210 if kind == K_Q6_K else (
        110 if kind == K_Q3_K else 84)


@njit(cache=_CACHE, nogil=True, inline="always")
def _super_scales(kind, w, o):
    """(d, dmin) of the superblock at ``w[o:]`` as float32 (dmin 0 for types without mins)."""
    if kind == K_Q4_K or kind == K_Q5_K:
        return _h(w, o), _h(w, o + 2)
    if kind == K_Q6_K:
        return _h(w, o + 208), np.float32(0.0)
    if kind == K_Q3_K:
        return _h(w, o + 108), np.float32(0.0)
    return _h(w, o + 80), _h(w, o + 82)


@njit(cache=_CACHE, nogil=True, inline="always")
def _sb_codes(kind, oa, out):
    if kind == K_Q4_K:
        sb_codes_q4k(oa, out, 0)
    elif kind == K_Q5_K:
        sb_codes_q5k(oa, out, 0)
    elif kind == K_Q6_K:
        sb_codes_q6k(oa, out, 0)
    elif kind == K_Q3_K:
        sb_codes_q3k(oa, out, 0)
    else:
        sb_codes_q2k(oa, out, 0)


@njit(cache=_CACHE, nogil=True, inline="always")
def _sb_dot(kind, oa, xa, ba):
    if kind == K_Q4_K:
        return sb_dot_q4k(oa, xa, ba)
    if kind == K_Q5_K:
        return sb_dot_q5k(oa, xa, ba)
    if kind == K_Q6_K:
        return sb_dot_q6k(oa, xa, ba)
    if kind == K_Q3_K:
        return sb_dot_q3k(oa, xa, ba)
    return sb_dot_q2k(oa, xa, ba)


@njit(cache=_CACHE, nogil=True, inline="always")
def _u8_pack(kind, oa, pa):
    if kind == K_Q4_K:
        u8_pack_q4k(oa, pa, 0)
    elif kind == K_Q5_K:
        u8_pack_q5k(oa, pa, 0)
    elif kind == K_Q6_K:
        u8_pack_q6k(oa, pa, 0)
    elif kind == K_Q3_K:
        u8_pack_q3k(oa, pa, 0)
    else:
        u8_pack_q2k(oa, pa, 0)


SB_CODES = QK_K + 16  # int16 per unpacked superblock: 256 scaled codes, 16 mins


@njit(cache=_CACHE, nogil=True)
def unpack_row(kind, wa, n, q, dd, dm):
    """Row at address ``wa`` (``n`` weights) -> per superblock ``q[b*272 : (b+1)*272]`` int16: 256
    codes times their 16-weight integer scale (|q| <= 4096), then the 16 mins (0 without mins);
    super-scales ``dd``/``dm`` float32 [n/256] (``dm`` 0 without mins)."""
    nb = n // QK_K
    tb = _tb(kind)
    w = carray(ptr_u8(wa), (nb * tb,))
    qa = q.ctypes.data
    for b in range(nb):
        dd[b], dm[b] = _super_scales(kind, w, b * tb)
        _sb_codes(kind, wa + b * tb, qa + b * (2 * SB_CODES))


@njit(cache=_CACHE, nogil=True, inline="always")
def _sb_float(d, dmin, v):
    """A superblock's float step from ``sb_dot``'s two integer sums: d * sumi - dmin * summ."""
    return d * np.float32(np.int32(v & 0xFFFFFFFF)) - dmin * np.float32(np.int32(v >> 32))


@njit(cache=_CACHE, nogil=True, inline="always")
def row_dot_direct(kind, wa, n, xqa, xd, bsa, t):
    """The row at ``wa`` . q8_K token ``t`` (codes at ``xqa``, scales ``xd``, int16 sums at ``bsa``,
    all tokens), read where it lies: per superblock exact integer sums (``sb_dot``: their order is
    free), then one float step per superblock in a fixed order, as ggml's vec_dot."""
    nb = n // QK_K
    tb = _tb(kind)
    w = carray(ptr_u8(wa), (nb * tb,))
    xo = xqa + t * nb * QK_K
    bo = bsa + t * nb * 32
    acc = np.float32(0.0)
    for b in range(nb):
        d, dmin = _super_scales(kind, w, b * tb)
        acc += xd[t * nb + b] * _sb_float(d, dmin, _sb_dot(kind, wa + b * tb, xo + b * QK_K, bo + b * 32))
    return acc


@njit(cache=_CACHE, nogil=True, inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(cache=_CACHE, nogil=True)
def run_rows_twins(kind, wa, rb, n, r0, r1, xqa, xda, bsa, out, wb, nb_, xqb, xdb, bsb, outb):
    """:func:`run_rows` at one token (not fused) of two twins, a cut product's halves, row by row:
    a row's two halves read one after the other, each the bits :func:`run_rows` gives it alone."""
    xd = carray(ptr_f32(xda), (n // QK_K,))
    xe = carray(ptr_f32(xdb), (nb_ // QK_K,))
    for r in range(r0, r1):
        out[r] = row_dot_direct(kind, wa + r * rb, n, xqa, xd, bsa, 0)
        outb[r] = row_dot_direct(kind, wb + r * rb, nb_, xqb, xe, bsb, 0)


@njit(cache=_CACHE, nogil=True)
def run_rows(kind, swig, wa, wa2, rb, n, T, r0, r1, xqa, xda, bsa, out, os_):
    """Output rows ``r0..r1`` of a task, every token: ``out[t * os_ + r]`` = row r . token t (or the
    fused ``silu(gate) * up`` with ``swig``). One token: each row dotted where it lies; more (with
    AVX2 or ARM's dot product): each superblock's codes taken apart once for up to SB_NT tokens
    (``sb_dotn``). Both are the same arithmetic: a token's result never depends on the tokens
    beside it (batch invariance)."""
    nb = n // QK_K
    xd = carray(ptr_f32(xda), (T * nb,))
    if T == 1 or not (HAVE_AVX2 or HAVE_NEONDOT):
        for t in range(T):
            for r in range(r0, r1):
                g = row_dot_direct(kind, wa + r * rb, n, xqa, xd, bsa, t)
                if swig:
                    g = _silu_mul(g, row_dot_direct(kind, wa2 + r * rb, n, xqa, xd, bsa, t))
                out[t * os_ + r] = g
        return
    tb = _tb(kind)
    g = np.empty(SB_NT, dtype=np.float32)  # each token's running sum
    v = np.empty(SB_NT, dtype=np.int64)  # each token's two integer sums (sb_dotn)
    for r in range(r0, r1):
        t0 = 0
        while t0 < T:  # up to SB_NT tokens a pass over the row (in L1 after the first)
            k = min(SB_NT, T - t0)
            xo = xqa + t0 * nb * QK_K
            bo = bsa + t0 * nb * 32
            for m in range(2 if swig else 1):  # gate (or the only matrix), then up
                ra = (wa if m == 0 else wa2) + r * rb
                w = carray(ptr_u8(ra), (nb * tb,))
                g[:] = 0.0
                for b in range(nb):  # per token, the float steps in superblock order
                    d, dmin = _super_scales(kind, w, b * tb)
                    sb_dotn(kind, k, ra + b * tb, xo + b * QK_K, bo + b * 32, nb * QK_K, nb * 32,
                            v.ctypes.data)
                    for j in range(k):
                        g[j] += xd[(t0 + j) * nb + b] * _sb_float(d, dmin, v[j])
                for j in range(k):
                    i = (t0 + j) * os_ + r
                    out[i] = g[j] if m == 0 else _silu_mul(out[i], g[j])
            t0 += k
    v[0] = 0  # (kept alive while sb_dotn writes to it by address)


@njit(cache=_CACHE, nogil=True)
def dequant_row(kind, wa, n, buf):
    """One K-quant row at ``wa`` -> float32 ``buf[:n]``: ``d * (sc*q) - dmin * m`` (``gguf.quants``
    rounds ``(d*sc) * q``: the same values to float32 rounding)."""
    nb = n // QK_K
    q = np.empty(nb * SB_CODES, dtype=np.int16)
    dd = np.empty(nb, dtype=np.float32)
    dm = np.empty(nb, dtype=np.float32)
    unpack_row(kind, wa, n, q, dd, dm)
    for b in range(nb):
        for g in range(16):
            m = dm[b] * np.float32(q[b * SB_CODES + QK_K + g])
            for ll in range(16):
                buf[b * QK_K + g * 16 + ll] = dd[b] * np.float32(q[b * SB_CODES + g * 16 + ll]) - m


@njit(cache=_CACHE, nogil=True)
def run_rows_exact(kind, swig, wa, wa2, rb, n, T, r0, r1, xa, out, os_):
    """``run_rows`` on float32 activations at ``xa`` [T, n] (exact mode): each row dequantized once
    to float32, then one float dot per token, the same at any T."""
    buf = np.empty(n, dtype=np.float32)
    buf2 = np.empty(n if swig else 1, dtype=np.float32)
    ba, ba2 = buf.ctypes.data, buf2.ctypes.data
    for r in range(r0, r1):
        dequant_row(kind, wa + r * rb, n, buf)
        if swig:
            dequant_row(kind, wa2 + r * rb, n, buf2)
        for t in range(T):
            g = dot_f32(ba, xa + t * n * 4, n)  # n % 256 == 0: no tail
            if swig:
                g = _silu_mul(g, dot_f32(ba2, xa + t * n * 4, n))
            out[t * os_ + r] = g
