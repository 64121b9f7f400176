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

``mlx.launch`` also never closes a rank's stdin when its own input ends, so a piped ``chat`` under it
would wait for a next line for ever. :func:`relayed_lines` reads rank 0's stdin and ends when the
launcher's input has ended (:func:`launcher_input_ended`: ``/dev/null``, a file read to its end, or
a pipe or socket the kernel says has no writer left, emptied) and nothing more came for two checks
in a row.
"""
from __future__ import annotations

import contextlib
import os
import select
import stat
from collections.abc import Callable, Iterator

MAX_FILL = 1 << 20  # pipes hold 64 KiB by default; never write more than this
MAX_LINE = 16 << 20  # a line longer than this is passed on in pieces (the chat refuses it anyway)


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


def _pending(fd: int) -> int:
    import fcntl
    import termios

    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


_POLLRDHUP = 0x2000  # Linux: the peer shut its side down (select.POLLRDHUP where Python has it)


def _hung_up(fd: int) -> bool:
    """Whether ``fd`` (a pipe's or a socket's read side) has nothing left and no writer: the kernel
    says so (POLLHUP: the pipe's writers are gone, in any process or namespace; POLLRDHUP: the
    socket's peer shut down), not a guess from the processes this one can see."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP | _POLLRDHUP)
    events = 0
    for _, ev in p.poll(0):
        events |= ev
    return bool(events & (select.POLLHUP | _POLLRDHUP)) and not _pending(fd)


def _parents_socket(ppid: int) -> int | None:
    """A duplicate of the parent's fd 0, a socket (``pidfd_getfd``, Linux 5.6+; None where the
    system or its ptrace policy refuses)."""
    import ctypes

    try:
        pidfd = os.pidfd_open(ppid)
    except (OSError, AttributeError):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(438, pidfd, 0, 0)  # SYS_pidfd_getfd (x86-64 and arm64 alike)
        return fd if fd >= 0 else None
    except (OSError, AttributeError):
        return None
    finally:
        os.close(pidfd)


def launcher_input_ended(proc: str = "/proc") -> bool:
    """Whether the input of ``mlx.launch`` (this process's parent, checked as for
    :func:`quiet_relay`) has ended: ``/dev/null``, a regular file read to its end, or a pipe or socket
    with nothing left whose writers are all gone. False for a terminal or when it cannot tell (the
    chat then waits, as it did, rather than end early and drop a line)."""
    ppid = os.getppid()
    try:
        st = os.stat(f"{proc}/{ppid}/fd/0")
        if stat.S_ISCHR(st.st_mode):
            return st.st_rdev == os.makedev(1, 3)  # /dev/null; a terminal never ends this way
        if stat.S_ISREG(st.st_mode):
            with open(f"{proc}/{ppid}/fdinfo/0") as f:
                pos = next((int(ln.split()[1]) for ln in f if ln.startswith("pos:")), -1)
            return pos >= st.st_size
        if stat.S_ISFIFO(st.st_mode):
            fd = os.open(f"{proc}/{ppid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)  # another reader: reads nothing
        elif stat.S_ISSOCK(st.st_mode):
            got = _parents_socket(ppid)
            if got is None:
                return False
            fd = got
        else:
            return False
        try:
            return _hung_up(fd)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return False


def under_launcher_pipe() -> bool:
    """This process's stdin is ``mlx.launch``'s relay pipe."""
    try:
        return stat.S_ISFIFO(os.fstat(0).st_mode) and _parent_is_mlx_launch()
    except OSError:
        return False


def _relayed(ended: Callable[[], bool], fd: int, every: float) -> Iterator[bytes]:
    """The raw lines of ``fd`` (each with its line break; one longer than :data:`MAX_LINE` in
    pieces), until it ends or ``ended()`` holds at two checks ``every`` seconds apart with nothing
    read between."""
    buf = b""
    quiet = 0
    while True:
        ready, _, _ = select.select([fd], [], [], every)
        if not ready:
            quiet = quiet + 1 if ended() else 0
            if quiet >= 2:
                break
            continue
        quiet = 0
        data = os.read(fd, 1 << 16)
        if not data:
            break
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:
                    yield buf
                    buf = b""
                break
            line, buf = buf[: nl + 1], buf[nl + 1 :]
            yield line
    if buf:
        yield buf


def relayed_lines(ended: Callable[[], bool] = launcher_input_ended, fd: int = 0,
                  every: float = 1.0) -> Iterator[str]:
    """The lines of ``fd`` (rank 0's stdin under ``mlx.launch``), invalid UTF-8 replaced (as
    ``chat.read_piped``), until it ends or the launcher's input has ended (:func:`_relayed`)."""
    for line in _relayed(ended, fd, every):
        yield line.decode("utf-8", errors="replace")


def relayed_input(limit: int, ended: Callable[[], bool] = launcher_input_ended, fd: int = 0,
                  every: float = 1.0) -> bytes:
    """All of ``fd`` (rank 0's stdin under ``mlx.launch``), ended as :func:`relayed_lines` ends, at
    most ``limit`` + 1 bytes (the caller refuses more)."""
    out = bytearray()
    for line in _relayed(ended, fd, every):
        out += line
        if len(out) > limit:
            break
    return bytes(out)
