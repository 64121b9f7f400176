"""The NumPy backend: the Mixtral forward pass on raw (memory-mapped, quantized) weights.

Per layer: RMSNorm -> GQA attention with RoPE and a KV cache -> RMSNorm -> sparse MoE (top-k
routing in float32, each expert run once on the tokens routed to it). A dense model is one
always-on expert. ``moe_naive`` is the per-token, per-expert reference kept for tests.
"""
from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlxtral.backends import ops
from mlxtral.config import ModelArgs
from mlxtral.errors import ContextOverflowError
from mlxtral.qtensor import QTensor


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [dim] f32
    wq: QTensor  # [H*hd, dim]
    wk: QTensor  # [KV*hd, dim]
    wv: QTensor  # [KV*hd, dim]
    wo: QTensor  # [dim, H*hd]
    ffn_norm: np.ndarray  # [dim] f32
    router: np.ndarray | None  # [E, dim] f32; None for a dense model
    w1: list[QTensor]  # gate, E x [hidden, dim]
    w3: list[QTensor]  # up,   E x [hidden, dim]
    w2: list[QTensor]  # down, E x [dim, hidden]


def _f32(q: QTensor) -> np.ndarray:
    return np.ascontiguousarray(q.dequantize(), dtype=np.float32)


def build_layers(args: ModelArgs, t: dict[str, QTensor]) -> list[LayerWeights]:
    layers = []
    for i in range(args.n_layers):
        b = f"blk.{i}."
        layers.append(
            LayerWeights(
                attn_norm=_f32(t[b + "attn_norm.weight"]),
                wq=t[b + "attn_q.weight"],
                wk=t[b + "attn_k.weight"],
                wv=t[b + "attn_v.weight"],
                wo=t[b + "attn_output.weight"],
                ffn_norm=_f32(t[b + "ffn_norm.weight"]),
                router=_f32(t[b + "ffn_gate_inp.weight"]) if args.is_moe else None,
                w1=[t[b + f"ffn_gate.{e}.weight"] for e in range(args.n_ffn)],
                w3=[t[b + f"ffn_up.{e}.weight"] for e in range(args.n_ffn)],
                w2=[t[b + f"ffn_down.{e}.weight"] for e in range(args.n_ffn)],
            )
        )
    return layers


class KVCache:
    """Keys and values for every layer, preallocated for ``max_context`` positions.

    ``np.zeros`` maps pages lazily, so an unused context costs address space, not RAM.
    """

    def __init__(self, args: ModelArgs, max_context: int, dtype: np.dtype | type = np.float32) -> None:
        shape = (args.n_layers, max_context, args.n_kv_heads, args.head_dim)  # [L, ctx, KV, hd]
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.max_context = max_context
        self.offset = 0  # positions filled

    def trim(self, n: int) -> None:
        """Forget everything after the first ``n`` positions (for prefix reuse)."""
        self.offset = min(self.offset, max(n, 0))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class NumpyBackend:
    name = "numpy"

    def __init__(self, args: ModelArgs, tensors: dict[str, QTensor], kv_dtype: str = "float32") -> None:
        self.args = args
        self.embed = tensors["token_embd.weight"]
        self.output = tensors.get("output.weight", self.embed)
        self.norm = _f32(tensors["output_norm.weight"])
        self.layers = build_layers(args, tensors)
        self.kv_dtype = np.dtype(kv_dtype)
        self.rope = ops.Rope(args.rope_dim or args.head_dim, args.rope_theta, args.max_position_embeddings)
        self.expert_counts = np.zeros((args.n_layers, args.n_ffn), dtype=np.int64)  # tokens per expert

    # ---- cache ----------------------------------------------------------------------------
    def new_cache(self, max_context: int) -> KVCache:
        if max_context > self.rope.cos.shape[0]:
            self.rope = ops.Rope(self.rope.rope_dim, self.args.rope_theta, max_context)
        return KVCache(self.args, max_context, self.kv_dtype)

    # ---- forward --------------------------------------------------------------------------
    def forward(self, ids: Sequence[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``ids`` at positions cache.offset.. and return logits, float32.

        Returns [T, vocab] if ``all_logits`` else [vocab] for the last position.
        """
        a = self.args
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        p0 = cache.offset
        if p0 + T > cache.max_context:
            raise ContextOverflowError(
                f"{p0 + T} tokens do not fit the context of {cache.max_context} (raise max_context)"
            )
        pos = np.arange(p0, p0 + T)
        h = self.embed.rows(ids)  # [T, dim]
        for li, L in enumerate(self.layers):
            x = ops.rms_norm(h, L.attn_norm, a.norm_eps)
            q = ops.linear(x, L.wq).reshape(T, a.n_heads, a.head_dim)  # [T, H, hd]
            k = ops.linear(x, L.wk).reshape(T, a.n_kv_heads, a.head_dim)  # [T, KV, hd]
            v = ops.linear(x, L.wv).reshape(T, a.n_kv_heads, a.head_dim)
            self.rope(q, pos)
            self.rope(k, pos)
            cache.k[li, p0 : p0 + T] = k
            cache.v[li, p0 : p0 + T] = v
            keys = cache.k[li, : p0 + T]  # [S, KV, hd]
            vals = cache.v[li, : p0 + T]
            if keys.dtype != np.float32:
                keys = keys.astype(np.float32)
                vals = vals.astype(np.float32)
            att = ops.attention(q, keys, vals, p0, a.sliding_window)  # [T, H*hd]
            h = h + ops.linear(att, L.wo)
            x = ops.rms_norm(h, L.ffn_norm, a.norm_eps)
            h = h + self.moe(x, L, li)
        cache.offset = p0 + T
        if not all_logits:
            h = h[-1:]
        out = ops.linear(ops.rms_norm(h, self.norm, a.norm_eps), self.output)  # [T or 1, vocab]
        return out if all_logits else out[0]

    def moe(self, x: np.ndarray, L: LayerWeights, li: int) -> np.ndarray:
        """Sparse MoE FFN, tokens grouped per expert. x [T, dim] -> [T, dim]."""
        if L.router is None:
            self.expert_counts[li, 0] += x.shape[0]
            return self._expert(x, L, 0)
        idx, w = ops.route(x, L.router, self.args.n_experts_per_tok)  # [T, k], [T, k]
        out = np.zeros_like(x)
        flat = idx.ravel()  # token-expert pairs, token-major
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=self.args.n_experts)
        self.expert_counts[li] += counts
        start = 0
        k = idx.shape[1]
        for e in np.nonzero(counts)[0]:
            sel = order[start : start + counts[e]]
            start += counts[e]
            tok = sel // k  # token of each pair
            y = self._expert(x[tok], L, int(e))  # [n, dim]
            out[tok] += y * w.ravel()[sel][:, None]  # a token appears once per expert
        return out

    @staticmethod
    def _expert(x: np.ndarray, L: LayerWeights, e: int) -> np.ndarray:
        g = ops.linear(x, L.w1[e])  # [n, hidden]
        u = ops.linear(x, L.w3[e])
        return ops.linear(ops.silu(g) * u, L.w2[e])  # [n, dim]

    def moe_naive(self, x: np.ndarray, li: int) -> np.ndarray:
        """Reference MoE: per token, per selected expert, on dequantized weights."""
        L = self.layers[li]
        out = np.zeros_like(x)
        for t in range(x.shape[0]):
            xt = x[t : t + 1]
            if L.router is None:
                pairs = [(0, 1.0)]
            else:
                logits = xt[0] @ L.router.T
                top = np.argsort(-logits, kind="stable")[: self.args.n_experts_per_tok]
                ws = np.exp(logits[top] - logits[top].max())
                ws /= ws.sum()
                pairs = list(zip(top.tolist(), ws.tolist(), strict=True))
            for e, wt in pairs:
                g = xt @ L.w1[e].dequantize().T
                u = xt @ L.w3[e].dequantize().T
                out[t] += wt * ((ops.silu(g) * u) @ L.w2[e].dequantize().T)[0]
        return out

    @staticmethod
    def peak_memory() -> int:
        """Peak resident memory of this process, bytes."""
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)
