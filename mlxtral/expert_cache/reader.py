"""Reading whole experts from the file into preallocated, page-aligned slots.

Mechanism (chosen by measurement, ``benchmarks/bench_expert_io.py`` on the 26.3 GB Mixtral-shape
Q4_0 file; numbers in the README): ``preadv`` with ``O_DIRECT`` into a slot that stays resident for
the whole run, each matrix (~33 MB for Mixtral Q4_0) cut into 8 MB pieces read by a few I/O
threads at once. One request at a time left this machine's disk at 0.2-0.65 GB/s; two to four
in flight reach its 1.0-1.4 GB/s. Reads the forward pass waits for go before read-ahead.

- ``O_DIRECT`` reads go from the disk straight into the slot: no second copy in the page cache
  (which, on a machine the model does not fit, would compete with the cache for the same RAM and
  make peak memory depend on the kernel), no memcpy out of the page cache, and the same
  throughput as buffered reads of this size.
- Preallocated slots are faulted in once; allocating per read costs ~25k page faults and zeroing
  per expert, and returning memory on eviction makes RSS saw-tooth.
- ``mmap`` + ``madvise(WILLNEED/DONTNEED)`` leaves residency to the kernel: a page of a
  ``DONTNEED``-ed expert may stay in the page cache or not, so neither the budget nor the hit rate
  is ours to decide, and readahead works in 128 KB pieces rather than one large request.

Where ``O_DIRECT`` is refused (tmpfs, some filesystems: ``EINVAL`` on open or on the first read),
or on macOS (``F_NOCACHE`` instead), reads fall back to buffered ``preadv`` followed by
``POSIX_FADV_DONTNEED`` on the range read. Either way the bytes are exactly the file's.
"""
from __future__ import annotations

import errno
import heapq
import itertools
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from mlxtral.errors import FormatError
from mlxtral.expert_cache.layout import ExpertLayout, Span

ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffers aligned to the logical block size
PIECE = 8 << 20  # bytes per request: several in flight keep the disk's queue full
IO_THREADS = 4
DEMAND, AHEAD = 0, 1  # priorities: what the forward pass waits for, then read-ahead


def _extent(s: Span) -> tuple[int, int]:
    """The aligned file range [a0, a1) that holds ``s``."""
    a0 = s.offset // ALIGN * ALIGN
    a1 = -(-(s.offset + s.nbytes) // ALIGN) * ALIGN
    return a0, a1


def slot_bytes(layout: ExpertLayout) -> int:
    """Bytes a slot needs to hold the largest expert with each matrix's aligned extent."""
    best = 0
    for layer in layout.spans:
        for trio in layer:
            best = max(best, sum(a1 - a0 for a0, a1 in map(_extent, trio)))
    return best


class Slot:
    """A page-aligned buffer (an anonymous mapping) that holds one expert's raw matrices."""

    def __init__(self, nbytes: int) -> None:
        self._mm = mmap.mmap(-1, nbytes)
        self.buf = np.frombuffer(self._mm, dtype=np.uint8)  # [nbytes]

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)


class _Batch:
    """Pieces of one read: done when every piece is, failed with the first error."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.error: BaseException | None = None
        self.done = threading.Event()
        if n == 0:
            self.done.set()


class ExpertReader:
    """Reads experts of ``layout.path`` into slots, on ``io_threads`` threads (``preadv`` has no
    file position; reads the caller waits for jump the queue of read-ahead)."""

    def __init__(self, layout: ExpertLayout, direct: bool = True, io_threads: int = IO_THREADS) -> None:
        self.layout = layout
        self.path = layout.path
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise FormatError(f"cannot open for streaming experts ({e.strerror})", self.path) from None
        self._dfd: int | None = None
        if direct:
            self._dfd = self._open_direct()
        self.direct = self._dfd is not None
        self._cv = threading.Condition()
        self._heap: list[tuple[int, int, tuple]] = []
        self._seq = itertools.count()
        self._closed = False
        # the threads hold the reader weakly, so a reader nobody uses is collected (and closed)
        me = weakref.ref(self)
        self._threads = [threading.Thread(target=_io_loop, args=(me,), name=f"mlxtral-io-{i}", daemon=True)
                         for i in range(max(1, int(io_threads)))]
        for t in self._threads:
            t.start()
        self.bytes_read = 0  # bytes the experts occupy in the file, summed over reads

    def _open_direct(self) -> int | None:
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            try:
                return os.open(self.path, os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return None
        if sys.platform == "darwin":  # no O_DIRECT: F_NOCACHE on a second descriptor
            try:
                import fcntl

                fd = os.open(self.path, os.O_RDONLY)
                fcntl.fcntl(fd, 48, 1)  # F_NOCACHE
                return fd
            except OSError:
                return None
        return None

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            while self._heap:  # reads still queued fail instead of waiting forever
                batch = heapq.heappop(self._heap)[2][0]
                if batch.error is None:
                    batch.error = FormatError("the expert reader was closed", self.path)
                batch.left -= 1
                if batch.left == 0:
                    batch.done.set()
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=30)
        for fd in (self._fd, self._dfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._dfd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # ---- reading ---------------------------------------------------------------------------
    def _pread(self, buf: np.ndarray, a0: int, need: int) -> None:
        """Fill ``buf`` (aligned) from file offset ``a0``; at least ``need`` bytes must arrive."""
        got = 0
        fd = self._dfd
        while got < need:
            mv = memoryview(buf[got:])  # type: ignore[arg-type]
            try:
                if fd is not None and got % ALIGN == 0:
                    n = os.preadv(fd, [mv], a0 + got)
                else:
                    n = os.preadv(self._fd, [mv], a0 + got)
            except OSError as e:
                if fd is not None and e.errno == errno.EINVAL:  # O_DIRECT refused here: buffered
                    fd = self._dfd = None
                    self.direct = False
                    continue
                raise FormatError(f"reading experts failed ({e.strerror})", self.path) from None
            if n == 0:
                raise FormatError(f"the file ends before byte {a0 + need} (truncated while running?)",
                                  self.path)
            got += n
        if fd is None and hasattr(os, "posix_fadvise"):
            try:  # buffered: do not keep a second copy in the page cache
                os.posix_fadvise(self._fd, a0, got, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def _next(self) -> tuple | None:
        """The next piece to read, waiting up to a second; None when closed or idle."""
        with self._cv:
            if not self._heap and not self._closed:
                self._cv.wait(1.0)
            if self._closed or not self._heap:
                return None
            return heapq.heappop(self._heap)[2]

    def _do(self, batch: _Batch, buf: np.ndarray, a0: int, need: int) -> None:
        err = None
        if batch.error is None:
            try:
                self._pread(buf, a0, need)
            except BaseException as e:  # handed to the reader's caller
                err = e
        with self._cv:
            if err is not None and batch.error is None:
                batch.error = err
            batch.left -= 1
            if batch.left == 0:
                batch.done.set()

    def read(self, layer: int, expert: int, slot: Slot, priority: int = DEMAND) -> list[np.ndarray]:
        """Read expert ``(layer, expert)`` into ``slot``: its (gate, up, down) raw data, read-only
        views of the slot with the shapes and dtypes the memory-mapped tensors have."""
        views, pieces = [], []
        pos = 0
        for s in self.layout.spans[layer][expert]:
            a0, a1 = _extent(s)
            end = s.offset + s.nbytes
            for p0 in range(a0, a1, PIECE):
                p1 = min(p0 + PIECE, a1)
                pieces.append((slot.buf[pos + p0 - a0 : pos + p1 - a0], p0, min(p1, end) - p0))
            lo = pos + s.offset - a0
            v = slot.buf[lo : lo + s.nbytes].view(np.dtype(s.dtype)).reshape(s.data_shape)
            v.flags.writeable = False
            views.append(v)
            pos += a1 - a0
        batch = _Batch(len(pieces))
        with self._cv:
            if self._closed:
                raise FormatError("the expert reader is closed", self.path)
            for buf, p0, need in pieces:
                heapq.heappush(self._heap, (priority, next(self._seq), (batch, buf, p0, need)))
            self._cv.notify_all()
        batch.done.wait()
        if batch.error is not None:
            raise batch.error
        with self._cv:
            self.bytes_read += sum(s.nbytes for s in self.layout.spans[layer][expert])
        return views


def weak_worker(ref: weakref.ref, take: Callable[[Any], Any], run: Callable[[Any, Any], None]) -> None:
    """A worker thread's loop that holds its owner (an object with ``_closed``) only weakly:
    ``take(owner)`` waits a little for a job (None if there is none), ``run(owner, job)`` does it.
    Between jobs no strong reference is kept, so an owner nobody uses is collected (and closes)."""
    while True:
        owner = ref()
        if owner is None or owner._closed:
            return
        job = take(owner)
        if job is not None:
            run(owner, job)
        del owner, job


def _io_loop(ref: weakref.ref) -> None:
    weak_worker(ref, ExpertReader._next, lambda r, piece: r._do(*piece))


def read_copy(a: np.ndarray) -> np.ndarray:
    """A private copy of ``a``, a view of a memory-mapped file, read with ``preadv`` (the page
    cache is told to drop the range after): the weights that stay resident while experts stream
    live in this process's own memory, not in file pages the kernel may drop under pressure."""
    from mlxtral.expert_cache.layout import file_range

    where = file_range(a)
    if where is None:
        return np.array(a)
    file, off = where
    out = np.empty(a.shape, dtype=a.dtype)
    flat = out.reshape(-1).view(np.uint8)
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        got = 0
        while got < flat.nbytes:
            n = os.preadv(fd, [memoryview(flat[got:])], off + got)  # type: ignore[arg-type]
            if n == 0:
                raise FormatError(f"the file ends before byte {off + flat.nbytes}", file)
            got += n
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, off, got, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return out


def read_columns(a: np.ndarray, c0: int, c1: int, chunk: int = 4 << 20) -> np.ndarray:
    """A private copy of columns ``[c0, c1)`` of ``a`` [rows, cols], a view of a memory-mapped
    file: rows read ``chunk`` bytes at a time (:func:`read_copy`, which drops the page cache's range
    after) and their columns kept, so the process never maps the columns it does not keep (a
    rank's half of down; rows of 2 KB share their pages). Not a file view: a plain copy."""
    from mlxtral.expert_cache.layout import file_range

    out = np.empty((a.shape[0], c1 - c0), dtype=a.dtype)
    if file_range(a) is None:
        out[:] = a[:, c0:c1]
        return out
    step = max(1, chunk // max(1, a.strides[0]))
    for r in range(0, a.shape[0], step):
        out[r : r + step] = read_copy(a[r : r + step])[:, c0:c1]
    return out
