"""Will the model fit? Estimate what a loaded model needs and compare it with the machine's memory.

:func:`estimate` counts the weights as the backend holds them (NumPy: the checkpoint's own
arrays, memory-mapped or not: mapped weights must be paged in to run at speed; MLX: the arrays it
converts them to), the KV cache filled to ``max_context``, and a working set (attention scores
of one prefill chunk, activations, logits, the runtime itself). :func:`check_fits` compares the
total with the memory available to this process (``MemAvailable`` on Linux, capped by the limits
of its own cgroup and its parents, v2 or v1; physical memory on macOS) and raises
:class:`~mlxtral.errors.OutOfMemoryError` with a suggestion, instead of letting the OOM killer end
the process mid-load. :func:`check_address_space` does the same for ``ulimit -v`` (RLIMIT_AS), which
counts every mapping, the memory-mapped model file included.
"""
from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxtral.errors import OutOfMemoryError
from mlxtral.formats import Checkpoint
from mlxtral.qtensor import F32_NAMES, Tensor

GB = 1e9
RUNTIME_BYTES = 300 * 1024 * 1024  # interpreter, NumPy/numba/MLX libraries, tokenizer (MLX backend)
# the NumPy backend's process (interpreter, NumPy, numba's runtime and kernels, tokenizer): measured
# ~125 MB resident besides weights and KV cache on the bench model (anonymous ~90 MB, libraries ~35 MB)
NUMPY_RUNTIME_BYTES = 192 * 1024 * 1024
def runtime_bytes(backend: str) -> int:
    """The process itself, beside weights, KV cache and activations, on ``backend``."""
    return RUNTIME_BYTES if backend == "mlx" else NUMPY_RUNTIME_BYTES


PREFILL_CHUNK = 512  # tokens per prefill step (Model.stream's default)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes the backend keeps resident for the weights
    kv_cache: int  # keys + values for max_context positions
    working: int  # activations, attention scores, logits, runtime
    held: int = 0  # of ``weights``, bytes this process already holds (arrays not backed by a file)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working

    def describe(self) -> str:
        return (f"~{size_text(self.total)} (weights {size_text(self.weights)} + KV cache "
                f"{size_text(self.kv_cache)} + working set {size_text(self.working)})")


def size_text(n: float) -> str:
    """Bytes as people read them here: 52.1 GB, 0.45 GB, 67.1 MB (one rounding for every line)."""
    if n >= 10 * GB:
        return f"{n / GB:.1f} GB"
    return f"{n / GB:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _is_mapped(a: np.ndarray) -> bool:
    """True if ``a`` is a view of a memory-mapped file."""
    b: object = a
    for _ in range(64):
        if isinstance(b, (np.memmap, mmap.mmap)):
            return True
        if isinstance(b, memoryview):
            b = b.obj
            continue
        nxt = getattr(b, "base", None)
        if nxt is None:
            return False
        b = nxt
    return False


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _mlx_float_bytes(kv_dtype: str | None) -> int:
    if kv_dtype is None:
        from mlxtral.model import metal_available

        return 2 if metal_available() else 4
    return _DTYPE_BYTES.get(str(kv_dtype).lower().removeprefix("mlx.core."), 4)


def tensor_bytes(ckpt: Checkpoint, name: str, q: Tensor, backend: str, float_bytes: int) -> int:
    """Bytes ``backend`` keeps resident for tensor ``name`` (``float_bytes``: MLX's float size)."""
    from mlxtral.formats.native import native_form
    from mlxtral.quant.gguf_affine import mlx_form

    if backend != "mlx":
        return native_form(q)[1]  # GGUF blocks as stored, MLX 4-bit as Q4_1: after this check
    n = _numel(q.shape)
    form = mlx_form(q)
    if F32_NAMES.search(name):
        return 4 * n
    if form is not None:  # packed codes + a scale and a bias per group
        return n * form[0] // 8 + 2 * (n // form[1]) * float_bytes
    if ".ffn_" in name and ckpt.args.is_moe and float_bytes == 4:
        return 4 * n  # MLX's CPU gather_mm is float32-only
    return n * float_bytes


def _weights(ckpt: Checkpoint, backend: str, kv_dtype: str | None,
             keep: Callable[[str], bool] | None = None) -> tuple[int, int]:
    """(resident bytes as ``backend`` holds the weights, bytes already held by this process);
    only the tensors ``keep`` accepts, when given."""
    seen: set[int] = set()
    total = held = 0
    float_bytes = _mlx_float_bytes(kv_dtype) if backend == "mlx" else 0
    for name, q in ckpt.tensors.items():
        if id(q.data) in seen or (keep is not None and not keep(name)):
            continue
        seen.add(id(q.data))
        if not _is_mapped(q.data):
            held += q.nbytes  # already in this process's memory (converted at load, or read)
        total += tensor_bytes(ckpt, name, q, backend, float_bytes)
    if backend == "mlx":
        held = 0  # MLX makes its own copies; the checkpoint's stay until they are built (the peak)
    return total, held


def estimate(ckpt: Checkpoint, backend: str, max_context: int, kv_dtype: str | None = None,
             logits_rows: int = 1) -> MemoryEstimate:
    """What loading ``ckpt`` on ``backend`` ("numpy" or "mlx") with ``max_context`` will need;
    ``logits_rows``: the positions whose logits a forward returns at once (a generation: its last
    one; perplexity: a whole chunk, with its log-softmax beside)."""
    a = ckpt.args
    weights, held = _weights(ckpt, backend, kv_dtype)
    if backend == "mlx":
        kv_item = _mlx_float_bytes(kv_dtype)
    else:
        try:
            kv_item = np.dtype(kv_dtype or "float32").itemsize
        except TypeError:
            kv_item = 4
    kv = 2 * a.n_layers * max_context * a.n_kv_heads * a.head_dim * kv_item
    t = min(PREFILL_CHUNK, max_context)
    acts = t * (6 * a.dim + 3 * a.hidden_dim * max(a.n_experts_per_tok, 1)) * 4
    if backend == "mlx":
        scores = 3 * a.n_heads * t * max_context * 4  # scores, mask, softmax of one layer, f32
        upcast = 2 * max_context * a.n_kv_heads * a.head_dim * 4 if kv_item != 4 else 0
        logits = t * a.vocab_size * 4
        return MemoryEstimate(weights, kv, runtime_bytes(backend) + scores + upcast + acts + logits, held)
    # NumPy: attention runs over the cache as it lies, a row of scores per thread (no [H, T, ctx]
    # matrix), a float16 cache is read in place, and a generation's prefill keeps its last logits only
    scores = 2 * a.n_heads * max_context * 4
    logits = a.vocab_size * 4 * (1 if logits_rows <= 1 else 3 * logits_rows)  # + log-softmax, a copy
    return MemoryEstimate(weights, kv, runtime_bytes(backend) + scores + acts + logits, held)


# ---- what the machine has -----------------------------------------------------------------------
PROC = "/proc"  # where /proc and the cgroup file system are (tests point them at fake trees)
CGROUP = "/sys/fs/cgroup"
_MAX_LEVELS = 64  # cgroup nesting walked up at most (the kernel allows far less in practice)
_MAX_READ = 1 << 20  # a /proc or cgroup file read at most (memory.stat is a few kB)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read(_MAX_READ).strip()
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo_available(proc: str = PROC) -> int | None:
    text = _read(f"{proc}/meminfo")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def _own_cgroups(proc: str = PROC) -> dict[str, str]:
    """This process's cgroup paths from ``/proc/self/cgroup``: ``{"v2": path}`` for the unified
    hierarchy (``0::/path``), ``{"v1": path}`` for the v1 memory controller (``N:memory:/path``)."""
    out: dict[str, str] = {}
    for line in (_read(f"{proc}/self/cgroup") or "").splitlines()[:_MAX_LEVELS]:
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        if parts[0] == "0" and parts[1] == "":
            out.setdefault("v2", parts[2])
        elif "memory" in parts[1].split(","):
            out.setdefault("v1", parts[2])
    return out


def _levels(base: str, path: str) -> list[str]:
    """The cgroup folders from ``base + path`` up to ``base`` (innermost first). Levels that do not
    exist are skipped by the reads: in a container the process's cgroup is the mount's root."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")][:_MAX_LEVELS]
    dirs = [base + "".join("/" + p for p in parts[:k]) for k in range(len(parts), 0, -1)]
    return [*dirs, base]


def _room(limit_f: str, usage_f: str, stat_f: str) -> int | None:
    """Room left under one cgroup level's limit, or None if it has none (or it is unreadable)."""
    limit = _read(limit_f)
    if limit is None or not limit.isdigit():
        return None  # "max" (v2), missing (the root, or not this hierarchy)
    lim = int(limit)
    if lim >= 1 << 60:  # cgroup v1's "unlimited"
        return None
    usage = _read(usage_f)
    used = int(usage) if usage and usage.isdigit() else 0
    inactive = 0  # page cache the kernel reclaims before it OOM-kills
    for line in (_read(stat_f) or "").splitlines():
        k, _, v = line.partition(" ")
        if k in ("inactive_file", "total_inactive_file") and v.isdigit():
            inactive = int(v)
    return max(lim - max(used - inactive, 0), 0)


def _cgroup_available(proc: str = PROC, cgroup: str = CGROUP) -> int | None:
    """Room left under this process's cgroup memory limits, or None if unlimited: the tightest
    level of its own cgroup and every parent (v2 ``memory.max``; v1 ``memory.limit_in_bytes``)."""
    own = _own_cgroups(proc)
    found: list[int] = []
    v2 = [(d, f"{d}/memory.max", f"{d}/memory.current", f"{d}/memory.stat")
          for d in _levels(cgroup, own.get("v2", "/"))]
    mem = f"{cgroup}/memory"
    v1 = [(d, f"{d}/memory.limit_in_bytes", f"{d}/memory.usage_in_bytes", f"{d}/memory.stat")
          for d in _levels(mem, own.get("v1", "/"))]
    for levels in (v2, v1):
        for _, limit_f, usage_f, stat_f in levels:
            room = _room(limit_f, usage_f, stat_f)
            if room is not None:
                found.append(room)
    return min(found) if found else None


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(proc: str | None = None, cgroup: str | None = None) -> int | None:
    """Bytes this process can still use without swapping or being killed; None if unknown: Linux's
    ``MemAvailable`` capped by the process's own cgroup limits (and its parents'). The address-space
    limit (``ulimit -v``) is another kind of limit: :func:`check_address_space`."""
    if sys.platform.startswith("linux"):
        proc, cgroup = proc or PROC, cgroup or CGROUP
        found = [v for v in (_meminfo_available(proc), _cgroup_available(proc, cgroup)) if v is not None]
        return min(found) if found else _physical_memory()
    return _physical_memory()  # macOS (hw.memsize) and others: unified memory, no MemAvailable


def address_space_needed(ckpt: Checkpoint, est: MemoryEstimate, backend: str) -> int:
    """Address space a load of ``ckpt`` (open: its file is mapped already) still needs: weights not
    used in place from the mapping, the KV cache, the compute kernels still to come (numba,
    llvmlite, their threads: what aborts when it does not fit) and a short prompt's working set (a
    longer prompt that does not fit is a MemoryError later, reported as the same one line)."""
    from mlxtral import address_space
    from mlxtral.formats.native import native_form

    in_place = 0
    if backend != "mlx":
        seen: set[int] = set()
        for q in ckpt.tensors.values():
            if id(q.data) not in seen and _is_mapped(q.data) and native_form(q)[0] == q.qtype:
                seen.add(id(q.data))
                in_place += q.nbytes
    return (max(est.weights - in_place - est.held, 0) + est.kv_cache + address_space.KERNELS
            + min(max(est.working - runtime_bytes(backend), 0), address_space.WORKING))


def check_address_space(ckpt: Checkpoint, est: MemoryEstimate, backend: str) -> None:
    """Under ``ulimit -v``: :class:`~mlxtral.address_space.AddressSpaceError` (one line, naming the
    file) if the rest of the load and a run of the whole context cannot fit."""
    from mlxtral import address_space

    if address_space.limit() is None:
        return
    try:
        address_space.check_room(address_space_needed(ckpt, est, backend))
    except address_space.AddressSpaceError as e:
        raise address_space.AddressSpaceError(e.message, ckpt.path) from None


ADVICE = ("try a smaller --max-context (the KV cache grows with it) or a smaller quantization (mlxtral "
          "convert SRC OUT --q4, or --q3-k-m / --q2-k from a 4-bit or larger file)")


def check_fits(est: MemoryEstimate, path: str | Path | None = None, available: int | None = None,
               budget: int | None = None) -> None:
    """Raise :class:`OutOfMemoryError` if ``est`` does not fit the memory available (or the
    ``budget`` the user gave, bytes, weights already held included)."""
    if budget is not None:
        if est.total > budget:
            raise OutOfMemoryError(f"needs {est.describe()} but the budget is {budget / GB:.1f} GB; {ADVICE}",
                                   path)
        return
    avail = available_memory() if available is None else available
    if avail is None:
        return
    avail += est.held  # weights this process already holds are part of the estimate
    if est.total <= avail:
        return
    raise OutOfMemoryError(f"needs {est.describe()} but only {avail / GB:.1f} GB is available; {ADVICE}",
                           path)
