"""Q5_0, Q5_1, IQ4_NL and IQ4_XS computed where they lie (issue 13, item 3): llama.cpp's activation
types (q8_0 for Q5_0 / IQ4_NL, q8_1 for Q5_1, q8_K for IQ4_XS), products against "dequantize with
gguf.quants, quantize the activations the same way, float dot", bit-identical rows at any batch
size, thread count and instruction set, every entry point, and no converted copies at load (the
memory plan counts the file's own bytes; streamed experts are views of their slot)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_batch_invariance import assert_invariant, tensors_of
from tiny_models import random_gguf_blocks, raw_gguf_tensors, tiny_args, write_raw_gguf

import mlxtral
from mlxtral.backends import _kernels_ir, kernels
from mlxtral.backends.numpy_backend import NumpyBackend, expert_materializer
from mlxtral.formats.native import native_form, to_native
from mlxtral.memory import _is_mapped, estimate
from mlxtral.qtensor import NATIVE_TYPES, QTensor

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba kernels only")

B32 = ["Q5_0", "Q5_1", "IQ4_NL"]  # 32-weight blocks: q8_0 / q8_1 activations
TYPES = [*B32, "IQ4_XS"]  # IQ4_XS: 256-weight superblocks, q8_K activations
K_ARGS = dict(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=300)


def make(qtype: str, shape: tuple[int, int], seed: int = 0, quantize: bool = False) -> QTensor:
    """Random valid blocks (every code and bit pattern), or with ``quantize`` gguf.quants' own blocks
    of Gaussian weights (it quantizes Q5_0 / Q5_1, not the IQ4 types)."""
    rng = np.random.default_rng(seed)
    if quantize:
        w = rng.standard_normal(shape).astype(np.float32)
        return QTensor(qtype, shape, gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype]))
    return QTensor(qtype, shape, random_gguf_blocks(qtype, shape, rng, 1.0))


def acts(T: int, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, n)).astype(np.float32)


def reference(x: np.ndarray, w: QTensor) -> np.ndarray:
    """``x @ w.T`` as llama.cpp computes it, in float64: the weights dequantized by gguf.quants, the
    activations quantized as the kernels quantize them (q8_0 / q8_1 blocks: rint(x * 127 / amax),
    the scale as float16, Q5_1's min times float16(d * sum(q)); q8_K for IQ4_XS)."""
    wd = gguf.quants.dequantize(np.asarray(w.data), gguf.GGMLQuantizationType[w.qtype]).astype(np.float64)
    T, n = x.shape
    if w.qtype == "IQ4_XS":
        q, d, _ = kernels._kq.quantize_q8k(x)
        return (q.reshape(T, -1, 256).astype(np.float64) * d[..., None]).reshape(T, n) @ wd.T
    xb = x.reshape(T, -1, 32)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[..., None])
    d = (amax / np.float32(127)).astype(np.float32)
    d16 = d.astype(np.float16).astype(np.float64)
    out = (q * d16[..., None]).reshape(T, n) @ wd.T
    if w.qtype == "Q5_1":  # q8_1's s: m times float16(d * sum(q)), not m * d16 * sum(q)
        mb = np.asarray(w.data).reshape(w.shape[0], -1, 24)[..., 2:4]
        m = np.ascontiguousarray(mb).view(np.float16)[..., 0]
        sq = q.sum(-1)
        s16 = (d * sq.astype(np.float32)).astype(np.float16).astype(np.float64)
        out += (s16 - d16 * sq) @ m.astype(np.float64).T
    return out


def shapes(qtype: str) -> list[tuple[int, int]]:
    """Odd row counts (not a multiple of any work item), one-block rows included."""
    return [(77, 512), (5, 256), (130, 768)] if qtype == "IQ4_XS" else [(77, 96), (130, 256), (5, 32)]


# ---- the types are native: no copy at load ---------------------------------------------------------
@pytest.mark.parametrize("qtype", TYPES)
def test_native_zero_copy(qtype: str, tmp_path: Path) -> None:
    w = make(qtype, (8, 256))
    p = tmp_path / "w.bin"
    w.data.tofile(p)
    mm = QTensor(qtype, w.shape, np.memmap(p, dtype=np.uint8, mode="r", shape=w.data.shape))
    assert qtype in NATIVE_TYPES
    assert to_native(mm, "w") is mm  # the file's own blocks, not a Q8_0 copy
    assert native_form(mm) == (qtype, mm.nbytes)
    x = acts(3, 256)
    np.testing.assert_array_equal(kernels.linear(x, mm), kernels.linear(x, w))  # read-only mapping
    idx = [5, 0, 5]
    np.testing.assert_array_equal(w.rows(idx), w.dequantize()[idx])  # the embedding's lookup


# ---- products ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("T", [1, 2, 7, 64])
def test_linear_equals_reference(qtype: str, T: int) -> None:
    for i, shape in enumerate(shapes(qtype)):
        w = make(qtype, shape, seed=i)
        x = acts(T, shape[1], seed=T + i)
        ref = reference(x, w)
        got = kernels.linear(x, w)
        assert got.dtype == np.float32 and got.shape == (T, shape[0])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=f"{shape}")


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_gguf_quantized_blocks(qtype: str) -> None:
    """gguf.quants' own Q5_0 / Q5_1 of Gaussian weights (not only random bit patterns)."""
    w = make(qtype, (96, 256), seed=3, quantize=True)
    for T in (1, 5):
        x = acts(T, 256, seed=4)
        ref = reference(x, w)
        np.testing.assert_allclose(kernels.linear(x, w), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        # and near the float product (int8 activations: ~1e-2 relative)
        exact = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
        assert np.linalg.norm(kernels.linear(x, w) - exact) < 3e-2 * np.linalg.norm(exact)


@pytest.mark.parametrize("qtype", TYPES)
def test_every_entry_point(qtype: str) -> None:
    """swiglu, swiglu_experts, linear_many, linear_experts; gate and up of different types; a job
    mixing q8_0 and q8_K activations of one x."""
    n = 512 if qtype == "IQ4_XS" else 96
    g, u, dn = make(qtype, (40, n), seed=4), make(qtype, (40, n), seed=5), make(qtype, (24, n), seed=6)
    q8 = QTensor("Q8_0", (40, n), gguf.quants.quantize(acts(40, n, seed=7), gguf.GGMLQuantizationType.Q8_0))
    x = acts(5, n)
    G, U = reference(x, g), reference(x, u)
    want = G / (1 + np.exp(-G)) * U
    for got in (kernels.swiglu(x, g, u), kernels.swiglu_experts([x, x[:2]], [g, g], [u, u])[0]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    lin = kernels.linear(x, g)
    outs = kernels.linear_many(x, [g, q8, u, dn])
    np.testing.assert_array_equal(outs[0], lin)
    np.testing.assert_array_equal(outs[1], kernels.linear(x, q8))
    np.testing.assert_array_equal(outs[2], kernels.linear(x, u))
    np.testing.assert_array_equal(outs[3], kernels.linear(x, dn))
    ex = kernels.linear_experts([x, x[1:3]], [g, u])
    np.testing.assert_array_equal(ex[0], lin)
    np.testing.assert_array_equal(ex[1], kernels.linear(x[1:3], u))
    mixed = kernels.swiglu_experts([x], [g], [q8])[0]
    np.testing.assert_allclose(mixed, kernels._silu_mul(lin, kernels.linear(x, q8)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", TYPES)
def test_batch_invariance_bit_identical(qtype: str) -> None:
    """A (row, token) computes the same bits at T = 1, 7 and 64, in every entry point, on 1 or 2
    threads (prefill's four-token dot4 for the 32-weight blocks included)."""
    n = 512 if qtype == "IQ4_XS" else 96
    w, w2 = make(qtype, (83, n), seed=7), make(qtype, (83, n), seed=8)
    x = acts(64, n, seed=9)
    one = np.concatenate([kernels.linear(x[t:t + 1], w) for t in range(64)])
    one_s = np.concatenate([kernels.swiglu(x[t:t + 1], w, w2) for t in range(64)])
    np.testing.assert_array_equal(kernels.linear(x, w), one)
    np.testing.assert_array_equal(kernels.swiglu(x, w, w2), one_s)
    np.testing.assert_array_equal(kernels.linear_many(x, [w, w2])[0], one)
    for t0 in (0, 7, 57):
        np.testing.assert_array_equal(kernels.linear(x[t0:t0 + 7], w), one[t0:t0 + 7])
        np.testing.assert_array_equal(kernels.swiglu_experts([x[t0:t0 + 7]], [w], [w2])[0], one_s[t0:t0 + 7])
        np.testing.assert_array_equal(kernels.linear_experts([x[t0:t0 + 7]], [w])[0], one[t0:t0 + 7])
    nt = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        np.testing.assert_array_equal(kernels.linear(x, w), one)
        np.testing.assert_array_equal(kernels.swiglu(x, w, w2), one_s)
    finally:
        kernels.set_num_threads(nt)


@pytest.mark.parametrize("qtype", TYPES)
def test_exact_mode(qtype: str) -> None:
    """float32 activations: each row dequantized (as gguf.quants) and dotted, the same at any T."""
    n = 512 if qtype == "IQ4_XS" else 96
    w, u = make(qtype, (37, n), seed=10), make(qtype, (37, n), seed=11)
    x = acts(9, n)
    kernels.set_exact(True)
    try:
        got = kernels.linear(x, w)
        sw = kernels.swiglu(x, w, u)
        assert np.array_equal(kernels.linear(x[4:5], w), got[4:5])
        assert np.array_equal(kernels.swiglu(x[4:5], w, u), sw[4:5])
    finally:
        kernels.set_exact(False)
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _isa_cases() -> list[tuple[str, QTensor, QTensor, np.ndarray]]:
    return [(t, make(t, (40, 512), seed=13), make(t, (40, 512), seed=14), acts(9, 512, seed=15))
            for t in TYPES]


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_lower_isa_paths_are_bit_identical(isa: str) -> None:
    """MLXTRAL_KERNEL_ISA=avx2|portable (vpshufb or a select chain for the IQ4 table, vpmaddubsw or
    portable IR for the dots): integer sums are exact and the float steps the same, so every
    result, decode and four-token prefill, is bit-identical to this host's path."""
    order = _kernels_ir.ISAS
    if order.index(isa) < order.index(_kernels_ir.HOST_ISA):
        pytest.skip(f"this CPU has no {isa}")
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]);"
        "from mlxtral.backends import kernels as k, _kernels_ir as ir; import test_kernels_q5_iq4 as t\n"
        "got = [np.concatenate([k.linear(x, w), k.swiglu(x, w, u), k.linear(x[:1], w)]).tobytes().hex()"
        " for _, w, u, x in t._isa_cases()]\n"
        "print(ir.ISA, ' '.join(got))"
    )
    env = dict(os.environ, MLXTRAL_KERNEL_ISA=isa)
    env.pop("MLXTRAL_NO_AVX2", None)
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True,
                       text=True, check=True, timeout=900)
    ran, *got = r.stdout.split()
    assert ran == isa
    for (t, w, u, x), g in zip(_isa_cases(), got, strict=True):
        here = np.concatenate([kernels.linear(x, w), kernels.swiglu(x, w, u), kernels.linear(x[:1], w)])
        assert here.tobytes().hex() == g, t


# ---- models -----------------------------------------------------------------------------------------
def tiny_backend(qtype: str) -> NumpyBackend:
    args = tiny_args(4, dim=256, hidden_dim=256, head_dim=64) if qtype == "IQ4_XS" else tiny_args(4)
    return NumpyBackend(args, tensors_of(args, qtype))


@pytest.mark.parametrize("qtype", TYPES)
def test_model_logits_bit_identical_across_chunkings(qtype: str) -> None:
    """Prompt in one chunk, in chunks of 1, 7 and 64, prefixes, and after a cache hit: the same bits."""
    assert_invariant(tiny_backend(qtype))


MIX = {"attn_q": "Q5_0", "attn_k": "Q5_1", "attn_v": "IQ4_NL", "attn_output": "Q5_1", "ffn_down": "Q5_0",
       "token_embd": "IQ4_NL", "*": "IQ4_XS"}


@pytest.fixture(scope="module")
def mix_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tiny_args(8, max_position_embeddings=512, **K_ARGS)
    path = tmp_path_factory.mktemp("q5iq4") / "mix.gguf"
    return write_raw_gguf(path, raw_gguf_tensors(args, MIX, seed=3), args)


def test_model_holds_the_file_blocks_and_matches_the_reference(mix_model: Path, monkeypatch) -> None:
    """Every weight a view of the file's mapping (no Q8_0 copies); the memory estimate counts the
    file's bytes; logits near the dequantize-then-matmul path; exact mode equal to it."""
    m = mlxtral.load(mix_model, backend="numpy", max_context=128, tokenizer=False)
    ts = m.checkpoint.tensors
    ours = {n: t for n, t in ts.items() if t.qtype in TYPES}
    assert {t.qtype for t in ours.values()} == set(TYPES)
    assert all(_is_mapped(t.data) for t in ours.values())
    assert m.backend.layers[0].wq.qtype == "Q5_0" and _is_mapped(m.backend.layers[0].wq.data)
    est = estimate(m.checkpoint, "numpy", 128)
    assert est.weights == sum({id(t.data): t.nbytes for t in ts.values()}.values())
    ids = [1, *range(3, 30)]
    got = m.logits(ids)
    assert np.isfinite(got).all()
    kernels.set_exact(True)
    try:
        exact = m.logits(ids)
    finally:
        kernels.set_exact(False)
    monkeypatch.setattr(kernels, "HAVE_NUMBA", False)  # gguf.quants dequantize, float32 matmul
    ref = m.logits(ids)
    np.testing.assert_allclose(exact, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert np.linalg.norm(got - ref) < 5e-2 * np.linalg.norm(ref)  # int8 activations


def test_no_compilation_after_load(mix_model: Path) -> None:
    """warmup() (run by load) compiled every specialization these types use."""
    import numba

    from mlxtral.backends import _kernels_iq, _kernels_kq
    from mlxtral.backends import _kernels_nb as nb

    m = mlxtral.load(mix_model, backend="numpy", max_context=256, tokenizer=False)

    def signatures() -> dict[str, int]:
        return {f"{mod.__name__}.{k}": len(v.signatures) for mod in (nb, _kernels_iq, _kernels_kq)
                for k, v in vars(mod).items() if isinstance(v, numba.core.registry.CPUDispatcher)}

    before = signatures()
    be = m.backend
    cache = be.new_cache(200)
    be.forward(list(range(1, 4)), cache)
    be.forward(list(range(4, 74)), cache)
    for t in range(3):
        be.forward([t + 100], cache)
    assert signatures() == before


def test_streamed_experts_are_views_of_their_slot(mix_model: Path) -> None:
    """The expert cache's materializer hands the kernels the slot's own bytes (no conversion), and a
    model streaming its experts under the smallest budget computes the resident model's numbers."""
    from mlxtral.expert_cache import plan_memory
    from mlxtral.formats.detect import open_checkpoint

    ckpt = open_checkpoint(mix_model)
    mat = expert_materializer(ckpt.tensors)
    raw = [np.array(ckpt.tensors[f"blk.1.ffn_{k}.3.weight"].data) for k in ("gate", "up", "down")]
    out = mat(1, 3, raw)
    assert [t.qtype for t in out] == ["IQ4_XS", "IQ4_XS", "Q5_0"]
    assert all(t.data is r or np.shares_memory(t.data, r) for t, r in zip(out, raw, strict=True))
    plan = plan_memory(ckpt, "numpy", 256, stream=True)
    ref = mlxtral.load(mix_model, backend="numpy", max_context=256, tokenizer=False)
    m = mlxtral.load(mix_model, backend="numpy", max_context=256, tokenizer=False,
                     memory_budget=plan.min_budget, stream_experts=True)
    assert m.streaming
    ids = [1, *range(5, 60)]
    np.testing.assert_array_equal(m.logits(ids), ref.logits(ids))
    np.testing.assert_array_equal(m.logits(ids[:2]), ref.logits(ids[:2]))
