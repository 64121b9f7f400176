"""One scheduler step for several sequences in one forward: the weights stream once per step for
the whole batch instead of once per sequence (the NumPy backend's ``forward_runs``).

Each sequence brings a run of tokens (one to decode, a prompt chunk to prefill), its own KV cache
and position; the backend's kernels compute a row the same way whatever the number of rows
(tests/test_batch_invariance.py), so each sequence gets bit for bit the logits it gets alone
(tests/test_server_batch.py). Other backends step their sequences one by one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def supports_batch(backend: Any) -> bool:
    return hasattr(backend, "forward_runs")


def step_batch(be: Any, runs: Sequence[Sequence[int]], caches: Sequence[Any]) -> np.ndarray:
    """Runs [B] of tokens [T_b] at positions cache.offset.. of their caches -> logits [B, vocab]
    float32 of each run's last token; cache b advances by T_b."""
    return np.asarray(be.forward_runs(runs, caches), dtype=np.float32)


def decode_batch(be: Any, tokens: Sequence[int], caches: Sequence[Any]) -> np.ndarray:
    """Tokens [B] at positions cache.offset of their caches -> logits [B, vocab] float32; each
    cache advances by one position."""
    return step_batch(be, [[t] for t in tokens], caches)
