"""The sampler's fast paths (no argsort of the whole vocabulary) draw exactly what the previous
implementation drew: the same token for the same seed, logits and parameters, ties included."""
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


@pytest.mark.parametrize("params", PARAMS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("kind", ["normal", "ties", "flat", "peaked"])
def test_same_tokens_as_before(params, kind):
    rng = np.random.default_rng(hash((kind, tuple(params.items()))) % 2**32)
    for seed in range(12):
        vocab = int(rng.choice([2, 7, 1000, 32000]))
        new, old = (cls(SamplingParams(seed=seed, **params)) for cls in (Sampler, OldSampler))
        history: list[int] = []
        for _ in range(6):  # the generators must stay in step token after token
            x = _logits(kind, rng, vocab)
            a, b = new(x, history), old(x, history)
            assert a == b, (seed, vocab)
            history.append(a)


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
