"""The address-space limit (``RLIMIT_AS``, ``ulimit -v``) and what mlxtral needs under it.

Under ``ulimit -v`` every mapping counts, resident or not: a memory-mapped model file (all of it, at
once: a file larger than the limit cannot be mapped at all), the interpreter and its libraries,
numba's LLVM, each thread's stack. Too little of it fails in places Python cannot always catch: LLVM
and glibc abort the process, a thread that never starts leaves a pool waiting, llvmlite's library
"cannot be found". So the CLI checks the limit before it imports numba, against the measured
minimum of the command (:func:`check_startup`); the memory check checks it again once the model is
open, against what that model needs (:func:`check_room`); and what can still fail (a mapping refused,
a thread that cannot start, llvmlite that cannot load, an allocation) is turned into the same one
line by :func:`explain`. Nothing here imports NumPy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mlxtral.errors import OutOfMemoryError

MB = 1 << 20
# Measured on Linux x86-64 (Python 3.11, NumPy 2, numba 0.6x, 2 cores): the peak address space
# (VmPeak) of each command on a 5 MB model, rounded up. A model adds its file (mapped whole), its KV
# cache and working set: checked by the memory check once the model is open.
MIN_RUN = 640 * MB  # chat, generate, bench (numba, llvmlite, compiled kernels, kernel threads): 592 MB
MIN_CONVERT = 576 * MB  # convert, upcycle (quantizer threads): 520 MB
MIN_OTHER = 384 * MB  # info, --help and the rest (no compiler): 344 MB
# What loading the compute kernels adds once the model is open (numba, llvmlite, the compiled
# kernels, the kernel threads' stacks): measured 241 MB (the demo model under ulimit -v: LLVM aborts
# below that, 2026-12-04; it was 175 MB before the K-quant and batched kernels), plus a third: LLVM
# aborts (a signal, no line) when compiling runs out, and code generation differs from CPU to CPU.
KERNELS = 320 * MB
# Compiling the kernels after an install (a child process, mlxtral.backends.precompile): its peak
# address space, measured 1376 MB (Xeon with AVX-512, numba 0.68, 2026-12-04), plus a third.
COMPILE = 1792 * MB
# The working set of a short prompt; a longer one that does not fit fails later as a MemoryError,
# which is caught (:func:`explain`): only LLVM and thread starts abort, and those come at load.
WORKING = 32 * MB
_MIN_BY_COMMAND = {"chat": MIN_RUN, "generate": MIN_RUN, "bench": MIN_RUN, "convert": MIN_CONVERT,
                   "upcycle": MIN_CONVERT}

_NO_ROOM = ("failed to map segment", "cannot allocate memory", "cannot map", "out of memory")
_expected = 0  # the address space the current work was estimated to need (for messages)
# Address space held from the start and given back when memory runs out, so that reporting the
# failure (unwinding, a module import, the line itself) does not fail in its turn. Untouched
# zero pages: it costs no RAM. The minimums above still cover it (592 + 16 < 640, 520 + 16 < 576,
# 344 + 16 < 384).
RESERVE = 16 * MB
_reserve: bytearray | None = None


class AddressSpaceError(OutOfMemoryError):
    """``ulimit -v`` (RLIMIT_AS) is below what mlxtral needs."""


def limit() -> int | None:
    """The soft RLIMIT_AS in bytes, or None when unlimited (or unknown on this platform)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    return int(soft)


def in_use(proc: str | Path = "/proc") -> int | None:
    """This process's address space now (``VmSize``), or None where /proc is not there."""
    try:
        with open(Path(proc) / "self" / "status", encoding="ascii", errors="replace") as f:
            for line in f.read(1 << 16).splitlines():
                if line.startswith("VmSize:"):
                    parts = line.split()
                    return int(parts[1]) * 1024 if len(parts) >= 2 and parts[1].isdigit() else None
    except OSError:
        return None
    return None


def _mb(n: int) -> int:
    return max(1, math.ceil(n / MB))


def error(need: int | None = None, what: str = "") -> AddressSpaceError:
    """The one line: ``not enough address space: ulimit -v is N MB, mlxtral needs about M MB; raise
    it``. ``need``: what the work needs in all (default: the last estimate, or more than the limit)."""
    lim = limit() or 0
    want = max(need or 0, _expected)
    if want <= lim:  # the estimate fell short of what actually failed: at least a little more
        want = lim + max(64 * MB, lim // 5)
    prefix = f"{what}: " if what else ""
    return AddressSpaceError(f"{prefix}not enough address space: ulimit -v is {_mb(lim)} MB, mlxtral needs "
                             f"about {_mb(want)} MB; raise it (ulimit -v {_mb(want) * 1024} or unlimited)")


def check(need: int, what: str = "") -> None:
    """:class:`AddressSpaceError` if the limit is below ``need`` bytes in all."""
    global _expected
    _expected = max(_expected, need)
    lim = limit()
    if lim is not None and lim < need:
        raise error(need, what)


def check_room(more: int, what: str = "", proc: str | Path = "/proc") -> None:
    """:class:`AddressSpaceError` if ``more`` bytes beyond what this process maps now do not fit."""
    if limit() is None:
        return
    now = in_use(proc)
    if now is not None:
        check(now + max(more, 0), what)


def command_minimum(argv: Sequence[str]) -> int:
    """The measured minimum address space of the command ``argv`` names (see the constants)."""
    cmd = next((a for a in argv if not a.startswith("-")), "")
    return _MIN_BY_COMMAND.get(cmd, MIN_OTHER)


def check_startup(argv: Sequence[str]) -> None:
    """At the CLI's entry, before numba or a model is loaded: the command's measured minimum."""
    check(command_minimum(argv))


def hold_reserve() -> None:
    """Take the reserve (at the CLI's start), if there is room for it."""
    global _reserve
    try:
        _reserve = bytearray(RESERVE)
    except MemoryError:
        _reserve = None


def release_reserve() -> None:
    """Give the reserve back: memory ran out and the failure is being reported."""
    global _reserve
    _reserve = None


def out_of_memory(e: BaseException) -> BaseException | None:
    """The exception in ``e``'s chain (``e`` itself, or what it interrupted) that says memory or
    address space ran out, or None. A failure to report a failure is reported as the first one."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 64:
        if isinstance(cur, MemoryError) or (isinstance(cur, OSError) and cur.errno == 12):
            return cur
        cur, seen = cur.__context__, seen + 1
    return None


def explain(e: BaseException, what: str = "") -> AddressSpaceError | None:
    """The address-space line for a failure that a finite ``ulimit -v`` explains (a refused
    mapping or allocation, a thread that cannot start, a library that cannot load); None when there
    is no limit (the failure is something else: let it be reported as it is)."""
    if limit() is None:
        return None
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno in (None, 12, 11)):
        return error(None, what)
    text = str(e)[:1000].lower()
    if isinstance(e, RuntimeError) and "thread" in text:
        return error(None, what)
    if isinstance(e, ImportError) and any(s in text for s in _NO_ROOM):  # a library that cannot be mapped
        return error(None, what)
    if isinstance(e, SystemError) and "without" in text and "exception" in text:
        return error(None, what)  # a C extension whose allocation failed ("error return without ...")
    return None


def map_error(path: str | Path, nbytes: int, e: OSError) -> OutOfMemoryError | None:
    """For a file whose mapping failed: the address-space line (the whole file is mapped at once,
    and a mapping counts against ``ulimit -v``), or None when no limit explains it."""
    lim = limit()
    if lim is None or e.errno not in (None, 12):
        return None
    now = in_use() or 0
    err = error(now + nbytes + KERNELS, f"cannot map the file ({_mb(nbytes)} MB)")
    return AddressSpaceError(err.message, path)

