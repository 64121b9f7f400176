"""K-quant blocks computed where they lie (``mlxtral/backends/_kernels_kq.py``): llama.cpp's q8_K
activations bit for bit, products against dequantize-then-matmul, bit-identical rows at any batch
size, tiny models' logits, and no converted copies at load."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_models import Q4_K_M, random_gguf_blocks, raw_gguf_tensors, tiny_args, write_raw_gguf

import mlxtral
from mlxtral.backends import kernels
from mlxtral.memory import _is_mapped, estimate
from mlxtral.qtensor import NATIVE_TYPES, QTensor

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba kernels only")

K_TYPES = ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K"]
K_ARGS = dict(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=300)


def q8k_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's quantize_row_q8_K_ref in NumPy: per 256 values, ``iscale = -127 / max`` (``max`` the
    first value of largest magnitude), codes ``min(127, nearest_int(iscale * x))``, ``d = 1 / iscale``,
    int16 sums per 16 codes; an all-zero superblock gives d = 0 and zero codes."""
    T, n = x.shape
    xb = x.reshape(T, n // 256, 256)
    mx = np.take_along_axis(xb, np.argmax(np.abs(xb), axis=-1)[..., None], -1)[..., 0]
    zero = mx == 0
    iscale = np.float32(-127.0) / np.where(zero, np.float32(1.0), mx)
    q = np.minimum(np.rint(iscale[..., None] * xb), 127).astype(np.int8)
    d = (np.float32(1.0) / iscale).astype(np.float32)
    q[zero] = 0
    d[zero] = 0
    bs = q.reshape(T, -1, 16).astype(np.int32).sum(-1).astype(np.int16)
    return q.reshape(T, n), d, bs


def dequant_acts(x: np.ndarray) -> np.ndarray:
    """The activations as the kernels see them: q8_K codes times their scales."""
    q, d, _ = kernels._kq.quantize_q8k(x)
    T, n = x.shape
    return (q.reshape(T, -1, 256).astype(np.float64) * d[..., None]).reshape(T, n)


def make(qtype: str, shape: tuple[int, int], seed: int = 0) -> QTensor:
    return QTensor(qtype, shape, random_gguf_blocks(qtype, shape, np.random.default_rng(seed), 1.0))


def acts(T: int, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, n)).astype(np.float32)


def test_q8k_activations_equal_ggml_reference() -> None:
    x = acts(9, 1024) * np.float32(3.0)
    x[1, :256] = 0  # an all-zero superblock
    x[2, 256:512] = -x[2, 256:512]
    x[3, 512:768] = np.float32(1e-30)  # tiny scale
    x[4, 5] = np.float32(1e4)  # one outlier: most codes round to 0
    x[5, :256] = np.float32(0.5)  # every value the max: ties, codes -127
    x[6, 256:512] = np.arange(256, dtype=np.float32) - 127.5  # halves: rint ties to even
    got = kernels._kq.quantize_q8k(x)
    want = q8k_reference(x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g.view(np.uint8) if g.dtype == np.float32 else g,
                                      w.view(np.uint8) if w.dtype == np.float32 else w)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_unpacked_rows_equal_gguf_dequantize(qtype: str) -> None:
    w = make(qtype, (6, 1024), seed=2)
    want = gguf.quants.dequantize(w.data, gguf.GGMLQuantizationType[qtype])
    buf = np.empty(1024, np.float32)
    from mlxtral.backends import _kernels_kq  # numba's own (the library exports what Python calls)

    for r in range(6):
        _kernels_kq.dequant_row(kernels._KINDS[qtype], w.data[r].ctypes.data, 1024, buf)
        np.testing.assert_allclose(buf, want[r], rtol=2e-7, atol=1e-7 * np.abs(want[r]).max())


@pytest.mark.parametrize("qtype", K_TYPES)
@pytest.mark.parametrize("T", [1, 3, 7])
def test_linear_equals_dequantize_then_matmul(qtype: str, T: int) -> None:
    w = make(qtype, (96, 768), seed=3)
    x = acts(T, 768, seed=T)
    ref = dequant_acts(x) @ w.dequantize().astype(np.float64).T
    got = kernels.linear(x, w)
    assert got.dtype == np.float32 and got.shape == (T, 96)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", K_TYPES)
def test_swiglu_experts_and_mixed_jobs(qtype: str) -> None:
    g, u = make(qtype, (64, 512), seed=4), make(qtype, (64, 512), seed=5)
    q8 = make("Q8_0", (64, 512), seed=6)
    x = acts(5, 512)
    xd = dequant_acts(x)
    G, U = xd @ g.dequantize().astype(np.float64).T, xd @ u.dequantize().astype(np.float64).T
    want = G / (1 + np.exp(-G)) * U
    for got in (kernels.swiglu(x, g, u), kernels.swiglu_experts([x], [g], [u])[0]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # one job, one x, a K-quant and a Q8_0 weight: each gets its own activation type
    outs = kernels.linear_many(x, [g, q8, u])
    np.testing.assert_array_equal(outs[0], kernels.linear(x, g))
    np.testing.assert_array_equal(outs[1], kernels.linear(x, q8))
    np.testing.assert_array_equal(outs[2], kernels.linear(x, u))
    mixed = kernels.swiglu_experts([x], [g], [q8])[0]  # gate and up of different types
    np.testing.assert_allclose(mixed, kernels._silu_mul(kernels.linear(x, g), kernels.linear(x, q8)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_batch_invariance_bit_identical(qtype: str) -> None:
    """A token's products do not depend on the tokens beside it: T=1 rows equal the same rows of
    T=2, 3, 6, 7, 8, 12, 15 and 64 calls (the superblock dots of 2 to 8 tokens, a pass of 8 and one
    of 4 or 7, the tiles), bit for bit (linear and fused SwiGLU, 1 and 2 threads)."""
    w, w2 = make(qtype, (80, 512), seed=7), make(qtype, (80, 512), seed=8)
    x = acts(64, 512, seed=9)
    one = np.concatenate([kernels.linear(x[t:t + 1], w) for t in range(64)])
    one_s = np.concatenate([kernels.swiglu(x[t:t + 1], w, w2) for t in range(64)])
    np.testing.assert_array_equal(kernels.linear(x, w), one)
    np.testing.assert_array_equal(kernels.swiglu(x, w, w2), one_s)
    for t0, k in ((0, 7), (7, 7), (57, 7), (3, 2), (20, 3), (40, 6), (1, 8), (30, 12), (49, 15)):
        np.testing.assert_array_equal(kernels.linear(x[t0:t0 + k], w), one[t0:t0 + k])
        np.testing.assert_array_equal(kernels.swiglu_experts([x[t0:t0 + k]], [w], [w2])[0], one_s[t0:t0 + k])
    n = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        np.testing.assert_array_equal(kernels.linear(x, w), one)
    finally:
        kernels.set_num_threads(n)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q3_K"])
def test_exact_mode(qtype: str) -> None:
    w = make(qtype, (48, 512), seed=10)
    x = acts(3, 512)
    kernels.set_exact(True)
    try:
        got = kernels.linear(x, w)
        assert np.array_equal(kernels.linear(x[1:2], w), got[1:2])
    finally:
        kernels.set_exact(False)
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _isa_cases() -> list[tuple[str, QTensor, QTensor, np.ndarray]]:
    # 3 tokens: row dots; 21 (40 rows): two 16-row tiles (_kernels_tile) and 8 rows of row dots
    return [(t, make(t, (40, 512), seed=13), make(t, (40, 512), seed=14), acts(T, 512, seed=15))
            for t in K_TYPES for T in (3, 21)]


@pytest.mark.parametrize("env", [{"MLXTRAL_NO_AVX2": "1"}, {"MLXTRAL_KERNEL_ISA": "avx2"}],
                         ids=["portable", "avx2"])
def test_portable_path_is_bit_identical(env: dict) -> None:
    """MLXTRAL_NO_AVX2=1 (macOS arm64, old x86: portable vector IR instead of vpmaddubsw/vpmaddwd),
    and AVX2 without VNNI where this CPU has it: the integer sums are exact and the float steps the
    same, so every result is bit-identical."""
    import os
    import subprocess
    import sys

    from mlxtral.backends import _kernels_ir as ir

    if "MLXTRAL_KERNEL_ISA" in env and ir.HOST_ISA != "vnni":
        pytest.skip("the host's own path is AVX2 (or lower) already")

    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]);"
        "from mlxtral.backends import kernels as k, _kernels_ir as ir; import test_kquant_kernels as t\n"
        "got = [np.concatenate([k.linear(x, w), k.swiglu(x, w, u), k.linear(x[:1], w)]).tobytes().hex()"
        " for _, w, u, x in t._isa_cases()]\n"
        "print(ir.HAVE_AVX2, ' '.join(got))"
    )
    full = {k: v for k, v in os.environ.items() if k not in ("MLXTRAL_NO_AVX2", "MLXTRAL_KERNEL_ISA")}
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env={**full, **env},
                       capture_output=True, text=True, check=True, timeout=900)
    avx2, *got = r.stdout.split()
    assert avx2 == str("MLXTRAL_KERNEL_ISA" in env)
    for (t, w, u, x), g in zip(_isa_cases(), got, strict=True):
        here = np.concatenate([kernels.linear(x, w), kernels.swiglu(x, w, u), kernels.linear(x[:1], w)])
        assert here.tobytes().hex() == g, t


def test_read_only_memory_mapped_weights(tmp_path: Path) -> None:
    w = make("Q6_K", (32, 512), seed=11)
    p = tmp_path / "w.bin"
    w.data.tofile(p)
    mm = QTensor("Q6_K", w.shape, np.memmap(p, dtype=np.uint8, mode="r", shape=w.data.shape))
    x = acts(2, 512)
    np.testing.assert_array_equal(kernels.linear(x, mm), kernels.linear(x, w))


# ---- models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[*K_TYPES, "Q4_K_M"])
def k_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    args = tiny_args(**K_ARGS)
    mix = Q4_K_M if request.param == "Q4_K_M" else request.param
    path = tmp_path_factory.mktemp("kq") / f"tiny.{request.param}.gguf"
    return request.param, write_raw_gguf(path, raw_gguf_tensors(args, mix, seed=12), args)


def reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap the kernels' products for NumPy ones: K-quant weights dequantized by ``gguf.quants``
    times the q8_K-dequantized activations (float64, then float32); other types as before."""
    real_linear = kernels.linear

    def linear(x: np.ndarray, w: QTensor) -> np.ndarray:
        if w.qtype not in K_TYPES:
            return real_linear(x, w)
        x = np.ascontiguousarray(x, dtype=np.float32)
        return (dequant_acts(x) @ w.dequantize().astype(np.float64).T).astype(np.float32)

    def swiglu(x: np.ndarray, g: QTensor, u: QTensor) -> np.ndarray:
        return kernels._silu_mul(linear(x, g), linear(x, u))

    monkeypatch.setattr(kernels, "linear", linear)
    monkeypatch.setattr(kernels, "linear_many", lambda x, ws: [linear(x, w) for w in ws])
    monkeypatch.setattr(kernels, "linear_experts",
                        lambda xs, ws: [linear(x, w) for x, w in zip(xs, ws, strict=True)])
    monkeypatch.setattr(kernels, "swiglu", swiglu)
    monkeypatch.setattr(kernels, "swiglu_experts",
                        lambda xs, gs, us: [swiglu(x, g, u) for x, g, u in zip(xs, gs, us, strict=True)])


def test_model_holds_the_file_blocks_and_matches_the_reference(k_model: tuple[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    name, path = k_model
    m = mlxtral.load(path, backend="numpy", max_context=128, tokenizer=False)
    ts = m.checkpoint.tensors
    kq = {n: t for n, t in ts.items() if t.qtype in K_TYPES}
    assert kq and all(t.qtype in NATIVE_TYPES for t in ts.values())
    # no copies: every K-quant tensor is a view of the file's own mapping, and the memory estimate
    # counts the file's bytes
    assert all(_is_mapped(t.data) for t in kq.values())
    est = estimate(m.checkpoint, "numpy", 128)
    assert est.weights == sum({id(t.data): t.nbytes for t in ts.values()}.values())
    ids = [1, *range(3, 40)]
    got = m.logits(ids)
    assert np.isfinite(got).all()
    with monkeypatch.context() as mp:
        reference_kernels(mp)
        ref = m.logits(ids)
    # q8_K rounding is discontinuous: where float32 and float64 sums round an activation to
    # different codes (rare), that position moves by up to a code step's effect; all others agree
    scale = float(np.abs(ref).max())
    per_pos = np.abs(got - ref).max(axis=1) / scale
    assert (per_pos < 2e-4).mean() >= 0.9, (name, per_pos)
    assert per_pos.max() < 1e-2, (name, per_pos)


@pytest.mark.parametrize("name", ["Q4_K_M", "Q2_K"])
def test_exact_model_equals_numpy_dequantize_path(name: str, tmp_path: Path, monkeypatch) -> None:
    """Exact mode (float32 activations) against the no-numba path (gguf.quants dequantize, matmul)."""
    args = tiny_args(**K_ARGS)
    path = write_raw_gguf(tmp_path / "m.gguf", raw_gguf_tensors(args, Q4_K_M if name == "Q4_K_M" else name,
                                                                 seed=16), args)
    m = mlxtral.load(path, backend="numpy", max_context=128, tokenizer=False)
    ids = [1, *range(3, 20)]
    kernels.set_exact(True)
    try:
        got = m.logits(ids)
    finally:
        kernels.set_exact(False)
    monkeypatch.setattr(kernels, "HAVE_NUMBA", False)
    ref = m.logits(ids)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


# ---- llama.cpp on its own Q4_K_M file --------------------------------------------------------------
_QUANTIZE = r"""
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""
_FTYPES = {"Q4_K_M": 15, "Q8_0": 7}  # llama_cpp.LLAMA_FTYPE_MOSTLY_*


@pytest.mark.llamacpp
def test_teacher_forced_logits_match_llamacpp_on_its_q4_k_m(tmp_path: Path) -> None:
    """A tiny F32 GGUF quantized to Q4_K_M by llama.cpp itself; llama.cpp's logits (every position,
    teacher-forced) against ours on the same file. Both quantize activations (q8_K here), in
    different places of a random MoE, so the yardstick is the same comparison on llama.cpp's own
    Q8_0 file of the model (our Q8_0 kernels against llama.cpp's): no further off than that."""
    import subprocess

    from test_llamacpp import LLAMA_PY, SHARED_BENCH, _run
    from tiny_models import random_weights, write_gguf

    if LLAMA_PY is None:
        pytest.skip("llama-cpp-python not found (set MLXTRAL_LLAMACPP_PYTHON)")
    args = tiny_args(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64)
    f32 = write_gguf(tmp_path / "tiny.f32.gguf", random_weights(args, seed=21), args)
    ids = [1, 415, 2936, 9060, 285, 1142, 28705, 28770, 28734, 349, 264, 1179, 1369, 28723, 28705, 13]
    errs = {}
    for name, ftype in _FTYPES.items():
        q = tmp_path / f"tiny.{name}.gguf"
        r = subprocess.run([LLAMA_PY, "-c", _QUANTIZE, str(f32), str(q), str(ftype)], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        out = tmp_path / f"{name}.npy"
        _run([str(SHARED_BENCH / "llamacpp_logits.py"), str(q), str(out), "--ids", ",".join(map(str, ids))])
        ref = np.load(out)
        m = mlxtral.load(q, backend="numpy")
        types = {t.qtype for t in m.checkpoint.tensors.values()}
        if name == "Q4_K_M":  # llama.cpp's mix, held as the file's blocks
            assert {"Q4_K", "Q6_K"} <= types <= {"F32", "Q4_K", "Q5_K", "Q6_K"}, types
        ours = m.logits(ids)
        assert ours.shape == ref.shape
        err = np.abs(ours - ref)
        assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9, name
        errs[name] = (float(err.max()), float(err.mean()))
    (kmax, kmean), (qmax, qmean) = errs["Q4_K_M"], errs["Q8_0"]
    assert kmean < 2.0 * qmean and kmax < 3.0 * qmax, errs


def test_running_a_kquant_model_never_imports_gguf(tmp_path: Path) -> None:
    """The embedding lookup of a K-quant model dequantizes its rows with our own NumPy code: the
    ``gguf`` package (which pulls in mistral-common and pydantic, ~45 MB of peak RSS) is not
    imported to load, prefill or decode."""
    import subprocess
    import sys

    args = tiny_args(**K_ARGS)
    path = write_raw_gguf(tmp_path / "m.gguf", raw_gguf_tensors(args, Q4_K_M, seed=17), args)
    code = ("import sys, mlxtral\n"
            f"m = mlxtral.load({str(path)!r}, backend='numpy', max_context=64, tokenizer=False)\n"
            "ids = [1, *range(3, 12)]\n"
            "m.logits(ids); m.logits(ids[:1])\n"
            "print(sorted(k for k in sys.modules if k == 'gguf' or k.startswith('gguf.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
