"""NumPy building blocks of the forward pass: RMSNorm, RoPE, attention, routing, linear.

The matrix products go to :mod:`mlxtral.backends.kernels` (numba kernels on the raw GGUF blocks,
with a pure-NumPy fallback inside): ``linear``, ``linear_many`` (several weights, one input, one
pool job: q/k/v), ``swiglu_experts`` and ``linear_experts`` (the two halves of the MoE FFN, every
selected expert in one job each). ``ffn_experts`` / ``down_experts`` run an FFN with its down
product cut in two fixed halves (``down_split``), as every forward does.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np

from mlxtral.backends import kernels as _kernels
from mlxtral.qtensor import QTensor


def linear_reference(x: np.ndarray, w: QTensor) -> np.ndarray:
    """x [T, in] @ dequant(w [out, in]).T -> [T, out], float32. Allocates a float32 copy of w."""
    return x @ w.dequantize().T


def linear(x: np.ndarray, w: QTensor) -> np.ndarray:
    """x [T, in] float32 -> [T, out] float32."""
    return _kernels.linear(x, w)


def linear_many(x: np.ndarray, ws: Sequence[QTensor]) -> list[np.ndarray]:
    """``[linear(x, w) for w in ws]`` in one kernel job (x quantized once)."""
    return _kernels.linear_many(x, ws)


def swiglu_experts(
    xs: Sequence[np.ndarray], gates: Sequence[QTensor], ups: Sequence[QTensor]
) -> list[np.ndarray]:
    """``[silu(x @ g.T) * (x @ u.T) ...]``: every expert's first half in one kernel job."""
    return _kernels.swiglu_experts(xs, gates, ups)


def linear_experts(xs: Sequence[np.ndarray], ws: Sequence[QTensor]) -> list[np.ndarray]:
    """``[x @ w.T ...]`` in one kernel job (the experts' down projections)."""
    return _kernels.linear_experts(xs, ws)


def down_split(hidden: int) -> int:
    """Where every FFN down product is cut in two (0: not cut). A down projection sums ``hidden``
    products a row; this one always adds two fixed halves, columns ``[0, s)`` and ``[s, hidden)``,
    each summed as the kernels sum a row, then ``lo + hi`` in float32. So two processes that hold
    a half each (expert parallel by rows on 2 ranks, :mod:`mlxtral.distributed.placement`) add
    their halves in one collective and get one process's bits. ``s`` falls on a 256-column
    boundary when ``hidden`` allows (K-quant superblocks), else on a 32-column one (the other
    block types); the halves are equal whenever ``hidden`` is a multiple of 512 (Mixtral's 14336)."""
    step = 256 if hidden % 256 == 0 else 32
    return step * (hidden // step // 2)


_halves: weakref.WeakKeyDictionary[QTensor, tuple[int, QTensor, QTensor]] = weakref.WeakKeyDictionary()


def down_halves(w: QTensor) -> tuple[int, QTensor, QTensor] | None:
    """(s, columns [0, s), columns [s, in)) of down weight ``w`` [out, in] as views (kept per
    weight), or None when it is not cut (``down_split`` 0, or its blocks do not fall on ``s``)."""
    hit = _halves.get(w)
    if hit is None:
        s = down_split(w.shape[1])
        if s == 0:
            return None
        try:
            hit = (s, w.col_range(0, s), w.col_range(s, w.shape[1]))
        except ValueError:
            return None
        _halves[w] = hit
    return hit


_row_halves: weakref.WeakKeyDictionary[QTensor, tuple[QTensor, QTensor]] = weakref.WeakKeyDictionary()


def _rows_cut(w: QTensor) -> tuple[QTensor, QTensor]:
    """Rows [0, s) and [s, hidden) of gate or up weight ``w`` [hidden, dim] (``s`` where
    :func:`down_split` cuts its down), as views (kept per weight)."""
    hit = _row_halves.get(w)
    if hit is None:
        s = down_split(w.shape[0])
        hit = (w.row_range(0, s), w.row_range(s, w.shape[0]))
        _row_halves[w] = hit
    return hit


def ffn_experts(xs: Sequence[np.ndarray], gates: Sequence[QTensor], ups: Sequence[QTensor],
                downs: Sequence[QTensor]) -> list[np.ndarray]:
    """Every expert's FFN, ``down(silu(x @ gate.T) * (x @ up.T))`` [T, dim], down cut as
    :func:`down_experts` cuts it: gate and up run as two row halves, so each half of the hidden
    activation comes out on its own (no copies of it), then down's two halves."""
    cuts = [down_halves(w) for w in downs]
    if not cuts or any(c is None for c in cuts):
        return down_experts(swiglu_experts(xs, gates, ups), downs)
    gs = [_rows_cut(g) for g in gates]
    us = [_rows_cut(u) for u in ups]
    n = len(downs)
    hs = swiglu_experts([*xs, *xs], [g[0] for g in gs] + [g[1] for g in gs],
                        [u[0] for u in us] + [u[1] for u in us])  # [h's first halves, its second]
    return _kernels.linear_twins(hs[:n], [c[1] for c in cuts], hs[n:], [c[2] for c in cuts])  # type: ignore[index]


def down_experts(hs: Sequence[np.ndarray], ws: Sequence[QTensor]) -> list[np.ndarray]:
    """The FFN's down projections ``[h @ w.T ...]`` (h [T, hidden], w [dim, hidden]), every one
    the sum of its two fixed halves (:func:`down_split`), all in one kernel job."""
    halves = [down_halves(w) for w in ws]
    if all(hw is None for hw in halves):
        return linear_experts(hs, ws)
    if any(hw is None for hw in halves):  # (never within one layer: down_split is the width's)
        return [down_experts([h], [w])[0] for h, w in zip(hs, ws, strict=True)]
    return _kernels.linear_twins([h[:, : hw[0]] for h, hw in zip(hs, halves, strict=True)],  # type: ignore[index]
                                 [hw[1] for hw in halves],  # type: ignore[index]
                                 [h[:, hw[0] :] for h, hw in zip(hs, halves, strict=True)],  # type: ignore[index]
                                 [hw[2] for hw in halves])  # type: ignore[index]


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, window: int | None = None) -> np.ndarray:
    """Causal attention of queries q [T, H, hd] at positions p0.. over the cache k/v [KV, ctx, hd]
    (already holding them) -> [T, H*hd]; each row through the decode kernel (batch invariance)."""
    return _kernels.attend(q, k, v, p0, window)


def attend_runs(runs: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]],
                window: int | None = None) -> list[np.ndarray]:
    """``attend`` for several sequences, each (q [T, H, hd], its cache k, v [KV, ctx, hd], p0), in one
    kernel job -> [T, H*hd] per sequence, each the bits of its own ``attend``."""
    return _kernels.attend_runs(runs, window)


def attend_one(q: np.ndarray, k: np.ndarray, v: np.ndarray, S: int, window: int | None = None) -> np.ndarray:
    """Decode attention at position S - 1: q [H, hd], cache k/v [KV, ctx, hd] -> [H*hd]."""
    return _kernels.attend_one(q, k, v, S, window)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, dim] -> x / rms(x) * weight, float32."""
    return _kernels.rms_norm(x, weight, eps)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


class Rope:
    """Interleaved-pair rotary embedding (rotates x[2i], x[2i+1]), as in the original weights.

    A pair is a complex number ``x[2i] + 1j * x[2i+1]``; rotating it is one complex multiply by
    ``exp(1j * pos * theta_i)``, done in place on a complex64 view of the float32 rows.
    """

    def __init__(self, rope_dim: int, theta: float, max_positions: int) -> None:
        self.rope_dim = rope_dim
        self.max_positions = max_positions
        inv = 1.0 / (theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim))  # [rope_dim/2]
        ang = np.arange(max_positions, dtype=np.float64)[:, None] * inv[None, :]  # [P, rope_dim/2]
        cis = np.exp(1j * ang).astype(np.complex64)  # [P, rope_dim/2]
        self.cos = np.ascontiguousarray(cis.real)  # [P, rope_dim/2] f32 (the kernels' tables)
        self.sin = np.ascontiguousarray(cis.imag)
        self._cis: np.ndarray | None = None

    @property
    def cis(self) -> np.ndarray:
        """[P, rope_dim/2] complex64, the same numbers as ``cos`` and ``sin`` (made at first use:
        only the NumPy path without the kernels rotates with it)."""
        if self._cis is None:
            cis = np.empty(self.cos.shape, dtype=np.complex64)
            cis.real, cis.imag = self.cos, self.sin
            self._cis = cis
        return self._cis

    def __call__(self, x: np.ndarray, pos: np.ndarray | slice) -> np.ndarray:
        """x [T, H, hd] (last axis contiguous) rotated in place at positions pos [T]; returns x.
        With numba, one kernel call (``_kernels_nb.rope``: the complex product, each part rounded
        once, as the decode step computes it); else on a complex64 view."""
        xr = x[..., : self.rope_dim] if self.rope_dim < x.shape[-1] else x
        if xr.strides[-1] != 4:
            raise ValueError("Rope needs float32 rows with a contiguous last axis")
        if _kernels.HAVE_NUMBA and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 3:
            p = (np.arange(pos.start, pos.stop, dtype=np.int64) if isinstance(pos, slice)
                 else np.asarray(pos, dtype=np.int64))  # [T]
            if len(p) != x.shape[0] or (len(p) and not 0 <= p.min() <= p.max() < self.max_positions):
                raise ValueError(f"Rope: {len(p)} positions for {x.shape[0]} rows, or outside "
                                 f"0..{self.max_positions - 1}")
            _kernels.rope(x, self.cos, self.sin, p)
            return x
        xc = xr.view(np.complex64)  # [T, H, rd/2]
        xc *= self.cis[pos][:, None, :]
        return x


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos0: int, window: int | None = None
) -> np.ndarray:
    """Causal grouped-query attention; k, v [S, KV, hd] (see ``attention_kv`` for [KV, S, hd]).

    q [T, H, hd] at positions q_pos0..q_pos0+T-1; k, v at positions 0..S-1 (S = q_pos0 + T).
    Returns [T, H*hd].
    """
    return attention_kv(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), q_pos0, window)


def attention_kv(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos0: int, window: int | None = None
) -> np.ndarray:
    """Causal grouped-query attention on the cache layout: k, v [KV, S, hd] (each head's rows
    contiguous, so ``q . K^T`` and ``p . V`` are one batched BLAS matmul per KV head).

    q [T, H, hd] at positions q_pos0..q_pos0+T-1. Returns [T, H*hd] float32.
    """
    T, H, hd = q.shape
    KV, S, _ = k.shape
    G = H // KV
    # query rows of one KV group together: [KV, G*T, hd] (row = g*T + t)
    qg = q.reshape(T, KV, G, hd).transpose(1, 2, 0, 3).reshape(KV, G * T, hd)
    scores = np.matmul(qg, k.transpose(0, 2, 1))  # [KV, G*T, S]
    scores *= np.float32(1.0 / np.sqrt(hd))
    if T > 1 or window is not None:
        qpos = np.arange(q_pos0, q_pos0 + T)[:, None]  # [T, 1]
        kpos = np.arange(S)[None, :]  # [1, S]
        masked = kpos > qpos
        if window is not None:
            masked |= kpos <= qpos - window
        s4 = scores.reshape(KV, G, T, S)
        s4[:, :, masked] = -np.inf
    p = softmax(scores, axis=-1)
    out = np.matmul(p, v)  # [KV, G*T, hd]
    return out.reshape(KV, G, T, hd).transpose(2, 0, 1, 3).reshape(T, H * hd)


_routers: dict[int, tuple[np.ndarray, QTensor]] = {}


def router_logits(x: np.ndarray, router: np.ndarray) -> np.ndarray:
    """x [T, dim] @ router [E, dim].T -> [T, E] float32, through the F32 row kernel: one summation
    order per (token, expert) at every T (BLAS's gemv and gemm sum in different orders)."""
    hit = _routers.get(id(router))
    if hit is None or hit[0] is not router:
        if len(_routers) > 4096:
            _routers.clear()
        hit = _routers[id(router)] = (router, QTensor("F32", router.shape, np.ascontiguousarray(router,
                                                                                               np.float32)))
    return _kernels.linear(x, hit[1])


def route(x: np.ndarray, router: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing in float32, the same arithmetic per token whatever T.

    x [T, dim], router [E, dim] -> (experts [T, k] int, weights [T, k] float32): the k largest
    router logits (ties: the lower expert id first), weighted by the softmax over those k (= softmax
    over all, renormalised), its sum taken in rank order.
    """
    logits = router_logits(x, router)  # [T, E]
    fast = _kernels.top_k_softmax(logits, k)  # the steps below, one numba call (None without numba)
    if fast is not None:
        return fast
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # [T, k], rank order
    sel = np.take_along_axis(logits, idx, axis=-1)  # [T, k]
    e = np.exp(sel - sel[:, :1])  # [T, k]; the top logit is the row's maximum
    tot = e[:, 0].copy()  # [T]
    for j in range(1, e.shape[1]):
        tot += e[:, j]
    return idx, (e / tot[:, None]).astype(np.float32, copy=False)


def combine(ys: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The MoE output from each token's expert outputs in rank order: ys [T, k, dim], w [T, k]
    (summing to 1) -> [T, dim] = y_0 + sum_j>0 w_j (y_j - y_0).

    That is sum_j w_j y_j (as the weights sum to 1), in one fixed order per token whatever the
    grouping of tokens per expert; and where the experts are copies (an upcycled dense model: every
    y_j equals y_0 bit for bit) it is y_0 exactly, what the dense model computes, which w_0 y_0 +
    w_1 y_1 is not (rounding) whatever the order.
    """
    out = ys[:, 0].copy()  # [T, dim]
    for j in range(1, ys.shape[1]):
        out += w[:, j : j + 1] * (ys[:, j] - ys[:, 0])
    return out
