"""Arrays whose untouched pages stay unbacked: a KV cache sized for a long context costs RAM only
for the positions written.

``np.zeros`` maps a large array lazily, but NumPy advises the kernel to back arrays of 4 MB and
more with transparent huge pages (``MADV_HUGEPAGE``), so the first write into any 2 MB stretch
makes all of it resident. A cache laid out ``[L, KV, ctx, hd]`` has one such stretch per layer and
KV head at every context length: writing the first position of each made the whole cache resident
(the bench model's 4096-position float32 cache: 64 MB after a 128-token prompt, against the 4 MB
its positions hold). :func:`lazy_zeros` takes the advice back (``MADV_NOHUGEPAGE``) before
anything is written, so the cache fills page by page. Linux only; elsewhere plain ``np.zeros``.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

_MADV_NOHUGEPAGE = 15
_HUGE_ADVISED = 4 << 20  # NumPy's threshold for MADV_HUGEPAGE


def madvise_fn() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's ``madvise(addr, length, advice)``, or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def lazy_zeros(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """``np.zeros(shape, dtype)`` whose pages become resident one by one as they are written."""
    a = np.zeros(shape, dtype=dtype)
    if not sys.platform.startswith("linux") or a.nbytes < _HUGE_ADVISED:
        return a
    madvise = madvise_fn()
    if madvise is not None:
        page = mmap.PAGESIZE
        lo = -(-a.ctypes.data // page) * page  # the pages wholly inside the array
        hi = (a.ctypes.data + a.nbytes) // page * page
        if hi > lo:
            madvise(lo, hi - lo, _MADV_NOHUGEPAGE)  # advice only: a refusal changes nothing
    return a
