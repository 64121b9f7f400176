"""mlxtral.backends.kernels against naive ``x @ w.dequantize().T`` (and an int8 NumPy reference).

Tolerances are relative to the norm of the reference:
- int8-activation mode (the default, as llama.cpp): vs the same activations quantized in NumPy,
  1e-5; vs exact float32, 3e-2 (the int8 rounding of Gaussian activations is ~0.5%).
- exact mode and the float types: 1e-5.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from mlxtral.backends import kernels
from mlxtral.qtensor import QTensor

BLOCK = ["Q4_0", "Q4_1", "Q8_0"]
FLOAT = ["F32", "F16", "BF16"]

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba path disabled")


def make(qtype: str, shape: tuple[int, int], seed: int = 0) -> QTensor:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if qtype == "F32":
        return QTensor.from_float(w)
    if qtype == "F16":
        return QTensor.from_float(w.astype(np.float16))
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    return QTensor(qtype, shape, data.view(np.uint16) if qtype == "BF16" else data)


def ref_mm(x: np.ndarray, w: QTensor) -> np.ndarray:
    """x @ w.T as the decode kernels compute it (NumPy reference): block types see activations in
    llama.cpp's q8_0 / q8_1 blocks: q = rint(x * 127 / amax) per 32 values, the scale amax / 127 as
    float16, and (Q4_1's min term) the block sum d * sum(q) as float16."""
    wd = w.dequantize()
    if w.qtype not in BLOCK:
        return x @ wd.T
    T, n = x.shape
    xb = x.reshape(T, -1, 32).astype(np.float32)
    amax = np.abs(xb).max(-1)  # [T, nb]
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[..., None])  # [T, nb, 32]
    d = (amax / np.float32(127)).astype(np.float32)
    d16 = d.astype(np.float16).astype(np.float64)
    out = (q * d16[..., None]).reshape(T, n) @ wd.T.astype(np.float64)
    if w.qtype == "Q4_1":  # the kernel adds m * float16(d * sum(q)) instead of m * d16 * sum(q)
        nb = n // 32
        m = np.ascontiguousarray(np.asarray(w.data).reshape(-1, nb, 20)[..., 2:4]).view(np.float16)[..., 0]
        sq = q.sum(-1)  # [T, nb]
        s16 = (d * sq.astype(np.float32)).astype(np.float16).astype(np.float64)
        out += (s16 - d16 * sq) @ m.astype(np.float64).T
    return out.astype(np.float32)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def xs(T: int, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, n)).astype(np.float32)


@pytest.fixture
def exact():
    kernels.set_exact(True)
    yield
    kernels.set_exact(False)


@pytest.mark.parametrize("qtype", BLOCK)
@pytest.mark.parametrize("T", [1, 2, 7, 64])
@pytest.mark.parametrize("shape", [(77, 96), (130, 256), (5, 32)])
def test_block_types_int8(qtype, T, shape):
    w = make(qtype, shape)
    x = xs(T, shape[1])
    got = kernels.linear(x, w)
    wd = w.dequantize()
    assert got.shape == (T, shape[0]) and got.dtype == np.float32
    assert rel(got, ref_mm(x, w)) < 1e-5  # int8 activation blocks at every T
    assert rel(got, x @ wd.T) < 3e-2


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("window", [None, 3])
def test_attend_one_matches_attention(kv_dtype, window):
    from mlxtral.backends.ops import attention_kv

    rng = np.random.default_rng(9)
    H, KV, hd, ctx, S = 8, 2, 32, 20, 11
    q = rng.standard_normal((H, hd)).astype(np.float32)
    k = rng.standard_normal((KV, ctx, hd)).astype(kv_dtype)
    v = rng.standard_normal((KV, ctx, hd)).astype(kv_dtype)
    got = kernels.attend_one(q, k, v, S, window)
    ref = attention_kv(q[None], k[:, :S].astype(np.float32), v[:, :S].astype(np.float32), S - 1, window)[0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_rms_norm():
    x, w = xs(3, 200), xs(1, 200, 4)[0]
    ref = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(kernels.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)


def _portable_cases():
    rng = np.random.default_rng(0)
    for t in ("Q4_0", "Q4_1", "Q8_0", "F16"):
        wf = rng.standard_normal((40, 64)).astype(np.float32)
        w = (QTensor.from_float(wf.astype(np.float16)) if t == "F16"
             else QTensor(t, wf.shape, gguf.quants.quantize(wf, gguf.GGMLQuantizationType[t])))
        yield t, w, rng.standard_normal((3, 64)).astype(np.float32)


def test_portable_ir_without_avx2(tmp_path):
    """MLXTRAL_NO_AVX2=1: the portable vector IR (macOS arm64, old x86) gives the same results."""
    out = tmp_path / "got.npz"
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[2]);"
        "from mlxtral.backends import kernels as k, _kernels_ir as ir; import test_kernels as tk\n"
        "got = {t: k.swiglu(x, w, w) if t == 'Q8_0' else k.linear(x, w)\n"
        "       for t, w, x in tk._portable_cases()}\n"
        "np.savez(sys.argv[1], **got); print(ir.HAVE_AVX2, k.HAVE_NUMBA)"
    )
    env = dict(os.environ, MLXTRAL_NO_AVX2="1")
    r = subprocess.run([sys.executable, "-c", code, str(out), str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, check=True)
    avx2, numba_on = r.stdout.split()
    assert avx2 == "False" and numba_on == "True"
    got = np.load(out)
    for t, w, x in _portable_cases():
        ref = ref_mm(x, w)
        if t == "Q8_0":
            ref = ref / (1 + np.exp(-ref)) * ref
        assert rel(got[t], ref) < 1e-5, t


@pytest.mark.parametrize("qtype", BLOCK + FLOAT)
@pytest.mark.parametrize("T", [1, 2, 7, 64])
def test_exact_mode(qtype, T, exact):
    shape = (77, 96)
    w = make(qtype, shape)
    x = xs(T, shape[1])
    assert rel(kernels.linear(x, w), x @ w.dequantize().T) < 1e-5


@pytest.mark.parametrize("qtype", FLOAT)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("n_in", [40, 64, 200])
def test_float_types_odd_widths(qtype, T, n_in):
    w = make(qtype, (33, n_in))
    x = xs(T, n_in)
    assert rel(kernels.linear(x, w), x @ w.dequantize().T) < 1e-5


@pytest.mark.parametrize("qtype", BLOCK + FLOAT)
@pytest.mark.parametrize("T", [1, 5])
def test_swiglu(qtype, T):
    g, u = make(qtype, (70, 64), 3), make(qtype, (70, 64), 4)
    x = xs(T, 64)
    a, b = ref_mm(x, g), ref_mm(x, u)
    ref = a / (1 + np.exp(-a)) * b
    assert rel(kernels.swiglu(x, g, u), ref) < 1e-5


def test_experts_and_many():
    ws = [make("Q4_0", (90, 64), s) for s in range(3)]
    us = [make("Q4_0", (90, 64), s + 10) for s in range(3)]
    x_list = [xs(1, 64, 5), xs(3, 64, 6), xs(1, 64, 5)]
    outs = kernels.linear_experts(x_list, ws)
    for x, w, o in zip(x_list, ws, outs, strict=True):
        np.testing.assert_allclose(o, kernels.linear(x, w), rtol=1e-6, atol=1e-6)
    many = kernels.linear_many(x_list[1], ws)
    for w, o in zip(ws, many, strict=True):
        np.testing.assert_allclose(o, kernels.linear(x_list[1], w), rtol=1e-6, atol=1e-6)
    sw = kernels.swiglu_experts(x_list, ws, us)
    for x, g, u, o in zip(x_list, ws, us, sw, strict=True):
        np.testing.assert_allclose(o, kernels.swiglu(x, g, u), rtol=1e-6, atol=1e-6)
    # an expert no token was routed to
    empty = kernels.linear_experts([np.zeros((0, 64), np.float32), x_list[0]], ws[:2])
    assert empty[0].shape == (0, 90)
    np.testing.assert_allclose(empty[1], kernels.linear(x_list[0], ws[1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1, 5, 70])
def test_swiglu_mixed_types(T):
    """Gate and up of different types (mixed-quant files): still one job, SiLU applied after."""
    g, u = make("F16", (40, 64), 1), make("Q4_0", (40, 64), 2)
    x = xs(T, 64)
    a = x @ g.dequantize().T
    b = ref_mm(x, u)
    ref = a / (1 + np.exp(-a)) * b
    assert rel(kernels.swiglu(x, g, u), ref) < 1e-5
    both = kernels.swiglu_experts([x, x], [g, g], [u, g])
    assert rel(both[0], ref) < 1e-5
    assert rel(both[1], a / (1 + np.exp(-a)) * a) < 1e-5


def test_threads_agree():
    w = make("Q8_0", (1000, 128))
    x = xs(3, 128)
    ref = kernels.linear(x, w)
    try:
        kernels.set_num_threads(1)
        one = kernels.linear(x, w)
    finally:
        kernels.set_num_threads(2)
    np.testing.assert_array_equal(one, ref)
    for _ in range(50):  # many back-to-back jobs through the pool
        np.testing.assert_array_equal(kernels.linear(x, w), ref)


def test_memory_mapped_gguf(tmp_path):
    path = tmp_path / "w.gguf"
    rng = np.random.default_rng(7)
    dense = rng.standard_normal((45, 128)).astype(np.float32)
    wr = gguf.GGUFWriter(str(path), "llama")
    for t in BLOCK + FLOAT:
        qt = gguf.GGMLQuantizationType[t]
        if t == "F32":
            wr.add_tensor(t, dense)
        elif t == "F16":
            wr.add_tensor(t, dense.astype(np.float16))
        else:
            wr.add_tensor(t, gguf.quants.quantize(dense, qt), raw_dtype=qt)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    reader = gguf.GGUFReader(str(path))
    x = xs(4, 128)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        assert shape == (45, 128)
        data = t.data.view(np.uint16) if t.tensor_type.name == "BF16" else t.data
        assert isinstance(t.data, np.memmap)
        w = QTensor(t.tensor_type.name, shape, data)
        got = kernels.linear(x, w)
        assert rel(got, ref_mm(x, w)) < 1e-5, t.name


def test_stacked_expert_view():
    w3 = np.stack([gguf.quants.quantize(xs(20, 64, s), gguf.GGMLQuantizationType.Q4_0) for s in range(3)])
    w = QTensor("Q4_0", (3, 20, 64), w3)
    x = xs(2, 64)
    for e in range(3):
        ref = ref_mm(x, w.expert(e))
        assert rel(kernels.linear(x, w.expert(e)), ref) < 1e-5


def test_errors():
    w = make("Q4_0", (8, 64))
    with pytest.raises(ValueError):
        kernels.linear(xs(1, 32), w)
    with pytest.raises(ValueError):
        kernels.swiglu(xs(1, 64), w, make("Q8_0", (16, 64)))


def test_numpy_fallback_matches():
    for qtype in BLOCK + FLOAT:
        w = make(qtype, (70, 64))
        x = xs(3, 64)
        assert rel(kernels._linear_numpy(x, w), x @ w.dequantize().T) < 1e-6


def test_no_numba_env():
    code = (
        "import numpy as np; from mlxtral.backends import kernels as k; from mlxtral.qtensor import QTensor;"
        "w = QTensor.from_float(np.eye(4, dtype=np.float32)); x = np.ones((2, 4), np.float32);"
        "kv = np.ones((1, 5, 4), np.float32); assert np.allclose(k.attend_one(x[:1], kv, kv, 3), 1);"
        "assert np.allclose(k.rms_norm(x, np.ones(4, np.float32), 0.0), 1);"
        "print(k.HAVE_NUMBA, float(k.swiglu(x, w, w).sum()), float(k.linear(x, w).sum()))"
    )
    env = dict(os.environ, MLXTRAL_NO_NUMBA="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    flag, s1, s2 = out.stdout.split()
    assert flag == "False" and float(s2) == 8.0
    assert abs(float(s1) - 8 / (1 + np.exp(-1))) < 1e-5


def test_released_linking_modules_link_again():
    """After warmup every loaded kernel's parsed linking module is dropped (its bitcode kept): a
    function compiled later that calls one is linked from the re-parsed bitcode and computes the
    same bits; the machine code that was running never changed."""
    import numba

    from mlxtral.backends import _kernels_nb as nb
    from mlxtral.backends import jit_memory

    if not kernels.HAVE_NUMBA:
        pytest.skip("no numba")
    kernels.warmup()
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    w = np.linspace(0.5, 1.5, 64, dtype=np.float32)
    nb.rms_norm(x, w, 1e-5, np.empty_like(x))  # numba's own (a run on the native library never loads it)
    jit_memory.release_linking_modules([nb.rms_norm])
    libs = [c.library for c in nb.rms_norm.overloads.values()]
    assert libs and all(lib.__dict__.get("_mlxtral_bitcode") for lib in libs)
    jit_memory.release_linking_modules(kernels._our_dispatchers())  # again: those stay as they are
    assert all(lib.__dict__.get("_mlxtral_bitcode") for lib in libs)

    @numba.njit
    def calls_it(x, w):
        out = np.empty(x.shape, dtype=np.float32)
        return nb.rms_norm(x, w, 1e-5, out)

    assert np.array_equal(calls_it(x, w), kernels.rms_norm(x, w, 1e-5))
    assert any(lib.__dict__.get("_mlxtral_shared") is not None for lib in libs)  # parsed on demand


def test_no_compilation_after_warmup(tmp_path):
    """Loading a model warms every kernel specialization it will use (read-only memory-mapped
    weights included), so LLVM never runs again and its pages can stay released."""
    import numba
    from tiny_models import random_weights, tiny_args, write_gguf

    import mlxtral
    from mlxtral.backends import _kernels_nb as nb

    args = tiny_args()
    path = write_gguf(tmp_path / "m.gguf", random_weights(args), args, vocab=False)
    m = mlxtral.load(path, backend="numpy", tokenizer=False)

    def signatures():
        return {k: len(v.signatures) for k, v in vars(nb).items()
                if isinstance(v, numba.core.registry.CPUDispatcher)}

    before = signatures()
    be = m.backend
    cache = be.new_cache(200)
    be.forward(list(range(1, 4)), cache)  # int8 prefill
    be.forward(list(range(4, 4 + 70)), cache)  # BLAS prefill
    for t in range(5):
        be.forward([t + 100], cache)  # decode
    assert signatures() == before
    if sys.platform.startswith("linux"):
        assert kernels.release_compiler_pages() > 0  # llvmlite's mappings were found and advised
