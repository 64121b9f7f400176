"""Samplers on float32 logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The order follows llama.cpp's default chain: repetition penalty -> top-k -> top-p -> min-p ->
temperature -> draw. ``temperature == 0`` is greedy (argmax, after the penalty).

Every parameter is checked (:func:`check_sampling`) for type, finiteness and range, through the
Python API and the command line alike (there with the flags' names):

- temperature: 0 to 100 (0 = greedy; below 1e-5 it is greedy too, as in vLLM: the draw would be an
  argmax anyway and dividing by it overflows);
- top_p: (0, 1] (1 = off); min_p: [0, 1) (0 = off); top_k: a whole number >= 0 (0 = off);
- repetition_penalty: 0.5 to 10 (1 = off): a penalty of 1e-300 multiplies logits to infinity;
- seed: a whole number from 0 to 2**64 - 1, or -1 for a random seed (llama.cpp's meaning);
- repetition_context: a whole number >= 0 (0 = off).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mlxtral.display import show
from mlxtral.errors import UsageError

TEMPERATURE_MAX = 100.0
GREEDY_BELOW = 1e-5  # a smaller temperature samples greedily
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.5, 10.0
SEED_MAX = 2**64 - 1
RANDOM_SEED = -1  # llama.cpp's "pick a random seed"
_SHOWN = 40  # characters of a bad value shown in a message

# What the command line calls each parameter (the Python API uses the field names).
FLAG_NAMES = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
              "repetition_penalty": "--repeat-penalty", "seed": "--seed", "max_tokens": "--max-tokens"}


def _shown(v: object) -> str:
    return show(v, _SHOWN)


def check_number(name: str, v: object, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False,
                 note: str = "") -> float:
    """``v`` as a finite float in the range; :class:`UsageError` naming ``name`` otherwise."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    want = f"a number in {left}{lo:g}, {hi:g}{right}{note}"
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise UsageError(f"{name} must be {want}, got {type(v).__name__} {_shown(v)}")
    try:
        x = float(v)
    except OverflowError:  # an int too large for a float
        x = math.inf
    ok = math.isfinite(x) and (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)
    if not ok:
        raise UsageError(f"{name} must be {want}, got {_shown(v)}")
    return x


def check_whole(name: str, v: object, lo: int, hi: int | None = None, note: str = "",
                hi_text: str | None = None) -> int:
    """``v`` as an int in ``[lo, hi]``; :class:`UsageError` naming ``name`` otherwise."""
    want = f"a whole number from {lo} to {hi_text or hi}" if hi is not None else f"a whole number >= {lo}"
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise UsageError(f"{name} must be {want}{note}, got {type(v).__name__} {_shown(v)}")
    n = int(v)
    if n < lo or (hi is not None and n > hi):
        raise UsageError(f"{name} must be {want}{note}, got {_shown(n)}")
    return n


def check_seed(name: str, v: object) -> int | None:
    """A seed from 0 to 2**64 - 1; -1 (llama.cpp's "random") and None are a random seed (None)."""
    if v is None:
        return None
    if not isinstance(v, bool) and isinstance(v, numbers.Integral) and int(v) == RANDOM_SEED:
        return None
    return check_whole(name, v, 0, SEED_MAX, " (or -1 for a random seed)", hi_text="2^64 - 1")


def check_sampling(temperature: object, top_k: object, top_p: object, min_p: object,
                   repetition_penalty: object, seed: object = None, repetition_context: object = 64,
                   names: Mapping[str, str] | None = None) -> dict[str, object]:
    """Every sampling parameter checked (see the module docstring); the normalized values.

    ``names`` maps parameter names to what the message calls them (the CLI passes :data:`FLAG_NAMES`)."""
    def nm(k: str) -> str:
        return (names or {}).get(k, k)

    t = check_number(nm("temperature"), temperature, 0.0, TEMPERATURE_MAX, note=" (0 = greedy)")
    return {
        "temperature": 0.0 if t < GREEDY_BELOW else t,
        "top_k": check_whole(nm("top_k"), top_k, 0, note=" (0 = off)"),
        "top_p": check_number(nm("top_p"), top_p, 0.0, 1.0, lo_open=True, note=" (1 = off)"),
        "min_p": check_number(nm("min_p"), min_p, 0.0, 1.0, hi_open=True, note=" (0 = off)"),
        "repetition_penalty": check_number(nm("repetition_penalty"), repetition_penalty,
                                           REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX, note=" (1 = off)"),
        "seed": check_seed(nm("seed"), seed),
        "repetition_context": check_whole(nm("repetition_context"), repetition_context, 0, note=" (0 = off)"),
    }


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    repetition_context: int = 64  # how many recent tokens the penalty looks at (0: off)
    seed: int | None = None  # None or -1: random

    def __post_init__(self) -> None:
        """Checked and normalized (UsageError on a bad value): floats and ints of Python's types,
        a temperature below 1e-5 is 0 (greedy), a seed of -1 is None (random)."""
        for k, v in check_sampling(self.temperature, self.top_k, self.top_p, self.min_p,
                                   self.repetition_penalty, self.seed, self.repetition_context).items():
            setattr(self, k, v)


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self._ws: np.ndarray | None = None  # [2, n] float64 scratch
        self._sorted: np.ndarray | None = None  # [V] float32, ascending
        self._weights: np.ndarray | None = None  # [V rounded up to blocks] float32
        self._desc: np.ndarray | None = None  # [V] float64, descending

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """logits [vocab] float32 -> token id."""
        p = self.p
        x = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0 and len(history) and p.repetition_context:
            x = apply_repetition_penalty(x, history[-p.repetition_context :], p.repetition_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(x))
        if not p.top_k or p.top_k >= x.shape[0]:
            if p.top_p == 1.0 and p.min_p == 0.0:
                return self._draw_in_id_order(x)
            return self._draw_sorted_values(x)
        cand = np.argpartition(-x, p.top_k - 1)[: p.top_k]
        cl = x[cand].astype(np.float64)
        order = np.argsort(-cl, kind="stable")
        cand, cl = cand[order], cl[order]  # descending
        i = self._draw(cl)
        return int(cand[i])

    def _work(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Two float64 scratch vectors [n], kept between tokens: a fresh 256 KB array per step is
        a fresh mapping whose page faults cost more than the arithmetic."""
        if self._ws is None or self._ws.shape[1] < n:
            self._ws = np.empty((2, n), dtype=np.float64)
        return self._ws[0, :n], self._ws[1, :n]

    def _draw(self, cl: np.ndarray) -> int:
        """Index into ``cl`` (float64 logits, descending) after top-p and min-p, at the temperature.
        The operations (and their order) are those of the original implementation, in scratch
        buffers."""
        p = self.p
        n = cl.shape[0]
        a, c = self._work(n)
        if p.top_p < 1.0:
            np.exp(np.subtract(cl, cl[0], out=a), out=a)  # probs
            a /= a.sum()
            n = int(np.searchsorted(np.cumsum(a, out=c), p.top_p) + 1)
            cl = cl[:n]
        if p.min_p > 0.0:
            e = np.exp(np.subtract(cl, cl[0], out=a[:n]), out=a[:n])
            n = max(int(np.count_nonzero(e >= p.min_p)), 1)
            cl = cl[:n]
        probs = a[:n]
        np.subtract(cl, cl[0], out=probs)  # <= 0, the top one 0: no overflow at a small temperature
        if p.temperature != 1.0:  # x / 1.0 is x, bit for bit: skip the pass
            np.divide(probs, p.temperature, out=probs)
        np.exp(probs, out=probs)
        probs /= probs.sum()
        if not np.isfinite(probs[0]):  # NaN logits: numpy's own refusal, as before
            return int(self.rng.choice(n, p=probs))
        # = self.rng.choice(n, p=probs) (numpy's algorithm: one uniform double against the
        # normalized cumulative sum; the same draws, tested) without its ~1 ms of checks over p
        cdf = np.cumsum(probs, out=c[:n])
        cdf /= cdf[-1]
        return min(int(cdf.searchsorted(self.rng.random(), side="right")), n - 1)

    _BLOCK = 256  # ids per block of the two-level inverse CDF

    def _draw_in_id_order(self, x: np.ndarray) -> int:
        """Temperature alone (no top-k, top-p, min-p): one uniform draw against the cumulative
        softmax in id order, which needs no sort: P(id) = exp((x_id - max) / T) / sum, the weights
        in float32 (each within an ulp), their sums in float64. The cumulative sum is two-level
        (per block of 256 ids, then within the block the draw lands in), so it costs ~0.1 ms on
        32k logits, not the ~0.7 ms of sorting them, exp and cumsum in float64 over all.
        Non-finite logits go the sorted way (numpy's own refusal of NaN, as before)."""
        m = x.max()
        if not np.isfinite(m):
            return self._draw_sorted_values(x)
        V, B = x.shape[0], self._BLOCK
        nblk = -(-V // B)
        if self._weights is None or self._weights.shape[0] != nblk * B:
            self._weights = np.empty(nblk * B, dtype=np.float32)  # [nblk * B], zero-padded
        e = self._weights
        np.subtract(x, m, out=e[:V])  # <= 0, the top one 0
        if self.p.temperature != 1.0:
            e[:V] /= np.float32(self.p.temperature)
        np.exp(e[:V], out=e[:V])  # (0, 1]; -inf logits give 0
        e[V:] = 0.0
        blocks = e.reshape(nblk, B).sum(axis=1, dtype=np.float64)  # [nblk]
        cum = np.cumsum(blocks)  # [nblk]
        target = self.rng.random() * cum[-1]  # in [0, total)
        k = min(int(cum.searchsorted(target, side="right")), nblk - 1)
        within = np.cumsum(e[k * B : (k + 1) * B], dtype=np.float64)  # [B]
        within += cum[k - 1] if k else 0.0
        j = int(within.searchsorted(target, side="right"))
        if j >= B or e[k * B + j] == 0.0:  # rounding between the two levels: the block's last live id
            j = int(np.flatnonzero(e[k * B : (k + 1) * B])[-1])
        return k * B + j

    def _draw_sorted_values(self, x: np.ndarray) -> int:
        """No top-k, with top-p or min-p (or non-finite logits): the same draw as sorting every id
        by descending logit (ties by id, a stable sort), without the argsort of the whole
        vocabulary. The probabilities only need the sorted *values* (an in-place SIMD sort of
        float32); the drawn rank ``i`` is then mapped back to its id: the value at rank ``i`` and
        how many equal values come before it in the sorted order pick the id among the ids holding
        that value, in id order, as the stable sort would."""
        V = x.shape[0]
        if self._sorted is None or self._sorted.shape[0] != V:
            self._sorted = np.empty(V, dtype=np.float32)
            self._desc = np.empty(V, dtype=np.float64)
        srt, desc = self._sorted, self._desc
        np.copyto(srt, x)
        srt.sort()  # ascending, in place
        desc[:] = srt[::-1]  # [V] float64 descending: the values the stable argsort would order
        i = self._draw(desc)
        v = desc[i]
        first = V - int(np.searchsorted(srt, v, side="right"))  # rank of the first value equal to v
        ids = np.flatnonzero(x == v)  # [k] ascending ids holding v
        return int(ids[i - first])


def apply_repetition_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (as llama.cpp and transformers): divide positive logits, multiply negative."""
    x = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    v = x[ids]
    x[ids] = np.where(v > 0, v / penalty, v * penalty)
    return x
