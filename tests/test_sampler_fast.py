"""The sampler's fast paths (no argsort of the whole vocabulary). With top-k, top-p or min-p they
draw exactly what the previous implementation drew: the same token for the same seed, logits and
parameters, ties included. At a temperature alone the draw runs in id order (no sort at all): the
same distribution, tested by frequency, not the same token for a seed."""
from __future__ import annotations

import time

import numpy as np
import pytest

from mlxtral.sampling import Sampler, SamplingParams, apply_repetition_penalty


class OldSampler:
    """The implementation before the fast paths, verbatim: the independent reference."""

    def __init__(self, params: SamplingParams) -> None:
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history=()) -> int:
        p = self.p
        x = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0 and len(history) and p.repetition_context:
            x = apply_repetition_penalty(x, history[-p.repetition_context :], p.repetition_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(x))
        cand = np.arange(x.shape[0])
        if p.top_k and p.top_k < x.shape[0]:
            cand = np.argpartition(-x, p.top_k - 1)[: p.top_k]
        cl = x[cand].astype(np.float64)
        order = np.argsort(-cl, kind="stable")
        cand, cl = cand[order], cl[order]
        probs = np.exp(cl - cl[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            cand, cl = cand[:keep], cl[:keep]
        if p.min_p > 0.0:
            keep = int(np.sum(np.exp(cl - cl[0]) >= p.min_p))
            cand, cl = cand[: max(keep, 1)], cl[: max(keep, 1)]
        z = (cl - cl[0]) / p.temperature
        probs = np.exp(z)
        probs /= probs.sum()
        return int(cand[self.rng.choice(len(cand), p=probs)])


def _logits(kind: str, rng: np.random.Generator, vocab: int) -> np.ndarray:
    if kind == "normal":
        return (rng.standard_normal(vocab) * 3).astype(np.float32)
    if kind == "ties":  # few distinct values: long runs of equal logits, +0.0 and -0.0 among them
        x = rng.integers(-3, 4, vocab).astype(np.float32) * np.float32(0.5)
        x[rng.random(vocab) < 0.2] = -0.0
        return x
    if kind == "flat":  # every logit equal: the draw is decided by the tie order alone
        return np.full(vocab, 1.25, np.float32)
    x = (rng.standard_normal(vocab) * 0.1).astype(np.float32)  # peaked: one clear winner
    x[rng.integers(vocab)] = 20.0
    return x


PARAMS = [
    dict(temperature=1.0), dict(temperature=0.7), dict(temperature=0.05), dict(temperature=3.0),
    dict(temperature=1.0, top_p=0.9), dict(temperature=0.8, top_p=0.5, min_p=0.05),
    dict(temperature=1.0, min_p=0.1), dict(temperature=1.0, top_k=40), dict(temperature=1.0, top_k=1),
    dict(temperature=0.9, top_k=50, top_p=0.95), dict(temperature=1.0, top_k=10**6),
    dict(temperature=1.0, repetition_penalty=1.3), dict(temperature=0.0),
]


def _id_order(params: dict, vocab: int = 32000) -> bool:
    """Whether the sampler draws in id order (a temperature alone: no top-k below the vocabulary,
    no top-p, no min-p)."""
    k = params.get("top_k", 0)
    return (params.get("temperature", 0.0) > 0 and (k == 0 or k >= vocab)
            and params.get("top_p", 1.0) == 1.0 and params.get("min_p", 0.0) == 0.0)


@pytest.mark.parametrize("params", [p for p in PARAMS if not _id_order(p)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("kind", ["normal", "ties", "flat", "peaked"])
def test_same_tokens_as_before(params, kind):
    rng = np.random.default_rng(hash((kind, tuple(params.items()))) % 2**32)
    for seed in range(12):
        vocab = int(rng.choice([2, 7, 1000, 32000]))
        if _id_order(params, vocab):  # top-k of the whole vocabulary: the id-order draw (below)
            continue
        new, old = (cls(SamplingParams(seed=seed, **params)) for cls in (Sampler, OldSampler))
        history: list[int] = []
        for _ in range(6):  # the generators must stay in step token after token
            x = _logits(kind, rng, vocab)
            a, b = new(x, history), old(x, history)
            assert a == b, (seed, vocab)
            history.append(a)


def _softmax(x: np.ndarray, t: float) -> np.ndarray:
    z = (x.astype(np.float64) - x.max()) / t
    p = np.exp(z)
    return p / p.sum()


@pytest.mark.parametrize("params", [p for p in PARAMS if _id_order(p)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_id_order_draws_the_softmax(params):
    """Frequencies over many draws within 5 standard deviations of the softmax at the temperature
    (after the penalty), over a vocabulary of several blocks with the mass spread across them."""
    rng = np.random.default_rng(7)
    V = 700  # three blocks of 256, the last one partial
    x = np.full(V, -12.0, np.float32)
    heavy = [0, 255, 256, 300, 511, 512, 699]  # block edges, both sides
    x[heavy] = rng.uniform(-1.0, 1.0, len(heavy)).astype(np.float32)
    history = [300, 5]
    s = Sampler(SamplingParams(seed=3, **params))
    ref = x
    if params.get("repetition_penalty", 1.0) != 1.0:
        ref = apply_repetition_penalty(x, history, params["repetition_penalty"])
    p = _softmax(ref, params["temperature"])
    n = 40000
    freq = np.bincount([s(x, history) for _ in range(n)], minlength=V) / n
    sd = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * sd + 1e-4), np.abs(freq - p).max()


def test_id_order_edge_cases():
    """Reproducible for a seed; never an id of weight 0 (-inf logits, block edges, a partial last
    block); one live id is always drawn; NaN refused as before."""
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    a, b = (Sampler(SamplingParams(temperature=1.0, seed=11)) for _ in range(2))
    assert [a(x) for _ in range(50)] == [b(x) for _ in range(50)]
    for live in ([255, 256], [0], [999], [511, 767, 999]):
        y = np.full(1000, -np.inf, np.float32)
        y[live] = 0.5
        s = Sampler(SamplingParams(temperature=0.8, seed=2))
        assert {s(y) for _ in range(300)} <= set(live)
    tiny = np.array([3.0, -200.0, -np.inf], np.float32)  # exp underflows to 0 for the second at T 0.05
    s = Sampler(SamplingParams(temperature=0.05, seed=0))
    assert {s(tiny) for _ in range(200)} == {0}
    nan = x.copy()
    nan[3] = np.nan
    with pytest.raises(ValueError):
        Sampler(SamplingParams(temperature=1.0, seed=0))(nan)


def test_no_full_sort_is_faster():
    """Sampling at temperature 1 over 32k logits: well under the old stable argsort's cost."""
    x = (np.random.default_rng(0).standard_normal(32000) * 3).astype(np.float32)
    new, old = (cls(SamplingParams(temperature=1.0, seed=0)) for cls in (Sampler, OldSampler))

    def best(f) -> float:
        f(x)
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            f(x)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t_new, t_old = best(new), best(old)
    print(f"sampler at temperature 1, 32k vocab: {t_new * 1e3:.2f} ms, before {t_old * 1e3:.2f} ms")
    assert t_new < t_old
