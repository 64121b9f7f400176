"""The distributed doorbell (mlxtral.distributed.doorbell) on a group of threads: set-up, the
token check, ringing, a rank 0 that ends, and a group without a host file."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlxtral.distributed import doorbell


class ThreadGroup:
    """``all_sum`` across threads, one per rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.parts: list[Any] = [None] * size
        self.result: Any = None

    def rank_view(self, rank: int) -> Any:
        outer = self

        class View:
            def __init__(self) -> None:
                self.rank, self.size = rank, outer.size

            def all_sum(self, x: np.ndarray, what: str = "", wait: bool = True) -> np.ndarray:
                outer.parts[rank] = x.copy()
                if outer.barrier.wait(30) == 0:
                    outer.result = sum(outer.parts)
                outer.barrier.wait(30)
                out = outer.result.copy()
                outer.barrier.wait(30)
                return out  # type: ignore[no-any-return]

        return View()


def _connect_all(size: int) -> list[doorbell.Doorbell | None]:
    g = ThreadGroup(size)
    bells: list[doorbell.Doorbell | None] = [None] * size

    def run(r: int) -> None:
        bells[r] = doorbell.connect(g.rank_view(r))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return bells


def _hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, host: str = "127.0.0.1") -> None:
    f = tmp_path / "hosts.json"
    f.write_text(json.dumps([[f"{host}:{5000 + i}"] for i in range(n)]))
    monkeypatch.setenv("MLX_HOSTFILE", str(f))
    monkeypatch.delenv("MLXTRAL_DIST_DOORBELL", raising=False)


@pytest.mark.parametrize("size", [2, 3])
def test_ring_wakes_every_follower_and_a_closed_rank0_ends_the_wait(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     size: int) -> None:
    _hosts(tmp_path, monkeypatch, size)
    bells = _connect_all(size)
    assert all(b is not None for b in bells)
    lead, followers = bells[0], bells[1:]
    assert lead is not None and len(lead.socks) == size - 1
    for _ in range(3):
        lead.ring()
        assert all(f is not None and f.wait() for f in followers)
    lead.close()
    assert all(f is not None and not f.wait() for f in followers)  # rank 0 ended: no hang
    for f in followers:
        assert f is not None
        f.close()


def test_without_a_host_file_no_rank_has_a_doorbell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    assert _connect_all(2) == [None, None]
    _hosts(tmp_path, monkeypatch, 2)
    for off in ("0", "no", "false"):
        monkeypatch.setenv("MLXTRAL_DIST_DOORBELL", off)
        assert _connect_all(2) == [None, None]
    monkeypatch.setenv("MLXTRAL_DIST_DOORBELL", "yes")
    assert all(b is not None for b in _connect_all(2))


def test_a_rank_without_the_doorbell_means_none_at_once(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``MLXTRAL_DIST_DOORBELL=0`` on one rank only: every rank knows from the first collective, and
    rank 0 does not wait for a follower that will never dial."""
    _hosts(tmp_path, monkeypatch, 3)
    monkeypatch.setattr(doorbell, "enabled", lambda: threading.current_thread().name != "rank2")
    g = ThreadGroup(3)
    bells: list[Any] = [1, 1, 1]

    def run(r: int) -> None:
        bells[r] = doorbell.connect(g.rank_view(r))

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert bells == [None, None, None] and time.monotonic() - t0 < 2


def test_a_trickling_connection_cannot_hold_the_setup() -> None:
    """One byte every 0.5 s kept rank 0 in its accept loop for 37 s (the 2 s applied to each recv):
    now a connection's whole hello has 2 s, and the real follower still gets in."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    token = b"t" * doorbell.TOKEN_BYTES
    stop = threading.Event()

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            while not stop.is_set():
                try:
                    s.sendall(b"x")
                except OSError:
                    return
                stop.wait(0.5)

    threading.Thread(target=trickle, daemon=True).start()
    time.sleep(0.2)
    t0 = time.monotonic()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.extend(doorbell._accept(listener, token, 1, t0 + 10)))
    t.start()
    mine = doorbell._dial("127.0.0.1", port, token, 1, t0 + 10)
    t.join(30)
    stop.set()
    assert len(got) == 1 and mine is not None and time.monotonic() - t0 < 5
    for s in [*got, mine, listener]:
        s.close()


@pytest.mark.parametrize("text", ["", "[]", "[[]]", "{}", '"x"', "[[5]]", '[["nohost"]]', '[["a b:1"]]',
                                  "[" * 100000, "\xff"])
def test_a_bad_host_file_is_no_doorbell(tmp_path: Path, text: str) -> None:
    f = tmp_path / "hosts.json"
    f.write_text(text, encoding="utf-8", errors="surrogateescape")
    assert doorbell.rank0_host({"MLX_HOSTFILE": str(f)}) is None
    assert doorbell.rank0_host({"MLX_HOSTFILE": str(tmp_path / "missing.json")}) is None
    assert doorbell.rank0_host({}) is None


def test_host_file_forms() -> None:
    import tempfile

    for hosts, want in [([["10.0.0.1:5000", "10.0.0.2:5001"], ["10.0.0.3:5000"]], "10.0.0.1"),
                        ([["[::1]:5000"], ["[::1]:5001"]], "::1"), (["127.0.0.1:5000"], "127.0.0.1")]:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(hosts, f)
        assert doorbell.rank0_host({"MLX_HOSTFILE": f.name}) == want
        Path(f.name).unlink()


def test_rank0_accepts_only_followers_with_the_token() -> None:
    """Whoever else connects to rank 0's port (a scanner, an attacker, a stray follower of another
    group) is closed: it can neither take a follower's place nor stall the set-up past its deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    token = b"t" * doorbell.TOKEN_BYTES
    deadline = time.monotonic() + 10
    strangers = []
    for hello in (b"wrong token.....\x01\x00\x00\x00", token + (7).to_bytes(4, "little"), b"short"):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(hello)
        strangers.append(s)
    silent = socket.create_connection(("127.0.0.1", port))  # says nothing: dropped after its 2 s
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.extend(doorbell._accept(listener, token, 2, deadline)))
    t.start()
    mine = [doorbell._dial("127.0.0.1", port, token, r, deadline) for r in (1, 2)]
    t.join(30)
    assert len(got) == 2 and all(m is not None for m in mine)
    bell = doorbell.Doorbell(got)
    bell.ring()
    assert all(m is not None and m.recv(1) == b"\x01" for m in mine)
    for s in [*strangers, silent, *mine, *got, listener]:
        if s is not None:
            s.close()


def test_a_follower_that_never_comes_fails_the_setup_in_time() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    t0 = time.monotonic()
    assert doorbell._accept(listener, b"t" * doorbell.TOKEN_BYTES, 1, t0 + 0.5) == []
    assert time.monotonic() - t0 < 5
    listener.close()
    assert doorbell._dial("127.0.0.1", 1, b"t" * 16, 1, time.monotonic() + 0.3) is None


# ---- mlx.launch's relay (mlxtral.distributed.relay) ------------------------------------------------
_FILL = """
import os, sys, time
from mlxtral.distributed.relay import quiet_relay
while not os.path.exists(os.path.join(sys.argv[1], "ready")):  # the test's fake /proc is complete
    time.sleep(0.01)
print(quiet_relay(sys.argv[1]), flush=True)
time.sleep(60)  # alive while the test looks at the pipe (a closed reader makes it writable again)
"""
LAUNCHER = b"/usr/bin/python3\0/venv/bin/mlx.launch\0-n\0002\0"


@pytest.mark.skipif(not Path("/proc/self/fd/0").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(("parent", "piped", "ends", "filled"), [
    (LAUNCHER, True, "real", True),
    (b"python\0-m\0pytest\0", True, "real", False),  # not the launcher: its pipe is left alone
    (b"bash\0-c\0python -m mlxtral.cli generate ... 2>>mlx.launch.log\0", True, "real", False),  # a mention
    (LAUNCHER, True, "read", False),  # the parent holds the pipe's read end only: someone else writes it
    (LAUNCHER, False, "real", False),  # stdin a file: nothing to fill
])
def test_a_rank_fills_its_stdin_pipe_only_under_mlx_launch(tmp_path: Path, parent: bytes, piped: bool,
                                                           ends: str, filled: bool) -> None:
    """mlx.launch's relay thread selects on the rank's stdin for writing: a rank that never reads
    stdin fills the pipe once, so the relay sleeps instead of spinning (measured: an idle 2-rank
    serve cost the launcher 23 CPU-seconds per 20 s, now 0). Only a pipe the launcher writes."""
    import os
    import select
    import subprocess
    import sys

    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "fd").symlink_to("/proc/self/fd")  # the real one, as the child sees it
    me = proc / str(os.getpid())  # the child's parent is this process
    me.mkdir()
    (me / "cmdline").write_bytes(parent)
    with open(tmp_path / "in.txt", "w+b") as file:
        p = subprocess.Popen([sys.executable, "-c", _FILL, str(proc)], stdout=subprocess.PIPE, text=True,
                             stdin=subprocess.PIPE if piped else file)
        try:
            if ends == "real":
                (me / "fd").symlink_to(f"/proc/{os.getpid()}/fd")
                (me / "fdinfo").symlink_to(f"/proc/{os.getpid()}/fdinfo")
            else:
                assert p.stdin is not None
                (me / "fd").mkdir()
                (me / "fdinfo").mkdir()
                (me / "fd" / "7").symlink_to(f"pipe:[{os.fstat(p.stdin.fileno()).st_ino}]")
                (me / "fdinfo" / "7").write_text("pos:\t0\nflags:\t0100000\n")  # O_RDONLY
            (proc / "ready").touch()
            assert p.stdout is not None
            n = int(p.stdout.readline())
            if piped:
                writable = select.select([], [p.stdin], [], 0)[1]
                assert (n >= 4096 and not writable) if filled else (n == 0 and writable), (n, writable)
            else:
                assert n == 0 and file.read() == b""
        finally:
            p.kill()
            p.wait(30)
