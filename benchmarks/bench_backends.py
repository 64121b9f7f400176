#!/usr/bin/env python3
"""Prefill and decode speed of the NumPy and MLX backends on one GGUF.

    python benchmarks/bench_backends.py                     # /tmp/moe_q4_0.gguf (made if missing)
    python benchmarks/bench_backends.py model.gguf --prefill 128 --decode 64 --json

Each backend runs in its own subprocess (so peak memory is its own): load, a warm-up (JIT and
kernel caches), then one prefill of ``--prefill`` random token ids in a single forward and
``--decode`` greedy steps one token at a time. For MLX the decode is also timed with the
``decode_pipelined`` hook (``mx.async_eval``: the next step's graph is built while the current
one runs). Peak memory: NumPy ``ru_maxrss``; MLX ``mx.get_peak_memory``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT = Path("/tmp/moe_q4_0.gguf")
MAKER = Path(__file__).resolve().parents[2] / "shared" / "bench" / "make_moe_gguf.py"


def run_one(path: Path, backend: str, n_prefill: int, n_decode: int, dtype: str | None) -> dict:
    import mlxtral

    t0 = time.perf_counter()
    model = mlxtral.load(path, backend=backend, tokenizer=False, kv_dtype=dtype,
                         max_context=n_prefill + n_decode + 16)
    be = model.backend
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, vocab, n_prefill).tolist()

    warm = be.new_cache(64)  # compile / warm every path: prefill shapes, decode, sorted MoE
    be.forward(prompt[:32], warm)
    for _ in range(3):
        be.forward([5], warm)

    cache = be.new_cache(n_prefill + n_decode + 8)
    t = time.perf_counter()
    logits = be.forward(prompt, cache)
    prefill_s = time.perf_counter() - t
    first = int(np.argmax(logits))

    tok, toks = first, []
    t = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(be.forward([tok], cache)))
        toks.append(tok)
    decode_s = time.perf_counter() - t
    out = {
        "backend": be.name, "file": str(path), "load_s": round(load_s, 2),
        "prefill_tokens": n_prefill, "prefill_tps": round(n_prefill / prefill_s, 2),
        "decode_tokens": n_decode, "decode_tps": round(n_decode / decode_s, 2),
    }
    if hasattr(be, "decode_pipelined"):
        cache.trim(n_prefill)
        t = time.perf_counter()
        ptoks = list(be.decode_pipelined(first, cache, n_decode))
        pipe_s = time.perf_counter() - t
        out["decode_pipelined_tps"] = round(n_decode / pipe_s, 2)
        out["pipelined_same_tokens"] = ptoks == toks
    if hasattr(be, "dtype"):
        out["dtype"] = str(be.dtype).removeprefix("mlx.core.")
    out["peak_memory_gb"] = round(be.peak_memory() / 1e9, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--backends", default="numpy,mlx")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--dtype", default=None, help="MLX dtype (default: float16 on Metal, float32 on CPU)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        print(json.dumps(run_one(a.path, a.child, a.prefill, a.decode, a.dtype)))
        return
    if not a.path.exists():
        if a.path != DEFAULT:
            sys.exit(f"{a.path}: no such file")
        print(f"making {a.path} with {MAKER.name} (q4_0) ...", file=sys.stderr)
        subprocess.run([sys.executable, str(MAKER), str(a.path), "--type", "q4_0"], check=True)
    results = []
    for b in a.backends.split(","):
        cmd = [sys.executable, __file__, str(a.path), "--child", b, "--prefill", str(a.prefill),
               "--decode", str(a.decode)] + (["--dtype", a.dtype] if a.dtype else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{b} failed:\n{p.stderr[-3000:]}")
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        if not a.json:
            r = results[-1]
            extra = (f", pipelined {r['decode_pipelined_tps']} tok/s"
                     if "decode_pipelined_tps" in r else "")
            print(f"{r['backend']:6s} prefill {r['prefill_tokens']}: {r['prefill_tps']:8.2f} tok/s | "
                  f"decode {r['decode_tokens']}: {r['decode_tps']:7.2f} tok/s{extra} | "
                  f"peak {r['peak_memory_gb']:.2f} GB | load {r['load_s']:.1f} s")
    if a.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
