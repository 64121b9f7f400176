"""An LRU of finished sequences' KV caches, keyed by their tokens and bounded in bytes.

A new request finds the cached :class:`~mlxtral.generate.Session` sharing the longest prefix with
its prompt (the same system prompt, the previous turn of a chat) and skips that part of the
prefill. Where the KV caches are NumPy arrays the shared prefix is copied into the request's own
session and the entry stays cached (so concurrent requests with one system prompt all reuse it);
otherwise the session leaves the cache while its sequence runs. Every finished sequence's session
comes back as the most recent entry. The size of an entry is the KV bytes its
cache holds (its buffers, not only its tokens); the least recently used entries go first when the
total passes ``max_bytes``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlxtral.generate import Session, common_prefix


def copy_prefix(src: Any, dst: Any, n: int) -> bool:
    """Copy the first ``n`` positions of KV cache ``src`` into ``dst`` (both [L, KV, ctx, hd] NumPy
    caches); False when the caches are of another kind (then nothing is copied)."""
    k, v = getattr(src, "k", None), getattr(src, "v", None)
    if not (isinstance(k, np.ndarray) and isinstance(v, np.ndarray) and isinstance(getattr(dst, "k", None),
                                                                                   np.ndarray)):
        return False
    if dst.k.shape[:2] != k.shape[:2] or dst.max_context < n:
        return False
    dst.k[:, :, :n] = k[:, :, :n]
    dst.v[:, :, :n] = v[:, :, :n]
    dst.offset = n
    return True


def kv_bytes_per_token(args: Any, itemsize: int = 4) -> int:
    """Keys and values of one position in every layer."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * itemsize


class PromptCache:
    def __init__(self, max_bytes: int, bytes_per_token: int, min_reuse: int = 2) -> None:
        self.max_bytes = max_bytes
        self.bytes_per_token = bytes_per_token
        self.min_reuse = min_reuse  # a shorter shared prefix (BOS alone) is not worth a session
        self._entries: OrderedDict[int, Session] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._next = 0

    def size(self, s: Session) -> int:
        """The memory an entry holds: its cache's buffers (an MLX cache trimmed to a few tokens keeps
        them whole), at least its tokens' KV bytes."""
        held = getattr(s.cache, "held_bytes", 0)
        return max(int(held), len(s.tokens) * self.bytes_per_token)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self.size(s) for s in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, ids: Sequence[int]) -> tuple[Session | None, int]:
        """The session sharing the longest prefix with ``ids`` (removed from the cache) and the
        length of that prefix; (None, 0) when none shares at least ``min_reuse`` tokens."""
        with self._lock:
            best, best_n = None, 0
            for key, s in self._entries.items():
                n = common_prefix(s.tokens, ids)
                if n > best_n:
                    best, best_n = key, n
            if best is None or best_n < self.min_reuse:
                return None, 0
            return self._entries.pop(best), best_n

    def put(self, session: Session) -> None:
        """Keep ``session`` as the most recent entry; evict the oldest past ``max_bytes``. An entry
        whose tokens another entry starts with (or equals) adds nothing and is dropped."""
        if not session.tokens or self.size(session) > self.max_bytes:
            return
        with self._lock:
            for key in [k for k, s in self._entries.items()
                        if len(s.tokens) <= len(session.tokens)
                        and common_prefix(s.tokens, session.tokens) == len(s.tokens)]:
                del self._entries[key]
            self._entries[self._next] = session
            self._next += 1
            total = sum(self.size(s) for s in self._entries.values())
            while total > self.max_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                total -= self.size(old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
