"""The ARM dot-product path (``_kernels_ir``'s ``neondot``: ``sdot``) on an x86 host: each kernel's
IR is built as an ARM host builds it, compiled for AArch64, and run in an emulator (unicorn, QEMU's
CPU with the dot-product extension); its results must equal, bit for bit, the same kernel built for
this host's own path and for the portable one (the integer sums are exact on every path; the float
steps are the same IR). Row dots of every 32-block type (one token and 2-4 at once), IQ4_XS
superblocks, the Q4_0 tile kernels (one row, 16 rows, a repacked tile against 1-8 tokens), and
every K-quant's superblock dot (one token and 2-4 at once)."""
from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import pytest
from llvmlite import ir

from mlxtral.backends import _kernels_ir as K

pytest.importorskip("unicorn")
tile = pytest.importorskip("mlxtral.backends._kernels_tile")
kq = pytest.importorskip("mlxtral.backends._kernels_kq")
from arm_emu import TRIPLE, ArmObject, compile_object  # noqa: E402

# the host's AVX2 path (a VNNI host runs it too): its q8 / iq4 dots take signed codes as the ARM one
# does, where VNNI's take them unsigned with an offset (the inputs below are built for signed codes)
HOST = "avx2" if K.HOST_ISA in ("vnni", "avx2") else "portable"
Out = tuple[str, np.ndarray]  # an output argument: its array is compared after the call


@contextlib.contextmanager
def building_for(isa: str) -> Iterator[None]:
    """Build IR as a host whose best path is ``isa`` would (the modules read these flags while they
    build a function)."""
    flags = {"ISA": isa, "HAVE_AVX2": isa in ("vnni", "avx2"), "HAVE_VNNI": isa == "vnni",
             "HAVE_NEONDOT": isa == "neondot"}
    saved = [(m, k, getattr(m, k)) for m in (K, tile, kq) for k in flags if hasattr(m, k)]
    try:
        for m, k, _ in saved:
            setattr(m, k, flags[k])
        yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def module_ir(isa: str, build: Callable[[ir.Module, str], ir.Function], triple: str) -> str:
    with building_for(isa):
        mod = ir.Module(name="kernel")
        mod.triple = triple
        build(mod, "f").linkage = ""  # exported: the harness calls it by name
        return str(mod)


_ENGINES: list = []  # keep the JIT engines (and their code) alive for the session


def run_host(isa: str, build, args: list, ret: str) -> tuple:
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()
    mod = llvm.parse_assembly(module_ir(isa, build, llvm.get_process_triple()))
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
    ee = llvm.create_mcjit_compiler(mod, tm)
    ee.finalize_object()
    _ENGINES.append(ee)
    cty = {"f32": ctypes.c_float, "i32": ctypes.c_int32, "i64": ctypes.c_int64, "void": None}[ret]
    fn = ctypes.CFUNCTYPE(cty, *[ctypes.c_int64] * len(args))(ee.get_function_address("f"))
    live = [a[1].copy() if isinstance(a, tuple) else a for a in args]
    r = fn(*[x.ctypes.data if isinstance(x, np.ndarray) else int(x) for x in live])
    return r, [x for a, x in zip(args, live, strict=True) if isinstance(a, tuple)]


def run_arm(build, args: list, ret: str) -> tuple:
    emu = ArmObject(compile_object(module_ir("neondot", build, TRIPLE)))
    addrs = [emu.put(a[1] if isinstance(a, tuple) else a) if isinstance(a, (tuple, np.ndarray)) else a
             for a in args]
    r = emu.call("f", addrs, ret)
    return r, [emu.get(addr, a[1]) for a, addr in zip(args, addrs, strict=True) if isinstance(a, tuple)]


def same_everywhere(build, args: list, ret: str) -> None:
    """The kernel built for ARM (emulated), for this host's path and for the portable path gives the
    same bits."""
    got = {"neondot": run_arm(build, args, ret), HOST: run_host(HOST, build, args, ret),
           "portable": run_host("portable", build, args, ret)}
    want_r, want_out = got[HOST]
    for isa, (r, outs) in got.items():
        if ret == "f32":
            assert np.float32(r).tobytes() == np.float32(want_r).tobytes(), (isa, r, want_r)
        elif ret in ("i32", "i64"):
            assert r == want_r, (isa, r, want_r)
        for o, w in zip(outs, want_out, strict=True):
            np.testing.assert_array_equal(o, w, err_msg=isa)


def _halves(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)


def _blocks(kind: str, nb: int, rng: np.random.Generator) -> np.ndarray:
    """``nb`` blocks of ``kind``: random codes (every byte value), finite f16 scale and min."""
    bsz, _, with_min = K._BLOCK[kind]
    w = rng.integers(0, 256, (nb, bsz), dtype=np.uint8)
    w[:, 0:2] = _halves(rng, nb)
    if with_min:
        w[:, 2:4] = _halves(rng, nb)
    return w


def _acts(kind: str, nb: int, ntok: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """q8 activations for ``ntok`` tokens: codes (-127..127, as ``quantize_x`` makes them), scales,
    and the kind's ``xs`` (float block sums for a min) or ``xo`` (minus the code offset times each
    4 activations' sum; zeros where the codes go in signed, as ``quantize_x`` leaves them)."""
    xq = rng.integers(-127, 128, (ntok, nb * 32), dtype=np.int8)
    xd = (rng.random((ntok, nb)) * 0.02).astype(np.float32)
    if K._BLOCK[kind][2]:
        xs = rng.standard_normal((ntok, nb)).astype(np.float32)
    else:
        xs = (-K.X_OFFSET[kind] * xq.reshape(ntok, nb, 8, 4).astype(np.int32).sum(-1)).astype(np.int32)
    return xq, xd, xs


KINDS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nb", [1, 2, 7])
def test_row_dot(kind: str, nb: int) -> None:
    rng = np.random.default_rng([KINDS.index(kind), nb])
    w = _blocks(kind, nb, rng)
    xq, xd, xs = _acts(kind, nb, 1, rng)
    if K._BLOCK[kind][1] in ("q8", "iq4"):
        xs = np.zeros_like(xs)  # signed codes off VNNI: no offset (HOST is never the VNNI path)
    same_everywhere(lambda m, n: K._build_block_dot(m, n, kind), [w, xq, xd, xs, nb], "f32")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ntok", [2, 3, 4])
def test_row_dot_many_tokens(kind: str, ntok: int) -> None:
    rng = np.random.default_rng([10 + KINDS.index(kind), ntok])
    nb = 5
    w = _blocks(kind, nb, rng)
    xq, xd, xs = _acts(kind, nb, ntok, rng)
    if K._BLOCK[kind][1] in ("q8", "iq4"):
        xs = np.zeros_like(xs)
    out = np.zeros(ntok, np.float32)
    xss = xs.strides[0] if K._BLOCK[kind][2] else xq.strides[0]
    assert xss == (xd.strides[0] if K._BLOCK[kind][2] else xq.strides[0])
    same_everywhere(lambda m, n: K._build_block_dotn(m, n, kind, ntok),
                    [w, xq, xd, xs, nb, xq.strides[0], xd.strides[0], ("out", out)], "void")


def _iq4_xs_blocks(n: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.integers(0, 256, (n, K.IQ4_XS_BYTES), dtype=np.uint8)
    w[:, 0:2] = _halves(rng, n)
    return w


def test_iq4_xs_superblock() -> None:
    rng = np.random.default_rng(3)
    for _ in range(3):
        w = _iq4_xs_blocks(1, rng)
        x = rng.integers(-127, 128, 256, dtype=np.int8)
        same_everywhere(K._build_iq4_xs_sb, [w, x], "i32")


def test_iq4_xs_superblock_many_tokens() -> None:
    rng = np.random.default_rng(4)
    w = _iq4_xs_blocks(1, rng)
    x = rng.integers(-127, 128, (K.NTOK, 256), dtype=np.int8)
    out = np.zeros(K.NTOK, np.int32)
    same_everywhere(K._build_iq4_xs_sb4, [w, x, x.strides[0], ("out", out)], "void")


def _q4_0_rows(rows: int, nb: int, rng: np.random.Generator) -> np.ndarray:
    return _blocks("q4_0", rows * nb, rng).reshape(rows, nb * tile.Q4_BYTES)


def test_q4_0_tile_one_row() -> None:
    rng = np.random.default_rng(5)
    nb = 9
    w = _q4_0_rows(1, nb, rng)
    xq, xd, xo = _acts("q4_0", nb, 1, rng)
    same_everywhere(tile._build_dot1, [w, xq, xd, xo, nb], "f32")


def test_q4_0_tile_sixteen_rows() -> None:
    rng = np.random.default_rng(6)
    nb = 6
    w = _q4_0_rows(tile.ROWS, nb, rng)
    xq, xd, xo = _acts("q4_0", nb, 1, rng)
    xb = xo.reshape(1, nb, 8).sum(-1, dtype=np.int32)  # each block's offset (the AVX2 kernels read it)
    out = np.zeros(tile.ROWS, np.float32)
    same_everywhere(partial(tile._build_dot16, nt=1),
                    [w, w.strides[0], xq, xd, xo, nb, nb * 32, ("out", out), xb], "void")


@pytest.mark.parametrize("nt", tile.NTS)
def test_q4_0_repacked_tile(nt: int) -> None:
    rng = np.random.default_rng([7, nt])
    nb = 4
    w = _q4_0_rows(tile.ROWS, nb, rng)
    buf = np.zeros(nb * tile.TILE_BLOCK_BYTES, np.uint8)
    same_everywhere(tile._build_repack, [w, w.strides[0], nb, ("buf", buf)], "void")
    packed = run_host(HOST, tile._build_repack, [w, w.strides[0], nb, ("buf", buf)], "void")[1][0]
    xq, xd, xo = _acts("q4_0", nb, nt, rng)
    out = np.zeros((nt, tile.ROWS), np.float32)
    same_everywhere(partial(tile._build_gemm, nt=nt),
                    [packed, nb, xq, xd, xo, nb * 32, ("out", out), tile.ROWS], "void")


def _superblocks(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` K-quant superblocks: random codes and scale bytes, finite f16 d (and dmin)."""
    size = kq.KQ_TYPES[kind][1]
    w = rng.integers(0, 256, (n, size), dtype=np.uint8)
    halves = {kq.K_Q4_K: (0, 2), kq.K_Q5_K: (0, 2), kq.K_Q6_K: (208,), kq.K_Q3_K: (108,), kq.K_Q2_K: (80, 82)}
    for off in halves[kind]:
        w[:, off : off + 2] = _halves(rng, n)
    return w


def _q8k(ntok: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """q8_K activations of one superblock for ``ntok`` tokens: codes and their 16 sums of 16."""
    x = rng.integers(-127, 128, (ntok, 256), dtype=np.int8)
    return x, x.reshape(ntok, 16, 16).sum(-1, dtype=np.int16)


KQ = ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K"]


@pytest.mark.parametrize("name", KQ)
def test_kquant_superblock(name: str) -> None:
    kind = next(k for k, (n, _) in kq.KQ_TYPES.items() if n == name)
    rng = np.random.default_rng([20, kind])
    for _ in range(3):
        w = _superblocks(kind, 1, rng)
        x, bs = _q8k(1, rng)
        same_everywhere(lambda m, n: kq._build_superblock(m, n, kind, True), [w, x, bs], "i64")


@pytest.mark.parametrize("name", KQ)
@pytest.mark.parametrize("nt", range(1, kq.SB_NT + 1))
def test_kquant_superblock_many_tokens(name: str, nt: int) -> None:
    kind = next(k for k, (n, _) in kq.KQ_TYPES.items() if n == name)
    rng = np.random.default_rng([21, kind, nt])
    w = _superblocks(kind, 1, rng)
    x, bs = _q8k(nt, rng)
    out = np.zeros(nt, np.int64)
    same_everywhere(lambda m, n: kq._build_sb_dotn(m, n, kind, nt),
                    [w, x, bs, x.strides[0], bs.strides[0], ("out", out)], "void")


def test_sdot_is_what_the_arm_path_compiles_to() -> None:
    """The ARM build really uses the dot-product instruction (and the host's does not)."""
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    mod = llvm.parse_assembly(module_ir("neondot", lambda m, n: K._build_block_dot(m, n, "q8_0"), TRIPLE))
    tm = llvm.Target.from_triple(TRIPLE).create_target_machine(features="+neon,+dotprod", opt=3)
    asm = tm.emit_assembly(mod)
    assert "sdot" in asm
    assert "sdot" not in module_ir(HOST, lambda m, n: K._build_block_dot(m, n, "q8_0"), TRIPLE)
    mod = llvm.parse_assembly(module_ir("neondot", lambda m, n: kq._build_superblock(m, n, kq.K_Q4_K, True),
                                        TRIPLE))
    assert "sdot" in tm.emit_assembly(mod)
