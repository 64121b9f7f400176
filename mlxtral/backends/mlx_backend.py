"""The MLX backend: the same Mixtral forward pass as the NumPy backend, lazily on MLX arrays.

Weights stay quantized where the file is (GGUF Q4_0/Q4_1/Q5_x/Q8_0/Q4_K/Q5_K/IQ4 repacked
exactly into MLX affine groups of 32, Q2_K/Q3_K/Q6_K requantized to 8 bits, MLX folders as stored;
see :mod:`mlxtral.backends.mlx_weights`); experts are stacked ``[E, out, in]`` and run with
``mx.gather_qmm`` / ``mx.gather_mm``; for prefill the token-expert pairs are sorted by expert so
each expert's weights are read once (``sorted_indices=True``). Norms, RoPE and attention are the
``mx.fast`` kernels. Nothing is evaluated inside a layer: :meth:`MLXBackend.forward` builds the
whole graph and evaluates it once (logits and expert counts together).

Dtypes: float16 on Metal, float32 on the CPU (whose ``gather_mm`` is float32-only and whose
half-precision matmuls are slow); overridable. The router always runs in float32.

Streamed experts (an :class:`~mlxtral.expert_cache.ExpertCache`): each MoE layer evaluates its
routing, pins the experts used from the cache (each held as a ``[1, out, in]`` Weight built from
its slot by the same conversion as the resident stacks), concatenates them into a stack of just
those experts and runs the same ``switch_glu`` with the indices renumbered (monotonically, so the
sort order and the kernels are those of the resident model). A layer's experts are all held at
once, so the smallest MLX cache is one layer's experts.

Across processes (:mod:`mlxtral.distributed`, a ``place``ment and a ``group``): **expert parallel**
stacks only this rank's share: its whole experts (``expert``, a contiguous block, renumbered from
0) or its rows of every expert (``expert-rows``: every rank's columns of each pair's activation
are put side by side by one ``all_gather`` before down, of the output by another). Per MoE layer the routing
is evaluated and read on the host (one evaluation per layer, which the collective needs anyway),
so the rank runs only the token-expert pairs of its own experts, through the same kernels and the
same sorted or unsorted path as one process; it scatters them into a zero [T*k, dim] buffer of all
pairs and one ``all_sum`` over the group completes every pair exactly (x + 0 = x), so the combine
that follows is the single process's, bit for bit. **Pipeline parallel** holds this rank's layers
(and its KV cache only those); :meth:`MLXBackend.hidden` and :meth:`MLXBackend.logits` take and
give NumPy arrays for :mod:`mlxtral.distributed.pipeline`. Logits only on the head rank.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxtral.backends import MLX_DTYPES, mlx_dtype_name
from mlxtral.backends.mlx_sampling import make_sampler
from mlxtral.backends.mlx_weights import Weight, float_array, to_weight, to_weight_stack
from mlxtral.backends.numerics import check_logits, non_finite_error
from mlxtral.config import ModelArgs
from mlxtral.distributed.group import Group
from mlxtral.distributed.placement import Placement
from mlxtral.errors import ContextOverflowError, UsageError
from mlxtral.expert_cache import ExpertCache
from mlxtral.expert_cache.layout import KINDS
from mlxtral.qtensor import QTensor, Tensor
from mlxtral.sampling import SamplingParams

DTYPES = {name: getattr(mx, name) for name in MLX_DTYPES}  # mlx_dtype_name's names -> MLX types
SORT_THRESHOLD = 64  # token-expert pairs from which the MoE sorts by expert (mlx-lm's choice)


def on_metal() -> bool:
    try:
        return bool(mx.metal.is_available()) and mx.default_device() == mx.gpu
    except Exception:
        return False


def resolve_dtype(dtype: str | None) -> mx.Dtype:
    if dtype is None:
        return mx.float16 if on_metal() else mx.float32
    return DTYPES[mlx_dtype_name(dtype)]


@mx.compile
def _swiglu(g: mx.array, u: mx.array) -> mx.array:
    return g * mx.sigmoid(g) * u


@dataclass
class MLXLayer:
    attn_norm: mx.array  # [dim]
    wq: Weight  # [H*hd, dim]
    wk: Weight  # [KV*hd, dim]
    wv: Weight  # [KV*hd, dim]
    wo: Weight  # [dim, H*hd]
    ffn_norm: mx.array  # [dim]
    router: mx.array | None  # [E, dim] float32; None for a dense model
    gate: Weight | None  # w1: [E, hidden, dim] (MoE) or [hidden, dim] (dense); None when experts stream
    up: Weight | None  # w3: same
    down: Weight | None  # w2: [E, dim, hidden] or [dim, hidden]


class KVCache:
    """Per-layer keys/values ``[1, KV, capacity, hd]``, grown in ``step``-position chunks up to
    ``max_context`` (as mlx-lm's KVCache); writes are lazy slice updates."""

    step = 256

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_context: int,
                 dtype: mx.Dtype) -> None:
        self.keys: list[mx.array | None] = [None] * n_layers
        self.values: list[mx.array | None] = [None] * n_layers
        self.kv_shape = (n_kv_heads, head_dim)
        self.dtype = dtype
        self.max_context = max_context
        self.offset = 0

    def trim(self, n: int) -> None:
        """Forget everything after the first ``n`` positions (for prefix reuse)."""
        self.offset = min(self.offset, max(n, 0))

    @property
    def capacity(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, li: int, p0: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write k, v [1, KV, T, hd] at positions p0.. of layer ``li``; return keys, values
        [1, KV, p0+T, hd]."""
        end = p0 + k.shape[2]
        cur = self.keys[li]
        if cur is None or end > cur.shape[2]:
            cap = min(self.max_context, (end + self.step - 1) // self.step * self.step)
            shape = (1, *self.kv_shape[:1], cap, self.kv_shape[1])
            nk, nv = mx.zeros(shape, self.dtype), mx.zeros(shape, self.dtype)
            if cur is not None and p0 > 0:
                nk[..., :p0, :] = cur[..., :p0, :]
                nv[..., :p0, :] = self.values[li][..., :p0, :]
            self.keys[li], self.values[li] = nk, nv
        self.keys[li][..., p0:end, :] = k.astype(self.dtype)
        self.values[li][..., p0:end, :] = v.astype(self.dtype)
        return self.keys[li][..., :end, :], self.values[li][..., :end, :]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values if a is not None)

    @property
    def held_bytes(self) -> int:
        """The memory this cache holds: its buffers, whatever ``trim`` forgot of them."""
        return self.nbytes


class MLXBackend:
    name = "mlx"

    def __init__(self, args: ModelArgs, tensors: dict[str, Tensor], dtype: str | None = None,
                 experts: ExpertCache | None = None, place: Placement | None = None,
                 group: Group | None = None) -> None:
        from mlxtral.formats.mapped import install_sigbus_guard

        install_sigbus_guard()  # a model file truncated while its weights are copied in: one line
        self.args = args
        self.experts = experts  # None: every expert resident
        if place is not None and experts is not None:
            raise UsageError("--distributed holds each rank's share resident: streamed experts are not "
                             "supported with it")
        # across processes (mlxtral.distributed): this rank's share; logits on the head rank only
        self.place, self.group = place, group
        self.head = place is None or place.head
        self.held = range(args.n_layers) if place is None else place.layers  # layers this process runs
        self.local = range(args.n_ffn) if place is None else place.experts  # experts it stacks
        self.split = (place is not None and place.split_experts and group is not None
                      and args.is_moe)  # expert parallel: one collective per layer (by rows: two)
        # by rows: this rank's columns of an expert's hidden activation and of its output
        self.out_cols = None
        if place is not None and place.sliced:
            self.out_cols = place.rows(args.dim)
            self.ffn_widths, self.out_widths = place.widths(args.hidden_dim), place.widths(args.dim)
        self.dtype = resolve_dtype(dtype)
        # MLX's CPU gather_mm is float32-only: float expert stacks stay float32 there.
        self.expert_float_dtype = self.dtype if on_metal() else mx.float32
        emb = tensors.get("token_embd.weight")  # a pipeline rank but the head has none
        self.embed = None if emb is None else to_weight(emb, self.dtype)
        self.output: Weight | None = None
        self.norm: mx.array | None = None
        if self.head:
            out = tensors.get("output.weight")
            self.output = self.embed if out is None else to_weight(out, self.dtype)
            self.norm = self._vector(tensors["output_norm.weight"])
        self.layers: list[MLXLayer | None] = [self._layer(tensors, i) if i in self.held else None
                                              for i in range(args.n_layers)]
        self.expert_counts = np.zeros((args.n_layers, args.n_ffn), dtype=np.int64)  # tokens per expert
        self.sort_threshold = SORT_THRESHOLD
        # Whether the generation loop should use decode_pipelined: it pays off where the device
        # runs beside the Python thread (Metal); on MLX's CPU backend both share the same cores.
        self.pipeline_decode = on_metal() and experts is None and place is None  # a group: step by step

    # ---- loading --------------------------------------------------------------------------
    def _vector(self, q: Tensor) -> mx.array:
        a = float_array(q, self.dtype)
        mx.eval(a)
        return a

    def _layer(self, t: dict[str, Tensor], i: int) -> MLXLayer:
        a, b = self.args, f"blk.{i}."
        if a.is_moe:
            router = float_array(t[b + "ffn_gate_inp.weight"], mx.float32)
            mx.eval(router)

            def ffn(kind: str) -> Weight | None:
                if self.experts is not None:
                    return None
                qs = [t[b + f"ffn_{kind}.{e}.weight"] for e in self.local]  # this rank's experts
                return to_weight_stack(qs, self.dtype, self.expert_float_dtype)
        else:
            router = None

            def ffn(kind: str) -> Weight:
                return to_weight(t[b + f"ffn_{kind}.0.weight"], self.dtype)

        return MLXLayer(
            attn_norm=self._vector(t[b + "attn_norm.weight"]),
            wq=to_weight(t[b + "attn_q.weight"], self.dtype),
            wk=to_weight(t[b + "attn_k.weight"], self.dtype),
            wv=to_weight(t[b + "attn_v.weight"], self.dtype),
            wo=to_weight(t[b + "attn_output.weight"], self.dtype),
            ffn_norm=self._vector(t[b + "ffn_norm.weight"]),
            router=router,
            gate=ffn("gate"),
            up=ffn("up"),
            down=ffn("down"),
        )

    @property
    def weight_bytes(self) -> int:
        ws = {id(w): w for w in (self.embed, self.output) if w is not None}.values()
        n = sum(w.nbytes for w in ws) + (self.norm.nbytes if self.norm is not None else 0)
        for L in self.layers:
            if L is None:
                continue
            n += sum(w.nbytes for w in (L.wq, L.wk, L.wv, L.wo, L.gate, L.up, L.down) if w is not None)
            n += L.attn_norm.nbytes + L.ffn_norm.nbytes + (L.router.nbytes if L.router is not None else 0)
        return n

    # ---- cache ----------------------------------------------------------------------------
    def new_cache(self, max_context: int) -> KVCache:
        a = self.args
        return KVCache(len(self.held), a.n_kv_heads, a.head_dim, max_context, self.dtype)  # its layers

    # ---- forward --------------------------------------------------------------------------
    def forward(self, ids: Sequence[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``ids`` at positions cache.offset.. and return logits, float32 NumPy.

        Returns [T, vocab] if ``all_logits`` else [vocab] for the last position.
        """
        p0 = cache.offset
        if not self.head:  # another rank of a group computes the logits
            h, counts = self._hidden_lazy(mx.array(np.asarray(ids, dtype=np.uint32)), cache)
            mx.eval(h, *([counts] if counts is not None else []))
            self._add_counts(counts, len(ids))
            return np.empty(0, dtype=np.float32)
        logits, counts = self.forward_lazy(mx.array(np.asarray(ids, dtype=np.uint32)), cache, all_logits)
        mx.eval(logits, counts)  # the one evaluation of this forward (expert parallel: one per layer)
        self._add_counts(counts, len(ids))
        out = np.array(logits, copy=False)
        check_logits(out, p0 + 1 if all_logits else cache.offset)  # NaN/Inf weights: one line
        return out if all_logits else out[0]

    def forward_lazy(self, ids: mx.array, cache: KVCache, all_logits: bool = False
                     ) -> tuple[mx.array, mx.array | None]:
        """The forward graph, unevaluated: (float32 logits [T or 1, vocab], expert counts
        [n_layers, E] int32 or None for a dense model). Advances ``cache.offset``."""
        h, counts = self._hidden_lazy(ids, cache)
        if not all_logits:
            h = h[-1:]
        return self._logits_lazy(h), counts

    def _hidden_lazy(self, ids: mx.array, cache: KVCache, h: mx.array | None = None
                     ) -> tuple[mx.array, mx.array | None]:
        """Tokens ``ids`` [T] at positions cache.offset.. through this process's layers (every
        layer, or a pipeline rank's, starting from the previous rank's ``h`` [T, dim]) -> (hidden
        state [T, dim], expert counts [layers held, E] or None), unevaluated. Advances the cache."""
        a = self.args
        T = ids.shape[0]
        p0 = cache.offset
        if p0 + T > cache.max_context:
            raise ContextOverflowError.tokens(p0 + T, cache.max_context)
        if h is None:
            if self.embed is None:
                raise ValueError("this rank holds no embedding: it starts from the previous rank's h")
            h = self.embed.rows(ids).astype(self.dtype)  # [T, dim]
        counts: list[mx.array] = []
        for li in self.held:
            L = self.layers[li]
            assert L is not None
            ci = li - self.held.start  # the layer's index in this process's KV cache
            h = h + self._attention(mx.fast.rms_norm(h, L.attn_norm, a.norm_eps), L, ci, p0, cache)
            h = h + self._ffn(mx.fast.rms_norm(h, L.ffn_norm, a.norm_eps), L, counts, li, h)
        cache.offset = p0 + T
        if self.experts is not None:
            self.experts.add_tokens(T)
        return h, (mx.stack(counts) if counts else None)

    def _logits_lazy(self, h: mx.array) -> mx.array:
        """Final norm and output projection: h [T, dim] -> float32 logits [T, vocab], unevaluated."""
        if self.output is None or self.norm is None:
            raise ValueError("logits are computed on the head rank only")
        return self.output(mx.fast.rms_norm(h, self.norm, self.args.norm_eps)).astype(mx.float32)

    # ---- pipeline parallel (mlxtral.distributed.pipeline drives these) ---------------------
    def hidden(self, ids: Sequence[int], cache: KVCache, h: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``ids`` [T] through this process's layers (from the previous rank's ``h`` [T, dim]
        when given) -> hidden state [T, dim] float32 NumPy; the cache advances by T. Float32 holds
        every float16/bfloat16 value exactly, so a hop between ranks changes no number."""
        x = None if h is None else mx.array(np.ascontiguousarray(h, dtype=np.float32)).astype(self.dtype)
        out, counts = self._hidden_lazy(mx.array(np.asarray(ids, dtype=np.uint32)), cache, x)
        out = out.astype(mx.float32)
        mx.eval(out, *([counts] if counts is not None else []))
        if counts is None:
            self.expert_counts[self.held, 0] += len(ids)
        else:
            self.expert_counts[self.held] += np.array(counts, dtype=np.int64)
        return np.array(out, copy=True)  # [T, dim]

    def logits(self, h: np.ndarray, pos: int) -> np.ndarray:
        """Final norm and output projection on the head rank: h [T, dim] -> [T, vocab] float32;
        ``pos`` (1-based) names the first position in the one-line error NaN/Inf logits raise."""
        x = mx.array(np.ascontiguousarray(h, dtype=np.float32)).astype(self.dtype)
        lg = self._logits_lazy(x)
        mx.eval(lg)
        out = np.array(lg, copy=True)  # [T, vocab]
        check_logits(out, pos)
        return out

    def _add_counts(self, counts: mx.array | None, T: int) -> None:
        if counts is None:
            self.expert_counts[self.held, 0] += T
        else:
            self.expert_counts[self.held] += np.array(counts, dtype=np.int64)

    def _attention(self, x: mx.array, L: MLXLayer, li: int, p0: int, cache: KVCache) -> mx.array:
        """x [T, dim] -> attention output projected by wo, [T, dim]."""
        a = self.args
        T = x.shape[0]
        q = L.wq(x).reshape(1, T, a.n_heads, a.head_dim).transpose(0, 2, 1, 3)  # [1, H, T, hd]
        k = L.wk(x).reshape(1, T, a.n_kv_heads, a.head_dim).transpose(0, 2, 1, 3)  # [1, KV, T, hd]
        v = L.wv(x).reshape(1, T, a.n_kv_heads, a.head_dim).transpose(0, 2, 1, 3)
        rd = a.rope_dim or a.head_dim
        q = mx.fast.rope(q, rd, traditional=True, base=a.rope_theta, scale=1.0, offset=p0)
        k = mx.fast.rope(k, rd, traditional=True, base=a.rope_theta, scale=1.0, offset=p0)
        keys, values = cache.update(li, p0, k, v)  # [1, KV, S, hd]
        o = mx.fast.scaled_dot_product_attention(
            q, keys, values, scale=1.0 / math.sqrt(a.head_dim), mask=self._mask(T, p0)
        )  # [1, H, T, hd]
        return L.wo(o.transpose(0, 2, 1, 3).reshape(T, a.n_heads * a.head_dim))

    def _mask(self, T: int, p0: int) -> mx.array | str | None:
        w = self.args.sliding_window
        S = p0 + T
        if w is None or S <= w:
            return "causal" if T > 1 else None
        qpos = mx.arange(p0, S)[:, None]  # [T, 1]
        kpos = mx.arange(S)[None, :]  # [1, S]
        return (kpos <= qpos) & (kpos > qpos - w)  # [T, S] True = attend

    def _ffn(self, x: mx.array, L: MLXLayer, counts: list[mx.array], li: int = 0,
             h: mx.array | None = None) -> mx.array:
        """Dense FFN or sparse MoE, x [T, dim] -> [T, dim] (``h``: the residual stream, from which
        the next layer's experts are guessed when they stream)."""
        if L.router is None:
            assert L.gate is not None and L.up is not None and L.down is not None
            return L.down(_swiglu(L.gate(x), L.up(x)))
        k = self.args.n_experts_per_tok
        gates = x.astype(mx.float32) @ L.router.T  # [T, E] float32
        inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[:, :k]  # [T, k] top-k, unordered
        scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)  # [T, k]
        counts.append((inds.reshape(-1, 1) == mx.arange(self.args.n_experts)).sum(axis=0))  # [E]
        if self.experts is not None:
            y = self._switch_glu_streamed(x, inds, li, h)
        elif self.split:
            y = self._switch_glu_split(x, inds, L, li)  # complete: every rank's pairs summed
        else:
            y = self.switch_glu(x, inds, L)  # [T, k, dim]
        # sum_j w_j y_j written as y_0 + sum_j>0 w_j (y_j - y_0) (the weights sum to 1), as the NumPy
        # backend does: experts that are copies (an upcycled dense model) give y_0 exactly
        w = scores[:, 1:, None].astype(y.dtype)  # [T, k-1, 1]
        return y[:, 0] + (w * (y[:, 1:] - y[:, :1])).sum(axis=1)  # [T, dim]

    def _switch_glu_streamed(self, x: mx.array, inds: mx.array, li: int, h: mx.array | None) -> mx.array:
        """:meth:`switch_glu` on the experts ``inds`` [T, k] picks, taken from the expert cache."""
        assert self.experts is not None
        ahead = self._guess(h, li + 1) if h is not None and self.experts.prefetch_enabled else None
        mx.eval(inds, *([ahead] if ahead is not None else []))
        used = np.unique(np.array(inds))  # sorted expert ids
        local = np.zeros(self.args.n_experts, dtype=np.uint32)
        local[used] = np.arange(len(used), dtype=np.uint32)  # monotonic: the sort order is kept
        with self.experts.use(li, used.tolist()) as forms:
            if ahead is not None:
                counts = np.bincount(np.array(ahead).ravel(), minlength=self.args.n_experts)
                guess = [int(e) for e in np.argsort(-counts, kind="stable") if counts[e]]  # most tokens first
                self.experts.prefetch(li + 1, guess)
            stack = _StackedExperts(*(_concat([f[i] for f in forms]) for i in range(len(KINDS))))
        return self.switch_glu(x, mx.array(local[np.array(inds)]), stack)  # type: ignore[arg-type]

    def _switch_glu_split(self, x: mx.array, inds: mx.array, L: MLXLayer, li: int) -> mx.array:
        """Expert parallel :meth:`switch_glu`: x [T, dim], inds [T, k] (global expert ids) ->
        [T, k, dim], every pair computed by the rank that holds its expert (by rows: every rank, its
        columns) and summed over the group.

        The routing is read on the host, so only this rank's pairs run (none of another rank's
        costs compute or reads), sorted by expert (stably) where one process sorts them, each a
        one-row product as in one process; the others stay 0 in the buffer the ``all_sum`` completes
        (by rows every rank computes every pair, its columns, and they are put side by side).
        """
        assert self.group is not None and L.gate is not None and L.up is not None and L.down is not None
        T, k = inds.shape
        dim = x.shape[-1]
        mx.eval(x, inds)  # this layer's attention and routing (no communication in it)
        flat = np.array(inds).reshape(-1).astype(np.int64)  # [T*k] token-major pairs
        e0 = self.local.start
        mine = np.flatnonzero((flat >= e0) & (flat < self.local.stop))  # this rank's pairs
        sort = inds.size >= self.sort_threshold  # the path one process takes for these tokens
        if sort:
            mine = mine[np.argsort(flat[mine], kind="stable")]  # grouped by expert
        rows = self.out_cols is not None  # by rows: every pair here, this rank's columns of it
        part = mx.zeros((T * k, len(self.out_cols) if rows else dim), dtype=x.dtype)  # [T*k, its dim]
        if len(mine):
            xs = x[mx.array(mine // k)][:, None, :]  # [n, 1, dim]
            idx = mx.array((flat[mine] - e0).astype(np.uint32))  # [n] local expert ids
            g = L.gate.gather(xs, idx, sorted_indices=sort)  # [n, 1, hidden] (by rows: its columns)
            u = L.up.gather(xs, idx, sorted_indices=sort)
            hid = _swiglu(g, u)
            if rows:  # every rank's columns side by side
                hid = self.group.concat_mx(hid, self.ffn_widths, f"layer {li}'s expert activations")
            y = L.down.gather(hid, idx, sorted_indices=sort)  # [n, 1, dim] (by rows: its columns)
            part[mx.array(mine)] = y.reshape(len(mine), -1).astype(x.dtype)
        if rows:
            return self.group.concat_mx(part, self.out_widths, f"layer {li}'s experts").reshape(T, k, dim)
        return self.group.all_sum_mx(part, f"layer {li}'s experts").reshape(T, k, dim)  # others' pairs 0

    def _guess(self, h: mx.array, li: int) -> mx.array | None:
        """The experts layer ``li``'s router picks for hidden state ``h`` (lazy) [T, k], or None."""
        N, k = (self.layers[li] if li < len(self.layers) else None), self.args.n_experts_per_tok
        if N is None or N.router is None:
            return None
        g = mx.fast.rms_norm(h, N.ffn_norm, self.args.norm_eps).astype(mx.float32) @ N.router.T  # [T, E]
        return mx.argpartition(-g, kth=k - 1, axis=-1)[:, :k]

    def switch_glu(self, x: mx.array, inds: mx.array, L: MLXLayer) -> mx.array:
        """Every token through its experts: x [T, dim], inds [T, k] -> [T, k, dim] (unweighted).

        With many pairs, they are sorted by expert first so each expert's weights are streamed
        once (``sorted_indices=True``), then put back in token order.
        """
        T, k = inds.shape
        xe = mx.expand_dims(x, (-2, -3))  # [T, 1, 1, dim]
        if inds.size >= self.sort_threshold:
            flat = inds.reshape(-1)  # [T*k] token-major pairs
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            xs = xe.reshape(T, 1, -1)[order // k]  # [T*k, 1, dim] grouped by expert
            idx = flat[order]
            g = L.gate.gather(xs, idx, sorted_indices=True)  # [T*k, 1, hidden]
            u = L.up.gather(xs, idx, sorted_indices=True)
            y = L.down.gather(_swiglu(g, u), idx, sorted_indices=True)  # [T*k, 1, dim]
            return y[inv].reshape(T, k, -1)
        g = L.gate.gather(xe, inds)  # [T, k, 1, hidden]
        u = L.up.gather(xe, inds)
        return L.down.gather(_swiglu(g, u), inds).squeeze(-2)  # [T, k, dim]

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()

    def moe_naive(self, x: mx.array, li: int) -> mx.array:
        """Reference MoE for tests: per token, per selected expert, dequantized weights, float32."""
        L = self.layers[li]
        xs = np.array(x.astype(mx.float32))
        out = np.zeros_like(xs)
        router = np.array(L.router)
        k = self.args.n_experts_per_tok
        wg, wu, wd = (np.array(w.dequantize().astype(mx.float32)) for w in (L.gate, L.up, L.down))
        for t in range(xs.shape[0]):
            logits = xs[t] @ router.T
            top = np.argsort(-logits, kind="stable")[:k]
            ws = np.exp(logits[top] - logits[top].max())
            ws /= ws.sum()
            for e, wt in zip(top.tolist(), ws.tolist(), strict=True):
                g, u = wg[e] @ xs[t], wu[e] @ xs[t]
                out[t] += wt * (wd[e] @ (g / (1 + np.exp(-g)) * u))
        return mx.array(out)

    # ---- pipelined decoding (optional hook for the generation loop) ----------------------
    def decode_pipelined(
        self, token: int, cache: KVCache, max_steps: int,
        sample: Callable[[mx.array], mx.array] | None = None,
    ) -> Iterator[int]:
        """Feed ``token``, then keep feeding each sampled token: yields up to ``max_steps`` ids.

        mlx-lm's scheme: the graph of step i+1 is built from step i's lazy, on-device token and
        queued with ``mx.async_eval`` before step i's token is read back, so graph building and
        the host round trip overlap the device's work. ``sample`` maps float32 logits [1, vocab]
        to token ids [1] on the device (default: greedy; see ``mlx_sampling.make_sampler``). The cache always
        holds one token more than was yielded (the one in flight); when the generator ends or is
        closed the cache is trimmed so that it holds ``token`` and every yielded id but the last,
        exactly as the step-by-step loop leaves it.
        """
        sample = sample or make_sampler(SamplingParams())
        start = cache.offset
        yielded = 0

        def step(tok: mx.array) -> tuple[mx.array, mx.array | None]:
            logits, counts = self.forward_lazy(tok, cache)
            finite.append((mx.isfinite(logits).all(), cache.offset))  # checked when the token is read
            return sample(logits).reshape(-1).astype(mx.uint32), counts

        finite: list[tuple[mx.array, int]] = []  # (logits all finite, position), one per step in flight
        try:
            if max_steps <= 0 or cache.offset >= cache.max_context:
                return
            y, c = step(mx.array([token], dtype=mx.uint32))
            mx.async_eval(y, finite[-1][0], *([c] if c is not None else []))
            while True:
                ny = nc = None
                if yielded + 1 < max_steps and cache.offset < cache.max_context:
                    ny, nc = step(y)  # built on the lazy token: no host round trip in between
                    mx.async_eval(ny, finite[-1][0], *([nc] if nc is not None else []))
                self._add_counts(c, 1)
                ok, pos = finite.pop(0)
                if not ok.item():  # sampled from NaN/Inf logits: never yield it
                    raise non_finite_error(pos)
                tok = int(y.item())
                yielded += 1
                yield tok
                if ny is None:
                    break
                y, c = ny, nc
        finally:
            cache.trim(start + yielded)  # drop the step still in flight: only consumed ones stay

    @staticmethod
    def make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
        """The on-device sampler for :meth:`decode_pipelined` (no repetition penalty)."""
        return make_sampler(params)

    @staticmethod
    def peak_memory() -> int:
        """Peak memory of this process, bytes (:func:`mlxtral.rss.peak_rss`), or MLX's own peak when
        that is larger (Metal buffers)."""
        from mlxtral.rss import peak_rss

        return max(peak_rss(), int(mx.get_peak_memory()))



@dataclass
class _StackedExperts:
    """The experts one layer uses, stacked: what :meth:`MLXBackend.switch_glu` reads of a layer."""

    gate: Weight
    up: Weight
    down: Weight


def _concat(ws: list[Weight]) -> Weight:
    """[1, out, in] Weights -> one [n, out, in] Weight."""
    if len(ws) == 1:
        return ws[0]
    w = ws[0]
    cat = mx.concatenate
    if w.bits is None:
        return Weight(cat([x.w for x in ws]))
    return Weight(cat([x.w for x in ws]), cat([x.scales for x in ws]), cat([x.biases for x in ws]),  # type: ignore[misc]
                  w.bits, w.group_size)


def expert_materializer(tensors: dict[str, Tensor], dtype: str | None = None
                        ) -> Callable[[int, int, list[np.ndarray]], tuple[Weight, Weight, Weight]]:
    """``materialize`` for the expert cache: raw slot data -> (gate, up, down) ``[1, out, in]``
    Weights, converted exactly as :func:`to_weight_stack` converts the resident stacks."""
    dt = resolve_dtype(dtype)
    fdt = dt if on_metal() else mx.float32

    def materialize(li: int, e: int, raw: list[np.ndarray]) -> tuple[Weight, Weight, Weight]:
        out = []
        for kind, data in zip(KINDS, raw, strict=True):
            q = tensors[f"blk.{li}.ffn_{kind}.{e}.weight"]
            out.append(to_weight_stack([QTensor(q.qtype, tuple(q.shape), data)], dt, fdt))
        return tuple(out)  # type: ignore[return-value]

    return materialize
