"""The decode step in one compiled call (``mlxtral.backends.decode_step``) computes what the
layer-by-layer path computes, bit for bit: logits, the KV cache it writes and the expert counts,
for every weight type (mixed as in a Q4_K_M file too), exact mode, a sliding window, partial
RoPE, a dense model, float32 and float16 caches, at 1, 2 and 3 threads; and it stands aside
where it does not apply. Its batched form (several sequences, a token each, each in its own cache
at its own position) gives each sequence the bits it gets alone."""
from __future__ import annotations

import numpy as np
import pytest
from test_batch_invariance import tensors_of, tiny
from tiny_models import tiny_args

from mlxtral.backends import kernels, ops
from mlxtral.backends.numpy_backend import NumpyBackend

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba path disabled")


def run_batched(be, B: int = 4, n_decode: int = 6, seed: int = 0, ctx: int = 32, n_prompt: int = 1):
    """B sequences with prompts of different lengths (from ``n_prompt`` tokens), then ``n_decode``
    steps of one token each through ``forward_runs`` (the batched step; with B = 1 the
    one-sequence step), against each sequence alone through ``forward`` (the one-sequence step)
    and through the layer loop (no step): logits, caches, expert counts."""
    step = be.decode_step
    assert step is not None
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 32000, n_prompt + 3 * b % 7).tolist() for b in range(B)]
    toks = rng.integers(3, 32000, (n_decode, B)).tolist()
    got = []
    for mode in ("batched", "alone", "layers"):
        be.decode_step = None if mode == "layers" else step
        be.expert_counts[:] = 0
        caches = [be.new_cache(ctx) for _ in range(B)]
        for p, c in zip(prompts, caches, strict=True):
            be.forward(p, c)
        rows = []
        for t in toks:
            if mode == "alone":
                rows.append(np.array([be.forward([x], c) for x, c in zip(t, caches, strict=True)]))
            else:
                rows.append(be.forward_runs([[x] for x in t], caches))
        assert all(c.offset == len(p) + n_decode for p, c in zip(prompts, caches, strict=True))
        kv = [np.concatenate([c.k[:, :, : c.offset].ravel() for c in caches]),
              np.concatenate([c.v[:, :, : c.offset].ravel() for c in caches])]
        got.append((np.array(rows), *kv, be.expert_counts.copy()))
    be.decode_step = step
    for other in got[1:]:
        for a, b in zip(got[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "IQ4_NL", "F32", "F16", "BF16",
                                   "Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS"])
def test_same_bits_as_layer_by_layer(qtype):
    run_batched(tiny(qtype, **(dict(dim=256, hidden_dim=256, head_dim=64) if qtype == "IQ4_XS" else {})),
                B=1, n_prompt=5, n_decode=9)


def test_mixed_kinds_as_a_q4_k_m_file():
    """q and k Q4_K, v Q6_K (two jobs), the output projection Q5_K, an expert's down Q8_0."""
    args = tiny_args(4, dim=256, hidden_dim=256, head_dim=64)
    t = tensors_of(args, "Q4_K")
    more = tensors_of(args, "Q6_K", seed=1)
    t["blk.0.attn_v.weight"] = more["blk.0.attn_v.weight"]
    t["blk.1.attn_output.weight"] = tensors_of(args, "Q5_K", seed=2)["blk.1.attn_output.weight"]
    t["blk.1.ffn_down.2.weight"] = tensors_of(args, "Q8_0", seed=3)["blk.1.ffn_down.2.weight"]
    run_batched(NumpyBackend(args, t), B=1, n_prompt=5, n_decode=16)


@pytest.mark.parametrize("B, n_prompt, n_decode", [(1, 5, 12), (5, 1, 8)])  # one sequence; a batch
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("exact", [False, True])
def test_same_bits_at_any_thread_count_and_in_exact_mode(threads, exact, B, n_prompt, n_decode, monkeypatch):
    monkeypatch.setattr(kernels, "_exact", exact)
    old = kernels.get_num_threads()
    try:
        kernels.set_num_threads(threads)
        # the window slides inside the run
        run_batched(tiny("Q4_0", sliding_window=4), B=B, n_prompt=n_prompt, n_decode=n_decode)
    finally:
        kernels.set_num_threads(old)


def test_dense_partial_rope_and_top_1():
    run_batched(tiny("Q8_0", n_experts=0), B=1, n_prompt=5, n_decode=9)  # one always-on expert, no router
    run_batched(tiny("Q4_0", rope_dim=8), B=1, n_prompt=5, n_decode=9)  # half of each head rotated
    run_batched(tiny("F16", n_experts=4, n_experts_per_tok=1), B=1, n_prompt=5, n_decode=9)


def test_rope_kernel_is_the_complex_product():
    rope = ops.Rope(16, 1e6, 64)
    x = np.random.default_rng(1).standard_normal((5, 3, 24)).astype(np.float32)  # rope_dim < hd
    pos = np.array([0, 3, 63, 7, 7])
    got = rope(x.copy(), pos)
    want = x.copy()
    c = want[..., :16].view(np.complex64)
    c *= rope.cis[pos][:, None, :]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[..., 16:], x[..., 16:])
    with pytest.raises(ValueError, match="outside"):
        rope(x.copy(), np.array([0, 1, 2, 3, 64]))


@pytest.mark.parametrize("threads", [1, 2])
def test_float16_cache(threads):
    """The cache written as NumPy casts to float16 and read by the float16 attention kernels."""
    old = kernels.get_num_threads()
    try:
        kernels.set_num_threads(threads)
        be = NumpyBackend(tiny_args(4, sliding_window=6), tensors_of(tiny_args(4, sliding_window=6), "Q8_0"),
                          kv_dtype="float16")
        run_batched(be, B=1, n_prompt=5, n_decode=12)
    finally:
        kernels.set_num_threads(old)


def test_float16_bits_as_numpy_rounds():
    from mlxtral.backends._decode_step_nb import f16_bits

    rng = np.random.default_rng(2)
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.concatenate([
            rng.standard_normal(20000) * 10.0 ** rng.uniform(-9, 6, 20000),  # normal, subnormal, overflow
            rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # any bits
            np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 65519.99, 2.0**-24, 2.0**-25,
                      2.0**-25 * 1.0001, 6.1035156e-05, -5.9604645e-08]),
        ]).astype(np.float32)
    got = np.empty(len(x), dtype=np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16)
    f16_bits(x, got)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


def test_stands_aside_where_it_does_not_apply():
    from mlxtral.backends.decode_step import DecodeStep
    from mlxtral.qtensor import QTensor

    be = tiny("Q4_0")
    be.layers[1].wo = QTensor.from_float(np.zeros((64, 32), dtype=np.float32))  # not [dim, H * hd]
    assert DecodeStep.build(be) is None  # it reads by address: any shape it would assume wrongly
    be = tiny("Q4_0")
    be.layers[0].router = be.layers[0].router[:3]  # three router rows for four experts
    assert DecodeStep.build(be) is None
    be = tiny("Q4_0")
    c = be.new_cache(8)
    c.k = np.zeros((1, *c.k.shape[1:]), dtype=np.float32)  # not this model's cache: the general path
    assert not be.decode_step.takes(c)
    c = be.new_cache(8)
    c.k, c.v = c.k.astype(np.float64), c.v.astype(np.float64)  # neither float32 nor float16
    assert not be.decode_step.takes(c)


def test_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("MLXTRAL_NO_DECODE_STEP", "1")
    assert tiny("Q4_0").decode_step is None


def test_a_lone_sequence_in_forward_runs_takes_the_step():
    be = tiny("Q4_0")
    caches = [be.new_cache(16) for _ in range(2)]
    for c in caches:
        be.forward([1, 2, 3], c)
    got = be.forward_runs([[7]], caches[:1])  # the decode step
    step, be.decode_step = be.decode_step, None
    want = be.forward_runs([[7]], caches[1:])  # the batched layer loop
    be.decode_step = step
    assert got.shape == want.shape == (1, be.args.vocab_size)
    np.testing.assert_array_equal(got, want)
    assert caches[0].offset == caches[1].offset == 4


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "IQ4_NL", "F32", "F16", "BF16",
                                   "Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS"])
def test_batched_step_gives_each_sequence_its_own_bits(qtype):
    run_batched(tiny(qtype, **(dict(dim=256, hidden_dim=256, head_dim=64) if qtype == "IQ4_XS" else {})))


def test_batched_step_mixed_kinds_and_every_batch_size():
    args = tiny_args(4, dim=256, hidden_dim=256, head_dim=64)
    t = tensors_of(args, "Q4_K")
    t["blk.0.attn_v.weight"] = tensors_of(args, "Q6_K", seed=1)["blk.0.attn_v.weight"]
    t["blk.1.attn_output.weight"] = tensors_of(args, "Q5_K", seed=2)["blk.1.attn_output.weight"]
    t["blk.1.ffn_down.2.weight"] = tensors_of(args, "Q8_0", seed=3)["blk.1.ffn_down.2.weight"]
    be = NumpyBackend(args, t)
    for B in (2, 3, 8, be.decode_step.max_batch, be.decode_step.max_batch + 1):  # the last: the layer loop
        run_batched(be, B=B, n_decode=3, seed=B)


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_step_dense_top_1_partial_rope_and_float16_caches(threads):
    old = kernels.get_num_threads()
    try:
        kernels.set_num_threads(threads)
        run_batched(tiny("Q8_0", n_experts=0))  # one always-on expert, no router: all rows to it
        run_batched(tiny("F16", n_experts=4, n_experts_per_tok=1))
        run_batched(tiny("Q4_0", rope_dim=8))
        args = tiny_args(4, sliding_window=6)
        run_batched(NumpyBackend(args, tensors_of(args, "Q8_0"), kv_dtype="float16"), B=3, n_decode=9)
    finally:
        kernels.set_num_threads(old)


def test_batched_step_stands_aside_for_caches_it_cannot_take():
    be = tiny("Q4_0")
    caches = [be.new_cache(16) for _ in range(3)]
    assert be.decode_step.takes_batch(caches)
    assert not be.decode_step.takes_batch(caches[:1])  # one sequence: the one-sequence step
    mixed = [*caches[:2], be.new_cache(16)]
    mixed[2].k, mixed[2].v = mixed[2].k.astype(np.float16), mixed[2].v.astype(np.float16)
    assert not be.decode_step.takes_batch(mixed)  # two cache dtypes: the layer loop (still each one's bits)
    for c in mixed:
        be.forward([1, 2], c)
    got = be.forward_runs([[5], [6], [7]], mixed)
    for c in mixed:
        c.trim(2)
    want = np.array([be.forward([t], c) for t, c in zip([5, 6, 7], mixed, strict=True)])
    np.testing.assert_array_equal(got, want)


def test_warm_compiles_the_signatures_the_steps_run():
    """``warm`` (the server calls it at start) compiles exactly what the first tokens run: nothing
    new is compiled when they come."""
    from mlxtral.backends import _decode_step_nb as nb

    be = tiny("Q4_0")
    be.decode_step.warm()
    sigs = (set(nb.decode_layers.signatures), set(nb.decode_batch.signatures))
    caches = [be.new_cache(8) for _ in range(3)]
    be.forward_runs([[1], [2], [3]], caches)
    be.forward([4], caches[0])
    assert (set(nb.decode_layers.signatures), set(nb.decode_batch.signatures)) == sigs
