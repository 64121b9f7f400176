"""One decode step for several sequences in one forward: the weights stream once per step for
the whole batch instead of once per sequence (the NumPy backend's ``forward_batch``).

Each sequence brings one token, its own KV cache and position; the backend's kernels compute a
row the same way whatever the number of rows (tests/test_batch_invariance.py), so each sequence
gets bit for bit the logits it gets alone. Other backends step their sequences one by one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def supports_batch(backend: Any) -> bool:
    return hasattr(backend, "forward_batch")


def decode_batch(be: Any, tokens: Sequence[int], caches: Sequence[Any]) -> np.ndarray:
    """Tokens [B] at positions cache.offset of their caches -> logits [B, vocab] float32; each
    cache advances by one position."""
    return np.asarray(be.forward_batch(tokens, caches), dtype=np.float32)
