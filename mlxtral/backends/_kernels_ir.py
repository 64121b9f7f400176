"""Hand-written LLVM IR for the inner loops of :mod:`mlxtral.backends.kernels`, as numba intrinsics.

Each ``dot_*`` intrinsic is one whole row dot product ``sum_k w[k] * x[k]`` over raw GGUF blocks,
taking plain addresses (int64) so the same code runs on the calling thread and on the spinning
worker threads. The loops keep an ``<8 x float>`` accumulator per block pair; a block's 32 products
(unsigned 4/8-bit weights x signed int8 activations) become 8 int32 sums of 4 by, per host
(:data:`ISA`, chosen once at import from the CPU features numba compiles for):

* ``vnni`` (x86 with AVX-512 VNNI + VL): one ``vpdpbusd`` on 256 bits, as llama.cpp does there;
* ``avx2``: ``vpmaddubsw`` (-> int16 pairs) + ``vpmaddwd`` (-> int32), as llama.cpp's AVX2 path;
* ``neondot`` (ARM with the dot-product extension: Apple M1 and later, Graviton 2 and later):
  two ``sdot`` on 128 bits each, as llama.cpp's ARM path (``vdotq_s32``). ``sdot`` multiplies
  signed bytes by signed bytes: the unsigned codes that go in are below 128 (4- and 5-bit codes),
  and Q8_0 / IQ4_NL take their signed values straight (no sign trick, no +128 offset);
* ``portable``: the same two steps in portable vector IR (LLVM lowers them on any target; slower).

The four give bit-identical results (the int16 pairs never saturate: |w| <= 128, |x| <= 127; the
sums are exact integers on every path). The ARM path cannot run on the x86 hosts this project is
built on: ``tests/test_kernel_arm.py`` compiles its IR for AArch64 and runs the machine code in
an emulator (unicorn), against the host's AVX2 (or portable) path, bit for bit.
``MLXTRAL_KERNEL_ISA=avx2|portable`` forces a lower path (for tests and comparisons; a path this
CPU lacks is refused); ``MLXTRAL_NO_AVX2=1`` is ``portable``. Kernels compiled on a forced path
are not written to numba's disk cache.

Q4_0 has its own kernels (``_kernels_tile``: whole-block sums, 16 rows in the lanes) built from
these helpers. Q5_0 / Q5_1 (5-bit codes: the nibbles plus ``qh``'s bits, unsigned 0..31) go the
Q4_0 / Q4_1 way (offset -16 or min through ``xs``), IQ4_NL the Q8_0 way (its signed 16-value
table, looked up with ``vpshufb``); ``sb_dot_iq4_xs`` is one IQ4_XS superblock against q8_K codes
(``_kernels_iq``).

Activations for the block types are pre-quantized per 32-block (``_kernels_nb.quantize_x``):
``xq`` int8 [in], ``xd`` float32 [in/32] (scale), and per kind either ``xo`` int32 [in/4] (minus
the code offset times each 4 activations' sum: the integer dot starts there, so Q4_0's -8, Q5_0's
-16 and the +128 that makes Q8_0 / IQ4_NL codes unsigned cancel exactly, in the integers) or
``xs`` float32 [in/32] (q8_1's float16(d * sum(xq)), for Q4_1 / Q5_1's min).

numba's on-disk cache keys each entry on the jitted function's source file and bytecode and on
the CPU (name and feature string numba compiles for, ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``
included). The ISA here is derived from that same feature string, so a different CPU never loads
code compiled for another; and :func:`key_cache_on_ir` adds this file's hash to the freshness
stamp of the kernel modules (``_kernels_*.py``), so editing the IR alone invalidates their entries.

Also here: atomics (acquire load, release store, compare-and-swap, fetch-add), ``pause``, f16->f32,
and address -> typed pointer casts for ``numba.carray``.
"""
from __future__ import annotations

import hashlib
import os

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mlxtral.env import env_choice, env_flag
from mlxtral.errors import UsageError

ISAS = ("vnni", "avx2", "neondot", "portable")
ISA_CHOICES = ("auto", *ISAS)
# what a host with each best path may force instead (itself, then lower paths of its family)
_LOWER = {"vnni": ("vnni", "avx2", "portable"), "avx2": ("avx2", "portable"),
          "neondot": ("neondot", "portable"), "portable": ("portable",)}


def _target_features() -> set[str]:
    """The CPU features numba compiles for (its own ``NUMBA_CPU_FEATURES`` when set, else the
    host's): the same string numba puts in every disk-cache key, so our choice follows the key."""
    try:
        from numba.core import config

        feats = config.CPU_FEATURES
        if feats is None:
            host = llvm_binding.get_host_cpu_features()
            return {k for k, on in host.items() if on}
        return {f[1:] for f in str(feats).split(",") if f.startswith("+")}
    except Exception:  # pragma: no cover - unusual platforms
        return set()


def _best_isa(feats: set[str]) -> str:
    if {"avx512vnni", "avx512vl", "avx512bw", "avx2"} <= feats:
        return "vnni"
    if {"avx2", "fma", "f16c"} <= feats:
        return "avx2"
    if {"neon", "dotprod"} <= feats:  # LLVM's AArch64 feature names
        return "neondot"
    return "portable"


def _chosen_isa(best: str) -> str:
    """``MLXTRAL_KERNEL_ISA`` (auto, vnni, avx2, neondot, portable) against what this CPU has."""
    want = env_choice("MLXTRAL_KERNEL_ISA", ISA_CHOICES) or "auto"
    if env_flag("MLXTRAL_NO_AVX2"):
        if want not in ("auto", "portable"):
            raise UsageError(f"MLXTRAL_NO_AVX2=1 and MLXTRAL_KERNEL_ISA={want} disagree: unset one")
        want = "portable"
    if want == "auto":
        return best
    if want not in _LOWER[best]:
        raise UsageError(f"MLXTRAL_KERNEL_ISA={want}: this CPU has no {want} (the best it runs is {best})")
    return want


HOST_ISA = _best_isa(_target_features())
ISA = _chosen_isa(HOST_ISA)
# A forced lower path (for tests) must neither load nor write the host's cached kernels: the cache
# key (CPU, source, bytecode) does not see the choice (see _kernels_nb._CACHE).
FORCED_GENERIC = ISA != HOST_ISA
HAVE_AVX2 = ISA in ("vnni", "avx2")
HAVE_VNNI = ISA == "vnni"
HAVE_NEONDOT = ISA == "neondot"
if HAVE_AVX2:
    llvm_binding.initialize_native_asmparser()  # for the one line of inline asm in _half


def _ir_hash() -> str:
    """This file, ``_kernels_kq.py``, ``_kernels_iq.py`` and ``_kernels_tile.py`` (K-quant, IQ4_XS and
    Q4_0 IR and kernels that ``_kernels_nb``'s cached ``run_chunk`` compiles in): a change to any
    must recompile every cached kernel."""
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (__file__, *(os.path.join(here, f"_kernels_{m}.py") for m in ("kq", "iq", "tile"))):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


IR_HASH = _ir_hash()


def key_cache_on_ir() -> None:
    """Make numba's disk-cache freshness stamp of our kernel modules (``mlxtral/backends/
    _kernels_*.py``) include this file's hash: their compiled code embeds the IR written here,
    which numba's own key (their source and bytecode) does not see. Other modules' caching is left
    as numba does it; a numba without these internals keeps its default behaviour."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover
        return
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)  # 0.68 / older
    classes = getattr(impl, "_locator_classes", None)
    if not isinstance(classes, list) or any(getattr(c, "_mlxtral_ir", False) for c in classes):
        return
    here = os.path.dirname(os.path.abspath(__file__))

    def keyed(base: type) -> type:
        class Keyed(base):  # type: ignore[misc, valid-type]
            _mlxtral_ir = True

            @classmethod
            def from_function(cls, py_func, py_file):
                path = os.path.abspath(py_file)
                if os.path.dirname(path) != here or not os.path.basename(path).startswith("_kernels_"):
                    return None
                return super().from_function(py_func, py_file)

            def get_source_stamp(self):
                return (super().get_source_stamp(), IR_HASH)

        Keyed.__name__ = f"MlxtralIR{base.__name__}"
        return Keyed

    try:
        ours = [keyed(c) for c in classes if hasattr(c, "get_source_stamp") and hasattr(c, "from_function")]
    except TypeError:  # pragma: no cover - a class that cannot be subclassed
        return
    classes[:0] = ours


key_cache_on_ir()

i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
f32, f16 = ir.FloatType(), ir.HalfType()
v8f = ir.VectorType(f32, 8)
v8i32 = ir.VectorType(i32, 8)
v4i32 = ir.VectorType(i32, 4)
v16i16 = ir.VectorType(i16, 16)
v16i8 = ir.VectorType(i8, 16)
v32i8 = ir.VectorType(i8, 32)
v8i16 = ir.VectorType(i16, 8)


def _vconst(ty: ir.VectorType, value: int | float) -> ir.Constant:
    return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)


def _mask(idx: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(i32, len(idx)), [ir.Constant(i32, i) for i in idx])


def _intr(mod: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(mod, ir.FunctionType(ret, args), name)


def _ptr(b: ir.IRBuilder, addr: ir.Value, ty: ir.Type) -> ir.Value:
    return b.inttoptr(addr, ty.as_pointer())


def _gep(b: ir.IRBuilder, p: ir.Value, off: ir.Value) -> ir.Value:
    return b.gep(p, [off])


def _load(b: ir.IRBuilder, base: ir.Value, off: ir.Value, ty: ir.Type) -> ir.Value:
    """Unaligned load of ``ty`` at byte pointer ``base + off``."""
    p = b.bitcast(_gep(b, base, off), ty.as_pointer())
    return b.load(p, align=1)


def _half(b: ir.IRBuilder, base: ir.Value, off: ir.Value) -> ir.Value:
    """The f16 at ``base + off`` as float. On x86 through inline asm (``vpbroadcastw`` from memory
    + ``vcvtph2ps``): LLVM turns a plain half load into ``vpinsrw`` into a stale register, a false
    dependency on the accumulator that serialized the whole loop."""
    p = b.bitcast(_gep(b, base, off), i16.as_pointer())
    if HAVE_AVX2:
        fty = ir.FunctionType(f32, [i16.as_pointer()])
        return b.asm(fty, "vpbroadcastw ($1), $0\n\tvcvtph2ps $0, $0", "=x,r", [p], False)
    return b.fpext(b.bitcast(b.load(p, align=1), f16), f32)


def _split_even_odd(b: ir.IRBuilder, v: ir.Value, n: int) -> tuple[ir.Value, ir.Value]:
    ev = b.shuffle_vector(v, v, _mask(list(range(0, n, 2))))
    od = b.shuffle_vector(v, v, _mask(list(range(1, n, 2))))
    return ev, od


def _maddubs(b: ir.IRBuilder, u: ir.Value, s: ir.Value) -> ir.Value:
    """<32 x i8> unsigned u, <32 x i8> signed s -> <16 x i16> pair sums (callers never saturate)."""
    if HAVE_AVX2:
        fn = _intr(b.module, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
        return b.call(fn, [u, s])
    v32i16 = ir.VectorType(i16, 32)
    p = b.mul(b.zext(u, v32i16), b.sext(s, v32i16))
    ev, od = _split_even_odd(b, p, 32)
    return b.add(ev, od)


def _madd_ones(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """<16 x i16> -> <8 x i32> pair sums."""
    if HAVE_AVX2:
        fn = _intr(b.module, "llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
        return b.call(fn, [v, _vconst(v16i16, 1)])
    w = b.sext(v, ir.VectorType(i32, 16))
    ev, od = _split_even_odd(b, w, 16)
    return b.add(ev, od)


def _dot_u8s8(b: ir.IRBuilder, u: ir.Value, s: ir.Value, init: ir.Value | None = None) -> ir.Value:
    """<32 x i8> unsigned u . <32 x i8> signed s (+ <8 x i32> ``init``) -> <8 x i32>, lane i the
    sum of bytes 4i..4i+3: one ``vpdpbusd`` with VNNI (``init`` its accumulator), else
    ``vpmaddubsw`` + ``vpmaddwd`` (the same sums: callers' int16 pairs never saturate there) and
    an add."""
    if HAVE_VNNI:
        fn = _intr(b.module, "llvm.x86.avx512.vpdpbusd.256", v8i32, [v8i32, v8i32, v8i32])
        acc = _vconst(v8i32, 0) if init is None else init
        return b.call(fn, [acc, b.bitcast(u, v8i32), b.bitcast(s, v8i32)])
    if HAVE_NEONDOT:  # signed x signed: u < 128 here, or signed codes (see _signed_codes)
        fn = _intr(b.module, "llvm.aarch64.neon.sdot.v4i32.v16i8", v4i32, [v4i32, v16i8, v16i8])
        acc = _vconst(v8i32, 0) if init is None else init
        halves = [b.call(fn, [b.shuffle_vector(acc, acc, _mask(list(range(4 * h, 4 * h + 4)))),
                              b.shuffle_vector(u, u, _mask(list(range(16 * h, 16 * h + 16)))),
                              b.shuffle_vector(s, s, _mask(list(range(16 * h, 16 * h + 16))))])
                  for h in (0, 1)]
        return b.shuffle_vector(halves[0], halves[1], _mask(list(range(8))))
    s4 = _madd_ones(b, _maddubs(b, u, s))
    return s4 if init is None else b.add(s4, init)


def _abs_sign(b: ir.IRBuilder, w: ir.Value, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(|w|, x * sign(w)) for a signed x signed dot through maddubs; on ``neondot`` (w, x) as they
    are: ``sdot`` multiplies signed bytes."""
    if HAVE_NEONDOT:
        return w, x
    if HAVE_AVX2:
        fn = _intr(b.module, "llvm.x86.avx2.psign.b", v32i8, [v32i8, v32i8])
        return b.call(fn, [w, w]), b.call(fn, [x, w])
    zero = _vconst(v32i8, 0)
    neg = b.icmp_signed("<", w, zero)
    aw = b.select(neg, b.sub(zero, w), w)
    sx = b.select(neg, b.sub(zero, x), x)
    sx = b.select(b.icmp_signed("==", w, zero), zero, sx)
    return aw, sx


def _fma(b: ir.IRBuilder, a: ir.Value, c: ir.Value, acc: ir.Value) -> ir.Value:
    fn = _intr(b.module, "llvm.fma.v8f32", v8f, [v8f, v8f, v8f])
    return b.call(fn, [a, c, acc])


def _splat(b: ir.IRBuilder, s: ir.Value) -> ir.Value:
    v = b.insert_element(ir.Constant(v8f, ir.Undefined), s, ir.Constant(i32, 0))
    return b.shuffle_vector(v, v, _mask([0] * 8))


def _hsum(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    lo = b.shuffle_vector(v, v, _mask([0, 1, 2, 3]))
    hi = b.shuffle_vector(v, v, _mask([4, 5, 6, 7]))
    s4 = b.fadd(lo, hi)
    s2 = b.fadd(b.shuffle_vector(s4, s4, _mask([0, 1])), b.shuffle_vector(s4, s4, _mask([2, 3])))
    return b.fadd(b.extract_element(s2, ir.Constant(i32, 0)), b.extract_element(s2, ir.Constant(i32, 1)))


PREFETCH_BYTES = 2048  # how far ahead of the weights being read the loops ask for more (see below)


def prefetch_ahead(b: ir.IRBuilder, wp: ir.Value, off: ir.Value, nbytes: int) -> None:
    """Ask for the weight bytes ``PREFETCH_BYTES`` past ``wp + off .. + nbytes`` (one prefetch
    per 64-byte line of the span, into every cache level). Measured on this project's KVM Xeon:
    the hardware prefetcher barely follows our row streams there (a Q4_0 matvec over 394 MB of
    matrices ran at 7 GB/s and its Q8_0 twin, twice the bytes, in the same time); with this, 13 and
    16 GB/s. A prefetch never faults, so running past the end of a matrix is harmless."""
    fn = _intr(b.module, "llvm.prefetch.p0i8", ir.VoidType(), [i8.as_pointer(), i32, i32, i32])
    for k in range(0, nbytes, 64):
        pa = _gep(b, wp, b.add(off, ir.Constant(i64, PREFETCH_BYTES + k)))
        b.call(fn, [pa, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


IQ4_XS_BYTES = 136  # d (f16), scales_h (u16), scales_l (4 bytes), 128 nibble bytes
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl


def _nibbles32(b: ir.IRBuilder, q: ir.Value) -> ir.Value:
    """16 bytes <16 x i8> -> 32 codes 0..15: low nibbles are elements 0-15, high ones 16-31."""
    lo = b.and_(q, _vconst(v16i8, 15))
    hi = b.lshr(q, _vconst(v16i8, 4))
    return b.shuffle_vector(lo, hi, _mask(list(range(32))))


def _bits32(b: ir.IRBuilder, wp: ir.Value, off: ir.Value) -> ir.Value:
    """The 32 bits of the little-endian word at ``wp + off`` -> <32 x i8>, element k 16 where bit k
    is set, else 0 (Q5_0 / Q5_1's fifth bits). The word as a <32 x i1> mask (element k = bit k):
    with AVX-512 one ``kmovd`` and a masked move; LLVM lowers it as ggml's ``bytes_from_bits_32``
    (broadcast, and, compare) on AVX2, and generically elsewhere."""
    on = b.bitcast(_load(b, wp, off, i32), ir.VectorType(ir.IntType(1), 32))
    return b.select(on, _vconst(v32i8, 16), _vconst(v32i8, 0))


def _iq4_lookup(b: ir.IRBuilder, idx: ir.Value, bias: int = 0) -> ir.Value:
    """<32 x i8> codes 0..15 -> IQ4_NL's signed values, or with ``bias`` 128 the same + 128 as
    unsigned bytes (``vpshufb`` on a 16-entry table, as llama.cpp; portable: a chain of selects)."""
    vals = [(v + bias + 128) % 256 - 128 for v in IQ4_VALUES]  # as i8 bit patterns
    if HAVE_AVX2:
        fn = _intr(b.module, "llvm.x86.avx2.pshuf.b", v32i8, [v32i8, v32i8])
        tbl = ir.Constant(v32i8, [ir.Constant(i8, v) for v in vals * 2])
        return b.call(fn, [tbl, idx])
    out = _vconst(v32i8, vals[0])
    for k in range(1, 16):
        out = b.select(b.icmp_unsigned("==", idx, _vconst(v32i8, k)), _vconst(v32i8, vals[k]), out)
    return out


# kind -> (bytes per block, family, has a min m). Codes go into the integer dot unsigned: Q4_0's
# and Q5_0's as stored (0..15, 0..31), Q8_0's and IQ4_NL's signed values + 128 (on the VNNI path;
# without it vpmaddubsw's int16 pairs would saturate, so they keep llama.cpp's sign trick there).
# The offset comes back exactly, in the integers: the dot's accumulator starts at -offset * (the
# lane's four activations' sum), ``xo`` (``_kernels_nb.quantize_x``). Q4_1 / Q5_1 add their
# float min m times q8_1's block sum ``xs`` instead, as llama.cpp.
_BLOCK = {"q4_0": (18, "q4", False), "q4_1": (20, "q4", True), "q8_0": (34, "q8", False),
          "q5_0": (22, "q5", False), "q5_1": (24, "q5", True), "iq4_nl": (18, "iq4", False)}
X_OFFSET = {"q4_0": 8, "q5_0": 16, "q8_0": 128, "iq4_nl": 128, "q4_1": 0, "q5_1": 0}


def _signed_codes(kind: str) -> bool:
    """Codes that go in signed (no offset): Q8_0 / IQ4_NL off VNNI (AVX2 and portable: the sign
    trick; ``neondot``: straight into ``sdot``)."""
    return _BLOCK[kind][1] in ("q8", "iq4") and not HAVE_VNNI


def _build_block_dot(mod: ir.Module, name: str, kind: str) -> ir.Function:
    """float dot(w_addr, xq_addr, xd_addr, xs_addr, nb): one row of ``nb`` blocks."""
    bsz = _BLOCK[kind][0]
    fn = ir.Function(mod, ir.FunctionType(f32, [i64] * 5), name)
    fn.linkage = "internal"
    wa, xa, xda, xsa, nb = fn.args
    entry, loop, tail, done = (fn.append_basic_block(n) for n in ("entry", "loop", "tail", "done"))
    b = ir.IRBuilder(entry)
    wp, xp = _ptr(b, wa, i8), _ptr(b, xa, i8)
    xdp, xsp = _ptr(b, xda, f32), _ptr(b, xsa, i8)
    npair = b.lshr(nb, ir.Constant(i64, 1))
    zero_v = ir.Constant(v8f, [ir.Constant(f32, 0.0)] * 8)
    zero_f = ir.Constant(f32, 0.0)
    b.cbranch(b.icmp_unsigned(">", npair, ir.Constant(i64, 0)), loop, tail)

    def block(bb, blk, acc, corr):  # exactly the multi-token dots' unpack and step
        return _step_x(bb, _unpack_w(bb, wp, blk, kind), xp, xdp, xsp, blk, acc, corr, kind)

    b = ir.IRBuilder(loop)
    i = b.phi(i64)
    a0, a1, c0, c1 = b.phi(v8f), b.phi(v8f), b.phi(f32), b.phi(f32)
    blk0 = b.shl(i, ir.Constant(i64, 1))
    prefetch_ahead(b, wp, b.mul(blk0, ir.Constant(i64, bsz)), 2 * bsz)
    n0, nc0 = block(b, blk0, a0, c0)
    n1, nc1 = block(b, b.add(blk0, ir.Constant(i64, 1)), a1, c1)
    inext = b.add(i, ir.Constant(i64, 1))
    loop_end = b.block
    b.cbranch(b.icmp_unsigned("<", inext, npair), loop, tail)
    i.add_incoming(ir.Constant(i64, 0), entry)
    i.add_incoming(inext, loop_end)
    for phi, new in ((a0, n0), (a1, n1)):
        phi.add_incoming(zero_v, entry)
        phi.add_incoming(new, loop_end)
    for phi, new in ((c0, nc0), (c1, nc1)):
        phi.add_incoming(zero_f, entry)
        phi.add_incoming(new, loop_end)

    b = ir.IRBuilder(tail)
    ta = b.phi(v8f)
    tb = b.phi(v8f)
    tc, td = b.phi(f32), b.phi(f32)
    for phi, v0, v1 in ((ta, zero_v, n0), (tb, zero_v, n1), (tc, zero_f, nc0), (td, zero_f, nc1)):
        phi.add_incoming(v0, entry)
        phi.add_incoming(v1, loop_end)
    acc = b.fadd(ta, tb)
    tc = b.fadd(tc, td)
    odd = b.icmp_unsigned("!=", b.and_(nb, ir.Constant(i64, 1)), ir.Constant(i64, 0))
    last = b.block
    with b.if_then(odd):
        acc_o, corr_o = block(b, b.sub(nb, ir.Constant(i64, 1)), acc, tc)
        odd_end = b.block
    accf = b.phi(v8f)
    accf.add_incoming(acc, last)
    accf.add_incoming(acc_o, odd_end)
    corrf = b.phi(f32)
    corrf.add_incoming(tc, last)
    corrf.add_incoming(corr_o, odd_end)
    b.branch(done)
    b = ir.IRBuilder(done)
    b.ret(b.fadd(_hsum(b, accf), corrf))
    return fn


NTOK = 4  # tokens per weight-row pass in the prefill dot


def _unpack_w(b: ir.IRBuilder, wp: ir.Value, blk: ir.Value, kind: str) -> tuple:
    """Weight block ``blk`` of a row: (32 codes for the integer dot, scale d, min m or None): the
    codes unsigned (see ``_BLOCK``), or signed ones for the sign trick (``_signed_codes``)."""
    bsz, fam, with_min = _BLOCK[kind]
    boff = b.mul(blk, ir.Constant(i64, bsz))
    d = _half(b, wp, boff)
    m = _half(b, wp, b.add(boff, ir.Constant(i64, 2))) if with_min else None
    if fam == "q8":
        w = _load(b, wp, b.add(boff, ir.Constant(i64, 2)), v32i8)
        return (w if _signed_codes(kind) else b.xor(w, _vconst(v32i8, -128))), d, None  # + 128
    if fam == "iq4":  # signed values -127..113
        codes = _nibbles32(b, _load(b, wp, b.add(boff, ir.Constant(i64, 2)), v16i8))
        return _iq4_lookup(b, codes, 0 if _signed_codes(kind) else 128), d, None
    if fam == "q5":  # d [m] qh(4) qs(16): unsigned 0..31
        o = 4 if with_min else 2
        lo4 = _nibbles32(b, _load(b, wp, b.add(boff, ir.Constant(i64, o + 4)), v16i8))
        return b.or_(lo4, _bits32(b, wp, b.add(boff, ir.Constant(i64, o)))), d, m
    q = _load(b, wp, b.add(boff, ir.Constant(i64, 4 if with_min else 2)), v16i8)
    return _nibbles32(b, q), d, m  # unsigned 0..15


def _step_x(b: ir.IRBuilder, wdm: tuple, xp, xdp, xsp, blk, acc, corr, kind: str):
    """One token's part of a block, the same operations in the same order as ``dot_*``'s: the lanes'
    exact integer sums (offset included), times d * xd into the float lanes; a min's m * xs into
    the constant term. ``xsp`` (bytes) holds the token's ``xo`` rows (int32 [nb, 8]) or, for the
    kinds with a min, its ``xs`` (float32 [nb])."""
    w, d, m = wdm
    x = _load(b, xp, b.shl(blk, ir.Constant(i64, 5)), v32i8)
    if _signed_codes(kind):
        s = _dot_u8s8(b, *_abs_sign(b, w, x))
    elif m is None:
        s = _dot_u8s8(b, w, x, _load(b, xsp, b.shl(blk, ir.Constant(i64, 5)), v8i32))
    else:
        s = _dot_u8s8(b, w, x)
    xd = b.load(_gep(b, xdp, blk))
    acc = _fma(b, b.sitofp(s, v8f), _splat(b, b.fmul(d, xd)), acc)
    if m is not None:
        xs = b.load(b.bitcast(_gep(b, xsp, b.shl(blk, ir.Constant(i64, 2))), f32.as_pointer()))
        corr = b.fadd(corr, b.fmul(m, xs))
    return acc, corr


def _build_block_dotn(mod: ir.Module, name: str, kind: str, ntok: int) -> ir.Function:
    """void dotn(w, xq, xd, xs, nb, xq_stride, xd_stride, out): one weight row against ``ntok``
    (2 .. NTOK) token rows (int8 rows ``xq_stride`` bytes apart, scale rows ``xd_stride`` bytes
    apart), each block unpacked once for all of them (prefill, and a batched decode step's experts
    that several sequences picked, are compute-bound); ``out`` gets ntok floats.

    Each token's float sums run in exactly ``dot_*``'s order (even blocks and odd blocks in two
    accumulators, added before the odd last block; the constant terms likewise), so ``out[t]``
    is bit-identical to ``dot_*`` on token ``t`` alone: batching tokens changes no result."""
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64] * 8), name)
    fn.linkage = "internal"
    wa, xa, xda, xsa, nb, xqs, xds, oa = fn.args
    entry, loop, tail, done = (fn.append_basic_block(n) for n in ("entry", "loop", "tail", "done"))
    b = ir.IRBuilder(entry)
    wp = _ptr(b, wa, i8)
    xps = [_ptr(b, b.add(xa, b.mul(xqs, ir.Constant(i64, t))), i8) for t in range(ntok)]
    xdps = [_ptr(b, b.add(xda, b.mul(xds, ir.Constant(i64, t))), f32) for t in range(ntok)]
    xss = xds if _BLOCK[kind][2] else xqs  # a token's xs (float [nb]) or xo (int32 [nb, 8]: xq's bytes)
    xsps = [_ptr(b, b.add(xsa, b.mul(xss, ir.Constant(i64, t))), i8) for t in range(ntok)]
    op = _ptr(b, oa, f32)
    zero_v = ir.Constant(v8f, [ir.Constant(f32, 0.0)] * 8)
    zero_f = ir.Constant(f32, 0.0)
    npair = b.lshr(nb, ir.Constant(i64, 1))
    b.cbranch(b.icmp_unsigned(">", npair, ir.Constant(i64, 0)), loop, tail)

    b = ir.IRBuilder(loop)
    i = b.phi(i64)
    # per token: even/odd vector accumulators and even/odd constant terms, as dot_*
    st = [[b.phi(v8f), b.phi(v8f), b.phi(f32), b.phi(f32)] for _ in range(ntok)]
    blk0 = b.shl(i, ir.Constant(i64, 1))
    blk1 = b.add(blk0, ir.Constant(i64, 1))
    prefetch_ahead(b, wp, b.mul(blk0, ir.Constant(i64, _BLOCK[kind][0])), 2 * _BLOCK[kind][0])
    w0 = _unpack_w(b, wp, blk0, kind)
    new = []
    for t in range(ntok):
        new.append(list(_step_x(b, w0, xps[t], xdps[t], xsps[t], blk0, st[t][0], st[t][2], kind)))
    w1 = _unpack_w(b, wp, blk1, kind)
    for t in range(ntok):
        a1, c1 = _step_x(b, w1, xps[t], xdps[t], xsps[t], blk1, st[t][1], st[t][3], kind)
        new[t] = [new[t][0], a1, new[t][1], c1]  # a0, a1, c0, c1
    inext = b.add(i, ir.Constant(i64, 1))
    loop_end = b.block
    b.cbranch(b.icmp_unsigned("<", inext, npair), loop, tail)
    i.add_incoming(ir.Constant(i64, 0), entry)
    i.add_incoming(inext, loop_end)
    for t in range(ntok):
        for phi, nv, z in zip(st[t], new[t], (zero_v, zero_v, zero_f, zero_f), strict=True):
            phi.add_incoming(z, entry)
            phi.add_incoming(nv, loop_end)

    b = ir.IRBuilder(tail)
    sums = []
    for t in range(ntok):
        ph = [b.phi(ty) for ty in (v8f, v8f, f32, f32)]
        for phi, nv, z in zip(ph, new[t], (zero_v, zero_v, zero_f, zero_f), strict=True):
            phi.add_incoming(z, entry)
            phi.add_incoming(nv, loop_end)
        sums.append(ph)
    accs = [b.fadd(ph[0], ph[1]) for ph in sums]
    corrs = [b.fadd(ph[2], ph[3]) for ph in sums]
    odd = b.icmp_unsigned("!=", b.and_(nb, ir.Constant(i64, 1)), ir.Constant(i64, 0))
    last = b.block
    with b.if_then(odd):
        blk = b.sub(nb, ir.Constant(i64, 1))
        wl = _unpack_w(b, wp, blk, kind)
        odd_vals = [_step_x(b, wl, xps[t], xdps[t], xsps[t], blk, accs[t], corrs[t], kind)
                    for t in range(ntok)]
        odd_end = b.block
    finals = []
    for t in range(ntok):
        a = b.phi(v8f)
        a.add_incoming(accs[t], last)
        a.add_incoming(odd_vals[t][0], odd_end)
        c = b.phi(f32)
        c.add_incoming(corrs[t], last)
        c.add_incoming(odd_vals[t][1], odd_end)
        finals.append((a, c))
    for t, (a, c) in enumerate(finals):
        b.store(b.fadd(_hsum(b, a), c), _gep(b, op, ir.Constant(i64, t)))
    b.branch(done)
    b = ir.IRBuilder(done)
    b.ret_void()
    return fn


def _load_f8(b: ir.IRBuilder, wp: ir.Value, idx: ir.Value, kind: str) -> ir.Value:
    """8 weights starting at element ``idx`` as <8 x float>."""
    if kind == "f32":
        p = b.bitcast(_gep(b, b.bitcast(wp, f32.as_pointer()), idx), v8f.as_pointer())
        return b.load(p, align=4)
    p = b.bitcast(_gep(b, b.bitcast(wp, i16.as_pointer()), idx), v8i16.as_pointer())
    v = b.load(p, align=2)
    if kind == "f16":
        return b.fpext(b.bitcast(v, ir.VectorType(f16, 8)), v8f)
    u = b.shl(b.zext(v, v8i32), _vconst(v8i32, 16))
    return b.bitcast(u, v8f)


def _build_float_dot(mod: ir.Module, name: str, kind: str) -> ir.Function:
    """float dot(w_addr, x_addr, n): the first ``n // 16 * 16`` elements (caller does the tail)."""
    fn = ir.Function(mod, ir.FunctionType(f32, [i64] * 3), name)
    fn.linkage = "internal"
    wa, xa, n = fn.args
    entry, loop, done = (fn.append_basic_block(s) for s in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    wp = _ptr(b, wa, i8)
    xp = _ptr(b, xa, f32)
    n16 = b.lshr(n, ir.Constant(i64, 4))
    zero_v = ir.Constant(v8f, [ir.Constant(f32, 0.0)] * 8)
    b.cbranch(b.icmp_unsigned(">", n16, ir.Constant(i64, 0)), loop, done)
    b = ir.IRBuilder(loop)
    i = b.phi(i64)
    a0, a1 = b.phi(v8f), b.phi(v8f)
    e0 = b.shl(i, ir.Constant(i64, 4))
    e1 = b.add(e0, ir.Constant(i64, 8))
    esz = 4 if kind == "f32" else 2
    prefetch_ahead(b, wp, b.mul(e0, ir.Constant(i64, esz)), 16 * esz)
    accs = []
    for acc, e in ((a0, e0), (a1, e1)):
        w = _load_f8(b, wp, e, kind)
        x = b.load(b.bitcast(_gep(b, xp, e), v8f.as_pointer()), align=4)
        accs.append(_fma(b, w, x, acc))
    inext = b.add(i, ir.Constant(i64, 1))
    b.cbranch(b.icmp_unsigned("<", inext, n16), loop, done)
    i.add_incoming(ir.Constant(i64, 0), entry)
    i.add_incoming(inext, loop)
    for phi, new in zip((a0, a1), accs, strict=True):
        phi.add_incoming(zero_v, entry)
        phi.add_incoming(new, loop)
    b = ir.IRBuilder(done)
    r0, r1 = b.phi(v8f), b.phi(v8f)
    for phi, new in zip((r0, r1), accs, strict=True):
        phi.add_incoming(zero_v, entry)
        phi.add_incoming(new, loop)
    b.ret(_hsum(b, b.fadd(r0, r1)))
    return fn


def _build_f16_row(mod: ir.Module, name: str) -> ir.Function:
    """void f16_row(src_addr, dst_addr, n): the first ``n // 8 * 8`` IEEE halves at ``src`` to
    float32 at ``dst``, exactly, eight a step (``vcvtph2ps`` with F16C; the caller does the tail)."""
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64] * 3), name)
    fn.linkage = "internal"
    sa, da, n = fn.args
    entry, loop, done = (fn.append_basic_block(s) for s in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    sp, dp = _ptr(b, sa, i8), _ptr(b, da, f32)
    n8 = b.lshr(n, ir.Constant(i64, 3))
    b.cbranch(b.icmp_unsigned(">", n8, ir.Constant(i64, 0)), loop, done)
    b = ir.IRBuilder(loop)
    i = b.phi(i64)
    e = b.shl(i, ir.Constant(i64, 3))
    b.store(_load_f8(b, sp, e, "f16"), b.bitcast(_gep(b, dp, e), v8f.as_pointer()), align=4)
    inext = b.add(i, ir.Constant(i64, 1))
    b.cbranch(b.icmp_unsigned("<", inext, n8), loop, done)
    i.add_incoming(ir.Constant(i64, 0), entry)
    i.add_incoming(inext, loop)
    ir.IRBuilder(done).ret_void()
    return fn


@intrinsic
def f16_row(typingctx, src, dst, n):
    """``dst[:n // 8 * 8] = float32(src halves)`` by addresses (``_build_f16_row``)."""
    sig = types.void(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        builder.call(_get_fn(builder.module, "mlxtral_f16_row", _build_f16_row), list(args))
        return context.get_dummy_value()

    return sig, codegen


def _get_fn(mod: ir.Module, name: str, build) -> ir.Function:
    try:
        return mod.get_global(name)
    except KeyError:
        return build(mod, name)


def _make_block_dot(kind: str):
    name = f"mlxtral_dot_{kind}_{ISA}"

    @intrinsic
    def dot(typingctx, w, x, xd, xs, nb):
        sig = types.float32(types.int64, types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            fn = _get_fn(builder.module, name, lambda m, n: _build_block_dot(m, n, kind))
            return builder.call(fn, list(args))

        return sig, codegen

    return dot


def _make_block_dotn(kind: str, ntok: int):
    name = f"mlxtral_dot{ntok}_{kind}_{ISA}"

    @intrinsic
    def dotn(typingctx, w, x, xd, xs, nb, xqs, xds):
        """-> a tuple of ntok floats (written by the IR function into a stack buffer)."""
        sig = types.UniTuple(types.float32, ntok)(*([types.int64] * 7))

        def codegen(context, builder, signature, args):
            fn = _get_fn(builder.module, name, lambda m, n: _build_block_dotn(m, n, kind, ntok))
            buf = cgutils.alloca_once(builder, f32, size=ntok)
            builder.call(fn, [*args, builder.ptrtoint(buf, i64)])
            vals = [builder.load(builder.gep(buf, [ir.Constant(i32, t)])) for t in range(ntok)]
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    return dotn


def _make_float_dot(kind: str):
    name = f"mlxtral_dot_{kind}"

    @intrinsic
    def dot(typingctx, w, x, n):
        sig = types.float32(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            fn = _get_fn(builder.module, name, lambda m, nm: _build_float_dot(m, nm, kind))
            return builder.call(fn, list(args))

        return sig, codegen

    return dot


dot_q4_1 = _make_block_dot("q4_1")
dot_q8_0 = _make_block_dot("q8_0")
dot_q5_0 = _make_block_dot("q5_0")
dot_q5_1 = _make_block_dot("q5_1")
dot_iq4_nl = _make_block_dot("iq4_nl")
# (Q4_0 has its own kernels: _kernels_tile)
# several tokens per weight-row pass: 4 (prefill), 3 and 2 (a prefill's tail; a batched decode
# step's experts picked by a few sequences)
dot4_q4_1, dot3_q4_1, dot2_q4_1 = (_make_block_dotn("q4_1", n) for n in (4, 3, 2))
dot4_q8_0, dot3_q8_0, dot2_q8_0 = (_make_block_dotn("q8_0", n) for n in (4, 3, 2))
dot4_q5_0, dot3_q5_0, dot2_q5_0 = (_make_block_dotn("q5_0", n) for n in (4, 3, 2))
dot4_q5_1, dot3_q5_1, dot2_q5_1 = (_make_block_dotn("q5_1", n) for n in (4, 3, 2))
dot4_iq4_nl, dot3_iq4_nl, dot2_iq4_nl = (_make_block_dotn("iq4_nl", n) for n in (4, 3, 2))
dot_f32 = _make_float_dot("f32")
dot_f16 = _make_float_dot("f16")
dot_bf16 = _make_float_dot("bf16")


def _iq4_xs_sub(b: ir.IRBuilder, wp: ir.Value, sh: ir.Value, j: int) -> tuple[ir.Value, ir.Value]:
    """Sub-block ``j`` of the IQ4_XS superblock at ``wp`` (``sh``: its scales_h as i32): the scale
    ``ls - 32`` (6 bits: 4 from scales_l, 2 from scales_h) in all 8 lanes of a <8 x i32>, and its 32
    weights as table values (<32 x i8>)."""
    sl = b.zext(_load(b, wp, ir.Constant(i64, 4 + j // 2), i8), i32)
    low = b.and_(b.lshr(sl, ir.Constant(i32, 4 * (j % 2))), ir.Constant(i32, 15))
    high = b.and_(b.lshr(sh, ir.Constant(i32, 2 * j)), ir.Constant(i32, 3))
    ls = b.sub(b.or_(low, b.shl(high, ir.Constant(i32, 4))), ir.Constant(i32, 32))
    lsv = b.insert_element(ir.Constant(v8i32, ir.Undefined), ls, ir.Constant(i32, 0))
    lsv = b.shuffle_vector(lsv, lsv, _mask([0] * 8))
    w = _iq4_lookup(b, _nibbles32(b, _load(b, wp, ir.Constant(i64, 8 + 16 * j), v16i8)))
    return lsv, w


def _build_iq4_xs_sb(mod: ir.Module, name: str) -> ir.Function:
    """i32 sb(w_addr, xq_addr): one IQ4_XS superblock (d, scales_h, scales_l, 128 nibble bytes)
    against 256 q8_K codes, the exact integer ``sum_j (ls_j - 32) * sum_k kvalue(q_jk) * x_jk`` over
    its eight 32-weight sub-blocks, as ggml's AVX2 ``vec_dot_iq4_xs_q8_K`` (table lookup, sign trick,
    ``vpmaddwd`` by the sub-block scale); |sum| < 2**25."""
    fn = ir.Function(mod, ir.FunctionType(i32, [i64, i64]), name)
    fn.linkage = "internal"
    wa, xa = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    wp, xp = _ptr(b, wa, i8), _ptr(b, xa, i8)
    prefetch_ahead(b, wp, ir.Constant(i64, 0), IQ4_XS_BYTES)
    sh = b.zext(_load(b, wp, ir.Constant(i64, 2), i16), i32)
    acc = None
    for j in range(8):
        lsv, w = _iq4_xs_sub(b, wp, sh, j)
        x = _load(b, xp, ir.Constant(i64, 32 * j), v32i8)
        aw, sx = _abs_sign(b, w, x)
        p = b.mul(_dot_u8s8(b, aw, sx), lsv)
        acc = p if acc is None else b.add(acc, p)
    red = _intr(b.module, "llvm.vector.reduce.add.v8i32", i32, [v8i32])
    b.ret(b.call(red, [acc]))
    return fn


def _build_iq4_xs_sb4(mod: ir.Module, name: str) -> ir.Function:
    """void sb4(w_addr, xq_addr, x_stride, out_addr): ``_build_iq4_xs_sb``'s sum for ``NTOK`` token
    rows ``x_stride`` bytes apart, each weight sub-block looked up once for all of them (prefill);
    the same exact integers, stored as NTOK int32 at ``out_addr``."""
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64] * 4), name)
    fn.linkage = "internal"
    wa, xa, xstride, oa = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    wp = _ptr(b, wa, i8)
    xps = [_ptr(b, b.add(xa, b.mul(xstride, ir.Constant(i64, t))), i8) for t in range(NTOK)]
    prefetch_ahead(b, wp, ir.Constant(i64, 0), IQ4_XS_BYTES)
    sh = b.zext(_load(b, wp, ir.Constant(i64, 2), i16), i32)
    accs: list = [None] * NTOK
    for j in range(8):
        lsv, w = _iq4_xs_sub(b, wp, sh, j)
        for t in range(NTOK):
            x = _load(b, xps[t], ir.Constant(i64, 32 * j), v32i8)
            aw, sx = _abs_sign(b, w, x)
            p = b.mul(_dot_u8s8(b, aw, sx), lsv)
            accs[t] = p if accs[t] is None else b.add(accs[t], p)
    red = _intr(b.module, "llvm.vector.reduce.add.v8i32", i32, [v8i32])
    op = _ptr(b, oa, i32)
    for t in range(NTOK):
        b.store(b.call(red, [accs[t]]), _gep(b, op, ir.Constant(i64, t)))
    b.ret_void()
    return fn


@intrinsic
def sb_dot4_iq4_xs(typingctx, w, x, xstride):
    """IQ4_XS superblock at ``w`` . NTOK rows of 256 int8 codes (``xstride`` bytes apart) -> a
    NTOK-tuple of the exact int32 sums (each what ``sb_dot_iq4_xs`` gives for its row)."""
    sig = types.UniTuple(types.int32, NTOK)(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        fn = _get_fn(builder.module, f"mlxtral_sb4_iq4_xs_{ISA}", _build_iq4_xs_sb4)
        buf = cgutils.alloca_once(builder, i32, size=NTOK)
        builder.call(fn, [*args, builder.ptrtoint(buf, i64)])
        vals = [builder.load(builder.gep(buf, [ir.Constant(i32, t)])) for t in range(NTOK)]
        return context.make_tuple(builder, signature.return_type, vals)

    return sig, codegen


@intrinsic
def sb_dot_iq4_xs(typingctx, w, x):
    """IQ4_XS superblock at address ``w`` . 256 int8 codes at ``x`` -> the exact int32 sum."""
    sig = types.int32(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        fn = _get_fn(builder.module, f"mlxtral_sb_iq4_xs_{ISA}", _build_iq4_xs_sb)
        return builder.call(fn, list(args))

    return sig, codegen


# ---- small helpers ------------------------------------------------------------------------------
@intrinsic
def half_to_f32(typingctx, bits):
    """uint16 bits of an IEEE half -> float32."""
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        v = builder.trunc(args[0], i16) if args[0].type.width > 16 else args[0]
        return builder.fpext(builder.bitcast(v, f16), f32)

    return sig, codegen


def _make_ptr(nbty):
    @intrinsic
    def ptr(typingctx, addr):
        sig = types.CPointer(nbty)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(nbty)))

        return sig, codegen

    return ptr


ptr_f32 = _make_ptr(types.float32)
ptr_i64 = _make_ptr(types.int64)
ptr_i32 = _make_ptr(types.int32)
ptr_u8 = _make_ptr(types.uint8)
ptr_u16 = _make_ptr(types.uint16)
ptr_i8 = _make_ptr(types.int8)


def _elem_ptr(context, builder, arr_ty, arr, idx):
    ary = context.make_array(arr_ty)(context, builder, arr)
    return builder.gep(ary.data, [idx])


@intrinsic
def atomic_load(typingctx, arr, idx):
    """Acquire load of int64 ``arr[idx]``."""
    sig = types.int64(arr, types.int64)

    def codegen(context, builder, signature, args):
        p = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(p, "acquire", 8)

    return sig, codegen


@intrinsic
def atomic_store(typingctx, arr, idx, val):
    """Release store of int64 ``val`` to ``arr[idx]``."""
    sig = types.void(arr, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        p = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], p, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def atomic_cas(typingctx, arr, idx, expected, new):
    """Compare-and-swap int64 ``arr[idx]``; returns True on success (seq_cst)."""
    sig = types.boolean(arr, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        p = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        res = builder.cmpxchg(p, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return sig, codegen


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """Fetch-and-add on int64 ``arr[idx]``; returns the old value (seq_cst)."""
    sig = types.int64(arr, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        p = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", p, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def cpu_pause(typingctx):
    """A spin-wait hint (x86 ``pause``, ARM ``yield``; nothing elsewhere)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if HAVE_AVX2:
            fn = _intr(builder.module, "llvm.x86.sse2.pause", ir.VoidType(), [])
            builder.call(fn, [])
        elif HAVE_NEONDOT:
            fn = _intr(builder.module, "llvm.aarch64.hint", ir.VoidType(), [i32])
            builder.call(fn, [ir.Constant(i32, 1)])  # YIELD
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cpu_yield(typingctx):
    """``sched_yield()`` on POSIX (lets a preempted worker run on an oversubscribed machine)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _POSIX:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


_POSIX = __import__("os").name == "posix"
