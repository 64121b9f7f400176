"""The server's mixed step (issue 15): one forward over several sequences' runs of tokens (one
token for a decoding sequence, a prompt chunk for a prefilling one), each at its own positions in
its own KV cache, gives every sequence bit for bit the logits it gets alone; the scheduler packs
its steps that way within its token budget."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tiny_models import random_gguf_blocks, random_weights, tiny_args, write_gguf

from mlxtral.backends import kernels
from mlxtral.backends.numpy_backend import NumpyBackend
from mlxtral.errors import ContextOverflowError
from mlxtral.qtensor import QTensor

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba path disabled")


def tiny(qtype: str, seed: int = 0) -> NumpyBackend:
    """A tiny random MoE (4 experts, top 2) with every matrix as ``qtype``."""
    args = tiny_args(4)
    rng = np.random.default_rng(seed)
    t: dict[str, QTensor] = {}
    for name, x in random_weights(args, seed).items():
        if x.ndim == 1 or name.endswith("ffn_gate_inp.weight") or qtype == "F32":
            t[name] = QTensor.from_float(x * (8.0 if name == "token_embd.weight" and qtype == "F32" else 1.0))
        else:
            amp = 1.0 if name == "token_embd.weight" else 2.0 / np.sqrt(x.shape[-1])
            t[name] = QTensor(qtype, x.shape, random_gguf_blocks(qtype, x.shape, rng, amp))
    return NumpyBackend(args, t)


def toks(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, 32000, n).tolist()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "F32"])
def test_mixed_runs_are_bit_identical_to_solo(qtype: str) -> None:
    """Decode rows and prefill chunks of several sequences (a fresh prompt, a prompt's middle
    chunk, decodes at different depths) in one forward: each sequence's logits and KV cache equal
    those of running that run alone, and every later step still does."""
    be = tiny(qtype)
    rng = np.random.default_rng(1)
    history = [toks(rng, 5), toks(rng, 0), toks(rng, 17), toks(rng, 2), toks(rng, 9)]  # already in the cache
    runs = [toks(rng, 1), toks(rng, 12), toks(rng, 1), toks(rng, 7), toks(rng, 1)]
    solo_c, mixed_c = [], []
    for h in history:
        for group in (solo_c, mixed_c):
            c = be.new_cache(64)
            if h:
                be.forward(h, c)
            group.append(c)
    for step in range(3):
        solo = np.stack([be.forward(r, c) for r, c in zip(runs, solo_c, strict=True)])  # [B, V]
        mixed = be.forward_runs(runs, mixed_c)  # [B, V]
        assert mixed.shape == solo.shape and mixed.dtype == np.float32
        np.testing.assert_array_equal(mixed, solo)
        for s, m in zip(solo_c, mixed_c, strict=True):
            assert s.offset == m.offset
            np.testing.assert_array_equal(m.k[:, :, : m.offset], s.k[:, :, : s.offset])
            np.testing.assert_array_equal(m.v[:, :, : m.offset], s.v[:, :, : s.offset])
        if step == 0:  # every sequence decodes its greedy token
            runs = [[int(np.argmax(row))] for row in solo]
        else:  # decodes beside chunks again
            runs = [toks(rng, 1 + 3 * (i % 2)) for i in range(5)]


def test_forward_batch_is_runs_of_one() -> None:
    """The decode-only batch (one token per sequence) is the same path."""
    be = tiny("Q4_0")
    rng = np.random.default_rng(2)
    prompts = [toks(rng, 3), toks(rng, 1), toks(rng, 6)]
    solo, batch = [], []
    for p in prompts:
        for group in (solo, batch):
            c = be.new_cache(32)
            be.forward(p, c)
            group.append(c)
    ids = toks(rng, 3)
    out = be.forward_batch(ids, batch)  # [3, V]
    for i, c in enumerate(solo):
        np.testing.assert_array_equal(out[i], be.forward([ids[i]], c))
        assert batch[i].offset == c.offset


def test_forward_runs_refuses_bad_batches() -> None:
    be = tiny("Q8_0")
    c = be.new_cache(8)
    with pytest.raises(ValueError, match="one cache per run"):
        be.forward_runs([[5]], [c, be.new_cache(8)])
    with pytest.raises(ValueError, match="a token in every run"):
        be.forward_runs([[5], []], [c, be.new_cache(8)])
    with pytest.raises(ValueError, match="same cache twice"):
        be.forward_runs([[5], [6]], [c, c])
    be.forward([1, 2, 3, 4, 5], c)
    with pytest.raises(ContextOverflowError, match="9 tokens do not fit the context of 8"):
        be.forward_runs([[5], [1, 2, 3, 4]], [be.new_cache(8), c])
    assert c.offset == 5


def test_scheduler_steps_are_one_mixed_forward(tmp_path) -> None:  # noqa: ANN001
    """Requests of different prompt lengths: the short ones decode while the long ones prefill, every
    step with more than one sequence is one ``forward_runs`` (prompt chunks within the budget beside
    the decoders' tokens), and each request gets what ``model.generate`` gives it alone."""
    import mlxtral
    from mlxtral.sampling import SamplingParams
    from mlxtral.server.protocol import GenRequest
    from mlxtral.server.scheduler import Handle, Scheduler

    args = tiny_args(4)
    m = mlxtral.load(write_gguf(tmp_path / "tiny.gguf", random_weights(args, 3), args), backend="numpy",
                     max_context=128)
    rng = np.random.default_rng(4)
    cases = [([1, *toks(rng, n)], dict(temperature=0.0) if i % 2 else dict(temperature=0.8, seed=i))
             for i, n in enumerate([3, 20, 1, 9, 14])]
    want = [m.generate(ids, max_tokens=8, session=m.new_session(), **kw) for ids, kw in cases]
    be = m.backend
    steps: list[list[int]] = []  # run lengths of each batched forward
    solo: list[int] = []  # tokens of each single-sequence forward
    real_runs, real_fwd = be.forward_runs, be.forward
    be.forward_runs = lambda runs, caches: (steps.append([len(r) for r in runs]), real_runs(runs, caches))[1]
    be.forward = lambda ids, cache, *a: (solo.append(len(ids)), real_fwd(ids, cache, *a))[1]
    sched = Scheduler(m, parallel=8, prefill_chunk=6)

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        hs = [Handle(GenRequest("completion", ids, 8, SamplingParams(**kw)), loop) for ids, kw in cases]
        for h in hs:  # all waiting before the worker starts: the short prompts decode while the
            sched.submit(h)  # long ones still prefill
        sched.start()

        async def text(h: Handle) -> str:
            return "".join([ev.text async for ev in h.events()])

        return await asyncio.gather(*(text(h) for h in hs))

    try:
        assert asyncio.run(run()) == want
    finally:
        sched.stop()
        be.forward_runs, be.forward = real_runs, real_fwd
    mixed = [s for s in steps if max(s) > 1 and min(s) == 1]  # a prompt chunk beside a decoder
    assert mixed, steps
    assert all(sum(n for n in s if n > 1) <= 6 for s in steps)  # the budget (decoders' rows apart)
    assert sum(solo) + sum(map(sum, steps)) == sum(len(ids) for ids, _ in cases) + 7 * len(cases)


def test_scheduler_refuses_an_empty_budget() -> None:
    from types import SimpleNamespace

    from mlxtral.errors import UsageError
    from mlxtral.server.scheduler import Scheduler

    fake = SimpleNamespace(backend=None, tokenizer=None)
    for bad in (0, -3, 2.5):
        with pytest.raises(UsageError, match="prefill_chunk"):
            Scheduler(fake, prefill_chunk=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("window", [None, 5])
def test_attend_runs_is_each_sequences_attend(dtype: type, window: int | None) -> None:
    """Several sequences' attention in one kernel job (the mixed step's): each sequence gets the
    bits of its own ``attend`` call, decode rows and prefill chunks alike, on either cache dtype."""
    rng = np.random.default_rng(3)
    H, KV, hd, ctx = 4, 2, 16, 32
    runs = []
    for T, p0 in ((1, 9), (6, 0), (1, 20), (3, 12)):
        k = rng.standard_normal((KV, ctx, hd)).astype(dtype)
        v = rng.standard_normal((KV, ctx, hd)).astype(dtype)
        runs.append((rng.standard_normal((T, H, hd)).astype(np.float32), k, v, p0))
    got = kernels.attend_runs(runs, window)
    for (q, k, v, p0), g in zip(runs, got, strict=True):
        np.testing.assert_array_equal(g, kernels.attend(q, k, v, p0, window))
    other = np.float16 if dtype == np.float32 else np.float32  # caches of both dtypes in one job
    mixed = [*runs, (runs[0][0], runs[0][1].astype(other), runs[0][2].astype(other), runs[0][3])]
    got = kernels.attend_runs(mixed, window)
    for (q, k, v, p0), g in zip(mixed, got, strict=True):
        np.testing.assert_array_equal(g, kernels.attend(q, k, v, p0, window))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.attend_runs([*runs, (runs[0][0], runs[0][1], runs[0][2], ctx)], window)
