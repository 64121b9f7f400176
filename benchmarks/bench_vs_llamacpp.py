#!/usr/bin/env python3
"""mlxtral (NumPy backend) vs llama.cpp on the same GGUF files, same threads, same run: the ratios.

    python benchmarks/bench_vs_llamacpp.py                       # Q4_0 and Q8_0, 3 alternating rounds
    python benchmarks/bench_vs_llamacpp.py --types q4_0 --rounds 5 --json

Models: ``shared/bench/make_moe_gguf.py``'s default shape (dim 1024, 8 layers, 8 experts top-2,
ffn 3584), built once into ``--cache-dir`` (default /tmp/mlxtral-bench). Each engine runs in its own
subprocess, measured the way ``shared/bench/llamacpp_speed.py`` measures llama.cpp: prefill ``--pp``
random token ids (BOS first) in one call, then ``--tg`` random tokens one at a time, fresh cache each
repeat, best of ``--repeat``; peak RSS = the subprocess's ``ru_maxrss``. llama.cpp runs through
``~/llamacpp/bin/python`` (llama-cpp-python, never a dependency of mlxtral); without it, mlxtral is
reported alone. The machine is shared and noisy, so the engines run back to back, alternating, for
``--rounds`` rounds, and the ratios are per round (median shown).

Targets (issue 7): decode and prefill >= 0.5x llama.cpp (aim 1.0x); peak RSS <= 1.3x (file + KV cache).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared" / "bench"
MAKER = SHARED / "make_moe_gguf.py"
LLAMA_SPEED = SHARED / "llamacpp_speed.py"
LLAMA_PY = Path.home() / "llamacpp" / "bin" / "python"


# ---- the mlxtral side (runs in a subprocess: --worker) ------------------------------------------
def worker(model: str, pp: int, tg: int, threads: int, repeat: int, kv_dtype: str) -> dict:
    import numpy as np

    import mlxtral
    from mlxtral.backends import kernels

    kernels.set_num_threads(threads)
    ctx = pp + tg + 8
    t0 = time.perf_counter()
    m = mlxtral.load(model, backend="numpy", tokenizer=False, kv_dtype=kv_dtype, max_context=ctx)
    be = m.backend
    kernels.warmup()  # numba's disk cache: load (or, on a fresh machine, compile) every kernel
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = m.config.vocab_size
    best_pp = best_tg = 0.0
    kv_bytes = 0
    for _ in range(repeat):
        cache = be.new_cache(ctx)
        kv_bytes = cache.nbytes
        prompt = [1] + rng.integers(3, vocab, pp - 1).tolist()
        t1 = time.perf_counter()
        be.forward(prompt, cache)
        t2 = time.perf_counter()
        for tok in rng.integers(3, vocab, tg).tolist():
            be.forward([tok], cache)
        t3 = time.perf_counter()
        best_pp = max(best_pp, pp / (t2 - t1))
        best_tg = max(best_tg, tg / (t3 - t2))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 1024 if sys.platform != "darwin" else rss / 2**20
    return {"engine": "mlxtral", "model": model, "threads": threads, "pp": pp, "tg": tg,
            "pp_tok_s": round(best_pp, 2), "tg_tok_s": round(best_tg, 2), "peak_rss_mb": round(rss_mb, 1),
            "kv_mb": round(kv_bytes / 2**20, 1), "load_s": round(load_s, 2),
            "kernels": "numba" if kernels.HAVE_NUMBA else "numpy"}


# ---- the driver ---------------------------------------------------------------------------------
def ensure_model(cache_dir: Path, qtype: str) -> Path:
    path = cache_dir / f"moe-{qtype}.gguf"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    print(f"building {path} (make_moe_gguf.py --type {qtype}) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(MAKER), str(tmp), "--type", qtype], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp.rename(path)
    return path


def llamacpp_ready() -> str | None:
    """None when llama-cpp-python is usable, else why not."""
    if not LLAMA_PY.exists():
        return f"{LLAMA_PY} not found"
    r = subprocess.run([str(LLAMA_PY), "-c", "import llama_cpp, numpy"], capture_output=True, text=True)
    if r.returncode != 0:
        return "llama-cpp-python not importable yet: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


def _last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON in output: {out[-500:]}")


def run_mlxtral(model: Path, a: argparse.Namespace) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               OPENBLAS_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, str(HERE), "--worker", str(model), "--pp", str(a.pp), "--tg", str(a.tg),
           "--threads", str(a.threads), "--repeat", str(a.repeat), "--kv-dtype", a.kv_dtype]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"mlxtral worker failed:\n{r.stderr[-2000:]}")
    return _last_json(r.stdout)


def run_llamacpp(model: Path, a: argparse.Namespace) -> dict:
    cmd = [str(LLAMA_PY), str(LLAMA_SPEED), str(model), "--pp", str(a.pp), "--tg", str(a.tg),
           "--threads", str(a.threads), "--repeat", str(a.repeat)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llamacpp_speed.py failed:\n{r.stderr[-2000:]}")
    return _last_json(r.stdout)


def kv_cache_mb(model: Path, ctx: int, itemsize: int) -> float:
    from mlxtral.formats.detect import open_checkpoint

    c = open_checkpoint(model).args
    return 2 * c.n_layers * ctx * c.n_kv_heads * c.head_dim * itemsize / 2**20


def load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--types", default="q4_0,q8_0")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/mlxtral-bench"))
    p.add_argument("--pp", type=int, default=128)
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="best of N inside each engine run")
    p.add_argument("--rounds", type=int, default=3, help="alternating mlxtral / llama.cpp rounds")
    p.add_argument("--kv-dtype", default="float32", help="mlxtral's KV cache dtype")
    p.add_argument("--no-llamacpp", action="store_true", help="mlxtral alone")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.pp, a.tg, a.threads, a.repeat, a.kv_dtype)))
        return 0

    why_not = "--no-llamacpp" if a.no_llamacpp else llamacpp_ready()
    results: dict[str, dict] = {}
    for qtype in a.types.split(","):
        model = ensure_model(a.cache_dir, qtype)
        size_mb = model.stat().st_size / 2**20
        ctx = a.pp + a.tg + 8
        import numpy as np

        results[qtype] = {"file": str(model), "file_mb": round(size_mb, 1),
                          "kv_mb_mlxtral": round(kv_cache_mb(model, ctx, np.dtype(a.kv_dtype).itemsize), 1),
                          "kv_mb_llamacpp": round(kv_cache_mb(model, ctx, 2), 1),  # f16 cache
                          "rounds": []}
    for rnd in range(a.rounds):
        for qtype, res in results.items():
            model = Path(res["file"])
            row = {"load_avg": load_avg()}
            order = ["mlxtral", "llama.cpp"] if rnd % 2 == 0 else ["llama.cpp", "mlxtral"]
            for eng in order:
                if eng == "mlxtral":
                    row["mlxtral"] = run_mlxtral(model, a)
                elif why_not is None:
                    row["llama.cpp"] = run_llamacpp(model, a)
            res["rounds"].append(row)
            if not a.json:
                m, ll = row["mlxtral"], row.get("llama.cpp")
                msg = f"round {rnd + 1} {qtype}: mlxtral pp {m['pp_tok_s']} tg {m['tg_tok_s']}"
                if ll:
                    msg += f" | llama.cpp pp {ll['pp_tok_s']} tg {ll['tg_tok_s']}"
                print(msg + f" (load {row['load_avg']})", file=sys.stderr, flush=True)
    summary = summarize(results, why_not is None)
    doc = {"threads": a.threads, "pp": a.pp, "tg": a.tg, "repeat": a.repeat, "rounds": a.rounds,
           "kv_dtype": a.kv_dtype, "llamacpp": why_not or "ok", "models": results, "summary": summary}
    if a.json:
        print(json.dumps(doc, indent=1))
    else:
        print_table(doc)
    return 0


def summarize(results: dict[str, dict], with_llama: bool) -> dict:
    out = {}
    for qtype, res in results.items():
        ms = [r["mlxtral"] for r in res["rounds"]]
        s: dict = {
            "mlxtral_pp": max(m["pp_tok_s"] for m in ms), "mlxtral_tg": max(m["tg_tok_s"] for m in ms),
            "mlxtral_rss_mb": max(m["peak_rss_mb"] for m in ms),
        }
        s["rss_ratio"] = round(s["mlxtral_rss_mb"] / (res["file_mb"] + res["kv_mb_mlxtral"]), 3)
        if with_llama:
            ls = [r["llama.cpp"] for r in res["rounds"]]
            s["llama_pp"] = max(x["pp_tok_s"] for x in ls)
            s["llama_tg"] = max(x["tg_tok_s"] for x in ls)
            s["llama_rss_mb"] = max(x["peak_rss_mb"] for x in ls)
            s["llama_rss_ratio"] = round(s["llama_rss_mb"] / (res["file_mb"] + res["kv_mb_llamacpp"]), 3)
            s["pp_ratios"] = [round(m["pp_tok_s"] / x["pp_tok_s"], 3) for m, x in zip(ms, ls, strict=True)]
            s["tg_ratios"] = [round(m["tg_tok_s"] / x["tg_tok_s"], 3) for m, x in zip(ms, ls, strict=True)]
            s["pp_ratio_median"] = round(statistics.median(s["pp_ratios"]), 3)
            s["tg_ratio_median"] = round(statistics.median(s["tg_ratios"]), 3)
        out[qtype] = s
    return out


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    with_llama = doc["llamacpp"] == "ok"
    t = Table(title=f"mlxtral vs llama.cpp: prefill {doc['pp']}, decode {doc['tg']}, "
                    f"{doc['threads']} threads, best of {doc['repeat']}, {doc['rounds']} alternating rounds")
    cols = ("model", "engine", "prefill tok/s", "decode tok/s", "peak RSS MB", "file+KV MB", "RSS ratio")
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "engine") else "right")
    for qtype, res in doc["models"].items():
        s = doc["summary"][qtype]
        t.add_row(qtype.upper(), "mlxtral", f"{s['mlxtral_pp']:.1f}", f"{s['mlxtral_tg']:.1f}",
                  f"{s['mlxtral_rss_mb']:.0f}", f"{res['file_mb'] + res['kv_mb_mlxtral']:.0f}",
                  f"{s['rss_ratio']:.2f}")
        if with_llama:
            t.add_row("", "llama.cpp", f"{s['llama_pp']:.1f}", f"{s['llama_tg']:.1f}",
                      f"{s['llama_rss_mb']:.0f}", f"{res['file_mb'] + res['kv_mb_llamacpp']:.0f}",
                      f"{s['llama_rss_ratio']:.2f}")
            t.add_row("", "[bold]ratio (median)[/bold]", f"[bold]{s['pp_ratio_median']:.2f}x[/bold]",
                      f"[bold]{s['tg_ratio_median']:.2f}x[/bold]",
                      f"{s['mlxtral_rss_mb'] / s['llama_rss_mb']:.2f}x", "", "")
        t.add_section()
    con.print(t)
    if with_llama:
        for qtype, s in doc["summary"].items():
            con.print(f"{qtype.upper()} per-round ratios: prefill {s['pp_ratios']}, decode {s['tg_ratios']}")
    else:
        con.print(f"[yellow]llama.cpp not run ({doc['llamacpp']}): mlxtral alone[/yellow]")
    loads = [r["load_avg"] for res in doc["models"].values() for r in res["rounds"]
             if r["load_avg"] is not None]
    if loads:
        con.print(f"load average during the runs: {min(loads):.1f} .. {max(loads):.1f} "
                  f"(a shared machine: compare ratios, not absolute numbers)")


if __name__ == "__main__":
    sys.exit(main())
