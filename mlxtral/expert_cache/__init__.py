"""Experts streamed from disk under a memory budget, for models larger than RAM.

- :mod:`.layout`: where each expert's gate, up and down matrices lie in the file;
- :mod:`.reader`: whole experts read into preallocated slots (``O_DIRECT``; why, there);
- :mod:`.cache`: the bounded cache both backends use (LFU/LRU eviction, pinning, prefetch thread,
  statistics);
- :mod:`.plan`: the memory decision (resident, streamed, or refused with the numbers).

A backend runs in streaming mode when it is given an :class:`ExpertCache`: everything but the
experts stays resident, and each layer asks the cache for the experts its tokens route to, after
guessing the next layer's from the current hidden state (the guess only decides what is read
ahead; the answer is computed on the experts the router picks, read from the same bytes).
"""
from __future__ import annotations

from mlxtral.expert_cache.cache import POLICIES, ExpertCache, ExpertStats
from mlxtral.expert_cache.layout import ExpertLayout, expert_layout, is_expert
from mlxtral.expert_cache.plan import MemoryPlan, parse_size, plan_memory

__all__ = ["POLICIES", "ExpertCache", "ExpertLayout", "ExpertStats", "MemoryPlan", "expert_layout",
           "is_expert", "parse_size", "plan_memory"]
