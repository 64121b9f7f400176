"""Atomic output: build beside OUT under a temporary name, rename at the end, clean up on failure."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlxtral.errors import Terminated, UsageError

_CATCH = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (Python's
    default is to die on the spot, skipping every cleanup); the previous handlers come back after.
    SIGINT already raises KeyboardInterrupt. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    old = {s: signal.signal(s, handler) for s in _CATCH}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def check_output(out: Path, force: bool, src: Path | None = None) -> None:
    """Refuse to overwrite ``out`` without ``force``, and never let ``out`` be (inside) ``src``."""
    if src is not None:
        s, o = Path(src).resolve(), out.resolve()
        if o == s or s in o.parents or (s.is_file() and o == s):
            raise UsageError("the output must not be the source or inside it", out)
    if out.exists() and not force:
        raise UsageError("already exists (use --force to overwrite)", out)
    if not out.parent.exists():
        raise UsageError("the parent folder does not exist", out)


@contextlib.contextmanager
def atomic_output(out: Path, *, is_dir: bool, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out``, on any exception
    (KeyboardInterrupt, SIGTERM and SIGHUP included) it is deleted and ``out`` is left untouched."""
    out = Path(out)
    check_output(out, force)
    with terminate_as_exception():
        yield from _atomic(out, is_dir)


def _atomic(out: Path, is_dir: bool) -> Iterator[Path]:
    prefix = f".{out.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=out.suffix, dir=out.parent)  # keep .gguf
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)  # mkstemp/mkdtemp make them private
        if out.exists():  # force: replace
            if out.is_dir() and not out.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "x")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
                return
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
