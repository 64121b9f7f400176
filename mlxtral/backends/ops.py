"""NumPy building blocks of the forward pass: RMSNorm, RoPE, attention, routing, linear.

``linear`` dispatches to the quantized kernels of ``mlxtral.backends.kernels`` (numba) when
they are available, and otherwise to the reference: dequantize, then a float32 matmul.
"""
from __future__ import annotations

import numpy as np

from mlxtral.qtensor import QTensor

try:  # the fast path: kernels on raw GGUF blocks
    from mlxtral.backends import kernels as _kernels

    _kernel_linear = _kernels.linear
except ImportError:  # pragma: no cover - kernels not built yet / numba missing
    _kernels = None
    _kernel_linear = None


def linear_reference(x: np.ndarray, w: QTensor) -> np.ndarray:
    """x [T, in] @ dequant(w [out, in]).T -> [T, out], float32. Allocates a float32 copy of w."""
    return x @ w.dequantize().T


def linear(x: np.ndarray, w: QTensor) -> np.ndarray:
    """x [T, in] float32 -> [T, out] float32."""
    if w.qtype == "F32":
        return x @ w.data.T
    if _kernel_linear is not None:
        return _kernel_linear(np.ascontiguousarray(x, dtype=np.float32), w)
    return linear_reference(x, w)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, dim] -> x / rms(x) * weight, float32."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)  # [T, 1]
    return x * (1.0 / np.sqrt(ms + eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


class Rope:
    """Interleaved-pair rotary embedding (rotates x[2i], x[2i+1]), as in the original weights."""

    def __init__(self, rope_dim: int, theta: float, max_positions: int) -> None:
        self.rope_dim = rope_dim
        inv = 1.0 / (theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim))  # [rope_dim/2]
        ang = np.arange(max_positions, dtype=np.float64)[:, None] * inv[None, :]  # [P, rope_dim/2]
        self.cos = np.cos(ang).astype(np.float32)
        self.sin = np.sin(ang).astype(np.float32)

    def __call__(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x [T, H, hd] rotated in place at positions pos [T]; returns x."""
        rd = self.rope_dim
        c = self.cos[pos][:, None, :]  # [T, 1, rd/2]
        s = self.sin[pos][:, None, :]
        x0 = x[..., 0:rd:2].copy()  # [T, H, rd/2]
        x1 = x[..., 1:rd:2]
        x[..., 0:rd:2] = x0 * c - x1 * s
        x[..., 1:rd:2] = x0 * s + x1 * c
        return x


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos0: int, window: int | None = None
) -> np.ndarray:
    """Causal grouped-query attention.

    q [T, H, hd] at positions q_pos0..q_pos0+T-1; k, v [S, KV, hd] at positions 0..S-1
    (S = q_pos0 + T). Returns [T, H*hd].
    """
    T, H, hd = q.shape
    S, KV, _ = k.shape
    G = H // KV
    qg = q.reshape(T, KV, G, hd).transpose(1, 2, 0, 3)  # [KV, G, T, hd]
    kt = k.transpose(1, 2, 0)  # [KV, hd, S]
    scores = np.matmul(qg, kt[:, None]) * (1.0 / np.sqrt(hd))  # [KV, G, T, S]
    if T > 1 or window is not None:
        qpos = np.arange(q_pos0, q_pos0 + T)[:, None]  # [T, 1]
        kpos = np.arange(S)[None, :]  # [1, S]
        masked = kpos > qpos
        if window is not None:
            masked |= kpos <= qpos - window
        scores = np.where(masked, np.float32(-np.inf), scores)
    p = softmax(scores, axis=-1).astype(np.float32)
    out = np.matmul(p, v.transpose(1, 0, 2)[:, None])  # [KV, G, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(T, H * hd)


def route(x: np.ndarray, router: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing in float32.

    x [T, dim], router [E, dim] -> (experts [T, k] int, weights [T, k] float32): the k largest
    router logits, weighted by the softmax over those k (= softmax over all, renormalised).
    """
    logits = x.astype(np.float32) @ router.T  # [T, E]
    E = logits.shape[1]
    if k >= E:
        idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    else:
        part = np.argpartition(-logits, k - 1, axis=-1)[:, :k]  # [T, k] unordered
        order = np.argsort(-np.take_along_axis(logits, part, axis=-1), axis=-1, kind="stable")
        idx = np.take_along_axis(part, order, axis=-1)
    sel = np.take_along_axis(logits, idx, axis=-1)  # [T, k]
    w = softmax(sel, axis=-1).astype(np.float32)
    return idx, w
