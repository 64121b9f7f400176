"""Pipeline parallel: one forward, every rank its own layers (either backend: each has
``hidden(ids, cache, h)`` and ``logits(h, pos)`` on NumPy arrays; the NumPy backend's
``hidden_runs`` also steps several sequences at once, for the server).

The hidden state goes round the ring: rank 0 embeds and runs its layers, each next rank runs its
own, the last sends the result back to rank 0, which computes the logits. A prompt goes in
micro-batches (consecutive chunks of positions), so while rank 1 runs chunk 1 rank 0 already runs
chunk 2: with ``n`` ranks and ``m`` chunks a prefill takes about ``(m + n - 1) / m`` of one rank's
share of layers per chunk instead of ``n`` times it. Each rank's KV cache holds its own layers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mlxtral.backends.numerics import non_finite_error
from mlxtral.distributed.group import Group

MIN_MICRO = 16  # tokens: a smaller chunk costs more in weight reads than the overlap gains


def micro_batch(T: int, ranks: int) -> int:
    """Tokens per micro-batch: about 2 chunks per rank, at least :data:`MIN_MICRO` tokens."""
    return T if T <= MIN_MICRO or ranks == 1 else max(MIN_MICRO, -(-T // (2 * ranks)))


def forward(be: Any, group: Group, ids: Sequence[int], cache: Any, all_logits: bool) -> np.ndarray | None:
    """Every rank runs this with the same ``ids``; rank 0 gets the logits ([T, vocab] with
    ``all_logits``, else [vocab]), the others None."""
    place = be.place
    T, dim = len(ids), be.args.dim
    p0 = cache.offset
    last = place.rank == place.size - 1
    m = micro_batch(T, place.size)
    outs: list[np.ndarray] = []  # the last rank's results, for rank 0
    try:
        for c0 in range(0, T, m):
            part = list(ids[c0 : c0 + m])
            h = None if place.head else group.recv((len(part), dim), np.float32, place.prev,
                                                   f"layers {place.layers.start}-{place.layers.stop - 1}")
            h = be.hidden(part, cache, h)  # [n, dim]; the cache advances
            if not last:
                group.send(h, place.next, "sending the hidden state")
            else:
                outs.append(h if all_logits else h[-1:])
    except ZeroDivisionError:
        raise non_finite_error(p0 + 1) from None
    if last and not place.head:
        group.send(np.concatenate(outs) if all_logits else outs[-1], 0, "sending the hidden state")
        return None
    if not place.head:
        return None
    if place.size == 1:
        h = np.concatenate(outs) if all_logits else outs[-1]
    else:
        h = group.recv((T if all_logits else 1, dim), np.float32, place.prev, "the last layers")
    if all_logits:
        return be.logits(h, p0 + 1)  # [T, vocab]
    return be.logits(h, p0 + T)[0]  # [vocab]


def forward_runs(be: Any, group: Group, runs: Sequence[Sequence[int]], caches: Sequence[Any]
                 ) -> np.ndarray | None:
    """Several sequences in one pass round the ring (the server's steps; ``be.hidden_runs``): each
    rank runs its layers on every run at once and hands the hidden state [T, dim] on. Rank 0 gets
    the logits of each run's last token [B, vocab], the others None. Not micro-batched: a step is
    one decode token per sequence and at most a prompt chunk."""
    place = be.place
    T, dim = sum(len(r) for r in runs), be.args.dim
    h = None if place.head else group.recv((T, dim), np.float32, place.prev,
                                           f"layers {place.layers.start}-{place.layers.stop - 1}")
    h, ends, last = be.hidden_runs(runs, caches, h)  # [T, dim]; the caches advance
    if place.size > 1:
        group.send(h, place.next, "sending the hidden state")
        if not place.head:
            return None
        h = group.recv((T, dim), np.float32, place.prev, "the last layers")
    return be.logits(h[ends - 1], last)  # [B, vocab]
