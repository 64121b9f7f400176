"""The CPU kernels compiled in a child process, once per install, not in the process that runs.

numba compiles the kernels at their first use and keeps them in its disk cache. Compiling is the
costliest thing a run ever does, and its cost stays: measured on the demo model (Xeon, numba
0.68), a first run's peak RSS was 1.44 GB against 0.58 GB with the cache warm (LLVM's heap is not
given back), and its address space peaked at 2.0 GB, so under a ``ulimit -v`` that a warm run
fits, LLVM aborted the process (a signal, no line). On a 16 GB laptop running Mixtral that extra
gigabyte would sit beside the model for the whole session.

So when the cache is cold, :func:`ensure_compiled` runs ``python -m mlxtral.backends.precompile``:
the child builds a tiny random model, loads every kernel (``kernels.warmup``: model-independent,
every block kind) and compiles both decode steps (one sequence and batched; float32 and float16
KV caches), which fills the cache and exits, taking its memory with it. The parent then loads
what the child wrote, as every later run does. What a model needs beyond that (an expert-parallel
rank's steps) still compiles in-process, as before.

Cold means: numba's index for the one-sequence decode step holds no entry for this CPU (numba keys
its entries on the CPU's name and features, and drops an index whose source changed); an index
numba cannot read is one line naming the cache (numba raises on it at every load).

The child runs ``python -P`` (never the working directory on ``sys.path``: a ``numpy.py`` there
would run) and dies with its parent (``PR_SET_PDEATHSIG``). A child that dies of a signal or a
memory error under a ``ulimit -v`` below twice what compiling needs ends the run with one line
(LLVM's abort would end this process the same way, with none); any other failure leaves the
compiling to this process, as before, which reports it in its own words.
``MLXTRAL_NO_PRECOMPILE=1`` turns it off.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.env import env_flag
from mlxtral.errors import MlxtralError

_done = False  # this process asked a child once (whatever came of it): never twice
NOTICE = "compiling the CPU kernels, once after an install (about two minutes)..."


def _say(line: str) -> None:
    sys.stderr.write(f"mlxtral: {line}\n")
    sys.stderr.flush()


notice: Callable[[str], None] = _say  # how the wait is announced (the CLI shows it its own way)


def damaged_cache(where: str, e: BaseException) -> MlxtralError:
    """The one line for a numba cache file that cannot be read (numba raises on it, every run)."""
    why = f"{type(e).__name__}: {str(e)[:120]}" if str(e) else type(e).__name__
    return MlxtralError(f"numba's kernel cache is damaged ({why}) in {where[:300]}: delete that folder's "
                        "*.nbi and *.nbc files, or point NUMBA_CACHE_DIR at an empty folder")


def _index_has_this_cpu(dispatcher: Any) -> bool:
    """Whether numba's disk cache holds an entry of ``dispatcher`` for this CPU, fresh for its
    source (numba's own index, read as numba reads it: an obsolete one reads as empty). An index
    that cannot be read is :func:`damaged_cache` (numba would raise on it)."""
    from numba.core.registry import cpu_target

    cache = getattr(dispatcher, "_cache", None)
    cache_file = getattr(cache, "_cache_file", None)
    if cache_file is None:  # a dispatcher without a disk cache (a forced ISA): nothing to fill
        return True
    try:
        index = cache_file._load_index()
    except Exception as e:  # truncated, another format: numba raises on it at every load
        raise damaged_cache(str(getattr(cache, "cache_path", "numba's cache")), e) from None
    magic = cpu_target.target_context.codegen().magic_tuple()
    return any(isinstance(k, tuple) and len(k) > 1 and k[1] == magic for k in index)


def cache_dir() -> str:
    """Where numba keeps the kernels' cache (for messages)."""
    from mlxtral.backends import _decode_step_nb as nb

    return str(getattr(getattr(nb.decode_layers, "_cache", None), "cache_path", "numba's cache folder"))


def is_cold() -> bool:
    """Whether a first run's compiling is ahead: the kernels' native library is not built yet for
    this host (and no build failed), or numba's cache holds no decode step for this CPU."""
    from mlxtral.backends import aot, kernels

    if not kernels.HAVE_NUMBA or kernels.use_native():  # (built since this process looked)
        return False
    if aot.wanted() and aot.failure() is None:  # the native library is still to build
        return True
    from mlxtral.backends import _decode_step_nb as nb

    if not nb._CACHE:
        return False
    return not _index_has_this_cpu(nb.decode_layers)


_MEMORY = ("MemoryError", "LLVM ERROR", "Cannot allocate memory", "out of memory", "can't start new thread")


def ensure_compiled() -> None:
    """Fill numba's cache in a child process when it is cold (see the module's text). Raises
    :class:`AddressSpaceError` (one line) when the child ran out of address space under a limit."""
    global _done
    if _done or env_flag("MLXTRAL_NO_PRECOMPILE") or not is_cold():
        return
    _done = True
    notice(NOTICE)  # on a terminal or not: two silent minutes look like a hang
    env = dict(os.environ, MLXTRAL_NO_PRECOMPILE="1", MLXTRAL_AOT_BUILDING="1")  # the JIT's kernels there
    here = str(Path(__file__).resolve().parents[2])  # this mlxtral, however this process found it
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    # -P: never the working directory on sys.path (-m puts it first: a numpy.py there would run)
    argv = [sys.executable, "-P", "-m", "mlxtral.backends.precompile", str(os.getpid())]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=env, timeout=3600)
    except (OSError, subprocess.SubprocessError):
        return  # no child: this process compiles, as it did
    if r.returncode == 0:
        from mlxtral.backends import kernels

        kernels.use_native()  # the library the child built, when it could
        return
    from mlxtral import address_space

    lim = address_space.limit()
    tail = r.stderr[-4096:].decode("utf-8", errors="replace")
    ran_out = r.returncode < 0 or any(m in tail for m in _MEMORY)  # LLVM aborts: a signal
    if lim is not None and ran_out and lim < 2 * address_space.COMPILE:
        raise address_space.error(address_space.COMPILE, "compiling the CPU kernels (once after an install)")
    # anything else (the OOM killer, a user's kill, a failure this process will meet and report in
    # its own words): this process compiles, as it did


def _tiny() -> tuple[Any, dict[str, Any]]:
    """A 2-layer random MoE (4 experts, top 2), float32 weights: the kernels' types, not a model."""
    from mlxtral.config import ModelArgs
    from mlxtral.formats import expected_shapes
    from mlxtral.qtensor import QTensor

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                     vocab_size=256, norm_eps=1e-5, rope_theta=1e6, n_experts=4, n_experts_per_tok=2,
                     max_position_embeddings=64)
    rng = np.random.default_rng(0)
    tensors = {name: QTensor.from_float((0.1 * rng.standard_normal(shape)).astype(np.float32))
               for name, shape in expected_shapes(args).items()}
    return args, tensors


def _die_with(parent: int) -> None:
    """Linux: this child is killed when the process that started it dies (a SIGTERM or SIGKILL to
    it leaves no compiler running on alone)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before that took effect
        os._exit(1)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].isascii() and sys.argv[1].isdigit():
        _die_with(int(sys.argv[1]))
    from mlxtral.backends.numpy_backend import NumpyBackend

    args, tensors = _tiny()
    for kv in ("float32", "float16"):
        be = NumpyBackend(args, tensors, kv_dtype=kv)  # warmup() and the one-token decode step
        if be.decode_step is not None:  # both decode steps, and an expert-parallel rank's pieces
            be.decode_step.warm(batch=True, split=True)
    from mlxtral.backends import aot_build

    aot_build.build_or_note()  # what ran above, compiled again into the native library


if __name__ == "__main__":
    main()
