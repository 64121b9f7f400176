"""Opening checkpoint files: regular files only. A FIFO blocks ``open()`` forever and a device
(``/dev/zero``) never ends; both are refused up front with a :class:`FormatError`."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from mlxtral.errors import FormatError

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_regular(path: str | Path) -> BinaryIO:
    """``open(path, "rb")`` for a regular file (symlinks followed); :class:`FormatError` for
    anything else. OSErrors of the open itself (missing, no permission) propagate."""
    fd = os.open(path, os.O_RDONLY | _NONBLOCK)  # a FIFO without a writer: returns at once
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError("not a regular file (a pipe, device or socket cannot be a checkpoint)", path)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
