"""Pair merging, the core of both BPE (ranked merges) and llama.cpp's SentencePiece tokenizer
(scored pieces): repeatedly join the adjacent pair with the best priority, leftmost on ties.

A heap of candidate pairs over a linked list of symbols: O(n log n) in the text's length (a naive
rescan after every merge is quadratic, which a long word of one repeated character exploits).
"""
from __future__ import annotations

import heapq
from collections.abc import Callable

#: Symbols merged at once. A longer run (a 16 MB line without a space: one "word") is merged in
#: slices of this many, each on its own: ~300 bytes of Python objects a symbol, so ~20 MB at most
#: instead of ~5 GB; the ids differ from a whole merge only around each cut.
MAX_MERGE_SYMBOLS = 1 << 16


def merge_pairs(syms: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    """Merge a copy of ``syms``: while some adjacent pair ``(a, b)`` has a priority (lower
    is merged first; None: never), join the best one, leftmost on ties. Returns the symbols left.
    More than :data:`MAX_MERGE_SYMBOLS` are merged a slice at a time."""
    if len(syms) > MAX_MERGE_SYMBOLS:
        return [s for k in range(0, len(syms), MAX_MERGE_SYMBOLS)
                for s in _merge(syms[k : k + MAX_MERGE_SYMBOLS], priority)]
    return _merge(syms, priority)


def _merge(syms: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    syms = list(syms)
    n = len(syms)
    if n < 2:
        return syms
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))

    def pair(left: int, right: int) -> tuple[float, int, int, int] | None:
        a, b = syms[left], syms[right]
        r = priority(a, b)
        return None if r is None else (r, left, right, len(a) + len(b))

    heap = [p for p in (pair(k, k + 1) for k in range(n - 1)) if p is not None]
    heapq.heapify(heap)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        a, b = syms[left], syms[right]
        if not a or not b or len(a) + len(b) != size or nxt[left] != right:
            continue  # outdated: one side was merged since (merging only ever grows a symbol)
        syms[left] = a + b
        syms[right] = ""
        r2 = nxt[right]
        nxt[left] = r2
        if r2 >= 0:
            prv[r2] = left
        if prv[left] >= 0 and (p := pair(prv[left], left)) is not None:
            heapq.heappush(heap, p)
        if r2 >= 0 and (p := pair(left, r2)) is not None:
            heapq.heappush(heap, p)
    return [s for s in syms if s]
