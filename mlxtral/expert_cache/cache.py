"""The expert cache: whole experts in a bounded number of slots, prefetched on a background thread.

Backend-neutral: a backend gives a ``materialize(layer, expert, raw) -> form`` function that turns
the raw (gate, up, down) data read into a slot into what its kernels run on (the NumPy backend:
``QTensor`` views of the slot; MLX: affine arrays), and asks for a layer's experts with::

    with cache.use(layer, [e0, e1]) as forms:  # pinned: never evicted while in use
        ...compute with forms[0], forms[1]...

Misses are read on the calling thread, in the order asked; experts already being read by the
prefetcher are waited for. ``prefetch(layer, experts)`` queues reads that never block the caller
and never evict a pinned expert: a wrong guess costs a read, never a wrong answer (the bytes are
the file's either way).

Eviction: ``"lfu"`` (default) keeps a protected set of the experts used most often so far, and
streams the rest through the remaining ``reserve`` slots. A newly read expert joins the protected
set while it has room, and later only by being used clearly more often (by a margin) than the
least used protected expert. Every token walks the layers in order, so a cache smaller than the
experts in use sees a cyclic pattern: LRU (and LFU without admission, whose counts tie) then
evicts exactly the expert needed next and hits nothing; the protected set keeps its hits
(measured in the README). ``"lru"`` is kept for comparison. Entries read ahead and not used yet
are evicted only when nothing else can go, and never for another read-ahead.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlxtral.errors import MlxtralError
from mlxtral.expert_cache.layout import ExpertLayout
from mlxtral.expert_cache.reader import AHEAD, DEMAND, ExpertReader, Slot, slot_bytes, weak_worker
from mlxtral.wording import plural

POLICIES = ("lfu", "lru")
Materialize = Callable[[int, int, list[np.ndarray]], Any]

_QUEUED, _LOADING, _READY = "queued", "loading", "ready"


@dataclass
class _Entry:
    slot: Slot
    state: str
    prefetched: bool = False  # read by the prefetcher and not used since
    protected: bool = False  # in the LFU policy's protected set
    pins: int = 0
    last_use: int = 0
    raw: list[np.ndarray] | None = None
    form: Any = None
    error: BaseException | None = None


@dataclass
class ExpertStats:
    """What streaming cost: requests, where they were served from, and disk traffic."""

    requests: int = 0  # experts asked for by the forward pass
    hits: int = 0  # found in the cache or being read by the prefetcher
    misses: int = 0  # read while the forward pass waited
    prefetched: int = 0  # reads issued by the prefetcher
    prefetch_used: int = 0  # of those, experts later asked for before being evicted
    bytes_read: int = 0  # brought up to date from the reader by ExpertCache.snapshot()
    tokens: int = 0
    wait_seconds: float = 0.0  # time the forward pass spent waiting on the disk
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hit_rate, 4), "prefetched": self.prefetched,
                "prefetch_used": self.prefetch_used, "prefetch_accuracy": round(self.prefetch_accuracy, 4),
                "bytes_read": self.bytes_read, "tokens": self.tokens,
                "bytes_read_per_token": round(self.bytes_per_token),
                "io_wait_seconds": round(self.wait_seconds, 3),
                **self.extra}

    def minus(self, other: ExpertStats) -> ExpertStats:
        """The figures since ``other`` (an earlier snapshot)."""
        names = ("requests", "hits", "misses", "prefetched", "prefetch_used", "bytes_read", "tokens",
                 "wait_seconds")
        return ExpertStats(**{n: getattr(self, n) - getattr(other, n) for n in names})

    def summary(self) -> str:
        ahead = f"prefetch {self.prefetch_accuracy:.0%} accurate" if self.prefetched else "no prefetch"
        mb = self.bytes_per_token / 1e6
        return f"expert cache: {self.hit_rate:.0%} hits, {ahead}, {mb:.0f} MB read per token"


class ExpertCache:
    """Up to ``capacity`` experts of ``layout`` held at once (see the module docstring)."""

    def __init__(self, layout: ExpertLayout, capacity: int, materialize: Materialize,
                 prefetch: bool = True, policy: str = "lfu", direct: bool = True, reserve: int = 8) -> None:
        if policy not in POLICIES:
            raise MlxtralError(f"unknown eviction policy {policy!r}: choose one of {', '.join(POLICIES)}")
        if capacity < 1:
            raise MlxtralError(f"the expert cache needs at least one slot, got {capacity}")
        self.layout = layout
        self.capacity = int(capacity)
        self.materialize = materialize
        self.policy = policy
        self.prefetch_enabled = prefetch
        self.reader = ExpertReader(layout, direct=direct)
        self.slot_bytes = slot_bytes(layout)
        # LFU: slots left for streaming (the experts in use plus the next layer's read-ahead)
        self.protected_max = max(self.capacity - max(int(reserve), 1), 0)
        self._n_protected = 0
        self._slots: list[Slot] = []  # allocated lazily, up to capacity
        self._free: list[Slot] = []
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._freq = np.zeros((layout.n_layers, layout.n_experts), dtype=np.int64)
        self._tick = 0
        self._cv = threading.Condition()
        self._queue: deque[tuple[int, int]] = deque()
        self._ahead: dict[int, set[int]] = {}  # layer -> experts read ahead for its next use
        self._closed = False
        self._worker: threading.Thread | None = None
        self.stats = ExpertStats()

    # ---- public ----------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        return len(self._slots) * self.slot_bytes

    def cached(self, layer: int, expert: int) -> bool:
        en = self._entries.get((layer, expert))
        return en is not None and en.state == _READY

    @contextmanager
    def use(self, layer: int, experts: Sequence[int]) -> Iterator[list[Any]]:
        """Pin experts ``experts`` of ``layer`` (distinct, at most ``capacity``) and yield their
        materialized forms, in order."""
        experts = [int(e) for e in experts]
        if len(set(experts)) != len(experts) or len(experts) > self.capacity:
            raise ValueError(f"use() needs at most {self.capacity} distinct experts, got {experts}")
        keys = [(layer, e) for e in experts]
        mine: list[tuple[int, int]] = []  # misses this call reads itself
        pinned: list[tuple[int, int]] = []
        t0 = time.perf_counter()
        try:
            with self._cv:
                self._tick += 1
                for key in keys:
                    self._freq[key] += 1
                    self.stats.requests += 1
                    en = self._entries.get(key)
                    if en is None:
                        en = self._claim(key, demand=True)
                        mine.append(key)
                        self.stats.misses += 1
                    elif en.state == _QUEUED:  # the prefetcher has not started it: read it here
                        en.state = _LOADING
                        mine.append(key)
                        self.stats.misses += 1
                    else:
                        self.stats.hits += 1
                    if en.prefetched:
                        en.prefetched = False
                        self.stats.prefetch_used += 1
                    en.pins += 1
                    pinned.append(key)
                    en.last_use = self._tick
                    if self.policy == "lfu" and not en.protected:
                        self._admit(key, en)
                for e in self._ahead.pop(layer, ()):  # guesses for this use that it did not take: stale
                    en = self._entries.get((layer, e))
                    if en is not None and en.prefetched and e not in experts:
                        en.prefetched = False
            for key in mine:
                self._load(key)
            with self._cv:
                for key in keys:
                    en = self._entries[key]
                    while en.state != _READY and en.error is None:
                        self._cv.wait()
                    if en.error is not None:
                        raise en.error
            self.stats.wait_seconds += time.perf_counter() - t0
            forms = []
            for key in keys:
                en = self._entries[key]
                if en.form is None:
                    assert en.raw is not None
                    en.form = self.materialize(key[0], key[1], en.raw)
                forms.append(en.form)
            yield forms
        finally:
            with self._cv:
                for key in pinned:
                    en = self._entries.get(key)
                    if en is None:
                        continue
                    en.pins -= 1
                    # a failed read, or one of ours never started (an earlier one failed): gone
                    if en.pins <= 0 and (en.error is not None or (key in mine and en.state != _READY)):
                        self._drop(key)
                self._cv.notify_all()

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Queue reads of ``layer``'s ``experts`` that are not cached; skipped where no slot can
        be had without evicting a pinned or not-yet-used expert."""
        if not self.prefetch_enabled or self._closed:
            return
        with self._cv:
            for e in experts:
                key = (layer, int(e))
                if key in self._entries:
                    continue
                en = self._claim(key, demand=False)
                if en is None:
                    break
                en.prefetched = True
                self._ahead.setdefault(layer, set()).add(int(e))
                self._queue.append(key)
                self.stats.prefetched += 1
            if self._queue and self._worker is None:
                self._worker = threading.Thread(target=_prefetch_loop, args=(weakref.ref(self),),
                                                name="mlxtral-expert-prefetch", daemon=True)
                self._worker.start()
            self._cv.notify_all()

    def snapshot(self) -> ExpertStats:
        """A copy of the statistics so far (bytes read brought up to date)."""
        import copy

        with self._cv:
            self.stats.bytes_read = self.reader.bytes_read
            return copy.copy(self.stats)

    def add_tokens(self, n: int) -> None:
        self.stats.tokens += int(n)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=30)
        self.reader.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # ---- internals (call with the lock held unless noted) ----------------------------------
    def _claim(self, key: tuple[int, int], demand: bool) -> _Entry:
        """A new entry for ``key`` with a slot: a free one, a new one, or an evicted one's.
        Demand waits for in-flight reads to finish if every slot is busy; prefetch returns None."""
        while True:
            slot = self._take_slot(demand)
            if slot is not None:
                en = _Entry(slot, _LOADING if demand else _QUEUED)
                self._entries[key] = en
                return en
            if not demand:
                return None  # type: ignore[return-value]
            busy = [k for k, en in self._entries.items() if en.state != _READY]
            if not busy:
                slots = plural(self.capacity, "slot")
                raise MlxtralError(f"the expert cache ({slots}) cannot hold the experts one layer needs "
                                   "at once")
            self._cv.wait()

    def _take_slot(self, demand: bool) -> Slot | None:
        if self._free:
            return self._free.pop()
        if len(self._slots) < self.capacity:
            s = Slot(self.slot_bytes)
            self._slots.append(s)
            return s
        victim = self._victim(demand)
        if victim is None:
            return None
        return self._pop(victim).slot

    def _victim(self, demand: bool) -> tuple[int, int] | None:
        best, best_score = None, None
        for key, en in self._entries.items():
            if en.pins or en.state != _READY:
                continue
            fresh = en.prefetched  # read ahead and not used yet: last to go, never for a prefetch
            if (fresh or en.protected) and not demand:
                continue
            freq = int(self._freq[key]) if self.policy == "lfu" else 0
            score = (fresh, en.protected, freq, en.last_use)  # LFU: streamed ones first
            if best_score is None or score < best_score:
                best, best_score = key, score
        return best

    def _admit(self, key: tuple[int, int], en: _Entry) -> None:
        """LFU: protect ``key`` if there is room, or if it is used clearly more often than the
        least used protected expert (which then streams like any other)."""
        if self._n_protected < self.protected_max:
            en.protected = True
            self._n_protected += 1
            return
        f = int(self._freq[key])
        low, low_f = None, None
        for k2, e2 in self._entries.items():
            if e2.protected and (low_f is None or self._freq[k2] < low_f):
                low, low_f = e2, int(self._freq[k2])
        if low is not None and low_f is not None and f > low_f + max(2, low_f // 8):
            low.protected = False
            en.protected = True

    def _pop(self, key: tuple[int, int]) -> _Entry:
        en = self._entries.pop(key)
        if en.protected:
            self._n_protected -= 1
        en.raw = en.form = None
        return en

    def _drop(self, key: tuple[int, int]) -> None:
        if key in self._entries:
            self._free.append(self._pop(key).slot)

    def _load(self, key: tuple[int, int], priority: int = DEMAND) -> None:
        """Read ``key`` into its entry's slot (lock not held)."""
        en = self._entries[key]
        try:
            raw = self.reader.read(key[0], key[1], en.slot, priority)
        except BaseException as e:
            with self._cv:
                en.error = e
                if en.pins <= 0:
                    self._drop(key)
                self._cv.notify_all()
            raise
        with self._cv:
            en.raw = raw
            en.state = _READY
            self._cv.notify_all()

    def _load_ahead(self, key: tuple[int, int]) -> None:
        try:
            self._load(key, AHEAD)
        except BaseException:  # the demand path reads it again and reports the error
            pass

    def _next(self) -> tuple[int, int] | None:
        """The next read-ahead to do (marked loading), waiting up to a second; None if none."""
        with self._cv:
            if not self._queue and not self._closed:
                self._cv.wait(1.0)
            while self._queue and not self._closed:
                key = self._queue.popleft()
                en = self._entries.get(key)
                if en is not None and en.state == _QUEUED:  # not claimed by a demand read, nor dropped
                    en.state = _LOADING
                    return key
            return None


def _prefetch_loop(ref: weakref.ref) -> None:
    """The read-ahead thread; it holds the cache weakly, so an unused cache is collected."""
    weak_worker(ref, ExpertCache._next, ExpertCache._load_ahead)
