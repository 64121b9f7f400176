"""Quieting ``mlx.launch``'s output relay on this host.

``mlx.launch`` (mlx 0.32) relays each local rank's output in a thread that waits in ``select`` on
the rank's stdout and stderr *and its stdin pipe for writing*. A pipe with room is always
writable, so the wait returns at once and the thread spins for as long as the rank runs: measured
here, an idle 2-rank ``serve`` cost the launcher 5.8 CPU-seconds per 5 s (more than a core of a
2-core machine). A rank that never reads its stdin (every rank but 0, and rank 0 but in ``chat``)
fills that pipe once (64 KiB the kernel holds, never read): the pipe is then not writable, and
the relay sleeps until there is output (measured: 0.01 CPU-seconds per 5 s).

Only when stdin is a pipe whose write end the parent holds and the parent runs ``mlx.launch``: a
rank started by hand, by ``mpirun``, over ssh, or with stdin from a file, a terminal or a pipe of
someone else's is left alone. The launcher's own main
loop still spins when *its* stdin is ``/dev/null`` (it reads the end of file over and over): give
it a pipe that stays open, or start the ranks yourself.
"""
from __future__ import annotations

import contextlib
import os
import stat

MAX_FILL = 1 << 20  # pipes hold 64 KiB by default; never write more than this


def _parent_is_mlx_launch(proc: str = "/proc") -> bool:
    """The parent runs ``mlx.launch`` (one of its first arguments is that script, not a mention of
    it anywhere) and holds the write end of this process's stdin pipe: the pipe is the launcher's,
    shared with nobody else."""
    ppid = os.getppid()
    try:
        with open(f"{proc}/{ppid}/cmdline", "rb") as f:
            argv = f.read(1 << 16).split(b"\0")[:3]  # python, the script (or mlx.launch itself)
        if not any(os.path.basename(a) == b"mlx.launch" for a in argv):
            return False
        mine = os.fstat(0).st_ino
        fds = os.listdir(f"{proc}/{ppid}/fd")[:4096]
    except (OSError, ValueError):
        return False
    for fd in fds:
        try:
            if os.readlink(f"{proc}/{ppid}/fd/{fd}") != f"pipe:[{mine}]":
                continue
            with open(f"{proc}/{ppid}/fdinfo/{fd}") as f:
                flags = next((ln.split()[1] for ln in f if ln.startswith("flags:")), "0")
            if int(flags, 8) & os.O_ACCMODE == os.O_WRONLY:
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def quiet_relay(proc: str = "/proc") -> int:
    """Fill this process's stdin pipe (it will never read it) if ``mlx.launch`` holds the other
    end; the bytes written (0 when left alone)."""
    try:
        if not stat.S_ISFIFO(os.fstat(0).st_mode) or not _parent_is_mlx_launch(proc):
            return 0
        fd = os.open(f"{proc}/self/fd/0", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return 0
    n = 0
    try:
        block = b"\n" * 4096
        while n < MAX_FILL:
            n += os.write(fd, block)
    except OSError:  # BlockingIOError: full
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return n
