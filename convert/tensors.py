"""Output plans shared by the writers: which internal tensors make up each output tensor,
its shape and type, and the per-tensor report (bytes written, relative RMSE)."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from mlxtral.config import ModelArgs
from mlxtral.errors import FormatError, UsageError
from mlxtral.qtensor import QTensor
from mlxtral.quant.ggml import rmse_from_terms, squared_error_terms

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


def source_f32(t: QTensor) -> np.ndarray:
    """One source tensor as float32 (a fresh array of its own; the source map is only read)."""
    x = t.dequantize()
    return np.ascontiguousarray(x, dtype=np.float32)


def convert_threads() -> int:
    """Worker threads for quantization: ``MLXTRAL_CONVERT_THREADS`` or the CPU count (at most 8).
    NumPy releases the GIL inside its array operations, so row ranges convert in parallel."""
    env = os.environ.get("MLXTRAL_CONVERT_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise UsageError(f"MLXTRAL_CONVERT_THREADS must be an integer, got {env!r}") from None
    return max(1, min(os.cpu_count() or 1, 8))


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
PARALLEL_MIN_ELEMS = 1 << 20  # smaller tensors are converted on the calling thread


def row_ranges(n_rows: int, row_len: int, threads: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges for ``threads`` workers: 4 per worker (balance), none tiny."""
    if threads <= 1 or n_rows * row_len < PARALLEL_MIN_ELEMS or n_rows < 2:
        return [(0, n_rows)]
    parts = min(n_rows, threads * 4)
    bounds = np.linspace(0, n_rows, parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def map_rows(fn: Callable[[int, int], T], n_rows: int, row_len: int) -> list[T]:
    """``fn(lo, hi)`` over row ranges, on a shared thread pool when the tensor is big enough."""
    global _POOL, _POOL_SIZE
    threads = convert_threads()
    ranges = row_ranges(n_rows, row_len, threads)
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    if _POOL is None or _POOL_SIZE != threads:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL, _POOL_SIZE = ThreadPoolExecutor(threads, thread_name_prefix="mlxtral-convert"), threads
    return list(_POOL.map(lambda r: fn(*r), ranges))


def source_rows(t: QTensor) -> np.ndarray:
    """The stored data of ``t`` as 2-D ``[rows, stored row]`` (a view)."""
    d = np.asarray(t.data)
    return d.reshape(-1, d.shape[-1]) if d.ndim != 1 else d.reshape(1, -1)


def rows_f32(t: QTensor, data_rows: np.ndarray) -> np.ndarray:
    """Some stored rows of ``t`` as float32 ``[rows, n]``."""
    from mlxtral.quant import dequantize_blocks

    n = t.shape[-1] if t.shape else 1
    return dequantize_blocks(data_rows, t.qtype, (data_rows.shape[0], n))


def encode_gguf(t: QTensor, qtype: str, report: TensorReport) -> np.ndarray:
    """Source tensor -> stored data of GGUF ``qtype``; adds its error to ``report``.

    Same type in and out: the raw bytes are passed through unchanged (no requantization loss).
    Otherwise row ranges are dequantized, quantized and measured in parallel (:func:`map_rows`).
    """
    from mlxtral.quant.ggml import dequantize, quantize, quantized_shape

    report.src_qtype = report.src_qtype or t.qtype
    if t.qtype == qtype:
        report.copied = True
        return np.asarray(t.data)
    odtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(qtype, np.uint8)
    out = np.empty(quantized_shape(tuple(t.shape), qtype), dtype=odtype)
    src = source_rows(t)
    orows = out.reshape(src.shape[0], -1)

    def work(lo: int, hi: int) -> tuple[float, float]:
        x = rows_f32(t, src[lo:hi])  # [rows, n] float32
        quantize(x, qtype, out=orows[lo:hi])
        if qtype == "F32":
            return 0.0, 0.0
        return squared_error_terms(x, dequantize(orows[lo:hi], qtype))

    for num, den in map_rows(work, src.shape[0], t.shape[-1] if t.shape else 1):
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
