"""The compute backends (NumPy with numba kernels, MLX).

Importing this package checks ``NUMBA_NUM_THREADS`` before anything imports numba: numba itself
raises a traceback at import on 0 or a negative value, and accepts any huge one (the kernels'
thread pool would then try to start that many threads).
"""
from __future__ import annotations

import numbers

from mlxtral.env import env_int

MAX_THREADS = 256  # the kernels' thread pool: the calling thread plus at most 255 workers


def default_threads() -> int:
    """``NUMBA_NUM_THREADS`` (checked: 1 to :data:`MAX_THREADS`), else every core (at most that)."""
    import os

    cores = max(1, min(os.cpu_count() or 1, MAX_THREADS))
    return env_int("NUMBA_NUM_THREADS", cores, 1, MAX_THREADS, "threads")


def check_threads(n: object, name: str = "threads") -> int:
    """``n`` as a thread count from 1 to :data:`MAX_THREADS`; :class:`UsageError` naming ``name``
    otherwise (``set_num_threads`` and ``--threads`` alike)."""
    from mlxtral.errors import UsageError

    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise UsageError(f"{name} must be a whole number from 1 to {MAX_THREADS}, got {type(n).__name__}")
    if not 1 <= n <= MAX_THREADS:
        shown = str(n) if len(str(n)) <= 40 else str(n)[:40] + "..."
        raise UsageError(f"{name} must be from 1 to {MAX_THREADS} (the kernels' thread pool holds at most "
                         f"{MAX_THREADS} threads), got {shown}")
    return int(n)


MLX_DTYPES = ("float16", "bfloat16", "float32")  # what the MLX backend computes in


def mlx_dtype_name(dtype: object) -> str:
    """``dtype`` ("float16", "BFloat16", ``mx.float32``...) as one of :data:`MLX_DTYPES`;
    :class:`UsageError` naming the choices otherwise. No MLX import: NumPy runs check it too."""
    from mlxtral.display import show
    from mlxtral.errors import UsageError

    key = str(dtype).lower().removeprefix("mlx.core.")
    if key not in MLX_DTYPES:
        raise UsageError(f"unknown dtype {show(dtype)}: choose one of {', '.join(MLX_DTYPES)} (the MLX "
                         "backend's compute dtype)")
    return key


default_threads()  # before numba's import reads the variable
