"""A decode step in one compiled call: one token through every layer (``_decode_step_nb``).

``NumpyBackend._layers`` runs a layer as a dozen kernel calls with Python between them: ~100 us a
layer of dispatch, argument checks and small NumPy operations, ~1 ms a token on the 8-layer bench
model, which llama.cpp's C graph does not pay. Here the weights' addresses, block kinds and work
item sizes are laid out once in tables (a *plan*), and a token's whole pass, cache writes and
expert counts included, is one numba call that runs the very kernels of the layer-by-layer path
in its order: the same bits (tests check every weight type, a mix of kinds in one layer, exact
mode, a window, partial RoPE, dense and MoE, float32 and float16 caches, at 1 to 3 threads).

The server's decode steps (several sequences, a token each, each in its own cache at its own
position) take the batched form, :meth:`DecodeStep.batch` (``decode_batch``): each product runs
once on all the rows, each expert on the rows routed to it, so the weights stream once per step,
and every row gets the bits its own step gives it (the kernels are batch-invariant).

Across processes (:mod:`mlxtral.distributed`) a pipeline rank runs its own layers in one call; an
expert-parallel rank runs a layer a call (:meth:`DecodeStep.split`, ``decode_part``), because each
layer's expert outputs are completed by a collective before the next layer can start: attention,
routing and this rank's share of the token's experts in one call, the collective in Python, the
combine at the start of the next call (by rows, down runs in a second call, ``decode_down``, after
every rank's gate/up columns are put together; by halves, a rank's down is one half of every
expert's, whole to it, and the collective adds the halves). The bits are one process's: every down
product here is cut where ``ops.down_split`` cuts it, each half summed on its own and the two added
(``down_tasks``, the halves of a row read together). A server's batched steps go the same way there
(:meth:`DecodeStep.split_batch`, ``batch_part`` / ``batch_down``).

It applies where that path is plain: every layer and expert this process holds resident (no expert
streaming), numba present, every expert's gate and up of one kind. :meth:`DecodeStep.build`
returns None otherwise, and ``MLXTRAL_NO_DECODE_STEP=1`` turns it off (for A/B measurements).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mlxtral.backends import kernels, ops
from mlxtral.backends.jit_memory import release_new
from mlxtral.env import env_flag
from mlxtral.qtensor import QTensor

_MODULE = "_decode_step_nb"  # the compiled functions: the native library's, or numba's

if TYPE_CHECKING:
    from mlxtral.backends.numpy_backend import KVCache, NumpyBackend


def _resolve(fn: Any, args: tuple) -> Callable:
    """The function a call of ``fn`` with ``args`` runs: the native library's export (looked up
    once by the arguments' types), or numba's dispatcher as it is."""
    resolve = getattr(fn, "resolve", None)
    return fn if resolve is None else resolve(args)  # type: ignore[no-any-return]


class DecodeStep:
    """The plan of a backend's weights for ``_decode_step_nb.decode_layers``."""

    def __init__(self, backend: NumpyBackend) -> None:
        self.backend = backend
        self._threads = -1  # the work item sizes depend on the thread count: re-planned on a change
        # sequences :meth:`batch` takes: its products run at up to this many tokens, below the
        # K-quant tiles' first count (they read activations grouped in a layout it does not make)
        self.max_batch = kernels._tile.KQ_TILE_MIN_T - 1

    @classmethod
    def build(cls, backend: NumpyBackend) -> DecodeStep | None:
        a = backend.args
        place = backend.place
        if (not kernels.HAVE_NUMBA or env_flag("MLXTRAL_NO_DECODE_STEP") or backend.experts is not None
                or a.n_heads % a.n_kv_heads):
            return None
        layers = [backend.layers[li] for li in backend.held]  # a pipeline rank's: its own
        first = layers[0]
        if first is None or not first.w1:
            return None
        mine = np.flatnonzero(backend.mine).tolist()  # expert parallel: this rank's experts
        if not mine or not all(isinstance(first.w1[e], QTensor) for e in mine):
            return None
        # the compiled step reads by address, unchecked: every shape it assumes is checked here
        dim, hd, H, KV = a.dim, a.head_dim, a.n_heads, a.n_kv_heads
        E, routed = len(first.w1), first.router is not None
        if (routed and not 0 < a.n_experts_per_tok <= E) or (not routed and E != 1):
            return None
        # an expert's gate/up rows, down's rows and columns (by rows: this rank's share of each)
        hidden, (dout, hin) = first.w1[mine[0]].shape[0], first.w2[mine[0]].shape
        if place is not None and place.sliced:
            if hidden != len(place.rows(hin)) or dout != len(place.rows(dim)):
                return None
        elif (hidden, dout) != (hin, dim):
            return None
        if (a.rope_dim or hd) > hd or backend.rope.cos.shape[1] * 2 != (a.rope_dim or hd):
            return None
        for L in layers:
            if L is None or len(L.w1) != E or (L.router is not None) != routed:
                return None
            want = [(L.wq, (H * hd, dim)), (L.wk, (KV * hd, dim)), (L.wv, (KV * hd, dim)),
                    (L.wo, (dim, H * hd))]
            want += [(L.w1[e], (hidden, dim)) for e in mine] + [(L.w3[e], (hidden, dim)) for e in mine]
            want += [(L.w2[e], (dout, hin)) for e in mine]
            for w, shape in want:
                if not isinstance(w, QTensor) or w.qtype not in kernels._KINDS or tuple(w.shape) != shape:
                    return None
            floats = [(L.attn_norm, (dim,)), (L.ffn_norm, (dim,))]
            floats += [(L.router, (E, dim))] if routed else []
            for f, shape in floats:
                if f.dtype != np.float32 or f.shape != shape or not f.flags.c_contiguous:
                    return None
            if any(L.w1[e].qtype != L.w3[e].qtype for e in mine):
                return None  # the general path's two tasks and NumPy's SiLU
            if any(kernels._wdata(L.w2[e]).ctypes.data != L.w2[e].data.ctypes.data for e in mine):
                return None  # down read from a copy: its second half's offset is taken on w.data
        return cls(backend)

    def _plan(self) -> None:
        nb = kernels.step_module()
        be, a = self.backend, self.backend.args
        layers = [be.layers[li] for li in be.held]
        L = len(layers)
        E = len(layers[0].w1)  # type: ignore[union-attr]
        self.plan = np.zeros((L, nb.P_SIZE), dtype=np.int64)
        self.qkv = np.zeros((L, 3, nb.D_SIZE), dtype=np.int64)
        self.wo = np.zeros((L, 1, nb.D_SIZE), dtype=np.int64)
        self.experts = np.zeros((L, E, nb.X_SIZE), dtype=np.int64)
        mine = np.flatnonzero(be.mine).tolist()
        self.hidden = layers[0].w1[mine[0]].shape[0]  # type: ignore[union-attr]  # gate/up rows held
        self.dout, self.hin = layers[0].w2[mine[0]].shape  # type: ignore[union-attr]  # down's rows held, its width
        self.top = a.n_experts_per_tok if layers[0].router is not None else 1  # type: ignore[union-attr]

        def info(w: QTensor) -> tuple[int, ...]:  # kind, address, row bytes, rows, item rows at 1, 2, more
            kind, wd, ch, wa = kernels._winfo(w, 1)
            ch2, ch3 = kernels._winfo(w, 2)[2], kernels._winfo(w, kernels._STREAM_T + 1)[2]
            return kind, wa, wd.strides[0], wd.shape[0], ch, ch2, ch3

        def product(w: QTensor) -> tuple[int, ...]:  # its row of a run_decode table
            kind, wa, rb, nout, ch, ch2, ch3 = info(w)
            return 0, wa, wa, rb, nout, ch, kind, ch2, ch3

        for li, lw in enumerate(layers):  # a pipeline rank's: row i is layer held[i]
            assert lw is not None
            P = self.plan[li]
            P[nb.P_ATTN_NORM], P[nb.P_FFN_NORM] = lw.attn_norm.ctypes.data, lw.ffn_norm.ctypes.data
            P[nb.P_ROUTER] = 0 if lw.router is None else lw.router.ctypes.data
            self.qkv[li] = [product(w) for w in (lw.wq, lw.wk, lw.wv)]
            self.wo[li, 0] = product(lw.wo)
            for e in mine:  # another rank's expert: its row stays 0, never read
                g, u, d = info(lw.w1[e]), info(lw.w3[e]), info(lw.w2[e])
                self.experts[li, e] = (g[1], u[1], d[1], g[0], d[0], g[2], d[2], g[4], d[4],
                                       g[5], d[5], g[6], d[6], *self._cut(lw.w2[e]))
        self._threads = kernels.get_num_threads()

    def _cut(self, w: QTensor) -> tuple[int, int]:
        """(column, byte offset) where down weight ``w`` is cut in two (``ops.down_split``), or
        (0, 0): whole, as a rank holding one half of it computes it."""
        place = self.backend.place
        hw = None if place is not None and place.halves else ops.down_halves(w)
        if hw is None:
            return 0, 0
        s, _, hi = hw
        return s, hi.data.ctypes.data - w.data.ctypes.data  # w.data is what the step reads (build)

    def takes(self, cache: KVCache) -> bool:
        """A cache the compiled step can write where it lies (it reads by address: everything
        checked here): float32 or float16 k and v, C-contiguous, [L, KV, ctx, hd] of this model."""
        a = self.backend.args
        k, v = cache.k, cache.v
        return (k.dtype == v.dtype and k.dtype in (np.float32, np.float16) and k.shape == v.shape
                and k.shape[:2] == (len(self.backend.held), a.n_kv_heads) and k.shape[3] == a.head_dim
                and 0 <= cache.offset < k.shape[2] and k.flags.c_contiguous and v.flags.c_contiguous)

    def takes_batch(self, caches: Sequence[KVCache]) -> bool:
        """Whether :meth:`batch` (on an expert-parallel rank :meth:`split_batch`) runs these caches:
        2 .. ``max_batch`` of them, each one :meth:`takes`, all of one dtype, none past the rotary
        table."""
        return (1 < len(caches) <= self.max_batch
                and all(self.takes(c) for c in caches) and len({c.k.dtype for c in caches}) == 1
                and max(c.offset for c in caches) < self.backend.rope.max_positions)

    def batch(self, h: np.ndarray, caches: Sequence[KVCache]) -> np.ndarray:
        """h [B, dim] float32, B sequences' token embeddings, through every layer, sequence b at
        position ``caches[b].offset`` of its own cache (written; the caller advances them) -> h, in
        place: row b's bits are the ones :meth:`__call__` gives it alone."""
        nb = kernels.step_module()

        args = self._batch_args(h, caches)
        with kernels._run_lock:
            nb.decode_batch(*args)
        release_new(nb.decode_batch)  # loaded at its first call (unless warm ran): give back its IR
        return h

    def __call__(self, h: np.ndarray, cache: KVCache) -> np.ndarray:
        """h [1, dim] float32, the token's embedding, through every layer at position
        ``cache.offset`` (written into the cache, which the caller advances) -> h, in place."""
        nb = kernels.step_module()

        args = self._args(h, cache)
        with kernels._run_lock:
            nb.decode_layers(*args)
        return h

    def split(self, h: np.ndarray, cache: KVCache) -> np.ndarray:
        """Expert parallel: :meth:`__call__` a layer at a time, this process computing its share of
        the token's experts (whole experts, or by rows its rows of each); after each layer's call
        one collective completes the layer's expert outputs [top, dim] from every process's share
        (an exact sum with zeros elsewhere, or by rows every process's columns side by side)
        before the next call combines them; by rows a first one puts every process's gate/up
        columns together before down: the bits of one process, with nothing between the kernels
        and the collectives but one copy each."""
        nb = kernels.step_module()

        be, group = self.backend, self.backend.group
        assert group is not None
        args, (idx, w, gu, dn) = self._part_args(h, cache)
        L, dim, top, rows = len(be.held), h.shape[1], self.top, be.out_cols != slice(None)
        mine, ctl, exact = be.mine, args[0], args[-1]
        # every layer's call has the same types: the function each runs is looked up once
        part_fn = _resolve(nb.decode_part, (*args, 0, False, mine, idx, w, gu, dn, not rows))
        if rows:
            part = np.empty((top, self.hin), dtype=np.float32)  # every rank's gate/up columns
            out = np.empty((top, self.dout), dtype=np.float32)  # this rank's columns of down
            acts, outs, flat = gu.reshape(top, -1), dn.reshape(top, dim), out.reshape(-1)
            down_fn = _resolve(nb.decode_down,
                               (ctl, self.experts, 0, idx, mine, part, self.dout, exact, flat))
        for li in range(L + 1):
            with kernels._run_lock:
                part_fn(*args, li, li > 0, mine, idx, w, gu, dn, not rows)
            if li == L:
                break
            what = f"layer {li}'s experts"
            if rows:  # every rank's columns of gate/up [top, hin], then its rows of down
                group.concat_into(acts, be.ffn_widths, part, what)
                with kernels._run_lock:
                    down_fn(ctl, self.experts, li, idx, mine, part, self.dout, exact, flat)
                group.concat_into(out, be.out_widths, outs, what)
            else:
                group.all_sum_into(dn, what)
        return h

    def split_batch(self, h: np.ndarray, caches: Sequence[KVCache]) -> np.ndarray:
        """:meth:`batch` on an expert-parallel rank, a layer a call (:meth:`split` for B sequences):
        one collective a layer completes its (token, rank) outputs [B, top, dim], in the order
        ``batch_part`` grouped them (by expert: the same on every rank, which all route alike); by
        rows a first one puts the gate/up columns together before down. Row b gets the bits one
        process's :meth:`batch` gives it."""
        nb = kernels.step_module()

        be, group = self.backend, self.backend.group
        assert group is not None
        args, (idx, w, slot, n_e, gu, dn) = self._batch_part_args(h, caches)
        L, (B, dim), top, rows = len(be.held), h.shape, self.top, be.out_cols != slice(None)
        mine, ctl, exact, stream_t = be.mine, args[0], args[-2], args[-1]
        part_fn = _resolve(nb.batch_part, (*args, 0, False, mine, idx, w, slot, n_e, gu, dn, not rows))
        if rows:
            part = np.empty((B * top, self.hin), dtype=np.float32)  # every rank's gate/up columns
            out = np.empty((B * top, self.dout), dtype=np.float32)  # this rank's columns of down
            acts, outs, flat = gu.reshape(B * top, -1), dn.reshape(B * top, dim), out.reshape(-1)
            down_fn = _resolve(nb.batch_down,
                               (ctl, self.experts, 0, n_e, mine, part, self.dout, exact, stream_t, flat))
        for li in range(L + 1):
            with kernels._run_lock:
                part_fn(*args, li, li > 0, mine, idx, w, slot, n_e, gu, dn, not rows)
            if li == L:
                break
            what = f"layer {li}'s experts"
            if rows:  # every rank's columns of gate/up [B * top, hin], then its rows of down
                group.concat_into(acts, be.ffn_widths, part, what)
                with kernels._run_lock:
                    down_fn(ctl, self.experts, li, n_e, mine, part, self.dout, exact, stream_t, flat)
                group.concat_into(out, be.out_widths, outs, what)
            else:
                group.all_sum_into(dn, what)
        release_new(nb.batch_part, nb.batch_down)  # as batch's
        return h

    def _batch_part_args(self, h: np.ndarray, caches: Sequence[KVCache]
                         ) -> tuple[tuple, tuple[np.ndarray, ...]]:
        """``batch_part``'s arguments up to the layer (``decode_batch``'s but ``top``), and its
        buffers: idx, w, slot [B, top], n_e [E], gu [B * top * hidden], dn [B * top * dim]."""
        a = self._batch_args(h, caches)
        (B, dim), top, E = h.shape, self.top, self.experts.shape[1]
        bufs = (np.zeros((B, top), dtype=np.int64), np.ones((B, top), dtype=np.float32),
                np.zeros((B, top), dtype=np.int64), np.zeros(E, dtype=np.int64),
                np.empty(B * top * self.hidden, dtype=np.float32), np.zeros(B * top * dim, dtype=np.float32))
        return (*a[:8], *a[9:]), bufs

    def _part_args(self, h: np.ndarray, cache: KVCache) -> tuple[tuple, tuple[np.ndarray, ...]]:
        """``decode_part``'s arguments up to the layer (``decode_layers``' but ``top``, w's width), and
        its buffers: idx [1, top], w [1, top], gu [top * hidden], dn [top * dim]."""
        a = self._args(h, cache)
        top = self.top
        bufs = (np.zeros((1, top), dtype=np.int64), np.ones((1, top), dtype=np.float32),
                np.empty(top * self.hidden, dtype=np.float32), np.zeros(top * h.shape[1], dtype=np.float32))
        return (*a[:8], *a[9:]), bufs

    def _counts(self) -> np.ndarray:
        """Tokens per expert [L, E] of this process's layers (a view of the backend's)."""
        held = self.backend.held
        return self.backend.expert_counts[held.start : held.stop]

    def _common(self) -> tuple:
        if self._threads != kernels.get_num_threads():
            self._plan()
        return (kernels._get_pool().ctl, self._threads)

    def _args(self, h: np.ndarray, cache: KVCache) -> tuple:
        """``decode_layers``' arguments."""
        be, a = self.backend, self.backend.args
        return (*self._common(), h, self.plan, self.qkv, self.wo, self.experts, self.hidden, self.top,
                cache.k.ctypes.data, cache.v.ctypes.data, cache.k.dtype == np.float16, cache.k.shape,
                cache.offset, kernels._window(a.sliding_window), be.rope.cos, be.rope.sin, self._counts(),
                float(a.norm_eps), kernels._exact)

    def _batch_args(self, h: np.ndarray, caches: Sequence[KVCache]) -> tuple:
        """``decode_batch``'s arguments."""
        be, a = self.backend, self.backend.args
        ka = np.array([c.k.ctypes.data for c in caches], dtype=np.int64)
        va = np.array([c.v.ctypes.data for c in caches], dtype=np.int64)
        ctx = np.array([c.k.shape[2] for c in caches], dtype=np.int64)
        p0 = np.array([c.offset for c in caches], dtype=np.int64)
        return (*self._common(), h, self.plan, self.qkv, self.wo, self.experts, self.hidden, self.top, ka,
                va, caches[0].k.dtype == np.float16, a.n_kv_heads, a.head_dim, ctx, p0,
                kernels._window(a.sliding_window), be.rope.cos, be.rope.sin, self._counts(),
                float(a.norm_eps), kernels._exact, kernels._STREAM_T)

    def warm(self, batch: bool = True, split: bool = False) -> None:
        """Compile the one-sequence step (and with ``batch`` the batched one) now, or load them
        from numba's disk cache, rather than at the first token: compiled, each takes about a
        minute, once per install (a server would stall every stream on its first batched step).
        Loading parses each one's LLVM IR, ~30 MB, given back at once (:mod:`jit_memory`): here,
        before the weights are paged in, rather than at the first token, on top of them. With
        ``split``, an expert-parallel rank's calls too (the native library's build)."""
        calls = self._warm_calls(batch)
        if split and not self.backend.split:
            calls += self.split_calls(batch, rows=True)
        if kernels.NATIVE is not None:  # compiled ahead of time: numba only for what it lacks
            calls = [(name, sig) for name, sig in calls if not kernels.NATIVE.has(_MODULE, name, sig)]
            if not calls:
                return
        from numba import typeof

        from mlxtral.backends import _decode_step_nb as nb  # numba's own (JIT)

        for name, sig in calls:
            getattr(nb, name).compile(tuple(typeof(x) for x in sig))
        release_new(*(getattr(nb, name) for name, _ in calls))

    def _warm_calls(self, batch: bool) -> list[tuple[str, tuple]]:
        """(entry point, arguments of the types a step will call it with) for :meth:`warm`."""
        be = self.backend
        if be.split:  # an expert-parallel rank: the step a layer a call (split's calls)
            return self.split_calls(batch, rows=be.out_cols != slice(None))
        c = be.new_cache(1)  # only its types are used: nothing runs
        h = np.zeros((2, be.args.dim), dtype=np.float32)
        calls = [("decode_layers", self._args(h[:1], c))]
        if batch:
            calls.append(("decode_batch", self._batch_args(h, [c, c])))
        return calls

    def split_calls(self, batch: bool, rows: bool) -> list[tuple[str, tuple]]:
        """An expert-parallel rank's calls (:meth:`split`, with ``batch`` :meth:`split_batch`; by
        ``rows`` down's too), of the types it makes them with: a rank's own :meth:`warm`, and the
        native library's build, which a single process makes (every rank then runs without numba)."""
        be = self.backend
        c = be.new_cache(1)  # only its types are used: nothing runs
        h = np.zeros((2, be.args.dim), dtype=np.float32)
        calls: list[tuple[str, tuple]] = []
        args, (idx, w, gu, dn) = self._part_args(h[:1], c)
        calls.append(("decode_part", (*args, 0, False, be.mine, idx, w, gu, dn, True)))
        out = np.zeros(self.top * self.dout, dtype=np.float32)
        if rows:
            part = np.zeros((self.top, self.hin), dtype=np.float32)
            calls.append(("decode_down", (args[0], self.experts, 0, idx, be.mine, part, self.dout,
                                          args[-1], out)))
        if batch:  # split_batch's calls
            args, (idx, w, slot, n_e, gu, dn) = self._batch_part_args(h, [c, c])
            calls.append(("batch_part", (*args, 0, False, be.mine, idx, w, slot, n_e, gu, dn, True)))
            if rows:
                part = np.zeros((2 * self.top, self.hin), dtype=np.float32)
                calls.append(("batch_down", (args[0], self.experts, 0, n_e, be.mine, part, self.dout,
                                             args[-2], args[-1], out)))
        return calls
