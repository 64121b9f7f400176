"""The memory decision: load the whole model, stream its experts, or refuse (with the numbers).

``budget`` is what the whole run may use: weights, KV cache, working set and expert cache. By
default it is the memory available now (``MemAvailable``, a cgroup limit). If the whole model fits
it is loaded as before; otherwise everything but the experts stays resident and the rest of the
budget becomes the expert cache. Only when the resident part plus the smallest working cache (the
experts one token needs in one layer) does not fit is the load refused.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from mlxtral import memory
from mlxtral.display import show
from mlxtral.errors import OutOfMemoryError, UsageError
from mlxtral.expert_cache.layout import ExpertLayout, is_expert
from mlxtral.formats import Checkpoint
from mlxtral.memory import GB, MemoryEstimate, _mlx_float_bytes, _weights, estimate, tensor_bytes
from mlxtral.wording import plural

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*([a-zA-Z]{0,3})\s*$")
MARGIN = 256 * 1024 * 1024  # of the memory available by default, left to the rest of the machine


def parse_size(value: str | int | float | None) -> int | None:
    """Bytes from ``12GB``, ``150MB``, ``1.5GiB``, ``4096`` or an int; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(f"invalid memory size {show(value)}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = _SIZE.match(str(value)[:64])
        if m is None or m[2].lower() not in _UNITS:
            raise UsageError(f"invalid memory size {str(value)[:64]!r}: use a number of bytes or e.g. 12GB, "
                             "150MB, 1.5GiB")
        n = float(m[1]) * _UNITS[m[2].lower()]
    if not math.isfinite(n) or n <= 0 or n > 2**60:
        raise UsageError(f"invalid memory size {str(value)[:64]!r}: it must be positive")
    return int(n)


@dataclass(frozen=True)
class MemoryPlan:
    mode: str  # "resident" | "stream"
    budget: int | None  # bytes the run may use (None: unknown and not given)
    full: MemoryEstimate  # the whole model resident
    resident: int  # non-expert weights as the backend holds them
    experts_total: int  # every expert as the backend would hold it
    expert_bytes: int  # one cache slot: the largest expert read (aligned) plus its backend form
    cache_slots: int  # experts the cache holds at once (0 when resident)
    min_slots: int  # the smallest working cache: the experts one token needs in one layer
    n_experts_all: int = 0  # experts in the model (layers x experts per layer)

    @property
    def cache_bytes(self) -> int:
        return self.cache_slots * self.expert_bytes

    @property
    def streaming(self) -> bool:
        return self.mode == "stream"

    @property
    def fixed(self) -> int:
        """Everything but the expert cache: resident weights, KV cache, working set."""
        return self.resident + self.full.kv_cache + self.full.working

    @property
    def min_budget(self) -> int:
        """The smallest budget that runs: resident part plus the smallest working cache."""
        return self.fixed + self.min_slots * self.expert_bytes

    def describe(self) -> str:
        if not self.streaming:
            return f"whole model resident: {self.full.describe()}"
        return (f"streaming experts: {size(self.resident)} resident, {size(self.cache_bytes)} expert cache "
                f"of {size(self.experts_total)} ({self.cache_slots} of {self.n_experts_all} experts)")

    def as_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "budget_bytes": self.budget, "full_bytes": self.full.total,
                "resident_bytes": self.resident, "kv_cache_bytes": self.full.kv_cache,
                "working_bytes": self.full.working, "experts_bytes": self.experts_total,
                "expert_slot_bytes": self.expert_bytes, "cache_slots": self.cache_slots,
                "cache_bytes": self.cache_bytes, "min_budget_bytes": self.min_budget}


def _expert_form_bytes(ckpt: Checkpoint, backend: str, kv_dtype: str | None) -> int:
    """Bytes of one expert's backend form beyond the slot (0 where the kernels run on the slot)."""
    from mlxtral.qtensor import NATIVE_TYPES

    fb = _mlx_float_bytes(kv_dtype) if backend == "mlx" else 0
    worst = 0
    for li in range(ckpt.args.n_layers):
        for e in range(ckpt.args.n_experts):
            n = 0
            for kind in ("gate", "up", "down"):
                name = f"blk.{li}.ffn_{kind}.{e}.weight"
                q = ckpt.tensors.get(name)
                if q is None:  # another rank's expert (mlxtral.distributed)
                    continue
                if backend == "mlx" or q.qtype not in NATIVE_TYPES:
                    n += tensor_bytes(ckpt, name, q, backend, fb)
            worst = max(worst, n)
    return worst


def plan_memory(ckpt: Checkpoint, backend: str, max_context: int, kv_dtype: str | None = None,
                budget: int | str | None = None,
                layout: ExpertLayout | Callable[[], ExpertLayout] | None = None,
                stream: bool | None = None, logits_rows: int = 1) -> MemoryPlan:
    """Decide how ``ckpt`` runs on ``backend`` within ``budget`` (default: the memory available).

    ``stream``: None decides by size; True plans streaming even if the model fits (a MoE model);
    False never streams. Raises :class:`OutOfMemoryError` when the plan does not fit.

    A rank of a group (:mod:`mlxtral.distributed`) passes ``ckpt`` with its share of the tensors
    and ``layout`` (or a function making it) from the whole file: the plan is for its share."""
    from mlxtral.expert_cache.reader import slot_bytes

    given = parse_size(budget)
    full = estimate(ckpt, backend, max_context, kv_dtype, logits_rows)
    memory.check_address_space(ckpt, full, backend)  # ulimit -v: the mapped file counts too
    if given is None:
        avail = memory.available_memory()
        limit = None if avail is None else avail + full.held
    else:
        limit = given
    a = ckpt.args
    fits = limit is None or full.total <= limit
    if not (stream and a.is_moe) and (fits or not a.is_moe or stream is False):
        if limit is not None:  # a dense model (or streaming refused) that does not fit: refused
            memory.check_fits(full, ckpt.path, available=limit - full.held, budget=given)
        return MemoryPlan("resident", limit, full, full.weights, 0, 0, 0, a.n_experts_per_tok,
                          a.n_layers * a.n_experts if a.is_moe else 0)
    if limit is None:
        limit = 2**62  # forced streaming on a machine whose memory is unknown
    shown = limit  # what the message calls available
    if given is None:
        limit = max(limit - MARGIN, 0)  # leave the rest of the machine a little
    if layout is None:
        from mlxtral.expert_cache.layout import expert_layout

        layout = expert_layout(a, ckpt.tensors, ckpt.path)
    elif callable(layout):
        layout = layout()
    resident, _ = _weights(ckpt, backend, kv_dtype, keep=lambda n: not is_expert(n))
    experts_total, _ = _weights(ckpt, backend, kv_dtype, keep=is_expert)
    per = slot_bytes(layout) + _expert_form_bytes(ckpt, backend, kv_dtype)
    n_all = sum(1 for n in ckpt.tensors if is_expert(n)) // 3  # the experts held here (a rank: its share)
    fixed = resident + full.kv_cache + full.working
    slots = min(max((limit - fixed) // per, 0), n_all)
    # the experts one layer needs at once: top-k for NumPy (a prefill runs a layer's experts in groups
    # of what the cache holds), every expert of a layer for MLX (one stack per layer)
    min_slots = a.n_experts if backend == "mlx" else a.n_experts_per_tok
    plan = MemoryPlan("stream", limit, full, resident, experts_total, per, int(slots), min_slots, n_all)
    if slots < plan.min_slots:
        raise OutOfMemoryError(
            f"needs ~{size(plan.min_budget)} even with its experts streamed from disk (resident weights "
            f"{size(resident)} + KV cache {size(full.kv_cache)} + working set {size(full.working)} + "
            f"{plural(plan.min_slots, 'expert')} {size(plan.min_slots * per)}) but "
            f"{'the budget is' if given else 'only'} {size(shown)}{'' if given else ' is available'}; "
            f"{memory.ADVICE}", ckpt.path)
    return plan


def size(n: float) -> str:
    """Bytes for people: ``20.5 GB``, ``150 MB``."""
    if n >= 0.95 * GB:
        return f"{n / GB:.1f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{int(n)} bytes"
