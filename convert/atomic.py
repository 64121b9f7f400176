"""Atomic output: build beside OUT under a temporary name, rename at the end, clean up on failure."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mlxtral.errors import UsageError


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
    (KeyboardInterrupt included) it is deleted and ``out`` is left untouched."""
    out = Path(out)
    check_output(out, force)
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
