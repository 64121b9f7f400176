"""What rank 0 tells the other ranks: one command per forward, broadcast as int32.

A command is a fixed 64-word header (an ``all_sum`` in which only rank 0's words are not 0, so
every rank receives them exactly); a payload longer than the header's 48 inline words follows in
a second message. Decode steps fit inline: one collective per token.

Header words: ``[0]`` op, ``[1]`` payload length, ``[2:16]`` op fields, ``[16:64]`` inline payload.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlxtral.distributed.group import DistributedError, Group

FORWARD, RUNS, STATS, STOP, COUNTS, WARM = 1, 2, 3, 4, 5, 6
HEADER, FIELDS, INLINE = 64, 16, 48
MAX_PAYLOAD = 1 << 26  # words: far beyond any context; a header that claims more is corrupt


@dataclass
class Command:
    op: int
    fields: list[int] = field(default_factory=list)  # at most FIELDS - 2
    payload: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # int32


def send(group: Group, cmd: Command) -> None:
    """Rank 0: broadcast ``cmd``."""
    hdr = np.zeros(HEADER, dtype=np.int32)
    n = len(cmd.payload)
    hdr[0], hdr[1] = cmd.op, n
    hdr[2 : 2 + len(cmd.fields)] = cmd.fields
    if n <= INLINE:
        hdr[FIELDS : FIELDS + n] = cmd.payload
    if (bell := getattr(group, "doorbell", None)) is not None:
        bell.ring()
    group.all_sum(hdr, "a command")
    if n > INLINE:
        group.all_sum(np.ascontiguousarray(cmd.payload, dtype=np.int32), "a command")


def receive(group: Group) -> Command:
    """The other ranks: the next command from rank 0 (waits as long as rank 0 is idle: a chat that
    waits for its user; a rank 0 that dies ends the wait at once). With a doorbell the wait is a
    sleep until rank 0 rings, not a poll inside the collective."""
    if (bell := getattr(group, "doorbell", None)) is not None and not bell.wait():
        raise DistributedError(f"rank {group.rank}: lost the other ranks while waiting for rank 0 "
                               f"(the doorbell closed)")
    hdr = group.all_sum(np.zeros(HEADER, dtype=np.int32), "waiting for rank 0", wait=False)
    op, n = int(hdr[0]), int(hdr[1])
    if op not in (FORWARD, RUNS, STATS, STOP, COUNTS, WARM) or not 0 <= n <= MAX_PAYLOAD:
        raise DistributedError(f"rank {group.rank}: an unreadable command from rank 0 (op {op}, {n} words)")
    if n <= INLINE:
        payload = hdr[FIELDS : FIELDS + n].copy()
    else:
        payload = group.all_sum(np.zeros(n, dtype=np.int32), "a command")
    return Command(op, hdr[2:FIELDS].tolist(), payload)
