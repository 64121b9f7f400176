"""Samplers on float32 logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The order follows llama.cpp's default chain: repetition penalty -> top-k -> top-p -> min-p ->
temperature -> draw. ``temperature == 0`` is greedy (argmax, after the penalty).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlxtral.errors import UsageError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise UsageError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """logits [vocab] float32 -> token id."""
        p = self.p
        x = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0 and len(history):
            x = apply_repetition_penalty(x, history[-p.repetition_context :], p.repetition_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(x))
        cand = np.arange(x.shape[0])
        if p.top_k and p.top_k < x.shape[0]:
            cand = np.argpartition(-x, p.top_k - 1)[: p.top_k]
        cl = x[cand].astype(np.float64)
        order = np.argsort(-cl, kind="stable")
        cand, cl = cand[order], cl[order]  # descending
        probs = np.exp(cl - cl[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            cand, cl = cand[:keep], cl[:keep]
        if p.min_p > 0.0:
            keep = int(np.sum(np.exp(cl - cl[0]) >= p.min_p))
            cand, cl = cand[: max(keep, 1)], cl[: max(keep, 1)]
        z = cl / p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return int(cand[self.rng.choice(len(cand), p=probs)])


def apply_repetition_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (as llama.cpp and transformers): divide positive logits, multiply negative."""
    x = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    v = x[ids]
    x[ids] = np.where(v > 0, v / penalty, v * penalty)
    return x
