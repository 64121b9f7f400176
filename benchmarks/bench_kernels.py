"""Speed of mlxtral.backends.kernels.linear: GB/s of weights streamed and ms per call.

    python benchmarks/bench_kernels.py [--types Q4_0,Q8_0] [--tokens 1,128] [--json] [--exact]

Shapes: 14336x4096 (a Mixtral expert's gate/up) and 3584x1024 (the bench MoE model's expert).
Reference: this machine streams ~19.5 GB/s on two threads; llama.cpp decodes at about that.
Also reports the per-call overhead on a tiny matrix and the MoE-style swiglu of two experts.
"""
from __future__ import annotations

import argparse
import json
import time

import gguf
import numpy as np

from mlxtral.backends import kernels
from mlxtral.qtensor import QTensor

SHAPES = [(14336, 4096), (3584, 1024)]
TYPES = ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32"]


def make(qtype: str, shape: tuple[int, int], rng: np.random.Generator) -> QTensor:
    w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    if qtype == "F32":
        return QTensor.from_float(w)
    if qtype == "F16":
        return QTensor.from_float(w.astype(np.float16))
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    if qtype == "BF16":
        data = data.view(np.uint16)
    return QTensor(qtype, shape, data)


def timeit(fn, min_time: float = 0.5, max_iters: int = 200) -> float:
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while time.perf_counter() < t_end and len(times) < max_iters:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--tokens", default="1,128")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--exact", action="store_true", help="float32 activations (exact mode)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        kernels.set_num_threads(args.threads)
    kernels.set_exact(args.exact)
    kernels.warmup()
    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        for qtype in args.types.split(","):
            w = make(qtype, shape, rng)
            for T in (int(t) for t in args.tokens.split(",")):
                x = rng.standard_normal((T, shape[1]), dtype=np.float32)
                sec = timeit(lambda x=x, w=w: kernels.linear(x, w))
                row = {"qtype": qtype, "out": shape[0], "in": shape[1], "T": T, "ms": sec * 1e3,
                       "GBps": w.nbytes / sec / 1e9, "GFLOPs": 2 * T * shape[0] * shape[1] / sec / 1e9}
                rows.append(row)
                if not args.json:
                    print(f"{qtype:5s} {shape[0]:6d}x{shape[1]:<5d} T={T:<4d} {row['ms']:8.3f} ms "
                          f"{row['GBps']:6.2f} GB/s {row['GFLOPs']:7.1f} GFLOP/s", flush=True)
    # per-call overhead and the MoE decode step of the bench model (2 experts, dim 1024, ffn 3584)
    tiny = make("Q4_0", (32, 64), rng)
    xt = rng.standard_normal((1, 64), dtype=np.float32)
    overhead_us = timeit(lambda: kernels.linear(xt, tiny), 0.3, 5000) * 1e6
    extra = {"overhead_us": overhead_us}
    g = [make("Q4_0", (3584, 1024), rng) for _ in range(2)]
    u = [make("Q4_0", (3584, 1024), rng) for _ in range(2)]
    d = [make("Q4_0", (1024, 3584), rng) for _ in range(2)]
    x1 = rng.standard_normal((1, 1024), dtype=np.float32)

    def moe() -> None:
        h = kernels.swiglu_experts([x1, x1], g, u)
        kernels.linear_experts(h, d)

    sec = timeit(moe)
    nbytes = sum(t.nbytes for t in g + u + d)
    extra["moe_decode_q4_0_ms"] = sec * 1e3
    extra["moe_decode_q4_0_GBps"] = nbytes / sec / 1e9
    if args.json:
        print(json.dumps({"threads": kernels.get_num_threads(), "exact": args.exact,
                          "results": rows, **extra}, indent=1))
    else:
        print(f"per-call overhead (32x64 Q4_0): {overhead_us:.1f} us")
        print(f"MoE decode step, 2 experts Q4_0 1024/3584 (swiglu_experts + linear_experts): "
              f"{sec * 1e3:.3f} ms, {nbytes / sec / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
