#!/usr/bin/env python3
"""How to read experts from disk: the measurement behind :mod:`mlxtral.expert_cache.reader`.

    python benchmarks/bench_expert_io.py MIXTRAL.gguf [--experts 48] [--json]

Reads the same random sequence of whole experts (gate, up, down) with each mechanism, the page
cache dropped before each (needs root; otherwise the runs after the first may hit the cache and
the table says so):

- ``odirect xN``: ``preadv`` with ``O_DIRECT`` into preallocated page-aligned slots, in 8 MB
  pieces on N I/O threads (the reader's mechanism; N = 1 is one request at a time);
- ``buffered xN``: the same through the page cache, then ``POSIX_FADV_DONTNEED`` on the range;
- ``mmap``: ``madvise(MADV_WILLNEED)`` on each matrix of the file's map, then touching every page
  (what a kernel reading the weights in place costs), then ``MADV_DONTNEED``.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxtral.expert_cache.layout import expert_layout  # noqa: E402
from mlxtral.expert_cache.reader import ExpertReader, Slot, slot_bytes  # noqa: E402
from mlxtral.formats.detect import open_checkpoint  # noqa: E402


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def run_reader(layout, picks, direct: bool, threads: int) -> float:
    reader = ExpertReader(layout, direct=direct, io_threads=threads)
    slot = Slot(slot_bytes(layout))
    slot.buf[::4096] = 0  # fault the slot in first, as a long run does once
    t0 = time.perf_counter()
    for li, e in picks:
        reader.read(li, e, slot)
    dt = time.perf_counter() - t0
    reader.close()
    return dt


def run_mmap(layout, picks) -> float:
    with open(layout.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    arr = np.frombuffer(mm, dtype=np.uint8)
    t0 = time.perf_counter()
    total = 0
    for li, e in picks:
        for s in layout.spans[li][e]:
            a0 = s.offset // mmap.PAGESIZE * mmap.PAGESIZE
            mm.madvise(mmap.MADV_WILLNEED, a0, s.offset + s.nbytes - a0)
        for s in layout.spans[li][e]:
            total += int(arr[s.offset : s.offset + s.nbytes : 4096].sum())  # one byte per page
        for s in layout.spans[li][e]:
            a0 = s.offset // mmap.PAGESIZE * mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, a0, s.offset + s.nbytes - a0)
    dt = time.perf_counter() - t0
    del arr
    mm.close()
    return dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--experts", type=int, default=48, help="experts read per mechanism")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    ckpt = open_checkpoint(Path(a.model))
    layout = expert_layout(ckpt.args, ckpt.tensors, ckpt.path)
    rng = np.random.default_rng(a.seed)
    picks = [(int(rng.integers(layout.n_layers)), int(rng.integers(layout.n_experts)))
             for _ in range(a.experts)]
    nbytes = sum(layout.expert_bytes(li, e) for li, e in picks)
    rows = []
    for name, fn in (("odirect x1", lambda: run_reader(layout, picks, True, 1)),
                     ("odirect x2", lambda: run_reader(layout, picks, True, 2)),
                     ("odirect x4", lambda: run_reader(layout, picks, True, 4)),
                     ("buffered x4", lambda: run_reader(layout, picks, False, 4)),
                     ("mmap+willneed", lambda: run_mmap(layout, picks))):
        cold = drop_caches()
        dt = fn()
        rows.append({"mechanism": name, "seconds": round(dt, 3), "gb_per_s": round(nbytes / dt / 1e9, 3),
                     "cold_page_cache": cold})
    out = {"file": str(layout.path), "experts": len(picks), "bytes": nbytes,
           "expert_bytes": layout.expert_bytes(0, 0), "results": rows}
    if a.json:
        print(json.dumps(out))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(picks)} random experts, {nbytes / 1e9:.2f} GB, from {layout.path.name}")
    for c in ("mechanism", "seconds", "GB/s", "cold cache"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["mechanism"], f"{r['seconds']:.2f}", f"{r['gb_per_s']:.2f}", str(r["cold_page_cache"]))
    Console().print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
