"""CPU matrix kernels computing directly on GGUF blocks (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, IQ4_NL, the
K-quants Q2_K .. Q6_K with llama.cpp's q8_K activations in ``_kernels_kq``, IQ4_XS with q8_K ones in
``_kernels_iq``, F16, BF16, F32).

``linear(x, w)`` is ``x @ dequant(w).T`` for ``x`` float32 ``[T, in]`` and a 2-D :class:`QTensor`
``w`` ``[out, in]``, reading the weight where it lies (usually a memory map): no dequantized copy.

How it is fast
--------------
* **Integer dot products, as llama.cpp.** For the block types the activations are quantized once
  per call to int8 per 32-block (scale ``xd``) as llama.cpp's q8_0 / q8_1 blocks. A row dot is
  then, per block, one ``vpdpbusd`` (VNNI; else ``vpmaddubsw`` + ``vpmaddwd``) of unsigned codes
  against the signed activations into 8 int32 lanes, and one FMA of the lanes, as float, by
  ``d_w * d_x``. The codes' offset is taken out exactly, in the integers: the dot starts from
  ``xo`` = -offset * (each 4 activations' sum), precomputed per token (Q4_0's -8, Q5_0's -16, and
  the +128 that makes Q8_0's and IQ4_NL's signed values unsigned; off VNNI those two keep
  llama.cpp's sign trick, the same integers). Q4_1 / Q5_1 add their min times q8_1's block sum.
  The K-quants and IQ4_XS dot q8_K superblocks (integer sums per 256 weights, one float step each).
  Q4_0 (``_kernels_tile``) sums each whole block in the integers and keeps 16 rows in the vector
  lanes, so the convert, scale and FMA are paid once per block for 16 rows: decode and up to 16
  tokens dot 16 rows where they lie (with VNNI each block's codes transposed into the lanes in
  registers once for up to 8 tokens; elsewhere their lane sums folded by a shuffle tree); longer
  prefill repacks each 16-row tile into llama.cpp's interleaved layout in L1/L2 and runs 8 tokens
  per pass (~3.5x the four-token row dots). On AVX2 without VNNI its dot transposes each block's
  codes of 8 rows into the lanes once for up to 8 tokens (32 in prefill), which beats the split
  tiles at every T there. All of
  them are one arithmetic, so batch invariance holds there too.
  These inner loops are hand-written LLVM IR (``_kernels_ir``), called from numba; LLVM's own
  vectorizer does not find this on short per-block loops. Results differ from exact float32 by
  ~1e-3 relative (what llama.cpp does). ``set_exact(True)`` (or ``MLXTRAL_EXACT_KERNELS=1``)
  keeps float32 activations instead (dequantize a row into a small buffer, float dot): exact to
  float32 rounding, ~2-3x slower.
* **Our own spinning thread pool.** A numba ``prange`` costs ~50-100 us per call on this machine
  (thread wake-up through the kernel), more than a whole 1024x3584 Q4_0 matvec. Instead,
  ``n - 1`` worker threads sit in a nogil numba loop spinning (``pause``) on one shared int64 word;
  a call publishes a job table and the caller and the workers claim chunks of output rows with a
  compare-and-swap on that word (``seq | nchunks | next``), so a late worker can never run a
  chunk of the wrong job. Hand-off costs well under a microsecond. A worker idle for about
  ``MLXTRAL_SPIN_MS`` (default 20 ms) goes to sleep on an Event; the next call is then run by the
  caller alone and wakes it. Threads: ``NUMBA_NUM_THREADS`` or ``set_num_threads(n)``; default all
  cores; at most ``MAX_THREADS`` (256: the control block holds 255 workers' flags, and a worker whose
  id has no flag there quits instead of writing past it).
* **Several products, one job.** A job is a table of tasks (weight, activations, output), so the
  MoE FFN is two synchronisations per layer whatever ``top_k``: ``swiglu_experts`` (gate and up of
  every selected expert, with ``silu(g) * u`` fused, each token group quantized once) and
  ``linear_experts`` (the down projections). ``linear_many`` does q/k/v in one job. In decode
  (one token a task, one block kind) the job is built and run in one numba call
  (``_nb.run_decode``): ~5 us of Python a job instead of ~5 per task.
* **Decode work items** are about a quarter of a matrix per thread (16 KB .. 4 MB of rows): long
  sequential runs keep the hardware prefetcher streaming (16 KB items: ~11 GB/s in the model,
  these: ~14 GB/s).
* **Software prefetch.** Every row loop asks for the weight bytes 2 KB ahead of the ones it reads
  (``_kernels_ir.prefetch_ahead``): on this project's KVM Xeon the hardware prefetcher barely
  follows the row streams, and decode of the Q4_0 bench model went from 0.67x to 1.0x llama.cpp
  with it (experts streamed at 7 GB/s, now 13).
* **Prefill** (``T > 1``) computes every (row, token) with the very arithmetic of decode
  (**batch invariance**: a position's logits are bit-identical whatever the chunking of the
  prompt, one token at a time after a cache hit included). Block types quantize each token row to
  int8 blocks on its own; Q4_0 (from 2 tokens; on AVX2 never: its transposing dot, up to 32
  tokens a pass) and the K-quants (from 16) repack 16-row tiles and run 8 tokens per pass
  (``_kernels_tile``), the other block types dot a row four tokens at a
  time (``dot4_*``: each weight block unpacked once for four tokens, its sums in exactly the
  one-token ``dot_*``'s order, so the same bits; ~1.5x over one token at a time); float types dot
  with our own row kernel, one summation order at every T (F16/BF16 rows converted once to
  float32, exactly, then reused for every token). Each chunk of rows (~16 KB, or two tiles) stays
  in L1/L2 while every token passes over it. No BLAS (its summation order depends on the batch
  shape).
* **Around the matmuls**: ``attend`` (attention over the KV cache as it lies, one pool job of a
  work item per (query row, KV head) on every thread; each query row, prefill or decode, through
  the same per-row kernel; a float16 cache's rows converted to float32 exactly, eight halves a
  step, then the float32 steps) and ``rms_norm`` replace a handful of tiny NumPy/BLAS calls each
  (~30 us per tiny BLAS call).
* **Portability**: the IR has an AVX-512 VNNI path (``vpdpbusd``), an AVX2 path, an ARM
  dot-product path (``sdot``: Apple M1 and later; tested in an emulator, ``tests/test_kernel_arm.py``)
  and a portable vector path (older x86, ARM without the extension), chosen from the CPU's features
  and giving identical bits; ``MLXTRAL_KERNEL_ISA=avx2|portable`` (or ``MLXTRAL_NO_AVX2=1``) forces
  a lower one (not disk-cached), for tests.

The numba functions run from the native library compiled ahead of time (:mod:`mlxtral.backends.aot`:
``NATIVE``, no numba or LLVM in the process) when this host has one, else through numba's JIT.
Without numba (not installed, or ``MLXTRAL_NO_NUMBA=1``) everything falls back to NumPy:
dequantize (in row chunks) and matmul. ``HAVE_NUMBA`` tells whether compiled kernels are live,
:func:`describe` which. ``warmup()`` loads every kernel (JIT: from numba's disk cache, so compiling
is paid once per machine) and starts the worker threads.
"""
from __future__ import annotations

import atexit
import importlib.util
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlxtral.backends import MAX_THREADS, aot, check_threads, default_threads
from mlxtral.backends.jit_memory import release_compiler_pages, release_linking_modules
from mlxtral.env import env_flag, env_float, env_int
from mlxtral.qtensor import QTensor

__all__ = [
    "HAVE_NUMBA",
    "linear",
    "linear_many",
    "linear_experts",
    "linear_twins",
    "swiglu",
    "swiglu_experts",
    "attend",
    "attend_one",
    "rms_norm",
    "set_num_threads",
    "get_num_threads",
    "MAX_THREADS",
    "set_exact",
    "warmup",
]

_KINDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "F32": 3, "F16": 4, "BF16": 5,
          "Q4_K": 6, "Q6_K": 7, "Q5_K": 8, "Q3_K": 9, "Q2_K": 10,  # K-quants: _kernels_kq.KQ_TYPES
          "Q5_0": 11, "Q5_1": 12, "IQ4_NL": 13, "IQ4_XS": 14}  # _kernels_iq.K_*
_FLOAT_KINDS = (3, 4, 5)  # the rest are block types: int8-quantized activations unless exact
# kinds taking q8_K activations (256-blocks), as llama.cpp's K-quant and IQ4_XS vec_dots; the other
# block types take q8_0 blocks (Q4_0, Q8_0, Q5_0, IQ4_NL) or q8_1 ones (Q4_1, Q5_1): quantize_x
_KQ_KINDS = frozenset((6, 7, 8, 9, 10))  # the K-quants
_Q8K_KINDS = _KQ_KINDS | {14}
_MODE_LINEAR, _MODE_SWIGLU = 0, 1

HAVE_NUMBA = False  # the compiled kernels are live (from the native library, or numba's JIT)
NATIVE: Any = None  # the ahead-of-time library (mlxtral.backends.aot) the kernels run from, if any
_NO_GROUP = np.zeros(1, dtype=np.uint8)  # activations not grouped (no K-quant tiles)


def _bind_native(lib: Any) -> None:
    global _nb, _kq, _tile, NATIVE, HAVE_NUMBA
    _nb, _kq, _tile = (lib.module(m) for m in ("_kernels_nb", "_kernels_kq", "_kernels_tile"))
    NATIVE, HAVE_NUMBA = lib, True


def _bind_jit() -> None:
    global _nb, _kq, _tile, HAVE_NUMBA
    try:
        import numba

        if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the kernels' intrinsics cannot run as Python
            raise ImportError("numba's JIT is disabled")
        from mlxtral.backends import _kernels_kq as _kq
        from mlxtral.backends import _kernels_nb as _nb
        from mlxtral.backends import _kernels_tile as _tile

        HAVE_NUMBA = True
    except ImportError:  # pragma: no cover - numba is a declared dependency
        _nb = None
    except OSError as e:  # llvmlite's library could not be mapped: under ulimit -v, one clear line
        from mlxtral.address_space import explain

        if (why := explain(e, "loading numba (llvmlite)")) is None:
            raise
        raise why from None


def use_native() -> bool:
    """Run the kernels from the native library from now on, if this host has one (the precompile
    child has just built it); whatever numba loaded stays, unused. -> whether they do."""
    global _pool
    if NATIVE is not None:
        return True
    lib = aot.load(retry=True) if HAVE_NUMBA else None
    if lib is None:
        return False
    with _pool_lock:
        if _pool is not None:  # its workers spin in the JIT's loop: new ones take the library's
            _pool.stop()
            _pool = None
        _bind_native(lib)
    return True


def describe() -> tuple[str, str]:
    """(how the kernels run: ``native`` (the library), ``numba`` (its JIT) or ``numpy``, their
    dot-product path: vnni, avx2, neondot, portable or numpy)."""
    if NATIVE is not None:
        return "native", NATIVE.isa
    if not HAVE_NUMBA:
        return "numpy", "numpy"
    if isinstance(_nb, _Deferred):
        _bind_jit()
    from mlxtral.backends import _kernels_ir

    return "numba", _kernels_ir.ISA


def step_module() -> Any:
    """The decode step's functions and constants (``_decode_step_nb``): the library's, or numba's."""
    if NATIVE is not None:
        return NATIVE.module("_decode_step_nb")
    from mlxtral.backends import _decode_step_nb

    return _decode_step_nb


class _Deferred:
    """Stands for numba's kernel modules until one is used: a run whose native library is still to
    be built (by the precompile child, before the first kernel runs) then never imports numba, and
    holds none of its memory once it runs from the library."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if isinstance(globals()[self.name], _Deferred):
            _bind_jit()
        return getattr(globals()[self.name], attr)


_nb: Any = None
_kq: Any = None
_tile: Any = None
if not env_flag("MLXTRAL_NO_NUMBA"):
    if (_lib := aot.load()) is not None:
        _bind_native(_lib)
    elif aot.to_build() and importlib.util.find_spec("numba") is not None:
        _nb, _kq, _tile = _Deferred("_nb"), _Deferred("_kq"), _Deferred("_tile")
        HAVE_NUMBA = True
    else:
        _bind_jit()

_exact = env_flag("MLXTRAL_EXACT_KERNELS")
_SPIN_MS = env_float("MLXTRAL_SPIN_MS", 20.0, 0.0, 1000.0, "milliseconds")


def set_exact(flag: bool) -> None:
    """Exact float32 activations (True) or int8-quantized activations as llama.cpp (False)."""
    global _exact
    _exact = bool(flag)


# ---- NumPy fallback -----------------------------------------------------------------------------
_NP_CHUNK_ROWS = 1024


def _linear_numpy(x: np.ndarray, w: QTensor) -> np.ndarray:
    out_dim = w.shape[0]
    if w.qtype == "F32":
        return np.ascontiguousarray(x @ np.asarray(w.data).T, dtype=np.float32)
    out = np.empty((x.shape[0], out_dim), dtype=np.float32)
    for r0 in range(0, out_dim, _NP_CHUNK_ROWS):
        r1 = min(r0 + _NP_CHUNK_ROWS, out_dim)
        sub = QTensor(w.qtype, (r1 - r0, w.shape[1]), w.data[r0:r1])
        out[:, r0:r1] = x @ sub.dequantize().T
    return out


def _silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    return (g / (1.0 + np.exp(-g)) * u).astype(np.float32, copy=False)


# ---- the thread pool ----------------------------------------------------------------------------
class _Pool:
    """Spinning worker threads running ``_nb.worker_loop``; see the module docstring."""

    def __init__(self, n_threads: int) -> None:
        # never more workers than the control block has sleep flags for, whatever the caller asks
        self.n_workers = max(0, min(int(n_threads) - 1, MAX_THREADS - 1, _nb.MAX_WORKERS))
        self.ctl = np.zeros(_nb.CTL_SIZE, dtype=np.int64)
        self.spin_iters = int(_SPIN_MS * 1000 * _pauses_per_us())
        self.events = [threading.Event() for _ in range(self.n_workers)]
        self.threads = []
        if self.n_workers:
            # Compile (or load) the workers' loop here, not in the first worker: a worker still
            # inside LLVM when the process exits took it down (a crash at exit, and no cache entry
            # written, so every short run after a kernel change or on a fresh install did the same)
            _nb.worker_loop(self.ctl, -1, 0)  # a worker id below 0 returns at once
        for wid in range(self.n_workers):
            t = threading.Thread(target=self._run, args=(wid,), daemon=True, name=f"mlxtral-kernel-{wid}")
            try:
                t.start()
            except RuntimeError as e:  # "can't start new thread": no stack left under ulimit -v
                self.stop()  # the workers already started end; none is left waiting
                from mlxtral.address_space import explain

                raise (explain(e, "starting the kernel threads") or e) from None
            self.threads.append(t)

    def _run(self, wid: int) -> None:
        ev = self.events[wid]
        while True:
            if _nb.worker_loop(self.ctl, wid, self.spin_iters):
                return
            ev.wait()
            ev.clear()

    def wake(self) -> None:
        ctl = self.ctl
        if ctl[_nb.CTL_PARK]:
            ctl[_nb.CTL_PARK] = 0
        for wid in range(self.n_workers):  # scalar reads: cheaper than a slice + any() per call
            if ctl[_nb.CTL_SLEEP + wid]:
                ctl[_nb.CTL_SLEEP + wid] = 0
                self.events[wid].set()

    def stop(self) -> None:
        self.ctl[_nb.CTL_QUIT] = 1
        for ev in self.events:
            ev.set()
        for t in self.threads:
            t.join(timeout=1.0)


def _pauses_per_us() -> float:
    import time

    n = 20000
    _nb.spin_pauses(10)
    t0 = time.perf_counter()
    _nb.spin_pauses(n)
    dt = max(time.perf_counter() - t0, 1e-6)
    return n / (dt * 1e6)


_pool: _Pool | None = None
_pool_lock = threading.Lock()
_run_lock = threading.Lock()  # one job at a time (the control block is shared)
_n_threads: int | None = None


def get_num_threads() -> int:
    """The threads the kernels use (read per call: a decode step makes thousands of these)."""
    global _n_threads
    if _n_threads is None:
        _n_threads = default_threads()
    return _n_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (the caller plus ``n - 1`` workers) from the next call on; 1 to
    :data:`MAX_THREADS`, else :class:`UsageError`."""
    global _n_threads, _pool
    n = check_threads(n)
    with _pool_lock:
        _n_threads = n
        if _pool is not None and _pool.n_workers != n - 1:
            _pool.stop()
            _pool = None


def _get_pool() -> _Pool:
    global _pool
    p = _pool
    if p is None:
        with _pool_lock:
            if _pool is None:
                _pool = _Pool(get_num_threads())
            p = _pool
    else:
        p.wake()
    return p


@atexit.register
def _shutdown() -> None:
    if _pool is not None:
        _pool.stop()


# ---- job building -------------------------------------------------------------------------------
def _check(x: np.ndarray, w: QTensor) -> np.ndarray:
    if w.ndim != 2:
        raise ValueError(f"linear needs a 2-D weight, got shape {w.shape}")
    if w.qtype not in _KINDS:
        raise ValueError(f"no kernel for {w.qtype} weights")
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {x.shape} does not match weight {w.shape}")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return x


def _wdata(w: QTensor) -> np.ndarray:
    d = w.data
    if w.qtype == "F16":
        d = d.view(np.uint16)
    if d.ndim != 2 or d.strides[1] != d.itemsize or d.strides[0] < d.shape[1] * d.itemsize:
        d = np.ascontiguousarray(d)  # rows may lie apart (a column window), each row's bytes not
    return d


_winfo_cache: dict[int, tuple] = {}


def _winfo(w: QTensor, T: int) -> tuple[int, np.ndarray, int, int]:
    """(kind, raw data as the kernels read it, rows per work item, the data's address), cached per
    weight: the Python side of a decode step is a few dozen of these per layer."""
    key = id(w)
    hit = _winfo_cache.get(key)
    if hit is None or hit[0] is not w or hit[4] != get_num_threads():
        wd = _wdata(w)
        # rows per item for 1 token, 2 .. _STREAM_T (tiles start at 2 or past _STREAM_T, so 2
        # stands for them all) and more
        chunks = (_chunk_rows(w, 1), _chunk_rows(w, 2), _chunk_rows(w, _STREAM_T + 1))
        hit = (w, _KINDS[w.qtype], wd, chunks, get_num_threads(), wd.ctypes.data)
        if len(_winfo_cache) > 65536:
            _winfo_cache.clear()
        _winfo_cache[key] = hit  # holds w, so the id cannot be reused while cached
    return hit[1], hit[2], hit[3][0 if T == 1 else (1 if T <= _STREAM_T else 2)], hit[5]


class _Job:
    """A table of tasks sharing one pool synchronisation."""

    def __init__(self, n_tasks: int) -> None:
        self.table = np.empty((n_tasks, _nb.F_SIZE), dtype=np.int64)  # fill_task writes every field
        self.keep: list = []  # keeps every buffer alive while the job runs
        self.n = 0
        self.nchunks = 0
        self._xcache: dict[tuple[int, bool, int], tuple] = {}

    def add(self, x: np.ndarray, w: QTensor, out: np.ndarray, w2: QTensor | None = None) -> None:
        T = x.shape[0]
        kind, wd, ch, wa = _winfo(w, T)
        quant = kind not in _FLOAT_KINDS and not _exact
        q8k = kind in _Q8K_KINDS  # q8_K superblocks, or q8_0 / q8_1 blocks with the kind's offset
        key = (id(x), quant, -1 if q8k else _nb.X_OFFSETS[kind])
        acts = self._xcache.get(key)
        if acts is None:
            if quant and q8k:
                q8 = _kq.quantize_q8k(x)
                acts = (*q8, _tile.kq_group_acts(*q8))  # grouped for the tiles when they will run
            else:
                acts = (*_nb.prep_x(x, quant, kind), _NO_GROUP)
            self._xcache[key] = acts
        wd2, wa2 = _winfo(w2, T)[1::2] if w2 is not None else (wd, wa)
        self.keep.append((x, acts, wd, wd2, out))
        self.nchunks = _nb.fill_task(self.table, self.n, kind, w2 is not None, quant, wa, wa2, wd.strides[0],
                                     wd.shape[0], w.shape[1], x, *acts, out, ch, self.nchunks)
        self.n += 1

    def add_twin(self, x: np.ndarray, w: QTensor, out: np.ndarray) -> None:
        """:meth:`add` a task whose rows run beside the same rows of the task added just before (a
        cut product's second half: ``_nb.pair_task``)."""
        first = self.nchunks
        self.add(x, w, out)
        self.nchunks = _nb.pair_task(self.table, self.n - 1, first)

    def run(self) -> None:
        if self.n == 0:
            return
        pool = _get_pool()
        with _run_lock:
            _nb.execute(pool.ctl, self.table[: self.n], self.nchunks)


def _run_one(x: np.ndarray, w: QTensor, w2: QTensor | None) -> np.ndarray:
    T = x.shape[0]
    out = np.empty((T, w.shape[0]), dtype=np.float32)
    kind, wd, ch, wa = _winfo(w, T)
    if kind in _Q8K_KINDS:  # K-quants, IQ4_XS: their own activation type, through a one-task job
        job = _Job(1)
        job.add(x, w, out, w2)
        job.run()
        return out
    wa2 = _winfo(w2, T)[3] if w2 is not None else wa
    pool = _get_pool()
    with _run_lock:
        quant = kind not in _FLOAT_KINDS and not _exact
        return _nb.run_one(pool.ctl, kind, w2 is not None, quant, wa, wa2, wd.strides[0], wd.shape[0],
                           w.shape[1], x, out, ch)


_TILE = 16  # rows of a Q4_0 / K-quant tile (_kernels_tile.ROWS: a test checks)
_CHUNK_BYTES_MAX = env_int("MLXTRAL_CHUNK_KB_MAX", 4096, 16, 1 << 20, "KB") * 1024
_CHUNKS_PER_THREAD = env_int("MLXTRAL_CHUNKS_PER_THREAD", 4, 1, 64)


# tokens up to which the rows stream by in long items, as for decode: one pass of Q4_0's dot16 on
# AVX2 (8 tokens), two of the other dots' 4 (measured on AVX2 against 16 KB items: 3584 x 1024
# Q4_0 at 2 / 4 / 8 tokens 90 / 134 / 232 us against 126 / 213 / 370; Q8_0, Q4_K 2-5% at 6-8)
_STREAM_T = 8


def _tiles(w: QTensor, T: int) -> bool:
    """Whether T tokens of ``w`` run in repacked 16-row tiles (``_kernels_tile``)."""
    if w.qtype == "Q4_0":
        return T >= _tile.TILE_MIN_T
    return _KINDS[w.qtype] in _KQ_KINDS and _tile.kq_tiles(T)


def _chunk_rows(w: QTensor, T: int) -> int:
    """Rows per work item. Decode, and a few tokens (up to ``_STREAM_T``) dotted with each row
    as it streams by: long sequential runs of rows keep the hardware prefetcher
    streaming (16 KB items ran at ~11 GB/s, 256 KB items at ~14), so a matrix is cut into
    ``_CHUNKS_PER_THREAD`` items per thread (16 KB .. 4 MB each). Prefill (more tokens, or tiles):
    ~16 KB, which stays in L1 while every token passes over it."""
    row_bytes = w.data.nbytes // max(1, w.shape[0])  # a row's own bytes (a column window's too)
    row_bytes = max(1, row_bytes)
    prefill = T > _STREAM_T or (T > 1 and HAVE_NUMBA and _tiles(w, T))
    if prefill:
        rows = max(8, min(64, 16384 // row_bytes))
    else:
        target = min(_CHUNK_BYTES_MAX, max(16384, w.nbytes // (_CHUNKS_PER_THREAD * get_num_threads())))
        rows = max(4, target // row_bytes)
    if w.qtype == "Q4_0":  # whole 16-row tiles (_kernels_tile.ROWS); prefill: two tiles an item
        rows = 2 * _TILE if prefill else max(_TILE, rows // _TILE * _TILE)
    elif prefill and _KINDS[w.qtype] in _KQ_KINDS:  # K-quant prefill: tiles too (from KQ_TILE_MIN_T)
        rows = 2 * _TILE
    return rows


# ---- public API ---------------------------------------------------------------------------------
def linear(x: np.ndarray, w: QTensor) -> np.ndarray:
    """``x @ dequant(w).T``: x float32 [T, in], w [out, in] -> float32 [T, out]."""
    x = _check(x, w)
    if not HAVE_NUMBA:
        return _linear_numpy(x, w)
    T = x.shape[0]
    if T == 0:
        return np.empty((0, w.shape[0]), dtype=np.float32)
    return _run_one(x, w, None)


def linear_many(x: np.ndarray, ws: Sequence[QTensor]) -> list[np.ndarray]:
    """``[linear(x, w) for w in ws]`` in one job (e.g. q, k, v); x is quantized once."""
    return linear_experts([x] * len(ws), ws)


def _decode(xs: Sequence[np.ndarray], ws: Sequence[QTensor], ups: Sequence[QTensor] | None = None
            ) -> list[np.ndarray] | None:
    """A decode step's job (one token a task; every weight, and every ``ups`` twin, of one kind)
    in one numba call, ``_nb.run_decode``: the tasks, rows and
    bits of the ``_Job`` path without its per-task Python. None when it does not apply."""
    kind = _KINDS[ws[0].qtype]
    x0 = xs[0]
    same = True
    for x in xs:
        if x.shape[0] != 1 or x.shape[1] != x0.shape[1]:
            return None
        same = same and x is x0
    rows = []
    total = 0
    for i, w in enumerate(ws):
        k, wd, ch, wa = _winfo(w, 1)
        wa2 = wa
        if ups is not None:
            u = ups[i]
            if u.qtype != w.qtype or u.shape != w.shape:
                return None
            wa2 = _winfo(u, 1)[3]
        if k != kind:
            return None
        rows.append((0 if same else i, wa, wa2, wd.strides[0], wd.shape[0], ch))
        total += wd.shape[0]
    X = x0 if same else np.concatenate(xs)  # [R, in]
    out = np.empty((1, total), dtype=np.float32)
    pool = _get_pool()
    with _run_lock:
        _nb.run_decode(pool.ctl, X, kind not in _FLOAT_KINDS and not _exact, kind, ups is not None,
                       np.array(rows, dtype=np.int64), out[0])
    outs = []
    e = 0
    for r in rows:
        outs.append(out[:, e : e + r[4]])
        e += r[4]
    return outs


def linear_experts(xs: Sequence[np.ndarray], ws: Sequence[QTensor]) -> list[np.ndarray]:
    """``[linear(x, w) for x, w in zip(xs, ws)]`` in one job (the down projections of the MoE)."""
    if len(xs) != len(ws):
        raise ValueError("linear_experts needs one x per weight")
    xs = [_check(x, w) for x, w in zip(xs, ws, strict=True)]
    if not HAVE_NUMBA:
        return [_linear_numpy(x, w) for x, w in zip(xs, ws, strict=True)]
    if ws and (fast := _decode(xs, ws)) is not None:
        return fast
    outs: list[np.ndarray] = []
    job = _Job(len(ws))
    for x, w in zip(xs, ws, strict=True):
        out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        _add_linear(job, x, w, out)
        outs.append(out)
    job.run()
    return outs


def linear_twins(xs: Sequence[np.ndarray], ws: Sequence[QTensor], xs2: Sequence[np.ndarray],
                 ws2: Sequence[QTensor]) -> list[np.ndarray]:
    """``[x @ w.T + x2 @ w2.T ...]`` in one job, the two products of each term twin tasks (their
    same rows in one work item): a cut down projection's two halves (``ops.down_experts``), each
    summed as alone, then added in float32."""
    if not (len(xs) == len(ws) == len(xs2) == len(ws2)):
        raise ValueError("linear_twins needs one x per weight")
    xs = [_check(x, w) for x, w in zip(xs, ws, strict=True)]
    xs2 = [_check(x, w) for x, w in zip(xs2, ws2, strict=True)]
    if not HAVE_NUMBA:
        return [_linear_numpy(x, w) + _linear_numpy(x2, w2)
                for x, w, x2, w2 in zip(xs, ws, xs2, ws2, strict=True)]
    job = _Job(2 * len(ws))
    pairs = []
    for x, w, x2, w2 in zip(xs, ws, xs2, ws2, strict=True):
        if w.shape[0] != w2.shape[0] or x.shape[0] != x2.shape[0] or _KINDS[w.qtype] != _KINDS[w2.qtype]:
            raise ValueError(f"twins {w.qtype}{w.shape} and {w2.qtype}{w2.shape} differ")
        lo = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        hi = np.empty_like(lo)
        if x.shape[0] > _STREAM_T:  # prefill: each half's tiles on their own (measured faster)
            job.add(x, w, lo)
            job.add(x2, w2, hi)
        elif x.shape[0] > 0:  # a few tokens: a row's halves read together
            job.add(x, w, lo)
            job.add_twin(x2, w2, hi)
        pairs.append((lo, hi))
    job.run()
    return [np.add(lo, hi, out=lo) for lo, hi in pairs]  # lo + hi, in lo's memory


def swiglu(x: np.ndarray, w_gate: QTensor, w_up: QTensor) -> np.ndarray:
    """``silu(x @ gate.T) * (x @ up.T)``: [T, in] -> [T, ff], both products in one pass."""
    if not HAVE_NUMBA or x.shape[0] == 0:
        return swiglu_experts([x], [w_gate], [w_up])[0]
    x = _check(x, w_gate)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"gate {w_gate.qtype}{w_gate.shape} and up {w_up.qtype}{w_up.shape} differ")
    if w_gate.qtype != w_up.qtype:  # mixed-type files (e.g. Q4_K_M-style): two tasks, then SiLU
        return swiglu_experts([x], [w_gate], [w_up])[0]
    return _run_one(x, w_gate, w_up)


def swiglu_experts(
    xs: Sequence[np.ndarray], gates: Sequence[QTensor], ups: Sequence[QTensor]
) -> list[np.ndarray]:
    """``[swiglu(x, g, u) ...]`` for every selected expert in one job (the MoE's first half)."""
    if not (len(xs) == len(gates) == len(ups)):
        raise ValueError("swiglu_experts needs one x per gate and up weight")
    outs: list[np.ndarray] = []
    checked = []
    for x, g, u in zip(xs, gates, ups, strict=True):
        x = _check(x, g)
        if g.shape != u.shape:
            raise ValueError(f"gate {g.qtype}{g.shape} and up {u.qtype}{u.shape} differ")
        if u.qtype not in _KINDS:
            raise ValueError(f"no kernel for {u.qtype} weights")
        checked.append(x)
    if not HAVE_NUMBA:
        return [
            _silu_mul(_linear_numpy(x, g), _linear_numpy(x, u))
            for x, g, u in zip(checked, gates, ups, strict=True)
        ]
    if gates and (fast := _decode(checked, gates, ups)) is not None:
        return fast
    job = _Job(2 * len(gates))
    split: list[tuple[int, np.ndarray, np.ndarray]] = []  # gate and up of different types
    for x, g, u in zip(checked, gates, ups, strict=True):
        if g.qtype != u.qtype:
            og = np.empty((x.shape[0], g.shape[0]), dtype=np.float32)
            ou = np.empty_like(og)
            _add_linear(job, x, g, og)
            _add_linear(job, x, u, ou)
            split.append((len(outs), og, ou))
            outs.append(og)
            continue
        out = np.empty((x.shape[0], g.shape[0]), dtype=np.float32)
        if x.shape[0] > 0:
            job.add(x, g, out, w2=u)
        outs.append(out)
    job.run()
    for i, og, ou in split:
        outs[i] = _silu_mul(og, ou)
    return outs


def _add_linear(job: _Job, x: np.ndarray, w: QTensor, out: np.ndarray) -> None:
    """``out = x @ dequant(w).T`` as a task of ``job``."""
    if x.shape[0] > 0:
        job.add(x, w, out)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, window: int | None = None) -> np.ndarray:
    """Causal attention of the queries at positions ``p0 .. p0 + T - 1``: q [T, H, hd] float32, k/v
    the cache [KV, ctx, hd] (float32 or float16, read in place) already holding positions
    ``0 .. p0 + T - 1`` -> [T, H * hd] float32. Every query row, whatever T, goes through the same
    per-row kernel (``_kernels_nb.attend_one``): prefill and decode compute one arithmetic."""
    T, H, hd = q.shape
    S = p0 + T
    _check_fits(T, p0, k)
    if not HAVE_NUMBA:
        from mlxtral.backends.ops import attention_kv

        lo = max(0, p0 + 1 - window) if window is not None else 0  # the first query's first key
        return attention_kv(q, k[:, lo:S].astype(np.float32, copy=False),
                            v[:, lo:S].astype(np.float32, copy=False), p0 - lo, window)
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty(q.shape, dtype=np.float32)  # [T, H, hd]
    win = _window(window)
    if 1 < T * k.shape[0] <= _nb.MAX_CHUNKS and _pooled_cache(k, v):
        # every thread: one work item per (query row, KV head), each the serial path's arithmetic
        _attend_job([(q, k, v, p0, out)], win)
        return out.reshape(T, H * hd)
    if k.dtype == np.float16:  # read the half cache in place (F16C conversion in the loops)
        _nb.attend_f16(q, k.view(np.uint16), v.view(np.uint16), p0, win, out)
    elif k.dtype == np.float32:
        _nb.attend(q, k, v, p0, win, out)
    else:
        k, v = k[:, :S].astype(np.float32), v[:, :S].astype(np.float32)
        _nb.attend(q, k, v, p0, win, out)
    return out.reshape(T, H * hd)


def _check_fits(T: int, p0: int, k: np.ndarray) -> None:
    if p0 + T > k.shape[1] or p0 < 0:
        raise ValueError(f"queries at {p0}..{p0 + T - 1} do not fit a cache of {k.shape[1]} positions")


def _window(window: int | None) -> int:
    """The kernels' sliding window: 0 for none."""
    return int(window) if window is not None and window > 0 else 0


def _pooled_cache(k: np.ndarray, v: np.ndarray) -> bool:
    """Whether attention over the cache k/v runs on the pool (it reads the cache by address)."""
    return (get_num_threads() > 1 and k.dtype in (np.float32, np.float16) and k.dtype == v.dtype
            and k.flags.c_contiguous and v.flags.c_contiguous and k.shape == v.shape)


def _attend_job(items: list[tuple], win: int) -> None:
    """One pool job: for each (q [T, H, hd], k, v, p0, out [T, H, hd]), its (query row, KV head)
    work items, each the serial path's arithmetic."""
    table = np.empty((len(items), _nb.F_SIZE), dtype=np.int64)
    n = 0
    for i, (q, k, v, p0, out) in enumerate(items):
        f16 = k.dtype == np.float16
        kk, vv = (k.view(np.uint16), v.view(np.uint16)) if f16 else (k, v)
        n = _nb.fill_attend_row(table, i, n, q, kk, vv, p0, win, out, f16)
    pool = _get_pool()
    with _run_lock:
        _nb.execute(pool.ctl, table, n)


def attend_runs(runs: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]],
                window: int | None = None) -> list[np.ndarray]:
    """``attend`` for several sequences, each (q [T, H, hd], its cache k, v, p0): one pool job for
    all (each work item is ``attend``'s, so each sequence's bits are its own call's) -> [T, H * hd]
    per sequence."""
    pooled = (HAVE_NUMBA and len(runs) > 1 and all(_pooled_cache(k, v) for _, k, v, _ in runs)
              and sum(q.shape[0] * k.shape[0] for q, k, _, _ in runs) <= _nb.MAX_CHUNKS)
    if not pooled:
        return [attend(q, k, v, p0, window) for q, k, v, p0 in runs]
    items = []
    for q, k, v, p0 in runs:
        _check_fits(q.shape[0], p0, k)
        q = np.ascontiguousarray(q, dtype=np.float32)
        items.append((q, k, v, p0, np.empty(q.shape, dtype=np.float32)))
    _attend_job(items, _window(window))
    return [out.reshape(out.shape[0], -1) for *_, out in items]


def attend_one(q: np.ndarray, k: np.ndarray, v: np.ndarray, S: int, window: int | None = None) -> np.ndarray:
    """Decode attention for the query at position ``S - 1``: q [H, hd] float32, k/v the cache
    [KV, ctx, hd] -> [H * hd] float32 (``attend`` with one query row)."""
    return attend(q[None], k, v, S - 1, window).reshape(-1)


def top_k_softmax(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Router logits [T, E] float32 -> (the top ``k`` experts [T, k] int64, their softmax weights
    [T, k] float32) in one numba call (``_kernels_nb.top_k_softmax``); None without numba."""
    if not HAVE_NUMBA or logits.ndim != 2 or logits.dtype != np.float32 or not 0 < k <= logits.shape[1]:
        return None
    T = logits.shape[0]
    idx, w = np.empty((T, k), dtype=np.int64), np.empty((T, k), dtype=np.float32)
    _nb.top_k_softmax(np.ascontiguousarray(logits), k, idx, w)
    return idx, w


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, n] / rms(x) * weight, float32, in one numba call (NumPy without numba)."""
    if not HAVE_NUMBA or x.ndim != 2 or x.dtype != np.float32 or weight.dtype != np.float32:
        ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
        return (x * (1.0 / np.sqrt(ms + np.float32(eps))) * weight).astype(np.float32, copy=False)
    out = np.empty(x.shape, dtype=np.float32)
    return _nb.rms_norm(np.ascontiguousarray(x), np.ascontiguousarray(weight), float(eps), out)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rotary embedding in place: x [T, heads, hd] float32 (C-contiguous) at positions pos [T]
    int64, each below cos / sin's [P, rd/2] rows (the caller checks: the kernel reads unchecked)."""
    return _nb.rope(x, cos, sin, pos)


_warmed = False


def warmup() -> None:
    """Compile (or load from numba's disk cache) every kernel and start the worker threads, once
    per process; then give back what loading left behind (:mod:`mlxtral.backends.jit_memory`:
    the parsed linking modules, LLVM's code pages)."""
    global _warmed
    if not HAVE_NUMBA or _warmed:
        return
    _load_all()
    _warmed = True
    if NATIVE is not None:  # nothing to load, no LLVM in the process
        return
    release_linking_modules(_our_dispatchers())
    release_compiler_pages()


def _our_dispatchers() -> list:
    """Every numba dispatcher in mlxtral's loaded modules."""
    import sys

    from numba.core.dispatcher import Dispatcher

    found: dict[int, object] = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "mlxtral" or name.startswith("mlxtral.")):
            continue
        for v in list(vars(mod).values()):
            if isinstance(v, Dispatcher):
                found[id(v)] = v
    return list(found.values())


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.setflags(write=False)
    return a


def _load_all() -> None:
    rng = np.random.default_rng(0)
    wf = rng.standard_normal((8, 64)).astype(np.float32)
    tensors = [QTensor.from_float(wf), QTensor.from_float(wf.astype(np.float16))]
    tensors.append(QTensor("BF16", wf.shape, (wf.view(np.uint32) >> 16).astype(np.uint16)))
    for t, block_bytes in (("Q4_0", 18), ("Q4_1", 20), ("Q8_0", 34), ("Q5_0", 22), ("Q5_1", 24),
                           ("IQ4_NL", 18)):  # zero blocks: only compiling
        tensors.append(QTensor(t, wf.shape, np.zeros((8, 2 * block_bytes), dtype=np.uint8)))
    # memory-mapped weights are read-only arrays, a separate numba specialization of each kernel
    tensors += [QTensor(t.qtype, t.shape, _read_only(t.data)) for t in tensors]
    for norm_w in (np.ones(64, np.float32), _read_only(np.ones(64, np.float32))):
        rms_norm(rng.standard_normal((2, 64)).astype(np.float32), norm_w, 1e-5)
    kc = rng.standard_normal((2, 8, 16)).astype(np.float32)
    q4 = rng.standard_normal((4, 16)).astype(np.float32)
    top_k_softmax(rng.standard_normal((2, 8)).astype(np.float32), 2)
    rope(q4.reshape(1, 4, 16).copy(), kc[0, :4, :8].copy(), kc[1, :4, :8].copy(), np.zeros(1, np.int64))
    for c in (kc, kc.astype(np.float16)):  # every thread (the pool's items), and the serial path
        attend_one(q4, c, c, 5)
        bits = c.view(np.uint16) if c.dtype == np.float16 else c
        serial = _nb.attend_f16 if c.dtype == np.float16 else _nb.attend
        serial(q4[None], bits, bits, 4, 0, np.empty((1, 4, 16), dtype=np.float32))
    kq = [QTensor(t, (8, 256), np.zeros((8, b), dtype=np.uint8)) for t, b in
          (("Q4_K", 144), ("Q6_K", 210), ("Q5_K", 176), ("Q3_K", 110), ("Q2_K", 84), ("IQ4_XS", 136))]
    kq += [QTensor(t.qtype, t.shape, _read_only(t.data)) for t in kq]
    for T in (1, 2):
        xk = rng.standard_normal((T, 256)).astype(np.float32)
        for w in kq:
            linear(xk, w)
            swiglu(xk, w, w)
            linear_experts([xk, xk], [w, w])
            swiglu_experts([xk, xk], [w, w], [w, w])
    for T in (1, 2):
        x = rng.standard_normal((T, 64)).astype(np.float32)
        for w in tensors:
            linear(x, w)
            swiglu(x, w, w)
            linear_many(x, [w, w])  # multi-task jobs: another entry point
            linear_experts([x, x], [w, w])
            linear_twins([x], [w], [x], [w])  # a cut down projection's job
            swiglu_experts([x, x], [w, w], [w, w])
