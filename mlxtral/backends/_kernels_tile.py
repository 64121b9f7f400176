"""16 weight rows in the vector lanes: Q4_0 (decode and prefill) and the K-quants (prefill).

The arithmetic, one for every (row, token) at every batch size (batch invariance): for each
32-weight block ``b`` in order, the block's exact integer sum ``s_b = sum_k q_k x_k - 8 sum_k x_k``
(unsigned codes against the int8 activations; the offset through ``xo``: ``_kernels_nb.quantize_x``),
then ``acc = fma(float(s_b), d_b * xd_b, acc)`` in float32, starting from 0. ``s_b`` is exact
(|s_b| < 2**24), so it does not matter how the integers are summed, only that the float steps run
per block in order; a vector lane does exactly the scalar steps.

That frees the layout. llama.cpp's repacked Q4_0 (``ggml_gemm_q4_0_8x8_q8_0``) keeps a block of one
row in one lane so the convert, the scale and the FMA are paid once per block for many rows; the
same here, for 16 rows (``<16 x i32>``: one zmm with AVX-512):

* prefill (``gemm_q4_0``): a 16-row tile is first repacked (``repack_q4_0``) into a buffer that
  stays in L1/L2: per block, the 16 scales as float32, then 8 vectors whose lane ``r`` holds 4
  codes of row ``r`` (unpacked to bytes). Every token then costs 8 ``vpdpbusd`` per block for all
  16 rows, the activations' 4 bytes broadcast, plus one convert, multiply and FMA.
* decode and a few tokens (``dot16_q4_0``, up to 16 with VNNI): the rows as they lie in the file
  (the stream is memory-bound). With VNNI each block's codes of the 16 rows are transposed into the
  repacked layout in registers (``_lanes16``) once for up to 8 tokens, which then take the tile's
  steps; on the portable and ARM paths one ``vpdpbusd`` (``sdot``) per row and block, the 16 rows'
  lane sums folded by a shuffle tree into one vector of block sums, then the same convert, multiply
  and FMA.
* rows past a multiple of 16 (``dot1_q4_0``): one row, the same steps on scalars.

The K-quants (section below) keep ``_kernels_kq``'s arithmetic, already whole-superblock (exact
integer sums, then one float step per superblock): their prefill repacks 16-row tiles from
``u8_pack``'s unpacked superblocks and takes those steps per lane, bit for bit what the row dots
give; decode keeps the row dots.

Without VNNI the integer dot goes through ``vpmaddubsw`` + ``vpmaddwd`` (``_kernels_ir._dot_u8s8``:
the codes are 0..15, so the int16 pairs never saturate) and LLVM splits the 16-lane vectors where
the target has no 512-bit registers: the same integers, the same float steps, the same bits. On
AVX2 the Q4_0 dot has its own shape (``_build_dot16_avx2``: 8 rows a pass, each block's codes
transposed into the lanes once for up to 8 tokens, :data:`DOT16_NT`, and for up to
:data:`DOT16_PASS` with the accumulators in memory, ``_build_dot16_avx2_many``; a token then costs
int16 multiply-adds and adds, no horizontal sums). It beats the split 16-lane tiles at every batch size
measured, so on AVX2 Q4_0 is never repacked (:data:`TILE_MIN_T`).
"""
from __future__ import annotations

from functools import partial

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from mlxtral.backends._kernels_ir import (
    FORCED_GENERIC,
    HAVE_AVX2,
    HAVE_VNNI,
    ISA,
    _dot_u8s8,
    _fma,
    _gep,
    _get_fn,
    _intr,
    _load,
    _madd_ones,
    _maddubs,
    _mask,
    _nibbles32,
    _ptr,
    _splat,
    _vconst,
    f16,
    f32,
    i8,
    i16,
    i32,
    i64,
    prefetch_ahead,
    ptr_i32,
    ptr_u8,
    v4i32,
    v8f,
    v8i32,
    v16i8,
    v32i8,
)
from mlxtral.backends._kernels_kq import (
    K_Q3_K,
    K_Q6_K,
    U8_BYTES,
    _silu_mul,
    _super_scales,
    _tb,
    _u8_pack,
)
from mlxtral.backends._kernels_kq import run_rows as kq_row_dots

ROWS = 16  # rows per tile: the lanes of one <16 x i32>
Q4_BYTES = 18  # a Q4_0 block: d (f16), 16 bytes of nibbles
TILE_BLOCK_BYTES = 4 * ROWS + 8 * 4 * ROWS  # repacked block: 16 float scales, 8 x (16 rows x 4 codes)
NT_MAX = 8  # tokens per pass over a repacked tile

v16i32 = ir.VectorType(i32, 16)
v16f = ir.VectorType(f32, 16)
v64i8 = ir.VectorType(i8, 64)
v16i16 = ir.VectorType(i16, 16)
v16f16 = ir.VectorType(f16, 16)


def _c(v: int) -> ir.Constant:
    return ir.Constant(i64, v)


def _splat_as(b: ir.IRBuilder, s: ir.Value, ty: ir.VectorType) -> ir.Value:
    """The scalar ``s`` in every lane of a ``ty`` vector."""
    v = b.insert_element(ir.Constant(ty, ir.Undefined), s, ir.Constant(i32, 0))
    return b.shuffle_vector(v, v, _mask([0] * ty.count))


def _fma16(b: ir.IRBuilder, a: ir.Value, c: ir.Value, acc: ir.Value) -> ir.Value:
    return b.call(_intr(b.module, "llvm.fma.v16f32", v16f, [v16f, v16f, v16f]), [a, c, acc])


def _dpbusd16(b: ir.IRBuilder, acc: ir.Value, w: ir.Value, x: ir.Value) -> ir.Value:
    """<16 x i32> acc + per lane the dot of 4 unsigned bytes of ``w`` and 4 signed bytes of ``x``."""
    if HAVE_VNNI:
        fn = _intr(b.module, "llvm.x86.avx512.vpdpbusd.512", v16i32, [v16i32, v16i32, v16i32])
        return b.call(fn, [acc, w, x])
    halves = []
    for h in range(2):
        idx = _mask(list(range(8 * h, 8 * h + 8)))
        wh = b.bitcast(b.shuffle_vector(w, w, idx), v32i8)
        xh = b.bitcast(b.shuffle_vector(x, x, idx), v32i8)
        halves.append(_dot_u8s8(b, wh, xh, b.shuffle_vector(acc, acc, idx)))
    return b.shuffle_vector(halves[0], halves[1], _mask(list(range(16))))


def _hsum_i32(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """<8 x i32> -> i32 (integers: any order gives the same sum)."""
    s4 = b.add(b.shuffle_vector(v, v, _mask([0, 1, 2, 3])), b.shuffle_vector(v, v, _mask([4, 5, 6, 7])))
    s2 = b.add(b.shuffle_vector(s4, s4, _mask([0, 1])), b.shuffle_vector(s4, s4, _mask([2, 3])))
    return b.add(b.extract_element(s2, ir.Constant(i32, 0)), b.extract_element(s2, ir.Constant(i32, 1)))


def _fold16(b: ir.IRBuilder, zs: list) -> ir.Value:
    """8 x <16 x i32> (vector i: row 2i's 8 lane sums, then row 2i+1's) -> <16 x i32>, lane r the
    sum of row r's 8 lanes: three levels, each merging two vectors and halving the lanes a row has."""
    def pair(u, v, lo, hi):
        return b.add(b.shuffle_vector(u, v, _mask(lo)), b.shuffle_vector(u, v, _mask(hi)))

    def level(vs, k):  # k lanes per row in: rows' lanes [j*k .. j*k+k) -> k/2 lanes per row out
        h = k // 2
        lo = [i * k + j for i in range(32 // k) for j in range(h)]
        hi = [i * k + h + j for i in range(32 // k) for j in range(h)]
        return [pair(vs[2 * i], vs[2 * i + 1], lo, hi) for i in range(len(vs) // 2)]

    return level(level(level(zs, 8), 4), 2)[0]


def _scales16(b: ir.IRBuilder, wp: ir.Value, rb: ir.Value, boff: ir.Value) -> ir.Value:
    """The f16 scales of block ``boff`` of 16 rows ``rb`` bytes apart -> <16 x float> (one gather
    of the 4 bytes at each scale: AVX-512's ``vpgatherdd``)."""
    v16i64 = ir.VectorType(i64, 16)
    base = _splat_as(b, b.ptrtoint(_gep(b, wp, boff), i64), v16i64)
    addrs = b.add(base, b.mul(_splat_as(b, rb, v16i64), ir.Constant(v16i64, list(range(ROWS)))))
    pty = ir.VectorType(i32.as_pointer(), 16)
    mty = ir.VectorType(ir.IntType(1), 16)
    fn = _intr(b.module, "llvm.masked.gather.v16i32.v16p0i32", v16i32, [pty, i32, mty, v16i32])
    on = ir.Constant(mty, [1] * 16)
    words = b.call(fn, [b.inttoptr(addrs, pty), ir.Constant(i32, 1), on, ir.Constant(v16i32, ir.Undefined)])
    return b.fpext(b.bitcast(b.trunc(words, v16i16), v16f16), v16f)


def _function(mod: ir.Module, name: str, ret: ir.Type, nargs: int) -> tuple[ir.Function, ir.IRBuilder]:
    """An internal function of ``nargs`` int64 and a builder at its entry."""
    fn = ir.Function(mod, ir.FunctionType(ret, [i64] * nargs), name)
    fn.linkage = "internal"
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def _loop(b: ir.IRBuilder, n: ir.Value, inits: list, body) -> list:
    """``for i in range(n)`` from ``b``'s block, carrying values (``inits`` at the start):
    ``body(b, i, values)`` emits one iteration (it may add blocks; it leaves ``b`` in the last)
    and returns the next values. Leaves ``b`` after the loop; returns the final values (the
    ``inits`` when n is 0)."""
    fn = b.function
    start = b.block
    loop, done = fn.append_basic_block("loop"), fn.append_basic_block("done")
    b.cbranch(b.icmp_unsigned(">", n, _c(0)), loop, done)
    b.position_at_end(loop)
    i = b.phi(i64)
    vals = [b.phi(v.type) for v in inits]
    new = body(b, i, vals)
    nxt = b.add(i, _c(1))
    end = b.block
    i.add_incoming(_c(0), start)
    i.add_incoming(nxt, end)
    for phi, v0, v in zip(vals, inits, new, strict=True):
        phi.add_incoming(v0, start)
        phi.add_incoming(v, end)
    b.cbranch(b.icmp_unsigned("<", nxt, n), loop, done)
    b.position_at_end(done)
    fins = []
    for v0, v in zip(inits, new, strict=True):
        f = b.phi(v0.type)
        f.add_incoming(v0, start)
        f.add_incoming(v, end)
        fins.append(f)
    return fins


def _code_rows(b: ir.IRBuilder, wp: ir.Value, rb: ir.Value, boff: ir.Value) -> list:
    """The 16 code bytes of block ``boff`` of each of 16 rows ``rb`` bytes apart: 16 <4 x i32>."""
    return [_load(b, wp, b.add(boff, b.add(b.mul(rb, _c(r)), _c(2))), v4i32) for r in range(ROWS)]


def _build_repack(mod: ir.Module, name: str) -> ir.Function:
    """void repack(w, rb, nb, buf): 16 rows of ``nb`` Q4_0 blocks (``rb`` bytes apart) -> ``buf``
    [nb][TILE_BLOCK_BYTES]: the scales as <16 x float>, then vector g (0..7) with lane r = the codes
    of row r's elements 4g..4g+3 (low nibbles of bytes 4g.. for g < 4, high ones of 4(g-4).. after)."""
    fn, b = _function(mod, name, ir.VoidType(), 4)
    wa, rb, nb, ba = fn.args
    wp, bp = _ptr(b, wa, i8), _ptr(b, ba, i8)

    def block(b: ir.IRBuilder, blk: ir.Value, _: list) -> list:
        boff = b.mul(blk, _c(Q4_BYTES))
        obase = b.mul(blk, _c(TILE_BLOCK_BYTES))
        b.store(_scales16(b, wp, rb, boff), b.bitcast(_gep(b, bp, obase), v16f.as_pointer()), align=4)
        cat = _code_rows(b, wp, rb, boff)
        while len(cat) > 1:  # concatenate the 16 x <4 x i32> into one <64 x i32> (row-major)
            n = cat[0].type.count
            pairs = zip(cat[::2], cat[1::2], strict=True)
            cat = [b.shuffle_vector(u, v, _mask(list(range(2 * n)))) for u, v in pairs]
        allw = cat[0]
        for m in range(4):  # word m of every row -> lanes
            wm = b.shuffle_vector(allw, allw, _mask([4 * r + m for r in range(ROWS)]))
            lo = b.and_(wm, _vconst(v16i32, 0x0F0F0F0F))
            hi = b.and_(b.lshr(wm, _vconst(v16i32, 4)), _vconst(v16i32, 0x0F0F0F0F))
            for g, v in ((m, lo), (m + 4, hi)):
                p = _gep(b, bp, b.add(obase, _c(4 * ROWS + 64 * g)))
                b.store(v, b.bitcast(p, v16i32.as_pointer()), align=4)
        return []

    _loop(b, nb, [], block)
    b.ret_void()
    return fn


def _store16(b: ir.IRBuilder, oa: ir.Value, off: ir.Value, v: ir.Value) -> None:
    b.store(v, b.bitcast(_gep(b, _ptr(b, oa, i8), off), v16f.as_pointer()), align=4)


ZERO16 = ir.Constant(v16f, [ir.Constant(f32, 0.0)] * 16)
IZERO16 = ir.Constant(v16i32, [ir.Constant(i32, 0)] * 16)


def _token16(b: ir.IRBuilder, codes: list, xp: ir.Value, xop: ir.Value, xdp: ir.Value, blk: ir.Value,
             d: ir.Value, acc: ir.Value) -> ir.Value:
    """One token's VNNI step for 16 rows' block ``blk`` (codes in a repacked tile's lanes, scales
    ``d`` <16 x float>): the block's offset sum to start, 8 ``vpdpbusd`` against the token's 4
    bytes broadcast (16 exact block sums), then one convert, multiply and FMA into ``acc``. The
    tile GEMM (prefill) and ``dot16`` (decode) both take this step: one arithmetic at every T."""
    xoff = b.shl(blk, _c(5))
    s = _splat_as(b, _hsum_i32(b, _load(b, xop, xoff, v8i32)), v16i32)
    for g in range(8):
        s = _dpbusd16(b, s, codes[g], _splat_as(b, _load(b, xp, b.add(xoff, _c(4 * g)), i32), v16i32))
    xd = _load(b, xdp, b.shl(blk, _c(2)), f32)
    return _fma16(b, b.sitofp(s, v16f), b.fmul(d, _splat_as(b, xd, v16f)), acc)


def _build_gemm(mod: ir.Module, name: str, nt: int) -> ir.Function:
    """void gemm(buf, nb, xq, xd, xo, n, out, ostride): a repacked 16-row tile against ``nt`` tokens
    (activation rows ``n`` int8 apart; ``xd`` nb floats apart, ``xo`` n bytes apart); token t's
    16 results go to ``out + 4 * t * ostride``."""
    fn, b = _function(mod, name, ir.VoidType(), 8)
    ba, nb, xa, xda, xoa, n, oa, ostride = fn.args
    bp = _ptr(b, ba, i8)
    xps = [_ptr(b, b.add(xa, b.mul(n, _c(t))), i8) for t in range(nt)]
    xops = [_ptr(b, b.add(xoa, b.mul(n, _c(t))), i8) for t in range(nt)]
    xdps = [_ptr(b, b.add(xda, b.mul(b.shl(nb, _c(2)), _c(t))), i8) for t in range(nt)]

    def block(b: ir.IRBuilder, blk: ir.Value, accs: list) -> list:
        obase = b.mul(blk, _c(TILE_BLOCK_BYTES))
        dw = b.load(b.bitcast(_gep(b, bp, obase), v16f.as_pointer()), align=4)
        codes = [b.load(b.bitcast(_gep(b, bp, b.add(obase, _c(4 * ROWS + 64 * g))), v16i32.as_pointer()),
                        align=4) for g in range(8)]
        return [_token16(b, codes, xps[t], xops[t], xdps[t], blk, dw, accs[t]) for t in range(nt)]

    for t, fin in enumerate(_loop(b, nb, [ZERO16] * nt, block)):
        _store16(b, oa, b.mul(ostride, _c(4 * t)), fin)
    b.ret_void()
    return fn


def _unpack32(b: ir.IRBuilder, u: ir.Value, v: ir.Value, hi: bool, width: int) -> ir.Value:
    """AVX-512's ``vpunpck{l,h}{dq,qdq}`` on <16 x i32>: in each 128-bit lane, the low (or high)
    halves of ``u`` and ``v`` interleaved by ``width`` (1: dwords, 2: qwords)."""
    h = 2 if hi else 0
    idx = []
    for lane in range(4):
        base = 4 * lane + h
        if width == 1:
            idx += [base, 16 + base, base + 1, 16 + base + 1]
        else:
            idx += [base, base + 1, 16 + base, 16 + base + 1]
    return b.shuffle_vector(u, v, _mask(idx))


def _lanes16(b: ir.IRBuilder, wp: ir.Value, rb: ir.Value, boff: ir.Value) -> list:
    """Block ``boff`` of 16 rows ``rb`` bytes apart -> 8 <16 x i32> code vectors laid out as a
    repacked tile's (``_build_repack``): lane r of vector j holds row r's codes 4j..4j+3 (j < 4) or
    16+4(j-4).. (j >= 4). The rows' 16 code bytes are transposed in registers (four rows to a zmm,
    then a 4 x 4 dword transpose in each 128-bit lane), their nibbles split by an and and a shift."""
    rows = _code_rows(b, wp, rb, boff)
    quads = []
    for k in range(4):  # lane L of quad k: row k + 4L
        lo = b.shuffle_vector(rows[k], rows[k + 4], _mask(list(range(8))))
        hi = b.shuffle_vector(rows[k + 8], rows[k + 12], _mask(list(range(8))))
        quads.append(b.shuffle_vector(lo, hi, _mask(list(range(16)))))
    t0, t1 = (_unpack32(b, quads[0], quads[1], h, 1) for h in (False, True))
    t2, t3 = (_unpack32(b, quads[2], quads[3], h, 1) for h in (False, True))
    dwords = [_unpack32(b, t0, t2, False, 2), _unpack32(b, t0, t2, True, 2),
              _unpack32(b, t1, t3, False, 2), _unpack32(b, t1, t3, True, 2)]  # dword j of every row
    low = ir.Constant(v16i32, [0x0F0F0F0F] * 16)
    four = ir.Constant(v16i32, [4] * 16)
    return [b.and_(d, low) for d in dwords] + [b.and_(b.lshr(d, four), low) for d in dwords]


def _pairs16(b: ir.IRBuilder, wp: ir.Value, rb: ir.Value, boff: ir.Value) -> list:
    """Block ``boff`` of 16 rows -> 8 <16 x i32> code vectors, vector i holding rows 2i and 2i+1
    (each row's 32 codes in 8 lanes, in the activations' order): for the fold (``_fold16``)."""
    codes = []
    for r in range(0, ROWS, 2):  # rows r and r + 1 in one 512-bit vector
        qa = _load(b, wp, b.add(boff, b.add(b.mul(rb, _c(r)), _c(2))), v16i8)
        qb = _load(b, wp, b.add(boff, b.add(b.mul(rb, _c(r + 1)), _c(2))), v16i8)
        q = b.shuffle_vector(qa, qb, _mask(list(range(32))))
        lo = b.and_(q, _vconst(v32i8, 15))
        hi = b.lshr(q, _vconst(v32i8, 4))  # row a: lo[0:16] hi[0:16], row b: lo[16:32] hi[16:32]
        order = [*range(16), *range(32, 48), *range(16, 32), *range(48, 64)]
        codes.append(b.bitcast(b.shuffle_vector(lo, hi, _mask(order)), v16i32))
    return codes


def _build_dot16(mod: ir.Module, name: str, nt: int = 1) -> ir.Function:
    """void dot16(w, rb, xq, xd, xo, nb, n, out): 16 rows as they lie (``rb`` bytes apart) . ``nt``
    tokens (activation rows ``n`` int8 apart, as ``gemm``'s) -> out[16 t .. 16 t + 15] for token t.
    Each block's codes are put in registers once for the ``nt`` tokens. With VNNI transposed into
    the repacked tile's lanes (``_lanes16``): a token then takes exactly the tile's steps
    (``_build_gemm``), 8 ``vpdpbusd`` against its 4 bytes broadcast from the block's offset, no
    horizontal sums. Elsewhere (portable, ARM) two rows a vector (``_pairs16``): a token costs 8
    dot products and the fold. Then one convert, multiply and FMA per token."""
    if HAVE_AVX2 and not HAVE_VNNI:
        return _build_dot16_avx2(mod, name, nt)
    fn, b = _function(mod, name, ir.VoidType(), 9)
    wa, rb, xa, xda, xoa, nb, n, oa, _ = fn.args
    wp = _ptr(b, wa, i8)
    toks = range(nt)
    xps = [_ptr(b, b.add(xa, b.mul(n, _c(t))), i8) for t in toks]
    xops = [_ptr(b, b.add(xoa, b.mul(n, _c(t))), i8) for t in toks]
    xdps = [_ptr(b, b.add(xda, b.mul(b.shl(nb, _c(2)), _c(t))), i8) for t in toks]

    def block(b: ir.IRBuilder, blk: ir.Value, accs: list) -> list:
        boff = b.mul(blk, _c(Q4_BYTES))
        xoff = b.shl(blk, _c(5))
        # the next tile (16 rows further), 16 x 18 bytes a block: by its turn it is in cache
        ahead = b.add(b.mul(rb, _c(ROWS)), b.mul(blk, _c(ROWS * Q4_BYTES)))
        prefetch_ahead(b, wp, ahead, ROWS * Q4_BYTES + 64)
        codes = _lanes16(b, wp, rb, boff) if HAVE_VNNI else _pairs16(b, wp, rb, boff)
        d = _scales16(b, wp, rb, boff)

        if HAVE_VNNI:  # the tile's own step
            return [_token16(b, codes, xps[t], xops[t], xdps[t], blk, d, accs[t]) for t in toks]

        def sums(t: int) -> ir.Value:  # token t's 16 exact block sums, two rows a vector
            xo = _load(b, xops[t], xoff, v8i32)
            x = _load(b, xps[t], xoff, v32i8)
            x2 = b.bitcast(b.shuffle_vector(x, x, _mask(list(range(32)) * 2)), v16i32)  # twice
            xo2 = b.bitcast(b.shuffle_vector(xo, xo, _mask(list(range(8)) * 2)), v16i32)
            return _fold16(b, [_dpbusd16(b, xo2, c, x2) for c in codes])

        new = []
        for t in toks:
            xd = _load(b, xdps[t], b.shl(blk, _c(2)), f32)
            new.append(_fma16(b, b.sitofp(sums(t), v16f), b.fmul(d, _splat_as(b, xd, v16f)), accs[t]))
        return new

    for t, fin in enumerate(_loop(b, nb, [ZERO16] * nt, block)):
        _store16(b, oa, _c(4 * ROWS * t), fin)
    b.ret_void()
    return fn


def _scales8(b: ir.IRBuilder, wp: ir.Value, rb: ir.Value, boff: ir.Value) -> ir.Value:
    """The f16 scales of block ``boff`` of 8 rows ``rb`` bytes apart -> <8 x float>: each row's
    block start loaded as <8 x i16> (within its 18 bytes) and their first words gathered by an
    unpack tree (AVX2's gather is slower than these loads)."""
    v8i16, v4i32, v2i64 = (ir.VectorType(t, n) for t, n in ((i16, 8), (i32, 4), (i64, 2)))
    vs = [_load(b, wp, b.add(boff, b.mul(rb, _c(r))), v8i16) for r in range(8)]
    l1 = [b.bitcast(b.shuffle_vector(vs[2 * i], vs[2 * i + 1], _mask([0, 8, 1, 9, 2, 10, 3, 11])), v4i32)
          for i in range(4)]
    l2 = [b.bitcast(b.shuffle_vector(l1[2 * i], l1[2 * i + 1], _mask([0, 4, 1, 5])), v2i64) for i in range(2)]
    words = b.bitcast(b.shuffle_vector(l2[0], l2[1], _mask([0, 2])), v8i16)
    return b.fpext(b.bitcast(words, ir.VectorType(f16, 8)), v8f)


_LO32, _HI32 = _mask([0, 8, 1, 9, 4, 12, 5, 13]), _mask([2, 10, 3, 11, 6, 14, 7, 15])
_LO64, _HI64 = _mask([0, 4, 2, 6]), _mask([1, 5, 3, 7])


def _lanes8(b: ir.IRBuilder, wp: ir.Value, rb: ir.Value, boff: ir.Value) -> tuple[list, ir.Value]:
    """Block ``boff`` of 8 rows ``rb`` bytes apart -> (8 <32 x i8> vectors, lane r of vector j
    holding row r's codes 4j..4j+3 (j < 4) or 16+4(j-4).. (j >= 4); the rows' scales <8 x float>).
    The 8 rows' 16 code bytes are transposed (two ``vinserti128`` loads and 8 unpacks): vector j's
    lane r is row r's packed bytes 4j..4j+3, whose low nibbles are codes 4j..4j+3 and high nibbles
    codes 16+4j..16+4j+3."""
    v4i64 = ir.VectorType(i64, 4)

    def qs(r: int) -> ir.Value:
        return _load(b, wp, b.add(boff, b.add(b.mul(rb, _c(r)), _c(2))), v16i8)

    both = _mask(list(range(32)))
    ys = [b.bitcast(b.shuffle_vector(qs(i), qs(i + 4), both), v8i32) for i in range(4)]  # rows i, i + 4
    ts = [b.bitcast(b.shuffle_vector(ys[a], ys[a + 1], m), v4i64)
          for a in (0, 2) for m in (_LO32, _HI32)]  # t0, t1 (rows 0 1 4 5), t2, t3 (rows 2 3 6 7)
    ps = [b.shuffle_vector(ts[a], ts[a + 2], m) for a in (0, 1) for m in (_LO64, _HI64)]  # dword j
    ws: list = [None] * 8
    low = _vconst(v32i8, 15)
    for j, p in enumerate(ps):
        ws[j] = b.and_(b.bitcast(p, v32i8), low)
        ws[4 + j] = b.and_(b.bitcast(b.lshr(p, ir.Constant(v4i64, [4] * 4)), v32i8), low)
    return ws, _scales8(b, wp, rb, boff)


def _token8(b: ir.IRBuilder, ws: list, d: ir.Value, xp: ir.Value, xbp: ir.Value, xdp: ir.Value,
            blk: ir.Value, acc: ir.Value) -> ir.Value:
    """One token's step for 8 rows' block ``blk`` (``_lanes8``): each code vector against its 4
    activations broadcast (``vpmaddubsw``: int16 pair sums, |.| <= 2 * 15 * 127), the 8 added in
    int16 (16 products a lane, |.| <= 30480 < 2**15: exact), widened by one ``vpmaddwd`` and the
    block's offset added (the same for every row: -8 * sum(x), from ``xb``); then the convert,
    multiply and FMA into ``acc``."""
    xoff = b.shl(blk, _c(5))
    p16 = None
    for j in range(8):
        xw = _load(b, xp, b.add(xoff, _c(4 * j)), i32)
        m = _maddubs(b, ws[j], b.bitcast(_splat_as(b, xw, v8i32), v32i8))
        p16 = m if p16 is None else b.add(p16, m)
    xo = _load(b, xbp, b.shl(blk, _c(2)), i32)
    s = b.add(_madd_ones(b, p16), _splat_as(b, xo, v8i32))
    xd = _load(b, xdp, b.shl(blk, _c(2)), f32)
    return _fma(b, b.sitofp(s, v8f), b.fmul(d, _splat(b, xd)), acc)


def _prefetch8(b: ir.IRBuilder, wp: ir.Value, rb: ir.Value, blk: ir.Value) -> None:
    """The next 8 rows: by their turn (or the next tile's) they are in cache."""
    prefetch_ahead(b, wp, b.add(b.mul(rb, _c(8)), b.mul(blk, _c(8 * Q4_BYTES))), 8 * Q4_BYTES + 64)


def _build_dot16_avx2(mod: ir.Module, name: str, nt: int) -> ir.Function:
    """``dot16`` for AVX2 without VNNI: two passes of 8 rows (one ymm of row sums each; 16 rows'
    vectors would not fit AVX2's 16 registers), each block's codes put in the lanes once
    (``_lanes8``) for ``nt`` tokens (``_token8``), the accumulators in registers. The same exact
    integers as the 16-lane path, then the same convert, multiply and FMA per row and token: the
    same bits at any ``nt``. No horizontal adds: a token costs 8 multiply-adds and 8 adds per 8 rows."""
    fn, b = _function(mod, name, ir.VoidType(), 9)
    wa, rb, xa, xda, _, nb, n, oa, xba = fn.args
    toks = range(nt)
    xps = [_ptr(b, b.add(xa, b.mul(n, _c(t))), i8) for t in toks]
    xdps = [_ptr(b, b.add(xda, b.mul(b.shl(nb, _c(2)), _c(t))), i8) for t in toks]
    xbps = [_ptr(b, b.add(xba, b.mul(b.shl(nb, _c(2)), _c(t))), i8) for t in toks]
    zero = ir.Constant(v8f, [ir.Constant(f32, 0.0)] * 8)
    op = _ptr(b, oa, i8)
    for half in range(2):
        wp = _ptr(b, b.add(wa, b.mul(rb, _c(8 * half))), i8)

        def block(b: ir.IRBuilder, blk: ir.Value, accs: list, wp: ir.Value = wp) -> list:
            _prefetch8(b, wp, rb, blk)
            ws, d = _lanes8(b, wp, rb, b.mul(blk, _c(Q4_BYTES)))
            return [_token8(b, ws, d, xps[t], xbps[t], xdps[t], blk, accs[t]) for t in toks]

        for t, fin in enumerate(_loop(b, nb, [zero] * nt, block)):
            b.store(fin, b.bitcast(_gep(b, op, _c(4 * ROWS * t + 32 * half)), v8f.as_pointer()), align=4)
    b.ret_void()
    return fn


def _build_dot16_avx2_many(mod: ir.Module, name: str) -> ir.Function:
    """``_build_dot16_avx2`` for a runtime number of tokens (the 10th argument), the accumulators
    in ``out`` (token t's 16 at 16 t, zeroed first): each block's codes go into the lanes once for
    all of them (prefill), where the register version puts them there again every 8 tokens."""
    fn, b = _function(mod, name, ir.VoidType(), 10)
    wa, rb, xa, xda, _, nb, n, oa, xba, nt = fn.args
    op = _ptr(b, oa, i8)
    zero = ir.Constant(v8f, [ir.Constant(f32, 0.0)] * 8)

    def acc_ptr(b: ir.IRBuilder, t: ir.Value, half: int) -> ir.Value:
        return b.bitcast(_gep(b, op, b.add(b.mul(t, _c(4 * ROWS)), _c(32 * half))), v8f.as_pointer())

    def clear(b: ir.IRBuilder, t: ir.Value, _: list) -> list:
        for half in range(2):
            b.store(zero, acc_ptr(b, t, half), align=4)
        return []

    _loop(b, nt, [], clear)
    for half in range(2):
        wp = _ptr(b, b.add(wa, b.mul(rb, _c(8 * half))), i8)

        def block(b: ir.IRBuilder, blk: ir.Value, _: list, wp: ir.Value = wp, half: int = half) -> list:
            _prefetch8(b, wp, rb, blk)
            ws, d = _lanes8(b, wp, rb, b.mul(blk, _c(Q4_BYTES)))

            def token(b: ir.IRBuilder, t: ir.Value, _: list) -> list:
                xp = _ptr(b, b.add(xa, b.mul(n, t)), i8)
                xdp = _ptr(b, b.add(xda, b.mul(b.shl(nb, _c(2)), t)), i8)
                xbp = _ptr(b, b.add(xba, b.mul(b.shl(nb, _c(2)), t)), i8)
                ap = acc_ptr(b, t, half)
                b.store(_token8(b, ws, d, xp, xbp, xdp, blk, b.load(ap, align=4)), ap, align=4)
                return []

            _loop(b, nt, [], token)
            return []

        _loop(b, nb, [], block)
    b.ret_void()
    return fn


def _build_dot1(mod: ir.Module, name: str) -> ir.Function:
    """float dot1(w, xq, xd, xo, nb): one row, the same steps on scalars."""
    fn, b = _function(mod, name, f32, 5)
    wa, xa, xda, xoa, nb = fn.args
    wp, xp, xop, xdp = (_ptr(b, a, i8) for a in (wa, xa, xoa, xda))

    def block(b: ir.IRBuilder, blk: ir.Value, accs: list) -> list:
        boff = b.mul(blk, _c(Q4_BYTES))
        xoff = b.shl(blk, _c(5))
        q = _nibbles32(b, _load(b, wp, b.add(boff, _c(2)), v16i8))
        s = _hsum_i32(b, _dot_u8s8(b, q, _load(b, xp, xoff, v32i8), _load(b, xop, xoff, v8i32)))
        d = b.fpext(_load(b, wp, boff, f16), f32)
        xd = _load(b, xdp, b.shl(blk, _c(2)), f32)
        fma = _intr(b.module, "llvm.fma.f32", f32, [f32, f32, f32])
        return [b.call(fma, [b.sitofp(s, f32), b.fmul(d, xd), accs[0]])]

    (fin,) = _loop(b, nb, [ir.Constant(f32, 0.0)], block)
    b.ret(fin)
    return fn


@intrinsic
def repack_q4_0(typingctx, w, rb, nb, buf):
    sig = types.void(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        builder.call(_get_fn(builder.module, f"mlxtral_repack_q4_0_{ISA}", _build_repack), list(args))
        return context.get_dummy_value()

    return sig, codegen


NTS = (8, 4, 2, 1)  # tokens per pass over a tile: 8, then what is left by 4, 2, 1


def _switch_call(builder: ir.IRBuilder, key: ir.Value, cases: dict, args: list) -> None:
    """Call ``cases[k]`` = (name, build) for the runtime ``key`` == k (other keys: nothing)."""
    fn = builder.function
    end = fn.append_basic_block("switch_end")
    sw = builder.switch(key, end)
    for k, (name, build) in cases.items():
        bb = fn.append_basic_block(f"case_{k}")
        sw.add_case(ir.Constant(i64, k), bb)
        with builder.goto_block(bb):
            builder.call(_get_fn(builder.module, name, build), args)
            builder.branch(end)
    builder.position_at_end(end)


@intrinsic
def gemm_q4_0(typingctx, k, buf, nb, xq, xd, xo, n, out, ostride):
    """A repacked Q4_0 tile against ``k`` (one of NTS) tokens: ``_build_gemm``."""
    sig = types.void(*([types.int64] * 9))

    def codegen(context, builder, signature, args):
        cases = {nt: (f"mlxtral_gemm{nt}_q4_0_{ISA}", partial(_build_gemm, nt=nt)) for nt in NTS}
        _switch_call(builder, args[0], cases, list(args[1:]))
        return context.get_dummy_value()

    return sig, codegen


# tokens one pass of dot16 takes: a block's codes are put in the lanes once for up to 8 (on AVX2
# without VNNI the accumulators and the codes fill the 16 ymm registers; with VNNI 16 a pass was no
# faster at 12 and 16 tokens); the portable and ARM paths one (they repack from 2)
DOT16_NT = 8 if HAVE_AVX2 else 1
# tokens one pass of dot16 takes at most: past DOT16_NT (prefill on AVX2) the accumulators live in
# the output buffer and each block's codes go into the lanes once for all of them
_AVX2_DOTS = HAVE_AVX2 and not HAVE_VNNI  # the dots that read xb
DOT16_PASS = 32 if _AVX2_DOTS else DOT16_NT


@intrinsic
def dot16_q4_0(typingctx, k, w, rb, xq, xd, xo, nb, n, out, xb):
    """16 rows as they lie against ``k`` (1 .. DOT16_PASS) tokens: ``_build_dot16`` (``xb``: each
    block's offset, the sum of its ``xo``, int32 [k, nb]; read by the AVX2 kernels), past
    DOT16_NT tokens ``_build_dot16_avx2_many``."""
    sig = types.void(*([types.int64] * 10))

    def codegen(context, builder, signature, args):
        cases = {nt: (f"mlxtral_dot16x{nt}_q4_0_{ISA}", partial(_build_dot16, nt=nt))
                 for nt in range(1, DOT16_NT + 1)}
        if DOT16_PASS > DOT16_NT:  # more tokens: the accumulators in ``out``
            many = builder.icmp_unsigned(">", args[0], ir.Constant(i64, DOT16_NT))
            with builder.if_else(many) as (then, otherwise):
                with then:
                    fn = _get_fn(builder.module, f"mlxtral_dot16xn_q4_0_{ISA}", _build_dot16_avx2_many)
                    builder.call(fn, [*args[1:], args[0]])
                with otherwise:
                    _switch_call(builder, args[0], cases, list(args[1:]))
        else:
            _switch_call(builder, args[0], cases, list(args[1:]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot1_q4_0(typingctx, w, xq, xd, xo, nb):
    sig = types.float32(*([types.int64] * 5))

    def codegen(context, builder, signature, args):
        return builder.call(_get_fn(builder.module, f"mlxtral_dot1_q4_0_{ISA}", _build_dot1), list(args))

    return sig, codegen


_CACHE = not FORCED_GENERIC  # as _kernels_nb: a forced lower ISA neither loads nor writes the cache
# tokens from which a task's rows are repacked into tiles (fewer: dotted where they lie). With VNNI
# past two passes of dot16 (Xeon, 3584 x 1024 from DRAM, 2 threads: 2 / 4 / 8 / 12 / 16 tokens
# 110 / 124 / 162 / 299 / 354 us where the tiles from 2 took 213 / 245 / 308 / 345 / 408; from ~20
# the tiles win); on the portable and ARM paths from 2. On AVX2 never: there the 16-lane dots are split
# in two and the transposing dot16 was measured faster at every T (EPYC, 3584 x 1024, 2 threads:
# 29 / 31 / 31 us a token at T = 8 / 64 / 256 against the tiles' 47 / 38 / 38)
TILE_MIN_T = 2 if DOT16_NT == 1 else (2 * DOT16_NT + 1 if HAVE_VNNI else 1 << 62)


@njit(cache=_CACHE, nogil=True, inline="always")
def _group_size(left):
    return NT_MAX if left >= NT_MAX else (4 if left >= 4 else (2 if left >= 2 else 1))


@njit(cache=_CACHE, nogil=True, inline="always")
def _emit(out, os_, t0, r, k, g, u, swig):
    """Tokens t0..t0+k of rows r..r+15 from ``g`` (and ``u``: ``silu(g) * u`` with ``swig``), each
    token's 16 values ROWS apart, into ``out`` (token rows ``os_`` apart)."""
    for j in range(k):
        for i in range(ROWS):
            v = g[j * ROWS + i]
            out[(t0 + j) * os_ + r + i] = _silu_mul(v, u[j * ROWS + i]) if swig else v


@njit(cache=_CACHE, nogil=True)
def _block_offsets(xoa, T, n):
    """Each 32-block's offset, the sum of its 8 ``xo`` words (int32 [T, n/4] at ``xoa``) -> int32
    [T, n/32]: integers, so the same sum ``dot16`` would take."""
    xo = carray(ptr_i32(xoa), (T * (n // 4),))
    nb = n // 32
    xb = np.zeros(T * nb, dtype=np.int32)
    for i in range(T * nb):
        for j in range(8):
            xb[i] += xo[i * 8 + j]
    return xb


@njit(cache=_CACHE, nogil=True)
def run_rows(swig, wa, wa2, rb, n, T, r0, r1, xqa, xda, xoa, out, os_):
    """Q4_0 output rows ``r0..r1`` of a task, every token: ``out[t * os_ + r]`` = row r . token t
    (or ``silu(gate) * up`` with ``swig``). Activations: ``quantize_x`` with offset 8 (xq int8
    [T, n], xd float32 [T, n/32], xo int32 [T, n/4]). Tiles of 16 rows, then single rows; every
    path is the one arithmetic of the module docstring, so no result depends on T or on r0."""
    nb = n // 32
    r16 = r0 + (r1 - r0) // ROWS * ROWS
    # numba frees an array after its last use as an array, not after its address's: every use
    # below goes through the array (buf[0], g[0], ...) so none is freed while the IR writes to it
    g = np.empty(max(NT_MAX, DOT16_PASS) * ROWS, dtype=np.float32)
    u = np.empty(max(NT_MAX, DOT16_PASS) * ROWS, dtype=np.float32)
    if T < TILE_MIN_T:
        # the block offsets: only the AVX2 dots read them (the 16-lane one takes xo itself)
        xb = _block_offsets(xoa, T, n) if _AVX2_DOTS else np.zeros(1, dtype=np.int32)
        t0 = 0
        while t0 < T:  # up to DOT16_PASS tokens a pass over the rows as they lie
            k = min(DOT16_PASS, T - t0)
            xq, xd, xo, xbt = xqa + t0 * n, xda + t0 * nb * 4, xoa + t0 * n, xb.ctypes.data + t0 * nb * 4
            for r in range(r0, r16, ROWS):
                dot16_q4_0(k, wa + r * rb, rb, xq, xd, xo, nb, n, g.ctypes.data, xbt)
                if swig:
                    dot16_q4_0(k, wa2 + r * rb, rb, xq, xd, xo, nb, n, u.ctypes.data, xbt)
                _emit(out, os_, t0, r, k, g, u, swig)
            t0 += k
        xb[0] = 0  # (kept alive until here: see above)
    else:
        nm = 2 if swig else 1
        buf = np.empty(nm * nb * TILE_BLOCK_BYTES, dtype=np.uint8)
        for r in range(r0, r16, ROWS):
            b0 = buf.ctypes.data
            b1 = b0 + (nb * TILE_BLOCK_BYTES if swig else 0)
            repack_q4_0(wa + r * rb, rb, nb, b0)
            if swig:
                repack_q4_0(wa2 + r * rb, rb, nb, b1)
            t0 = 0
            while t0 < T:  # 8 tokens a pass, then 4, 2, 1: each token's steps are the same
                k = _group_size(T - t0)
                xq, xd, xo = xqa + t0 * n, xda + t0 * nb * 4, xoa + t0 * n
                gemm_q4_0(k, buf.ctypes.data, nb, xq, xd, xo, n, g.ctypes.data, ROWS)
                if swig:
                    gemm_q4_0(k, b1, nb, xq, xd, xo, n, u.ctypes.data, ROWS)
                _emit(out, os_, t0, r, k, g, u, swig)
                t0 += k
        buf[0] = 0
    for t in range(T):  # the rows past the last tile
        xq, xd, xo = xqa + t * n, xda + t * nb * 4, xoa + t * n
        for r in range(r16, r1):
            v = dot1_q4_0(wa + r * rb, xq, xd, xo, nb)
            out[t * os_ + r] = _silu_mul(v, dot1_q4_0(wa2 + r * rb, xq, xd, xo, nb)) if swig else v


@njit(cache=_CACHE, nogil=True)
def run_rows_twins(wa, rb, n, r0, r1, xqa, xda, xoa, out, wb, nb_, xqb, xdb, xob, outb):
    """:func:`run_rows` at one token (not fused) of two twins, a cut product's halves: for each 16
    rows, the first half's dot then the second's, so a row's two halves are read one after the
    other. Each half's values are the bits :func:`run_rows` gives it alone (out, outb)."""
    nb, nbb = n // 32, nb_ // 32
    g = np.empty(max(NT_MAX, DOT16_PASS) * ROWS, dtype=np.float32)
    xa = _block_offsets(xoa, 1, n) if _AVX2_DOTS else np.zeros(1, dtype=np.int32)
    xb = _block_offsets(xob, 1, nb_) if _AVX2_DOTS else np.zeros(1, dtype=np.int32)
    r16 = r0 + (r1 - r0) // ROWS * ROWS
    for r in range(r0, r16, ROWS):
        dot16_q4_0(1, wa + r * rb, rb, xqa, xda, xoa, nb, n, g.ctypes.data, xa.ctypes.data)
        _emit(out, 0, 0, r, 1, g, g, False)
        dot16_q4_0(1, wb + r * rb, rb, xqb, xdb, xob, nbb, nb_, g.ctypes.data, xb.ctypes.data)
        _emit(outb, 0, 0, r, 1, g, g, False)
    for r in range(r16, r1):
        out[r] = dot1_q4_0(wa + r * rb, xqa, xda, xoa, nb)
        outb[r] = dot1_q4_0(wb + r * rb, xqb, xdb, xob, nbb)
    xa[0] = 0  # (kept alive until here: see run_rows)
    xb[0] = 0


# ---- the K-quants: the same tiles over superblocks -------------------------------------------------
# A K-quant superblock's two exact integer sums (``_kernels_kq``: sumi = sum_g scale_g * sum_k
# (code_k + off) x_k, summ = sum_g min_g * bsum_g over its 16 groups of 16 weights), then its float
# step ``acc += xd * (d * float(sumi) - dmin * float(summ))``: ``row_dot_direct``'s operations in its
# order, here per lane for 16 rows. Each superblock of a 16-row tile is repacked from ``u8_pack``'s
# unpacked form: d and dmin (16 floats each), the codes interleaved as Q4_0's (64 vectors of 4
# codes a row), the 16 group scales (int32 a row) and the mins in pairs (two int16 a row, for one
# ``vpdpwssd`` per pair of groups against the token's bsum pair).
KQ_TILE_BYTES = 2 * 64 + 64 * 64 + 16 * 64 + 8 * 64  # d, dmin, codes, scales, min pairs
KQ_GROUP_BYTES = 256 + 32 + 4  # a token's share of a superblock in a group: codes, bsums, scale
_KQ_CODES, _KQ_SCALES, _KQ_MINS = 128, 128 + 64 * 64, 128 + 64 * 64 + 16 * 64


def _pairs_dot16(b: ir.IRBuilder, acc: ir.Value, m: ir.Value, p: ir.Value) -> ir.Value:
    """<16 x i32> acc + per lane the dot of two int16 of ``m`` with two int16 of ``p`` (exact)."""
    if HAVE_VNNI:
        fn = _intr(b.module, "llvm.x86.avx512.vpdpwssd.512", v16i32, [v16i32, v16i32, v16i32])
        return b.call(fn, [acc, m, p])
    v32i16, v32i32 = ir.VectorType(i16, 32), ir.VectorType(i32, 32)
    prod = b.mul(b.sext(b.bitcast(m, v32i16), v32i32), b.sext(b.bitcast(p, v32i16), v32i32))
    ev = b.shuffle_vector(prod, prod, _mask(list(range(0, 32, 2))))
    od = b.shuffle_vector(prod, prod, _mask(list(range(1, 32, 2))))
    return b.add(acc, b.add(ev, od))


def _build_kq_gemm(mod: ir.Module, name: str, nt: int, off: int, mins: bool) -> ir.Function:
    """void gemm(buf, nsb, xg, out): a repacked 16-row K-quant tile against a group of ``nt`` q8_K
    tokens packed per superblock (``kq_group_acts``: for each superblock, the nt tokens' 256 codes,
    then their 16 int16 bsums, then their float scales), so every activation sits at a constant
    offset from one pointer (with a pointer per token the loop ran out of registers); token t's
    16 results go to ``out + 64 * t``. The 16 groups of a superblock are a loop, not unrolled
    (unrolled, the twelve variants cost ~60 MB of LLVM memory to load)."""
    fn, b = _function(mod, name, ir.VoidType(), 4)
    ba, nsb, xga, oa = fn.args
    bp, xp = _ptr(b, ba, i8), _ptr(b, xga, i8)
    gb, gd = nt * 256, nt * (256 + 32)  # a superblock's bsums and scales in the group

    def vload(b: ir.IRBuilder, o: ir.Value, ty: ir.Type = v16i32) -> ir.Value:
        return b.load(b.bitcast(_gep(b, bp, o), ty.as_pointer()), align=4)

    def superblock(b: ir.IRBuilder, sb: ir.Value, accs: list) -> list:
        base = b.mul(sb, _c(KQ_TILE_BYTES))
        gx = b.mul(sb, _c(nt * KQ_GROUP_BYTES))  # this superblock's codes, bsums, scales of the group

        def group(b: ir.IRBuilder, g: ir.Value, sums: list) -> list:
            wbase = b.add(base, b.add(_c(_KQ_CODES), b.shl(g, _c(8))))  # 4 vectors of 64 bytes
            ws = [vload(b, b.add(wbase, _c(64 * j))) for j in range(4)]
            sc = vload(b, b.add(base, b.add(_c(_KQ_SCALES), b.shl(g, _c(6)))))
            xg0 = b.add(gx, b.shl(g, _c(4)))  # + 16 g: the group's codes of token 0
            bg0 = b.add(gx, b.shl(g, _c(1)))  # + 2 g: its bsum
            new = []
            for t in range(nt):
                acc = IZERO16
                if off:
                    bsum = b.sext(_load(b, xp, b.add(bg0, _c(gb + 32 * t)), i16), i32)
                    acc = _splat_as(b, b.mul(bsum, ir.Constant(i32, off)), v16i32)
                for j in range(4):
                    xw = _splat_as(b, _load(b, xp, b.add(xg0, _c(256 * t + 4 * j)), i32), v16i32)
                    acc = _dpbusd16(b, acc, ws[j], xw)
                new.append(b.add(sums[t], b.mul(acc, sc)))
            return new

        sumi = _loop(b, _c(16), [IZERO16] * nt, group)
        summ = [IZERO16] * nt
        if mins:
            for h in range(8):
                mp = vload(b, b.add(base, _c(_KQ_MINS + 64 * h)))
                for t in range(nt):
                    pair = _splat_as(b, _load(b, xp, b.add(gx, _c(gb + 32 * t + 4 * h)), i32), v16i32)
                    summ[t] = _pairs_dot16(b, summ[t], mp, pair)
        d = vload(b, base, v16f)
        dmin = vload(b, b.add(base, _c(64)), v16f)
        new = []
        for t in range(nt):  # row_dot_direct's float steps: acc + xd * (d * sumi - dmin * summ)
            s = b.fsub(b.fmul(d, b.sitofp(sumi[t], v16f)), b.fmul(dmin, b.sitofp(summ[t], v16f)))
            xd = _splat_as(b, _load(b, xp, b.add(gx, _c(gd + 4 * t)), f32), v16f)
            new.append(b.fadd(accs[t], b.fmul(xd, s)))
        return new

    for t, fin in enumerate(_loop(b, nsb, [ZERO16] * nt, superblock)):
        _store16(b, oa, _c(64 * t), fin)
    b.ret_void()
    return fn


# per family: with mins (Q4_K, Q5_K, Q2_K), Q6_K's code offset -32, Q3_K's -4
KQ_FAMILIES = ((0, True), (-32, False), (-4, False))
KQ_TILE_MIN_T = 16  # fewer tokens: _kernels_kq's row dots (the repack costs ~10-16 tokens' row dots)


@njit(cache=_CACHE, nogil=True, inline="always")
def kq_tiles(T):
    """Whether a K-quant task of T tokens runs in tiles (``kq_run_rows``, with ``kq_group_acts``'
    grouped activations) rather than ``_kernels_kq``'s row dots: the one test both sides use."""
    return T >= KQ_TILE_MIN_T and HAVE_AVX2


@intrinsic
def kq_gemm(typingctx, family, k, buf, nsb, xg, out):
    """A repacked K-quant tile of ``family`` (an index into KQ_FAMILIES) against ``k`` (one of NTS)
    grouped tokens: ``_build_kq_gemm``."""
    sig = types.void(*([types.int64] * 6))

    def codegen(context, builder, signature, args):
        cases = {}
        for f, (off, mins) in enumerate(KQ_FAMILIES):
            for nt in NTS:
                name = f"mlxtral_kq_gemm{nt}_{-off}{'m' if mins else ''}_{ISA}"
                cases[16 * f + nt] = (name, partial(_build_kq_gemm, nt=nt, off=off, mins=mins))
        _switch_call(builder, builder.add(builder.mul(args[0], _c(16)), args[1]), cases, list(args[2:]))
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=_CACHE, nogil=True, inline="always")
def _kq_family(kind):
    return 1 if kind == K_Q6_K else (2 if kind == K_Q3_K else 0)


@njit(cache=_CACHE, nogil=True)
def kq_group_acts(xq, xd, bs):
    """q8_K activations (``quantize_q8k``: codes int8 [T, n], scales float32 [T, n/256], bsums
    int16 [T, n/16]) -> uint8 [T * (n/256) * KQ_GROUP_BYTES]: tokens in groups of 8, 4, 2, 1 (as the
    tiles take them), each group per superblock: its codes, bsums, scales. Made once per job, when
    the tiles will run (else a placeholder)."""
    T, n = xq.shape
    nsb = n // 256
    if not kq_tiles(T):
        return np.zeros(1, dtype=np.uint8)
    xg = np.empty(T * nsb * KQ_GROUP_BYTES, dtype=np.uint8)
    # the bytes of each, under new names (numba's AOT compiler does not retype a rebound name)
    xqb = xq.reshape(T * n).view(np.uint8)
    bsb = bs.reshape(T * nsb * 16).view(np.uint8)
    xdb = xd.reshape(T * nsb).view(np.uint8)
    t0 = 0
    o = 0
    while t0 < T:
        k = _group_size(T - t0)
        for sb in range(nsb):
            for t in range(k):
                src = (t0 + t) * n + sb * 256
                xg[o + t * 256: o + t * 256 + 256] = xqb[src: src + 256]
                sbs = ((t0 + t) * nsb + sb) * 32
                xg[o + k * 256 + t * 32: o + k * 256 + t * 32 + 32] = bsb[sbs: sbs + 32]
                sd = ((t0 + t) * nsb + sb) * 4
                xg[o + k * 288 + t * 4: o + k * 288 + t * 4 + 4] = xdb[sd: sd + 4]
            o += k * KQ_GROUP_BYTES
        t0 += k
    return xg


@njit(cache=_CACHE, nogil=True)
def kq_repack(kind, wa, rb, nsb, buf, stage):
    """16 K-quant rows at ``wa`` (``rb`` bytes apart), ``nsb`` superblocks -> ``buf`` (uint8,
    nsb * KQ_TILE_BYTES), through ``u8_pack`` into ``stage`` (uint8, 16 * nsb * U8_BYTES): each
    row read front to back (one stream at a time), then the tile transposed out of L2."""
    tb = _tb(kind)
    b32 = buf.view(np.int32)
    bf = buf.view(np.float32)
    s16 = stage.view(np.int16)
    s32 = stage.view(np.int32)
    w16 = U8_BYTES // 4  # int32 per unpacked superblock
    for r in range(ROWS):
        ra = wa + r * rb
        for sb in range(nsb):
            o = sb * (KQ_TILE_BYTES // 4)
            d, dmin = _super_scales(kind, carray(ptr_u8(ra + sb * tb), (tb,)), 0)
            bf[o + r] = d
            bf[o + ROWS + r] = dmin
            _u8_pack(kind, ra + sb * tb, stage.ctypes.data + (r * nsb + sb) * U8_BYTES)
    for sb in range(nsb):
        o = sb * (KQ_TILE_BYTES // 4)
        c = o + _KQ_CODES // 4
        for j in range(64):  # 4 codes of every row, for each of the 64 groups of 4
            for r in range(ROWS):
                b32[c + j * ROWS + r] = s32[(r * nsb + sb) * w16 + j]
        s = o + _KQ_SCALES // 4
        for g in range(16):
            for r in range(ROWS):
                b32[s + g * ROWS + r] = np.int32(s16[(r * nsb + sb) * 2 * w16 + 128 + g])
        m = o + _KQ_MINS // 4
        for h in range(8):
            for r in range(ROWS):
                b32[m + h * ROWS + r] = s32[(r * nsb + sb) * w16 + 72 + h]


@njit(cache=_CACHE, nogil=True)
def kq_run_rows(kind, swig, wa, wa2, rb, n, T, r0, r1, xqa, xda, bsa, xga, out, os_):
    """``_kernels_kq.run_rows`` where ``kq_tiles(T)``, the activations also grouped at ``xga``
    (``kq_group_acts``): whole 16-row tiles here, the rows after the last tile there (the same
    bits either way)."""
    nsb = n // 256
    r16 = r0 + (r1 - r0) // ROWS * ROWS
    g = np.empty(NT_MAX * ROWS, dtype=np.float32)
    u = np.empty(NT_MAX * ROWS, dtype=np.float32)
    nm = 2 if swig else 1
    buf = np.empty(nm * nsb * KQ_TILE_BYTES, dtype=np.uint8)
    stage = np.empty(ROWS * nsb * U8_BYTES, dtype=np.uint8)
    half = nsb * KQ_TILE_BYTES
    for r in range(r0, r16, ROWS):
        kq_repack(kind, wa + r * rb, rb, nsb, buf[:half], stage)
        if swig:
            kq_repack(kind, wa2 + r * rb, rb, nsb, buf[half:], stage)
        t0 = 0
        while t0 < T:
            k = _group_size(T - t0)
            xo = xga + t0 * nsb * KQ_GROUP_BYTES
            kq_gemm(_kq_family(kind), k, buf.ctypes.data, nsb, xo, g.ctypes.data)
            if swig:
                kq_gemm(_kq_family(kind), k, buf.ctypes.data + half, nsb, xo, u.ctypes.data)
            _emit(out, os_, t0, r, k, g, u, swig)
            t0 += k
    if r16 < r1:
        kq_row_dots(kind, swig, wa, wa2, rb, n, T, r16, r1, xqa, xda, bsa, out, os_)
