"""A wake-up for the ranks that wait for rank 0, so that an idle group costs no CPU.

Between commands a follower waits for rank 0's next one. Inside a collective that wait is a busy
poll: MLX's ring backend spins on its sockets (measured: 7 CPU-seconds per 20 s of an idle
``serve``, a third of a core, for as long as nobody asks anything). So rank 0 rings before every
command (one byte on a TCP connection per follower, opened once at start-up) and a follower sleeps
in a blocking read of that byte, then joins the collective the command travels in. The doorbell
carries no data: commands and tensors still go through ``mx.distributed``. A byte per command
costs a wake-up (tens of microseconds) against a forward's milliseconds.

Rank 0 listens on its own address from the ring's host file (``MLX_HOSTFILE``, written by
``mlx.launch``); a follower proves it is one with a random token rank 0 broadcast in a collective.
Where there is no host file (MPI) or a connection fails, every rank agrees to go without, and the
followers wait inside the collective as before. ``MLXTRAL_DIST_DOORBELL=0`` (on any rank) turns it
off.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.env import env_flag, raw

TOKEN_BYTES = 16
SETUP_SECONDS = 10.0  # for every follower to connect, or the group goes without a doorbell
MAX_HOSTFILE = 1 << 20


def rank0_host(env: dict[str, str] | None = None) -> str | None:
    """Rank 0's first address in the ring's host file (a JSON list, per rank, of "ip:port"), or
    None when there is none or it cannot be read."""
    path = (env if env is not None else os.environ).get("MLX_HOSTFILE", "")
    if not path:
        return None
    try:
        p = Path(path)
        if p.stat().st_size > MAX_HOSTFILE:
            return None
        hosts = json.loads(p.read_text(encoding="utf-8"))
        first = hosts[0][0] if isinstance(hosts[0], list) else hosts[0]
        if not isinstance(first, str) or ":" not in first:
            return None
        host = str(ipaddress.ip_address(first[:64].rsplit(":", 1)[0].strip("[]")))  # the ring's are IPs
    except (OSError, ValueError, TypeError, IndexError, KeyError, UnicodeError, RecursionError):
        return None
    return host


class Doorbell:
    """Rank 0: one connection per follower (:meth:`ring`); a follower: its one to rank 0 (:meth:`wait`)."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks

    def ring(self) -> None:
        """Rank 0, before a command. A follower that is gone is found by the collective that follows."""
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.sendall(b"\x01")

    def wait(self) -> bool:
        """A follower: sleep until rank 0 rings; False when rank 0's end closed (it ended)."""
        try:
            return self.socks[0].recv(1) == b"\x01"
        except OSError:
            return False

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()
        self.socks = []


def _accept(listener: socket.socket, token: bytes, want: int, deadline: float) -> list[socket.socket]:
    """Rank 0: ``want`` followers, each sending the token and its rank within 2 s of connecting
    (all of it: a connection that trickles bytes is cut at its 2 s); anything else is closed. Ends
    by ``deadline`` whatever connects."""
    got: dict[int, socket.socket] = {}
    while len(got) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        listener.settimeout(left)
        try:
            conn, _ = listener.accept()
        except OSError:
            break
        try:
            hello = _read_hello(conn, min(time.monotonic() + 2.0, deadline))
            rank = int.from_bytes(hello[TOKEN_BYTES:], "little") if len(hello) == TOKEN_BYTES + 4 else 0
            if not secrets.compare_digest(hello[:TOKEN_BYTES], token) or not 0 < rank <= want or rank in got:
                conn.close()
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            got[rank] = conn
        except OSError:
            conn.close()
    if len(got) < want:
        for c in got.values():
            c.close()
        return []
    return [got[r] for r in sorted(got)]


def _read_hello(conn: socket.socket, until: float) -> bytes:
    hello = b""
    while len(hello) < TOKEN_BYTES + 4:
        left = until - time.monotonic()
        if left <= 0:
            break
        conn.settimeout(left)
        part = conn.recv(TOKEN_BYTES + 4 - len(hello))
        if not part:
            break
        hello += part
    return hello


def _dial(host: str, port: int, token: bytes, rank: int, deadline: float) -> socket.socket | None:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            s = socket.create_connection((host, port), timeout=left)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            s.sendall(token + rank.to_bytes(4, "little"))
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError:
            s.close()
            return None


def enabled() -> bool:
    """``MLXTRAL_DIST_DOORBELL``: on unless set off (0, false, no, off)."""
    return raw("MLXTRAL_DIST_DOORBELL") is None or env_flag("MLXTRAL_DIST_DOORBELL")


def connect(group: Any, timeout: float | None = None) -> Doorbell | None:
    """Every rank together, once at start-up: the doorbell, or None on every rank (the followers
    then wait inside the collective). In the first collective rank 0 publishes its port and token
    and every rank says whether it can take part (a host file, the doorbell on): unless all can,
    nobody waits for anybody. The connections then take at most ``SETUP_SECONDS`` (and half the
    collectives' timeout, so that no rank's watchdog fires while rank 0 accepts)."""
    if group.size == 1:
        return None
    host = rank0_host() if enabled() else None
    n_tok = TOKEN_BYTES // 4
    words = np.zeros(1 + n_tok + group.size, dtype=np.int32)  # [port, token..., able per rank]
    listener = None
    if group.rank == 0 and host is not None:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.create_server((host, 0), family=family, backlog=max(8, group.size))
            words[0] = listener.getsockname()[1]
            words[1 : 1 + n_tok] = np.frombuffer(secrets.token_bytes(TOKEN_BYTES), dtype=np.int32)
        except OSError:
            listener = None
    words[1 + n_tok + group.rank] = 1 if host is not None and (group.rank != 0 or listener is not None) else 0
    words = group.all_sum(words, "the start-up")
    port, token = int(words[0]), words[1 : 1 + n_tok].tobytes()
    able = bool((words[1 + n_tok :] == 1).all()) and 0 < port < 65536 and host is not None
    socks: list[socket.socket] = []
    if able:
        limit = timeout if timeout is not None else getattr(group, "timeout", 300)
        wait = min(SETUP_SECONDS, max(0.5, limit / 2))
        deadline = time.monotonic() + wait
        if listener is not None:
            socks = _accept(listener, token, group.size - 1, deadline)
        elif group.rank != 0:
            s = _dial(host, port, token, group.rank, deadline)  # type: ignore[arg-type]
            socks = [s] if s is not None else []
    if listener is not None:
        listener.close()
    if not able:
        return None
    ok = group.all_sum(np.array([1 if socks else 0], dtype=np.int32), "the start-up")
    bell = Doorbell(socks)
    if int(ok[0]) != group.size:
        bell.close()
        return None
    return bell
