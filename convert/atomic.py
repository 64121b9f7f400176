"""Atomic output: build beside OUT under a temporary name, rename at the end, clean up on failure."""
from __future__ import annotations

import contextlib
import errno as errno_module
import functools
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlxtral.errors import MlxtralError, Terminated, UsageError

from .output_guard import GGUF_FILE, FileKind, check_output, check_replaceable

_CATCH = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
_DEFER = (signal.SIGINT, *_CATCH)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (Python's
    default is to die on the spot, skipping every cleanup); the previous handlers come back after.
    One that is ignored (``nohup``) stays ignored. SIGINT already raises KeyboardInterrupt. A no-op
    off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    # a signal ignored on purpose stays ignored (``nohup mlxtral convert ...`` survives a hangup)
    old = {s: signal.signal(s, handler) for s in _CATCH if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP are only noted; on the way out the previous handlers
    come back and the first signal noted is handled then (KeyboardInterrupt, :class:`Terminated`,
    or the default action). For steps that must not be cut in two (renames, cleanup).

    Done with Python-level handlers rather than ``pthread_sigmask`` on the main thread: a signal sent
    to the process is delivered to any thread that does not block it (a progress bar's, a BLAS
    worker's), and Python then runs its handler in the main thread anyway. A no-op off the main
    thread (Python only runs signal handlers there, so nothing can interrupt it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum: int, frame: Any) -> None:
        noted.append(signum)

    old: dict[int, Any] = {}
    try:
        for s in _DEFER:
            old[s] = signal.signal(s, note)
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if noted:
            _deliver(noted[0], old.get(noted[0]))


def _deliver(signum: int, handler: Any) -> None:
    """Handle ``signum`` now as ``handler`` (what was installed before) would have."""
    if callable(handler):
        handler(signum, None)  # KeyboardInterrupt (default_int_handler), Terminated, a user's handler
    elif handler != signal.SIG_IGN:
        signal.raise_signal(signum)  # SIG_DFL, or a handler not installed from Python


@contextlib.contextmanager
def atomic_output(out: Path, *, is_dir: bool, force: bool = False,
                  sources: list[Path] | None = None, kind: FileKind = GGUF_FILE) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it becomes ``out``, on any exception
    (KeyboardInterrupt, SIGTERM and SIGHUP included) it is deleted and ``out`` is left untouched.

    ``out`` is checked first (:func:`.output_guard.check_output`: never a source, inside one or
    holding one; an existing one only with ``force`` and only if it is what we write: a folder, or
    a file of ``kind``). Without
    ``force`` the final rename never replaces what appeared at ``out`` meanwhile (another
    conversion to the same name): that one stays and this one fails with "already exists"."""
    out = Path(out)
    check_output(out, is_dir=is_dir, force=force, sources=sources, kind=kind)
    with terminate_as_exception():
        yield from _atomic(out, is_dir, force, kind)


def _atomic(out: Path, is_dir: bool, force: bool, kind: FileKind) -> Iterator[Path]:
    prefix = f".{out.name}.tmp-"
    try:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=out.suffix, dir=out.parent)  # keep .gguf
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise OutputError(out, e) from e
    from mlxtral.formats.mapped import note_unfinished

    note_unfinished(tmp)  # a source truncated under its map (SIGBUS) exits at once: name what is left
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)  # mkstemp/mkdtemp make them private
        if force:
            _replace(tmp, out, is_dir, kind)
        else:
            _place_new(tmp, out)
    except BaseException as e:
        with signals_deferred():  # a second Ctrl-C must not leave half of the temporary behind
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        if isinstance(e, OSError) and concerns_output(e, out, tmp):
            raise OutputError(out, e) from e
        raise
    finally:
        note_unfinished(None)


def _place_new(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out`` only if nothing is at ``out`` (atomically: renameat2/renamex_np
    without replacing; where neither exists, a hard link for a file, and for a folder ``rename``,
    which refuses a non-empty folder)."""
    with signals_deferred():
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise UsageError("appeared while this conversion ran (another one wrote it?); it was left "
                             "as it is and this output was discarded", out) from None


def rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that fails with FileExistsError instead of replacing ``dst``."""
    call = _noreplace_call()
    if call is not None:
        import ctypes

        if call(os.fsencode(src), os.fsencode(dst)) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno_module.EINVAL, errno_module.ENOSYS, errno_module.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):  # the filesystem cannot rename without replacing: the fallbacks
        raise FileExistsError(errno_module.EEXIST, os.strerror(errno_module.EEXIST), str(dst))
    if src.is_dir():
        try:
            os.rename(src, dst)  # onto a non-empty folder: ENOTEMPTY; onto a file: ENOTDIR
        except OSError as e:
            if e.errno in (errno_module.ENOTEMPTY, errno_module.EEXIST, errno_module.ENOTDIR):
                raise FileExistsError(errno_module.EEXIST, os.strerror(errno_module.EEXIST), str(dst)) from e
            raise
        return
    os.link(src, dst)  # FileExistsError if dst appeared
    os.unlink(src)


@functools.lru_cache(maxsize=1)
def _noreplace_call() -> Callable[[bytes, bytes], int] | None:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if hasattr(libc, "renameat2"):  # Linux (glibc >= 2.28, musl)
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(-100, a, -100, b, 1)  # AT_FDCWD, RENAME_NOREPLACE
    if hasattr(libc, "renamex_np"):  # macOS
        fx = libc.renamex_np
        fx.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fx(a, b, 4)  # RENAME_EXCL
    return None


def _replace(tmp: Path, out: Path, is_dir: bool, kind: FileKind) -> None:
    """Put ``tmp`` at ``out``. A file over a file (or nothing) is one atomic ``os.replace``. When a
    folder is involved (the new OUT or the old one), the old OUT is moved aside first, then ``tmp``
    takes its place, then the old one is deleted: signals are deferred over those steps, and if the
    second rename fails the old OUT is put back, so OUT is never missing."""
    with signals_deferred():
        check_replaceable(out, is_dir=is_dir, kind=kind)  # again: what is there now, not at the start
        folder = tmp.is_dir() or (out.is_dir() and not out.is_symlink())
        if not folder or not os.path.lexists(out):
            os.replace(tmp, out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.replace(out, old / "x")
        except BaseException:
            old.rmdir()
            raise
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / "x", out)  # the previous OUT back (if this fails too, it stays in `old`)
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)


class OutputError(MlxtralError):
    """Writing OUT failed (a full disk, a quota, a file size limit, a read-only or vanished folder):
    one line naming OUT, with the system's reason and errno (kept as ``errno`` and ``strerror``)."""

    def __init__(self, out: Path, err: OSError) -> None:
        self.errno = err.errno
        self.strerror = err.strerror or str(err)
        code = errno_module.errorcode.get(err.errno) if isinstance(err.errno, int) else None
        detail = f"{code}, errno {err.errno}" if code else f"errno {err.errno}" if err.errno else ""
        super().__init__(f"{self.strerror} ({detail})" if detail else self.strerror, out)


_OUTPUT_ERRNOS = {getattr(errno_module, n) for n in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno_module, n)}


def concerns_output(e: OSError, out: Path, tmp: Path) -> bool:
    """Whether an OSError raised while building ``out`` is about the output (a full disk, or a path
    of the output's: its temporary, OUT itself, the old OUT moved aside), not about reading a source
    file (which names that file itself)."""
    if e.errno in _OUTPUT_ERRNOS:
        return True
    names = [n for n in (e.filename, e.filename2) if isinstance(n, (str, bytes, os.PathLike))]
    if not names:
        return True  # a write on an open file of the output
    out, tmp = out.absolute(), tmp.absolute()
    for n in names:
        p = Path(os.fsdecode(n)).absolute()
        for q in (p, *p.parents):
            if q in (out, tmp) or (q.parent == out.parent and q.name.startswith(f".{out.name}.")):
                return True
    return False
