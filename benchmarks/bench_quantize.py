#!/usr/bin/env python3
"""Speed of the GGUF quantizers (``mlxtral.quant.ggml.quantize``): K-quants next to Q4_0/Q8_0.

    python benchmarks/bench_quantize.py                       # 64 MB of float32, every type
    python benchmarks/bench_quantize.py --mb 256 --types Q4_K,Q6_K --threads 2 --json

The input is a random normal float32 matrix ``[rows, 4096]`` of ``--mb`` MB (weights-like scale),
quantized with ``quantize(x, type, out=...)`` (the public, chunked path that ``mlxtral convert``
uses) ``--repeat`` times; the best time gives MB/s of float32 input. ``--threads N`` splits the rows
over N threads (the numba kernels release the GIL), as ``mlxtral convert`` does. The numba kernels
are compiled (or loaded from numba's cache) on a small warm-up call first, outside the timing.

Also reported: the relative RMSE of the round trip (``||dequant(q) - x|| / ||x||``) and, when
llama.cpp's ``libggml-base.so`` is found (``--lib``, ``$MLXTRAL_GGML_BASE`` or llama-cpp-python in
``~/llamacpp``), llama.cpp's own single-threaded speed (``ggml_quantize_chunk``) on the same data.
Prints a rich table; ``--json`` prints one JSON object instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mlxtral.qtensor import BLOCK_TYPES
from mlxtral.quant import ggml
from mlxtral.quant.dequant import dequantize_blocks

HERE = Path(__file__).resolve().parent
TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGML_TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13,
                 "Q6_K": 14}
COLS = 4096


def run(x: np.ndarray, qtype: str, out: np.ndarray, threads: int) -> None:
    if threads <= 1:
        ggml.quantize(x, qtype, out=out)
        return
    step = -(-x.shape[0] // threads)
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda s: ggml.quantize(x[s : s + step], qtype, out=out[s : s + step]),
                    range(0, x.shape[0], step)))


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def llamacpp_lib(explicit: str | None):
    sys.path.insert(0, str(HERE))
    try:
        from make_kquant_golden import GGML, find_lib
    except ImportError:
        return None
    try:
        return GGML(find_lib(explicit))
    except SystemExit:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=64.0, help="MB of float32 input")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lib", help="llama.cpp's libggml-base.so (for its speed); default: searched")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp even if found")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = ap.parse_args()
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    rows = max(1, int(a.mb * 1e6 / 4 / COLS))
    x = np.random.default_rng(0).standard_normal((rows, COLS), dtype=np.float32) * np.float32(0.02)
    lib = None if a.no_llamacpp else llamacpp_lib(a.lib)
    results = []
    for qtype in types:
        out = np.empty(ggml.quantized_shape(x.shape, qtype), np.uint8)
        ggml.quantize(x[:8], qtype, out=out[:8])  # numba compile / cache load
        dt = best_time(lambda qtype=qtype, out=out: run(x, qtype, out, a.threads), a.repeat)
        rmse = ggml.relative_rmse(x, dequantize_blocks(out, qtype, x.shape))
        r = {"type": qtype, "mb": x.nbytes / 1e6, "seconds": dt, "mbps": x.nbytes / 1e6 / dt,
             "rel_rmse": rmse, "threads": a.threads}
        if lib is not None and qtype in GGML_TYPE_IDS:
            ref = np.empty_like(out)

            def call(qtype=qtype, ref=ref):
                lib._f(GGML_TYPE_IDS[qtype], x.ctypes.data, ref.ctypes.data, 0, x.shape[0], COLS, None)

            lt = best_time(call, a.repeat)
            ts = BLOCK_TYPES[qtype][1]
            r["llamacpp_mbps"] = x.nbytes / 1e6 / lt
            same = (ref.reshape(-1, ts) == out.reshape(-1, ts)).all(axis=1)
            r["identical_blocks_pct"] = 100.0 * float(same.mean())
        results.append(r)
    doc = {"results": results, "input_mb": x.nbytes / 1e6, "threads": a.threads,
           "llamacpp": lib.version() if lib is not None else None, "loadavg": os.getloadavg(),
           "cpus": os.cpu_count()}
    if a.json:
        print(json.dumps(doc, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"quantize {x.nbytes / 1e6:.0f} MB float32 [{rows}, {COLS}], {a.threads} thread(s), "
                    f"load {os.getloadavg()[0]:.1f}")
    for c in ("type", "MB/s", "s", "rel RMSE", "llama.cpp MB/s", "identical blocks"):
        t.add_column(c, justify="left" if c == "type" else "right")
    for r in results:
        t.add_row(r["type"], f"{r['mbps']:.1f}", f"{r['seconds']:.3f}", f"{r['rel_rmse']:.5f}",
                  f"{r['llamacpp_mbps']:.1f}" if "llamacpp_mbps" in r else "-",
                  f"{r['identical_blocks_pct']:.3f}%" if "identical_blocks_pct" in r else "-")
    Console().print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
