"""Output plans shared by the writers: which internal tensors make up each output tensor,
its shape and type, and the per-tensor report (bytes written, relative RMSE)."""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from mlxtral.config import ModelArgs
from mlxtral.errors import FormatError
from mlxtral.qtensor import AffineTensor, QTensor, Tensor, stored_qtype
from mlxtral.quant.ggml import rmse_from_terms, squared_error_terms

from .policy import exact_repack

T = TypeVar("T")


@dataclass
class OutTensor:
    """One tensor of the output file, built from one or more internal tensors."""

    name: str
    parts: list[str]  # internal names; more than one: stacked along a new first axis
    shape: tuple[int, ...]  # logical shape of the output tensor (stacked shape for experts)
    qtype: str  # GGUF type, or for MLX "affine" / a float dtype name


@dataclass
class TensorReport:
    """What happened to one output tensor."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    nbytes: int = 0
    src_qtype: str = ""
    num: float = 0.0  # sum (written - source)^2
    den: float = 0.0  # sum source^2
    copied: bool = False  # raw bytes copied unchanged (same type in and out)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def rel_rmse(self) -> float:
        return rmse_from_terms(self.num, self.den)

    def add_error(self, ref: np.ndarray, approx: np.ndarray) -> None:
        n, d = squared_error_terms(ref, approx)
        self.num += n
        self.den += d


def check_tensors(args: ModelArgs, tensors: Mapping[str, QTensor], where: str = "") -> None:
    """Every tensor the model needs is there with the expected shape (no silent garbage out)."""
    from mlxtral.formats import expected_shapes

    for name, shape in expected_shapes(args).items():
        t = tensors.get(name)
        if t is None:
            raise FormatError(f"tensor {name} is missing", where or None)
        if tuple(t.shape) != tuple(shape):
            raise FormatError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}", where or None)


def _layer_ffn_names(args: ModelArgs, i: int, kind: str) -> list[str]:
    return [f"blk.{i}.ffn_{kind}.{e}.weight" for e in range(args.n_ffn)]


def layer_order(args: ModelArgs) -> list[tuple[str, list[str]]]:
    """(base output name in GGUF terms, internal parts) in llama.cpp's file order."""
    out: list[tuple[str, list[str]]] = [("token_embd.weight", ["token_embd.weight"])]
    for i in range(args.n_layers):
        b = f"blk.{i}."
        for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"):
            out.append((b + n + ".weight", [b + n + ".weight"]))
        if args.is_moe:
            out.append((b + "ffn_gate_inp.weight", [b + "ffn_gate_inp.weight"]))
            for kind in ("gate", "up", "down"):
                out.append((b + f"ffn_{kind}_exps.weight", _layer_ffn_names(args, i, kind)))
        else:
            for kind in ("gate", "up", "down"):
                out.append((b + f"ffn_{kind}.weight", _layer_ffn_names(args, i, kind)))
    out.append(("output_norm.weight", ["output_norm.weight"]))
    if not args.tie_word_embeddings:
        out.append(("output.weight", ["output.weight"]))
    return out


def source_f32(t: Tensor) -> np.ndarray:
    """One source tensor as float32 (a fresh array of its own; the source map is only read)."""
    x = t.dequantize()
    return np.ascontiguousarray(x, dtype=np.float32)


def convert_threads() -> int:
    """Worker threads for quantization: ``MLXTRAL_CONVERT_THREADS`` or the CPU count (at most 8).
    NumPy releases the GIL inside its array operations, so row ranges convert in parallel."""
    from mlxtral.env import env_int

    # at most 256 threads (as the kernels): a huge value would start that many
    return env_int("MLXTRAL_CONVERT_THREADS", max(1, min(os.cpu_count() or 1, 8)), 1, 256, "threads")


PARALLEL_MIN_ELEMS = 1 << 20  # smaller tensors are converted on the calling thread
POOL_JOIN_TIMEOUT = 30.0  # on an exception, seconds to wait for the workers' running items


_Item = tuple[Future, Callable[..., Any], tuple[Any, ...]]  # a future, a function, its arguments


class WorkerPool:
    """Worker threads for :func:`map_rows` (row ranges of one tensor at a time).

    Unlike a ``ThreadPoolExecutor``, whose workers the interpreter joins at exit (a worker that never
    got its wake-up, e.g. after a Ctrl-C while it was starting, hangs the exit in
    ``threading._shutdown``), the threads are daemons: they never keep the process alive.
    :meth:`shutdown` drops the queued work with ``cancel_futures=True`` and stops every worker after
    the item it is running; :func:`worker_pool` calls it on every exit path.
    """

    def __init__(self, threads: int) -> None:
        self.size = threads
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            del item
            if fut.set_running_or_notify_cancel():
                try:
                    res = fn(*args)
                except BaseException as e:  # noqa: BLE001 - handed to the caller by fut.result()
                    fut.set_exception(e)
                else:
                    fut.set_result(res)
            del fut, fn, args

    def map(self, fn: Callable[..., T], items: list[tuple[Any, ...]]) -> list[T]:
        """``[fn(*it) for it in items]`` on the workers, in order; on any exception (a worker's,
        or KeyboardInterrupt / Terminated here) the items not started yet are cancelled."""
        if self._closed:
            raise RuntimeError("map() on a WorkerPool that is shut down")
        while len(self._threads) < self.size:
            t = threading.Thread(target=self._worker, name=f"mlxtral-convert-{len(self._threads)}",
                                 daemon=True)
            try:
                t.start()
            except RuntimeError as e:  # "can't start new thread": under ulimit -v, one clear line
                from mlxtral.address_space import explain

                raise (explain(e, "starting the conversion threads") or e) from None
            self._threads.append(t)
        futs: list[Future[T]] = []
        try:
            for it in items:
                f: Future[T] = Future()
                futs.append(f)
                self._queue.put((f, fn, it))
            return [f.result() for f in futs]
        except BaseException:
            for f in futs:
                f.cancel()
            raise

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False,
                 timeout: float | None = None) -> None:
        """Stop the workers (each after its running item); ``cancel_futures``: cancel the queued
        items first; ``wait``: join the workers (for at most ``timeout`` seconds in all)."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for t in self._threads:
                if t.ident is not None:
                    t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


_ACTIVE: ContextVar[WorkerPool | None] = ContextVar("mlxtral_convert_pool", default=None)


@contextlib.contextmanager
def worker_pool() -> Iterator[WorkerPool | None]:
    """The scope of one conversion: :func:`map_rows` inside runs on one pool of
    :func:`convert_threads` workers (started at first use), shut down on the way out on every path:
    after an exception the queued items are cancelled and the running ones get
    ``POOL_JOIN_TIMEOUT`` seconds to finish (the workers are daemons past that)."""
    threads = convert_threads()
    pool = WorkerPool(threads) if threads > 1 else None
    token = _ACTIVE.set(pool)
    ok = False
    try:
        yield pool
        ok = True
    finally:
        _ACTIVE.reset(token)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=not ok, timeout=None if ok else POOL_JOIN_TIMEOUT)


def row_ranges(n_rows: int, row_len: int, threads: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges for ``threads`` workers: 4 per worker (balance), none tiny."""
    if threads <= 1 or n_rows * row_len < PARALLEL_MIN_ELEMS or n_rows < 2:
        return [(0, n_rows)]
    parts = min(n_rows, threads * 4)
    bounds = np.linspace(0, n_rows, parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def map_rows(fn: Callable[[int, int], T], n_rows: int, row_len: int) -> list[T]:
    """``fn(lo, hi)`` over row ranges, on the conversion's :func:`worker_pool` when the tensor is big
    enough (outside one, on a pool of its own for this call)."""
    pool = _ACTIVE.get()
    threads = pool.size if pool is not None else convert_threads()
    ranges = row_ranges(n_rows, row_len, threads)
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    if pool is None:
        with worker_pool() as own:
            assert own is not None
            return own.map(fn, ranges)
    return pool.map(fn, ranges)


def source_rows(t: QTensor) -> np.ndarray:
    """The stored data of ``t`` as 2-D ``[rows, stored row]`` (a view)."""
    d = np.asarray(t.data)
    return d.reshape(-1, d.shape[-1]) if d.ndim != 1 else d.reshape(1, -1)


def rows_f32(t: QTensor, data_rows: np.ndarray) -> np.ndarray:
    """Some stored rows of ``t`` as float32 ``[rows, n]``."""
    from mlxtral.quant import dequantize_blocks

    n = t.shape[-1] if t.shape else 1
    return dequantize_blocks(data_rows, t.qtype, (data_rows.shape[0], n))


def row_reader(t: Tensor) -> tuple[int, Callable[[int, int], np.ndarray]]:
    """(rows, ``read(lo, hi)`` -> float32 ``[hi - lo, n]``) over ``t``'s rows, leading dims flattened:
    GGUF blocks through :func:`rows_f32`, MLX affine rows (codes, scales, biases) dequantized."""
    if isinstance(t, AffineTensor):
        from mlxtral.quant.affine import affine_dequantize

        w, sc, bi = (a.reshape(-1, a.shape[-1]) for a in (t.data, t.scales, t.biases))
        return w.shape[0], lambda lo, hi: affine_dequantize(w[lo:hi], sc[lo:hi], bi[lo:hi], t.bits,
                                                            t.group_size, t.scale_dtype)
    src = source_rows(t)
    return src.shape[0], lambda lo, hi: rows_f32(t, src[lo:hi])


def encode_gguf(t: Tensor, qtype: str, report: TensorReport) -> np.ndarray:
    """Source tensor -> stored data of GGUF ``qtype``; adds its error to ``report``.

    Same type in and out: the raw bytes are passed through unchanged (no requantization loss).
    Otherwise row ranges are dequantized, quantized and measured in parallel (:func:`map_rows`).
    """
    from mlxtral.quant.ggml import dequantize, quantize, quantized_shape

    report.src_qtype = report.src_qtype or stored_qtype(t)
    if t.qtype == qtype:
        report.copied = True
        return np.asarray(t.data)
    if isinstance(t, AffineTensor) and exact_repack(t.qtype, qtype):
        return _affine_to_q4_1(t, report)
    odtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(qtype, np.uint8)
    out = np.empty(quantized_shape(tuple(t.shape), qtype), dtype=odtype)
    n_rows, read = row_reader(t)
    orows = out.reshape(n_rows, -1)

    def work(lo: int, hi: int) -> tuple[float, float]:
        x = read(lo, hi)  # [rows, n] float32
        quantize(x, qtype, out=orows[lo:hi])
        if qtype == "F32":
            return 0.0, 0.0
        return squared_error_terms(x, dequantize(orows[lo:hi], qtype))

    for num, den in map_rows(work, n_rows, t.shape[-1] if t.shape else 1):
        report.num += num
        report.den += den
    return out


def _affine_to_q4_1(t: AffineTensor, report: TensorReport) -> np.ndarray:
    """An MLX 2-4-bit tensor as GGUF Q4_1, codes and groups kept (:func:`.policy.exact_repack`);
    exact when every scale and bias is a float16 value, else its error is measured and reported."""
    from mlxtral.quant.affine import load_dtype
    from mlxtral.quant.ggml import dequantize
    from mlxtral.quant.gguf_affine import affine_to_q4_1

    values = (load_dtype(t.scales, t.scale_dtype), load_dtype(t.biases, t.scale_dtype))
    if not all(np.isfinite(v).all() for v in values):
        raise FormatError(f"tensor {report.name}: its MLX scales or biases hold NaN or infinity (a damaged "
                          "file)")
    with np.errstate(over="ignore"):
        halves = [v.astype(np.float16) for v in values]
    if not all(np.isfinite(h).all() for h in halves):
        raise FormatError(f"tensor {report.name}: its MLX scales or biases exceed float16's range, which a "
                          "Q4_1 block stores; convert it to --bf16 or --f32 instead")
    out = affine_to_q4_1(t.data, t.scales, t.biases, t.group_size, t.scale_dtype, t.bits)
    if all(np.array_equal(v, h.astype(np.float32)) for v, h in zip(values, halves, strict=True)):
        if report.den == 0:  # no part of this tensor was rounded so far
            report.copied = True  # the same numbers, repacked
        return out
    report.copied = False
    n_rows, read = row_reader(t)  # bfloat16 scales outside float16's normal range: rounded, measured
    orows = out.reshape(n_rows, -1)

    def work(lo: int, hi: int) -> tuple[float, float]:
        return squared_error_terms(read(lo, hi), dequantize(orows[lo:hi], "Q4_1"))

    for num, den in map_rows(work, n_rows, t.shape[-1]):
        report.num += num
        report.den += den
    return out


def add_quant_error(report: TensorReport, x: np.ndarray, data: np.ndarray, qtype: str) -> None:
    """Accumulate the error of ``data`` (GGUF ``qtype``) against float32 ``x``, row chunk by chunk."""
    from mlxtral.quant.ggml import CHUNK_ELEMS, dequantize

    rows = x.reshape(-1, x.shape[-1])
    drows = data.reshape(rows.shape[0], -1)
    step = max(1, 16 * CHUNK_ELEMS // rows.shape[1])
    for s in range(0, rows.shape[0], step):
        report.add_error(rows[s : s + step], dequantize(drows[s : s + step], qtype))


def release_pages(arr: np.ndarray) -> None:
    """Drop the page cache pages of a memory-mapped source tensor from our RSS once it is done.

    Only for arrays that are views of an ``mmap`` (read-only file mappings: the pages are re-read
    from the file if touched again); heap arrays are left alone. Without this, every touched page
    of the input stays resident and the RSS grows to the input's size.
    """
    import ctypes
    import mmap

    base: object = arr
    for _ in range(16):  # ndarray views, possibly over a memoryview of the mmap (safetensors)
        if isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        elif isinstance(base, memoryview):
            base = base.obj
        else:
            break
    if not isinstance(base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or arr.nbytes == 0:
        return
    page = mmap.PAGESIZE
    start = arr.__array_interface__["data"][0]
    lo = start - start % page
    hi = start + arr.nbytes
    hi += -hi % page
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(mmap.MADV_DONTNEED))
    except (OSError, AttributeError):
        pass
