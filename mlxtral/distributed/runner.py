"""Rank 0 drives, the other ranks follow.

Rank 0 runs the user's program (chat, generate, bench, serve, a script) on a
:class:`DistributedBackend`: every forward is first broadcast as a :mod:`command
<mlxtral.distributed.protocol>` (the token ids, the KV cache's id and position), then computed by
every rank together. The other ranks run :func:`follow`: receive a command, run the same forward on
their share (their experts, or their layers), repeat until rank 0 says stop or goes away. Sampling
happens once, on rank 0; the next forward carries the sampled token, so every rank stays in step.

Each rank keeps its own KV cache for each of rank 0's caches (same positions; a pipeline rank its
layers only). A command carries the cache's position, so a cache that rank 0 trimmed (a chat that
reuses a prefix) is trimmed everywhere; caches rank 0 drops are dropped everywhere with the next
command.
"""
from __future__ import annotations

import atexit
import signal
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlxtral.distributed import pipeline, protocol, relay
from mlxtral.distributed.group import DistributedError, Group, end_with
from mlxtral.distributed.placement import Placement
from mlxtral.distributed.protocol import COUNTS, FORWARD, RUNS, STATS, STOP, WARM, Command
from mlxtral.errors import ContextOverflowError

STAT_FIELDS = ("peak_rss_bytes", "comm_seconds", "comm_bytes", "forward_seconds")


def _why(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


class DistCache:
    """Rank 0's handle on a KV cache every rank keeps."""

    def __init__(self, local: Any, cid: int, freed: list[int]) -> None:
        self.local = local
        self.cid = cid
        self.max_context = local.max_context
        weakref.finalize(self, freed.append, cid)

    @property
    def offset(self) -> int:
        return int(self.local.offset)

    @offset.setter
    def offset(self, n: int) -> None:
        self.local.offset = n

    def trim(self, n: int) -> None:
        self.local.trim(n)

    @property
    def nbytes(self) -> int:
        return int(self.local.nbytes)

    @property
    def held_bytes(self) -> int:
        return int(getattr(self.local, "held_bytes", self.local.nbytes))


def _run(backend: Any, group: Group, place: Placement, ids: Sequence[int], cache: Any,
         all_logits: bool) -> np.ndarray | None:
    if place.mode == "pipeline":
        return pipeline.forward(backend, group, ids, cache, all_logits)
    return backend.forward(ids, cache, all_logits)


class DistributedBackend:
    """Rank 0's backend: the same calls as a single-process backend, computed by the group."""

    def __init__(self, backend: Any, group: Group, place: Placement) -> None:
        self.backend = backend
        self.group = group
        self.place = place
        self.name = backend.name
        self.args = backend.args
        self.kv_dtype = getattr(backend, "kv_dtype", None)
        self.dtype = getattr(backend, "dtype", None)  # MLX's compute dtype
        self._freed: list[int] = []
        self._next = 1
        self._broken: str | None = None
        self.forward_seconds = 0.0
        atexit.register(self.close)

    @property
    def experts(self) -> Any:
        return getattr(self.backend, "experts", None)

    @property
    def expert_counts(self) -> Any:
        """Tokens per expert [L, E]: rank 0's own (every rank routes every layer) in expert
        parallel; in pipeline parallel each rank routes its layers, summed here."""
        mine = getattr(self.backend, "expert_counts", None)
        if mine is None or self.place.mode != "pipeline" or self._broken is not None:
            return mine
        self._command(COUNTS, [], [])
        return _sum_counts(self.group, self.backend)

    def peak_memory(self) -> int:
        return int(self.backend.peak_memory())

    def new_cache(self, max_context: int) -> DistCache:
        cid = self._next
        self._next += 1
        return DistCache(self.backend.new_cache(max_context), cid, self._freed)

    def _frees(self) -> list[int]:
        out, self._freed[:] = list(self._freed), []
        return out

    def _command(self, op: int, fields: list[int], payload: list[int]) -> None:
        if self._broken is not None:
            raise DistributedError(self._broken)
        try:
            protocol.send(self.group, Command(op, fields, np.asarray(payload, dtype=np.int32)))
        except BaseException as e:
            self._broken = f"the group ended ({_why(e)})"
            raise

    def _guarded(self, fn: Any) -> Any:
        """Run a forward the others run too; any failure midway ends the group (the ranks would no
        longer be in step)."""
        t0 = time.perf_counter()
        try:
            return fn()
        except BaseException as e:
            self._broken = f"the group ended after an error in a forward ({_why(e)}); start the ranks again"
            raise
        finally:
            self.forward_seconds += time.perf_counter() - t0

    def forward(self, ids: Sequence[int], cache: DistCache, all_logits: bool = False) -> np.ndarray:
        ids = [int(i) for i in ids]
        T, p0 = len(ids), cache.offset
        if p0 + T > cache.max_context:  # before anything is sent: the others never see it
            raise ContextOverflowError.tokens(p0 + T, cache.max_context)
        frees = self._frees()
        fields = [cache.cid, cache.max_context, p0, T, int(all_logits), len(frees)]
        self._command(FORWARD, fields, ids + frees)
        out = self._guarded(lambda: _run(self.backend, self.group, self.place, ids, cache.local, all_logits))
        return out  # type: ignore[no-any-return]

    def warm(self, batch: bool = True) -> None:
        """Every rank compiles (or loads) its decode steps now, side by side, rather than one after
        another in the first forward that needs them (a server's first batched step)."""
        self._command(WARM, [int(batch)], [])
        _warm(self.backend, batch)

    def stats(self) -> list[dict[str, float]]:
        """Every rank's peak RSS, time and bytes in communication, time in forwards (rank order)."""
        self._command(STATS, [], [])
        rows = _gather_stats(self.group, self)
        return [dict(zip(STAT_FIELDS, r.tolist(), strict=True)) for r in rows]

    def close(self) -> None:
        """Tell the other ranks to stop (once; also at exit)."""
        if self._broken is not None:
            return
        try:
            self._command(STOP, [], [])
            self.group.stopped = True
        except BaseException:  # noqa: BLE001 - the others are gone already: nothing to stop
            pass
        self._broken = "the group was closed"
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


class BatchingBackend(DistributedBackend):
    """Several sequences in one forward (the server's steps), when the backend batches them:
    expert parallel runs them as one process does, pipeline parallel hands them round the ring."""

    def forward_runs(self, runs: Sequence[Sequence[int]], caches: Sequence[DistCache]) -> np.ndarray:
        runs = [[int(t) for t in r] for r in runs]
        for r, c in zip(runs, caches, strict=True):
            if c.offset + len(r) > c.max_context:
                raise ContextOverflowError.tokens(c.offset + len(r), c.max_context)
        frees = self._frees()
        head = [x for r, c in zip(runs, caches, strict=True)
                for x in (c.cid, c.max_context, c.offset, len(r))]
        self._command(RUNS, [len(runs), len(frees)], head + [t for r in runs for t in r] + frees)
        locals_ = [c.local for c in caches]
        return self._guarded(lambda: _run_runs(self.backend, self.group, self.place, runs, locals_))  # type: ignore[no-any-return]

    def forward_batch(self, ids: Sequence[int], caches: Sequence[DistCache]) -> np.ndarray:
        return self.forward_runs([[int(t)] for t in ids], caches)


def leader(backend: Any, group: Group, place: Placement) -> DistributedBackend:
    if hasattr(backend, "hidden_runs" if place.mode == "pipeline" else "forward_runs"):
        return BatchingBackend(backend, group, place)
    return DistributedBackend(backend, group, place)


def _run_runs(backend: Any, group: Group, place: Placement, runs: Sequence[Sequence[int]],
              caches: Sequence[Any]) -> np.ndarray | None:
    if place.mode == "pipeline":
        return pipeline.forward_runs(backend, group, runs, caches)
    return backend.forward_runs(runs, caches)  # type: ignore[no-any-return]


def _warm(be: Any, batch: bool) -> None:
    warm = getattr(be, "warm", None)
    if warm is not None:
        warm(batch=batch)


def _sum_counts(group: Group, be: Any) -> np.ndarray:
    c = np.asarray(be.expert_counts)  # [L, E]
    return group.all_sum(np.minimum(c, 2**31 - 1).astype(np.int32), "gathering statistics").astype(np.int64)


def _gather_stats(group: Group, be: Any) -> np.ndarray:
    from mlxtral.rss import peak_rss

    mine = np.array([peak_rss(), group.comm_seconds, group.comm_bytes, be.forward_seconds],
                    dtype=np.float64)  # [4]
    every = group.all_gather(mine.view(np.int32), "gathering statistics")  # [size, 8] int32
    return every.view(np.float64).reshape(group.size, -1)  # [size, 4]


class _Follower:
    def __init__(self, backend: Any, group: Group, place: Placement) -> None:
        self.backend, self.group, self.place = backend, group, place
        self.caches: dict[int, Any] = {}
        self.forward_seconds = 0.0

    def cache(self, cid: int, max_context: int, offset: int) -> Any:
        c = self.caches.get(cid)
        if c is None:
            if not 1 <= max_context <= 1 << 24 or offset != 0:
                raise DistributedError(f"rank {self.group.rank}: rank 0 sent a cache it never made "
                                       f"(id {cid})")
            c = self.caches[cid] = self.backend.new_cache(max_context)
        c.trim(offset)
        if c.offset != offset:
            raise DistributedError(f"rank {self.group.rank}: out of step with rank 0 (position {c.offset}, "
                                   f"rank 0 at {offset})")
        return c

    def free(self, ids: Sequence[int]) -> None:
        for cid in ids:
            self.caches.pop(int(cid), None)

    def run(self) -> None:
        while True:
            cmd = protocol.receive(self.group)
            t0 = time.perf_counter()
            f, p = cmd.fields, cmd.payload
            if cmd.op == STOP:
                return
            if cmd.op == STATS:
                _gather_stats(self.group, self)
                continue
            if cmd.op == COUNTS:
                _sum_counts(self.group, self.backend)
                continue
            if cmd.op == WARM:
                _warm(self.backend, bool(f[0]))
                continue
            if cmd.op == FORWARD:
                cid, ctx, off, T, all_logits, n_free = f[:6]
                self.free(p[T : T + n_free].tolist())
                c = self.cache(cid, ctx, off)
                _run(self.backend, self.group, self.place, p[:T].tolist(), c, bool(all_logits))
            elif cmd.op == RUNS:
                B, n_free = f[:2]
                meta = p[: 4 * B].reshape(B, 4)
                self.free(p[len(p) - n_free :].tolist() if n_free else [])
                caches, runs, at = [], [], 4 * B
                for cid, ctx, off, n in meta.tolist():
                    caches.append(self.cache(cid, ctx, off))
                    runs.append(p[at : at + n].tolist())
                    at += n
                _run_runs(self.backend, self.group, self.place, runs, caches)
            self.forward_seconds += time.perf_counter() - t0


def follow(backend: Any, group: Group, place: Placement) -> None:
    """The loop of every rank but 0; ends the process when rank 0 says stop (status 0) or goes
    away (one line, status 1). Ctrl-C is rank 0's to handle: the followers ignore it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    relay.quiet_relay()  # a follower never reads stdin
    code, msg = 0, ""
    try:
        _Follower(backend, group, place).run()
    except DistributedError as e:
        code, msg = 1, str(e)
        if "lost the other ranks" in msg:
            msg = f"rank {group.rank}: rank 0 or another rank ended without saying stop; stopping too"
    except Exception as e:  # noqa: BLE001 - a follower has no user to raise to: one line, and end
        code, msg = 1, f"rank {group.rank}: {' '.join(str(e).split())[:300]}"
    end_with(code, msg)
