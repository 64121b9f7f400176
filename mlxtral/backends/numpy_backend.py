"""The NumPy backend: the Mixtral forward pass on raw (memory-mapped, quantized) weights.

Per layer: RMSNorm -> GQA attention with RoPE and a KV cache -> RMSNorm -> sparse MoE (top-k
routing in float32, each expert run once on the tokens routed to it). A dense model is one
always-on expert.

Batch invariant: a position's logits are bit-identical whether the prompt goes through in one
chunk, in several or one token at a time (every kernel computes a (row, token) the same way at any
T, attention runs each query row through the decode kernel, each token's experts are combined in
rank order by :func:`ops.combine`). ``moe_naive`` is the per-token, per-expert reference kept for tests.

With an :class:`~mlxtral.expert_cache.ExpertCache` the experts are not held: each layer pins the
ones its tokens route to (read from disk on a miss) and, first, asks the cache to read ahead
what the next layer's router picks for the current hidden state. The kernels and their order are
the same either way, so streaming changes no number.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlxtral.backends import ops
from mlxtral.backends.numerics import check_logits, non_finite_error
from mlxtral.backends.pages import lazy_zeros
from mlxtral.config import ModelArgs
from mlxtral.errors import ContextOverflowError
from mlxtral.expert_cache.layout import KINDS, is_expert
from mlxtral.formats.mapped import check_unchanged, files_backing, install_sigbus_guard, row_reader
from mlxtral.formats.native import native_tensors, to_native
from mlxtral.qtensor import QTensor, Tensor

if TYPE_CHECKING:  # not imported to run: a process that never splits a model does not pay for them
    from mlxtral.distributed.group import Group
    from mlxtral.distributed.placement import Placement
    from mlxtral.expert_cache import ExpertCache

_MOE_GROUP_BYTES = 2 << 20  # a prefill's experts run in groups of about this much hidden activation
_PREFILL_PIECE = 256  # a forward of more tokens runs in pieces of this many (its activations' peak)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [dim] f32
    wq: QTensor  # [H*hd, dim]
    wk: QTensor  # [KV*hd, dim]
    wv: QTensor  # [KV*hd, dim]
    wo: QTensor  # [dim, H*hd]
    ffn_norm: np.ndarray  # [dim] f32
    router: np.ndarray | None  # [E, dim] f32; None for a dense model
    w1: list[QTensor]  # gate, E x [hidden, dim]; empty when experts stream (another rank's: None)
    w3: list[QTensor]  # up,   E x [hidden, dim]
    w2: list[QTensor]  # down, E x [dim, hidden]


def _cols(r: range) -> slice:
    return slice(r.start, r.stop)


def _f32(q: QTensor) -> np.ndarray:
    return np.ascontiguousarray(q.dequantize(), dtype=np.float32)


def build_layers(args: ModelArgs, t: dict[str, QTensor], experts: bool = True,
                 place: Placement | None = None) -> list[LayerWeights | None]:
    """Every layer's weights; with a ``place``ment, only this rank's layers (the others None) and,
    of those, only its experts (the others None)."""
    layers: list[LayerWeights | None] = []
    n_ffn = args.n_ffn if experts else 0
    held = range(args.n_layers) if place is None else place.layers
    for i in range(args.n_layers):
        b = f"blk.{i}."
        if i not in held:
            layers.append(None)
            continue

        def ffn(name: str) -> QTensor | None:
            return t[name] if place is None or place.holds(name) else None  # another rank's: None
        layers.append(
            LayerWeights(
                attn_norm=_f32(t[b + "attn_norm.weight"]),
                wq=t[b + "attn_q.weight"],
                wk=t[b + "attn_k.weight"],
                wv=t[b + "attn_v.weight"],
                wo=t[b + "attn_output.weight"],
                ffn_norm=_f32(t[b + "ffn_norm.weight"]),
                router=_f32(t[b + "ffn_gate_inp.weight"]) if args.is_moe else None,
                w1=[ffn(b + f"ffn_gate.{e}.weight") for e in range(n_ffn)],  # type: ignore[misc]
                w3=[ffn(b + f"ffn_up.{e}.weight") for e in range(n_ffn)],  # type: ignore[misc]
                w2=[ffn(b + f"ffn_down.{e}.weight") for e in range(n_ffn)],  # type: ignore[misc]
            )
        )
    return layers


class KVCache:
    """Keys and values for every layer, preallocated for ``max_context`` positions.

    Layout ``[L, KV, ctx, hd]``: each KV head's keys are contiguous rows, so attention reads
    ``k[li, :, :S]`` in place (no copy or transpose per step), one query row at a time in prefill
    as in decode. Pages are mapped lazily (:func:`~mlxtral.backends.pages.lazy_zeros`, no huge
    pages), so an unused context costs address space, not RAM.
    """

    def __init__(self, args: ModelArgs, max_context: int, dtype: np.dtype | type = np.float32,
                 n_layers: int | None = None) -> None:
        n_layers = args.n_layers if n_layers is None else n_layers  # a pipeline rank: its layers only
        shape = (n_layers, args.n_kv_heads, max_context, args.head_dim)  # [L, KV, ctx, hd]
        self.k = lazy_zeros(shape, dtype)
        self.v = lazy_zeros(shape, dtype)
        self.max_context = max_context
        self.high = 0  # the most positions ever filled: their pages stay resident
        self.offset = 0  # positions filled

    @property
    def offset(self) -> int:
        return self._offset

    @offset.setter
    def offset(self, n: int) -> None:
        self._offset = n
        self.high = max(self.high, n)

    def trim(self, n: int) -> None:
        """Forget everything after the first ``n`` positions (for prefix reuse)."""
        self.offset = min(self.offset, max(n, 0))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def held_bytes(self) -> int:
        """The memory this cache holds: the pages of every position it ever filled (``trim`` forgets
        positions, the pages stay)."""
        return self.nbytes * self.high // self.max_context


class NumpyBackend:
    name = "numpy"

    def __init__(self, args: ModelArgs, tensors: dict[str, Tensor], kv_dtype: str = "float32",
                 experts: ExpertCache | None = None, place: Placement | None = None,
                 group: Group | None = None) -> None:
        from mlxtral.backends import kernels
        from mlxtral.backends.precompile import cache_dir, damaged_cache, ensure_compiled

        ensure_compiled()  # a cold cache filled (the native library built) by a child process
        # a model file truncated under its maps: one line (the native library's handler, else one
        # compiled now, before numba's warm-up)
        install_sigbus_guard(None if kernels.NATIVE is None else kernels.NATIVE.sigbus_handler)
        self.args = args
        self.experts = experts  # None: every expert resident
        if experts is not None:  # experts stream: the file's other tensors only
            tensors = {n: q for n, q in tensors.items() if not is_expert(n)}
        # across processes (mlxtral.distributed): this rank's share; logits on the head rank only
        self.place, self.group = place, group
        self.head = place is None or place.head
        self.held = range(args.n_layers) if place is None else place.layers
        self.mine = np.zeros(args.n_ffn, dtype=bool)  # [E] the experts this process computes
        self.mine[range(args.n_ffn) if place is None else place.experts] = True
        self.split = place is not None and place.split_experts and group is not None  # all_sum per layer
        # expert parallel by rows: this rank's rows of gate/up (FFN columns of the hidden
        # activation) and of down (model-width columns of an expert's output); slice(None): all
        self.ffn_cols = self.out_cols = slice(None)
        if place is not None:
            tensors = {n: q for n, q in tensors.items() if place.holds(n)}  # (load() cut the rows)
            if place.sliced:
                self.ffn_cols = _cols(place.rows(args.hidden_dim))
                self.out_cols = _cols(place.rows(args.dim))
                self.ffn_widths, self.out_widths = place.widths(args.hidden_dim), place.widths(args.dim)
        tensors = native_tensors(tensors)  # MLX affine -> Q4_1/F16; GGUF blocks and floats as they are
        self.mapped_files = files_backing(q.data for q in tensors.values())  # checked before each forward
        self.embed = tensors.get("token_embd.weight")
        self.output = tensors.get("output.weight", self.embed)
        # its rows read from the file, unless the output projection reads the whole table anyway
        self._embed_file = (row_reader(self.embed.data) if isinstance(self.embed, QTensor)
                            and self.output is not self.embed else None)
        # expert parallel: every rank projects its slice of the vocabulary (rank 0 alone would
        # read the whole output matrix per token while the others wait); pipeline: rank 0 alone
        self.vocab: slice | None = None
        if self.split and self.output is not None:
            assert place is not None
            spans = place.spans(args.vocab_size)
            self.vocab = _cols(spans[place.rank])
            self.vocab_widths = [len(r) for r in spans]
            o, n = self.output, self.vocab.stop - self.vocab.start
            self.output = QTensor(o.qtype, (n, *o.shape[1:]), o.data[self.vocab])  # [V/n, dim] rows
        self.norm = _f32(tensors["output_norm.weight"]) if self.head or self.vocab is not None else None
        self.layers = build_layers(args, tensors, experts=experts is None, place=place)
        self.kv_dtype = np.dtype(kv_dtype)
        # streaming: a prefill runs a layer's experts in groups of what the cache holds; by rows,
        # every group is a collective, so the ranks agree on the smallest cache's size
        self._group_size = 0 if experts is None else experts.capacity
        if experts is not None and self.ffn_cols != slice(None):
            every = group.all_gather(np.array([experts.capacity], dtype=np.int64), "the start-up")  # type: ignore[union-attr]
            self._group_size = int(every.min())
        # the table covers the contexts caches are made for (new_cache grows it), not the file's
        # context length: a GGUF claiming 50M positions must not cost 16 GB of angles
        self.rope = ops.Rope(args.rope_dim or args.head_dim, args.rope_theta,
                             min(args.max_position_embeddings, 1024))
        self.expert_counts = np.zeros((args.n_layers, args.n_ffn), dtype=np.int64)  # tokens per expert
        from mlxtral.backends.decode_step import DecodeStep

        self.decode_step = DecodeStep.build(self)  # decode: every layer in one call where it applies
        try:
            kernels.warmup()  # every kernel loaded now, once per process, then LLVM's pages released
            # the one-token step (every rank's too) loaded now, its memory given back before the
            # weights are paged in; the batched one at its first use, or a server's warm
            self.warm(batch=False)
        except (pickle.UnpicklingError, EOFError) as e:  # a cache file numba cannot read, every run
            raise damaged_cache(cache_dir(), e) from None

    def embed_rows(self, ids: Sequence[int]) -> np.ndarray:
        """The embeddings of ``ids`` [T] -> [T, dim] float32."""
        if self._embed_file is None:
            return self.embed.rows(ids)  # type: ignore[union-attr]
        e = self.embed
        idx = np.asarray(ids, dtype=np.int64)
        return QTensor(e.qtype, (len(idx), e.shape[-1]), self._embed_file.rows(idx)).dequantize()

    # ---- cache ----------------------------------------------------------------------------
    def new_cache(self, max_context: int) -> KVCache:
        if max_context > self.rope.max_positions:
            self.rope = ops.Rope(self.rope.rope_dim, self.args.rope_theta, max_context)
        return KVCache(self.args, max_context, self.kv_dtype, len(self.held))

    # ---- forward --------------------------------------------------------------------------
    def forward(self, ids: Sequence[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``ids`` at positions cache.offset.. and return logits, float32.

        Returns [T, vocab] if ``all_logits`` else [vocab] for the last position.
        """
        check_unchanged(self.mapped_files)  # a file rewritten under its memory map: one line, not garbage
        p0 = cache.offset
        try:
            return self._forward(ids, cache, all_logits)
        except ZeroDivisionError:  # numba's error model on a NaN/Inf-poisoned sum (rms_norm, softmax):
            raise non_finite_error(p0 + 1) from None  # finite inputs never divide by 0 (eps > 0, max term 1)

    def _forward(self, ids: Sequence[int], cache: KVCache, all_logits: bool) -> np.ndarray:
        p0 = cache.offset
        if len(ids) > _PREFILL_PIECE:  # in pieces of a bounded working set: the same bits (batch invariance)
            if p0 + len(ids) > cache.max_context:  # refused before any piece runs
                raise ContextOverflowError.tokens(p0 + len(ids), cache.max_context)
            parts = [self._forward(ids[s : s + _PREFILL_PIECE], cache, all_logits)
                     for s in range(0, len(ids), _PREFILL_PIECE)]
            return np.concatenate(parts) if all_logits else parts[-1]
        h = self.hidden(ids, cache)  # [T, dim]
        if self.norm is None:  # another rank of a group computes the logits
            return np.empty(0, dtype=np.float32)
        if not all_logits:
            return self.logits(h[-1:], cache.offset)[0]  # [vocab]
        return self.logits(h, p0 + 1)  # [T, vocab]

    def hidden(self, ids: Sequence[int], cache: KVCache, h: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``ids`` [T] at positions cache.offset.. through this process's layers (every
        layer, or a pipeline rank's, starting from the previous rank's ``h`` [T, dim]) -> hidden
        state [T, dim]; the cache advances by T."""
        a = self.args
        T = len(ids)
        p0 = cache.offset
        if p0 + T > cache.max_context:
            raise ContextOverflowError.tokens(p0 + T, cache.max_context)
        S = p0 + T

        def attention(li: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            ck, cv = cache.k[li], cache.v[li]  # [KV, ctx, hd]
            ck[:, p0:S] = k.transpose(1, 0, 2)
            cv[:, p0:S] = v.transpose(1, 0, 2)
            # every query row, prefill or decode, through one kernel over the cache as it lies
            return ops.attend(q, ck, cv, p0, a.sliding_window)  # [T, H*hd]

        step = self.decode_step
        if step is not None and T == 1 and step.takes(cache) and S <= self.rope.max_positions:
            x = np.ascontiguousarray(self.embed_rows(ids) if h is None else h, dtype=np.float32)  # [1, dim]
            h = step.split(x, cache) if self.split else step(x, cache)
        else:
            h = self._layers(ids, slice(p0, S), attention, h)
        cache.offset = S
        return h

    def logits(self, h: np.ndarray, pos: int) -> np.ndarray:
        """Final norm and output projection: h [T, dim] -> [T, vocab] float32; ``pos`` (1-based)
        names the first position in the one-line error NaN/Inf logits raise."""
        out = ops.linear(ops.rms_norm(h, self.norm, self.args.norm_eps), self.output)  # [T, vocab or slice]
        if self.vocab is not None:  # each rank's slice of the vocabulary, side by side
            out = self.group.concat(out, self.vocab_widths, "the logits")  # type: ignore[union-attr]
        if self.head:
            check_logits(out, pos)  # NaN/Inf weights: one line, not a sampler's error
        return out

    def forward_batch(self, ids: Sequence[int], caches: Sequence[KVCache]) -> np.ndarray:
        """One token for each of several sequences, each at its own cache's position, in one pass
        over the weights: ids [B] -> logits [B, vocab]; every cache advances by one
        (:meth:`forward_runs` with runs of one token)."""
        return self.forward_runs([[t] for t in ids], caches)

    def forward_runs(self, runs: Sequence[Sequence[int]], caches: Sequence[KVCache]) -> np.ndarray:
        """Several sequences in one pass over the weights, each bringing a run of tokens at its own
        cache's position: one token to decode, a prompt chunk to prefill. runs [B] of [T_b] ids ->
        logits [B, vocab] float32 of each run's last token; cache b advances by T_b.

        A row computes as it does alone (the kernels are batch-invariant, each run attends over its
        own cache through the same per-row kernel as :meth:`forward`), so each sequence gets the
        logits it gets from ``forward(run, cache)`` alone, bit for bit.
        """
        if self.decode_step is not None and len(runs) == len(caches) == 1 and len(runs[0]) == 1:
            return self.forward(runs[0], caches[0])[None]  # one sequence decoding: the decode step
        h, ends, last = self.hidden_runs(runs, caches)
        if self.norm is None:  # another rank of a group computes the logits
            return np.empty(0, dtype=np.float32)
        return self.logits(h[ends - 1], last)  # each run's last row -> [B, vocab]

    def hidden_runs(self, runs: Sequence[Sequence[int]], caches: Sequence[KVCache],
                    h: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """:meth:`forward_runs` up to the hidden state, through this process's layers (a pipeline
        rank's, from the previous rank's ``h`` [T, dim]): -> (hidden [T, dim], each run's end row
        [B], the last position + 1); every cache advances by its run."""
        check_unchanged(self.mapped_files)
        if len(runs) != len(caches):
            raise ValueError(f"forward_runs needs one cache per run, got {len(runs)} runs and "
                             f"{len(caches)} caches")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("forward_runs got the same cache twice")
        lens = np.array([len(r) for r in runs], dtype=np.int64)  # [B]
        if len(runs) == 0 or lens.min() < 1:
            raise ValueError("forward_runs needs at least one run and a token in every run")
        for n, c in zip(lens.tolist(), caches, strict=True):
            if c.offset + n > c.max_context:
                raise ContextOverflowError.tokens(c.offset + n, c.max_context)
        a = self.args
        ends = np.cumsum(lens)  # [B] one past each run's last row
        starts = (ends - lens).tolist()
        p0s = [c.offset for c in caches]  # each run's first position
        pos = np.concatenate([np.arange(p, p + n) for p, n in zip(p0s, lens.tolist(), strict=True)])  # [T]
        ids = [int(t) for r in runs for t in r]
        step = self.decode_step
        if step is not None and lens.max() == 1 and step.takes_batch(caches):
            h = np.ascontiguousarray(self.embed_rows(ids) if h is None else h, dtype=np.float32)  # [B, dim]
            try:
                if self.split:  # expert parallel: a layer a call, the collectives between
                    step.split_batch(h, caches)
                else:
                    step.batch(h, caches)  # every sequence's token through every layer in one call
            except ZeroDivisionError:
                raise non_finite_error(int(pos.max()) + 1) from None
            for c in caches:
                c.offset += 1
            return h, ends, int(pos.max()) + 1

        def attention(li: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            # q [T, H, hd], k/v [T, KV, hd] -> [T, H*hd]
            runs = []
            for c, r0, r1, p in zip(caches, starts, ends.tolist(), p0s, strict=True):
                ck, cv = c.k[li], c.v[li]  # [KV, ctx, hd]
                ck[:, p : p + r1 - r0] = k[r0:r1].transpose(1, 0, 2)
                cv[:, p : p + r1 - r0] = v[r0:r1].transpose(1, 0, 2)
                runs.append((q[r0:r1], ck, cv, p))
            # every sequence in one job, each row as forward's ops.attend computes it
            return np.concatenate(ops.attend_runs(runs, a.sliding_window))  # [T, H*hd]

        try:
            h = self._layers(ids, pos, attention, h)  # [T, dim]
        except ZeroDivisionError:
            raise non_finite_error(int(pos.max()) + 1) from None
        for n, c in zip(lens.tolist(), caches, strict=True):
            c.offset += n
        return h, ends, int(pos.max()) + 1

    def _layers(self, ids: Sequence[int], pos: slice | np.ndarray,
                attention: Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                h: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``ids`` [T] at positions ``pos`` through every layer -> hidden state [T, dim];
        ``attention(layer, q, k, v)`` stores k/v in the cache(s) and attends. A pipeline rank runs
        its own layers on ``h`` [T, dim], the previous rank's output (``attention`` gets the index
        of the layer in its cache)."""
        a = self.args
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
        h = self.embed_rows(ids) if h is None else h  # [T, dim]
        self._read_ahead(h, self.held.start)
        for li in self.held:
            L = self.layers[li]
            x = ops.rms_norm(h, L.attn_norm, a.norm_eps)
            q, k, v = ops.linear_many(x, (L.wq, L.wk, L.wv))  # one kernel job
            q = q.reshape(T, H, hd)  # [T, H, hd]
            k = k.reshape(T, KV, hd)  # [T, KV, hd]
            self.rope(q, pos)
            self.rope(k, pos)
            h += ops.linear(attention(li - self.held.start, q, k, v.reshape(T, KV, hd)), L.wo)
            del q, k, v  # not held through the MoE
            x = ops.rms_norm(h, L.ffn_norm, a.norm_eps)
            h += self.moe(x, L, li, ahead=h)
        if self.experts is not None:
            self.experts.add_tokens(T)
        return h

    def moe(self, x: np.ndarray, L: LayerWeights, li: int, ahead: np.ndarray | None = None) -> np.ndarray:
        """Sparse MoE FFN, tokens grouped per expert. x [T, dim] -> [T, dim].

        Two kernel jobs whatever ``top_k``: gate+up (SiLU fused) of every selected expert, then
        every expert's down projection (streaming with fewer slots than experts in use: one pair
        of jobs per group of experts, each expert read once). ``ahead``: the hidden state from
        which to guess the next layer's experts, when they stream.
        """
        T = x.shape[0]
        if L.router is None:
            self.expert_counts[li, 0] += T
            return ops.ffn_experts([x], L.w1[:1], L.w3[:1], L.w2[:1])[0]
        idx, w = ops.route(x, L.router, self.args.n_experts_per_tok)  # [T, k], [T, k]
        k = idx.shape[1]
        pairs = np.zeros((T, k, x.shape[1]), dtype=np.float32)  # [T, k, dim] each (token, rank)'s output
        if T == 1:  # decode: every selected expert sees the same row (quantized once)
            self.expert_counts[li, idx[0]] += 1
            ranks = [j for j, e in enumerate(idx[0].tolist()) if self.mine[e]]  # all in one process
            if ranks:
                with self._expert_weights(li, idx[0, ranks].tolist(), ahead) as (w1, w3, w2):
                    for j, y in zip(ranks, self._ffn([x] * len(ranks), w1, w3, w2, li), strict=True):
                        pairs[0, j, self.out_cols] = y[0]
            return ops.combine(self._gather(pairs, li), w)  # in rank order
        flat = idx.ravel()  # token-expert pairs, token-major
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=self.args.n_experts)
        self.expert_counts[li] += counts
        experts = np.flatnonzero(counts * self.mine)  # the experts in use that this process computes
        bounds = np.concatenate([[0], np.cumsum(counts)])  # [E+1] where each expert's pairs start in order
        sels = [order[bounds[e] : bounds[e + 1]] for e in experts]
        toks = [sel // k for sel in sels]  # tokens of each expert (each at most once)
        flat_pairs = pairs.reshape(T * k, -1)  # [T*k, dim], token-major
        groups = self._expert_groups([len(t) for t in toks])
        for n, (g0, g1) in enumerate(groups):
            es = experts[g0:g1].tolist()
            with self._expert_weights(li, es, ahead if n == len(groups) - 1 else None) as (w1, w3, w2):
                ys = self._ffn([x[t] for t in toks[g0:g1]], w1, w3, w2, li)  # [T_e, dim] each
            for sel, y in zip(sels[g0:g1], ys, strict=True):
                flat_pairs[sel, self.out_cols] = y  # every (token, rank) pair is some expert's exactly once
        return ops.combine(self._gather(pairs, li), w)  # as decode combines: rank order

    def _ffn(self, xs: list[np.ndarray], w1: list[QTensor], w3: list[QTensor], w2: list[QTensor], li: int
             ) -> list[np.ndarray]:
        """The experts' FFN on their tokens xs [T_e, dim] -> [T_e, dim] each: by rows with every
        rank's activations put together between its halves; on a rank holding one half of every
        expert's width, that half; else one process's cut FFN (``ops.ffn_experts``)."""
        if self.ffn_cols != slice(None):
            return ops.down_experts(self._whole_hidden(ops.swiglu_experts(xs, w1, w3), li), w2)
        if self.place is not None and self.place.halves:
            return ops.linear_experts(ops.swiglu_experts(xs, w1, w3), w2)
        return ops.ffn_experts(xs, w1, w3, w2)

    def _expert_groups(self, tokens: list[int]) -> list[tuple[int, int]]:
        """The experts in use (their token counts, in order) in groups run together, as [start,
        end) spans: at most what the streaming cache holds, and at most ``_MOE_GROUP_BYTES`` of
        hidden activations unless one expert alone is more (a 512-token prompt's would be 14 MB on
        the bench model, 59 MB on Mixtral: the prefill's largest buffer). Every row computes as in
        one group (batch invariance), and every rank of a group forms the same groups."""
        cap = max(len(tokens), 1) if self.experts is None else self._group_size
        cols = self.ffn_cols
        width = self.args.hidden_dim if cols == slice(None) else cols.stop - cols.start
        rows = max(1, _MOE_GROUP_BYTES // (4 * max(width, 1)))
        groups: list[tuple[int, int]] = []
        g0, held = 0, 0
        for i, n in enumerate(tokens):
            if i > g0 and (i - g0 >= cap or held + n > rows):
                groups.append((g0, i))
                g0, held = i, 0
            held += n
        if g0 < len(tokens):
            groups.append((g0, len(tokens)))
        return groups

    def _whole_hidden(self, hs: list[np.ndarray], li: int) -> list[np.ndarray]:
        """Expert parallel by rows: each expert's hidden activation [T_e, hidden] from every rank's
        columns ``hs`` [T_e, hidden/n] put side by side, so down's rows see what they see in one
        process. Otherwise ``hs`` as it is."""
        if self.ffn_cols == slice(None) or not hs:
            return hs
        lens = [len(h) for h in hs]
        whole = self.group.concat(np.concatenate(hs), self.ffn_widths,  # type: ignore[union-attr]
                                  f"layer {li}'s expert activations")  # [sum T_e, hidden]
        ends = np.cumsum(lens)
        return [whole[e - n : e] for e, n in zip(ends.tolist(), lens, strict=True)]

    def _gather(self, pairs: np.ndarray, li: int) -> np.ndarray:
        """Expert parallel: every rank filled the (token, rank) slots of its own experts and left
        the rest 0; one sum across the group completes every slot exactly (x + 0 = x). By rows
        every rank filled its columns of every slot: they are put side by side; by halves every
        rank filled every slot with its half of down, and the sum adds the two as one process
        does. Either way the combine that follows is the single process's, bit for bit. pairs
        [T, k, dim]."""
        if not self.split:
            return pairs
        what = f"layer {li}'s experts"
        if self.out_cols != slice(None):
            return self.group.concat(pairs[..., self.out_cols], self.out_widths, what)  # type: ignore[union-attr]
        return self.group.all_sum(pairs, what)  # type: ignore[union-attr]

    # ---- streamed experts -----------------------------------------------------------------
    @contextmanager
    def _expert_weights(self, li: int, es: list[int], ahead: np.ndarray | None
                        ) -> Iterator[tuple[list[QTensor], list[QTensor], list[QTensor]]]:
        """(gates, ups, downs) of experts ``es`` of layer ``li``: the held ones, or pinned in the
        expert cache (after queueing the next layer's guess from ``ahead``) until the block ends."""
        L = self.layers[li]
        if self.experts is None:
            yield [L.w1[e] for e in es], [L.w3[e] for e in es], [L.w2[e] for e in es]
            return
        with self.experts.use(li, es) as forms:
            if ahead is not None:
                self._read_ahead(ahead, li + 1)  # the disk works while this layer computes
            yield [f[0] for f in forms], [f[1] for f in forms], [f[2] for f in forms]

    def _read_ahead(self, h: np.ndarray, li: int) -> None:
        """Queue reads of the experts layer ``li``'s router picks for hidden state ``h`` [T, dim]
        (mixtral-offloading's guess; only what is read ahead depends on it)."""
        if self.experts is None or not self.experts.prefetch_enabled or li not in self.held:
            return
        N = self.layers[li]
        if N.router is None:
            return
        x = ops.rms_norm(h, N.ffn_norm, self.args.norm_eps)  # [T, dim]
        idx, _ = ops.route(x, N.router, self.args.n_experts_per_tok)  # [T, k]
        counts = np.bincount(idx.ravel(), minlength=self.args.n_experts)
        counts *= self.mine  # this process's experts only
        guess = [int(e) for e in np.argsort(-counts, kind="stable") if counts[e]]  # most tokens first
        self.experts.prefetch(li, guess)

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

    def warm(self, batch: bool = True) -> None:
        """The decode step compiled, or loaded from numba's disk cache, now rather than at the first
        token (``batch``: the batched one a server steps with too)."""
        from mlxtral.backends import kernels

        if self.decode_step is not None and kernels.HAVE_NUMBA:
            self.decode_step.warm(batch=batch)

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()

    @staticmethod
    def peak_memory() -> int:
        """Peak resident memory of this process, bytes (:func:`mlxtral.rss.peak_rss`)."""
        from mlxtral.rss import peak_rss

        return peak_rss()


def expert_materializer(tensors: dict[str, Tensor], path: Path | None = None
                        ) -> Callable[[int, int, list[np.ndarray]], tuple[QTensor, QTensor, QTensor]]:
    """``materialize`` for the expert cache: raw slot data -> (gate, up, down) QTensors the kernels
    run on (views of the slot for native types, which every GGUF block type a model uses is; a
    converted copy otherwise)."""

    def materialize(li: int, e: int, raw: list[np.ndarray]) -> tuple[QTensor, QTensor, QTensor]:
        out = []
        for kind, data in zip(KINDS, raw, strict=True):
            name = f"blk.{li}.ffn_{kind}.{e}.weight"
            q = tensors[name]
            out.append(to_native(QTensor(q.qtype, tuple(q.shape), data), name, path))
        return tuple(out)  # type: ignore[return-value]

    return materialize
