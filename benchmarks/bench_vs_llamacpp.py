#!/usr/bin/env python3
"""mlxtral (NumPy backend) vs llama.cpp on the same GGUF files, same threads, same run: the ratios.

    python benchmarks/bench_vs_llamacpp.py                       # Q4_0 and Q8_0, 3 alternating rounds
    python benchmarks/bench_vs_llamacpp.py --types q4_0 --rounds 5 --json

Models: ``shared/bench/make_moe_gguf.py``'s default shape (dim 1024, 8 layers, 8 experts top-2,
ffn 3584), built once into ``--cache-dir`` (default /tmp/mlxtral-bench).

What is measured is what a user gets. mlxtral: ``model.stream`` on random prompt ids (BOS first),
fresh session each time, sampling at temperature 1 (seed 0) and greedy: prefill tok/s from the
stats (``--pp``, default 128 and 512 tokens), decode tok/s from the wall-clock between the first
and the last streamed token (forward + sampler + detokenizer + the loop, ``--tg`` tokens); beside
it the bare forward (``backend.forward``, no sampling) for reference. llama.cpp:
``shared/bench/llamacpp_speed.py`` (``llm.eval``, no sampler: the comparison is conservative for
us). Best of ``--repeat`` inside each engine run. Each engine runs in its own process, one per
round, and peak RSS is that process's own ``VmHWM`` (``ru_maxrss`` keeps a forking parent's peak
across exec). llama.cpp runs through ``~/llamacpp/bin/python`` or ``MLXTRAL_LLAMACPP_PYTHON``
(llama-cpp-python, never a dependency of mlxtral); without it, mlxtral is reported alone. The
machine is shared and noisy, so the engines run back to back, alternating, for ``--rounds``
rounds, and the ratios are per round (median shown).

Targets (issue 13): decode and prefill (128 and 512) >= 1.0x llama.cpp through ``model.stream``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared" / "bench"
MAKER = SHARED / "make_moe_gguf.py"
LLAMA_SPEED = SHARED / "llamacpp_speed.py"
LLAMA_PY = Path(os.environ.get("MLXTRAL_LLAMACPP_PYTHON") or Path.home() / "llamacpp" / "bin" / "python")
MODES = ("temp1", "greedy")  # model.stream sampling modes: temperature 1 (seed 0), and 0


# ---- the mlxtral side (runs in a subprocess: --worker) ------------------------------------------
def _stream_once(m, ids: list[int], tg: int, temperature: float) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one ``model.stream`` on a fresh session."""
    times, stats = [], None
    for r in m.stream(ids, max_tokens=tg, temperature=temperature, seed=0, session=m.new_session()):
        if r.token is not None:
            times.append(time.perf_counter())
        if r.stats is not None:
            stats = r.stats
    pp = stats.prompt_tps if stats is not None else 0.0
    tg_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
    return pp, tg_s


def worker(model: str, pps: list[int], tg: int, threads: int, repeat: int, kv_dtype: str) -> dict:
    import numpy as np

    import mlxtral
    from mlxtral.backends import kernels
    from mlxtral.rss import peak_rss

    kernels.set_num_threads(threads)
    ctx = max(pps) + tg + 8
    t0 = time.perf_counter()
    m = mlxtral.load(model, backend="numpy", kv_dtype=kv_dtype, max_context=ctx)
    be = m.backend
    kernels.warmup()  # numba's disk cache: load (or, on a fresh machine, compile) every kernel
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = min(m.config.vocab_size, m.tokenizer.vocab_size)
    res: dict[str, float] = {}

    def best(key: str, v: float) -> None:
        res[key] = round(max(res.get(key, 0.0), v), 2)

    for _ in range(repeat):
        for pp in pps:
            prompt = [1] + rng.integers(3, vocab, pp - 1).tolist()
            if pp == pps[0]:  # decode after the first prompt length; the others prefill only
                cache = be.new_cache(ctx)
                t1 = time.perf_counter()
                be.forward(prompt, cache)
                t2 = time.perf_counter()
                for tok in rng.integers(3, vocab, tg).tolist():
                    be.forward([tok], cache)
                best("bare_tg", tg / (time.perf_counter() - t2))
                best(f"bare_pp{pp}", pp / (t2 - t1))
                for mode in MODES:
                    p, d = _stream_once(m, prompt, tg, 1.0 if mode == "temp1" else 0.0)
                    best(f"{mode}_pp{pp}", p)
                    best(f"{mode}_tg", d)
            else:
                p, _ = _stream_once(m, prompt, 1, 1.0)
                best(f"temp1_pp{pp}", p)
    return {"engine": "mlxtral", "model": model, "threads": threads, "pps": pps, "tg": tg, **res,
            "peak_rss_mb": round(peak_rss() / 2**20, 1), "load_s": round(load_s, 2),
            **dict(zip(("kernels", "isa"), kernels.describe(), strict=True))}


# ---- the driver ---------------------------------------------------------------------------------
# llama.cpp's own K-quant mixes, made by its quantizer from the F32 file (llama_ftype values)
LLAMA_MIXES = {"q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def ensure_model(cache_dir: Path, qtype: str) -> Path:
    path = cache_dir / f"moe-{qtype}.gguf"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    if qtype in LLAMA_MIXES:
        src = ensure_model(cache_dir, "f32")
        print(f"building {path} (llama_model_quantize from {src.name}) ...", file=sys.stderr, flush=True)
        code = ("import sys, llama_cpp as L\n"
                "p = L.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]); p.nthread = 2\n"
                "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
        subprocess.run([str(LLAMA_PY), "-c", code, str(src), str(tmp), str(LLAMA_MIXES[qtype])], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(path)
        return path
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
    cmd = [sys.executable, str(HERE), "--worker", str(model), "--pp", a.pp, "--tg", str(a.tg),
           "--threads", str(a.threads), "--repeat", str(a.repeat), "--kv-dtype", a.kv_dtype]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"mlxtral worker failed:\n{r.stderr[-2000:]}")
    return _last_json(r.stdout)


def run_llamacpp(model: Path, a: argparse.Namespace) -> dict:
    """One llama.cpp process per prompt length (decode after the first); its own VmHWM each."""
    out: dict = {"engine": "llama.cpp", "peak_rss_mb": 0.0}
    for i, pp in enumerate(_pps(a)):
        tg = a.tg if i == 0 else 2
        cmd = [str(LLAMA_PY), str(LLAMA_SPEED), str(model), "--pp", str(pp), "--tg", str(tg),
               "--threads", str(a.threads), "--repeat", str(a.repeat)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llamacpp_speed.py failed:\n{r.stderr[-2000:]}")
        j = _last_json(r.stdout)
        out[f"pp{pp}"] = j["pp_tok_s"]
        if i == 0:
            out["tg"] = j["tg_tok_s"]
        out["peak_rss_mb"] = max(out["peak_rss_mb"], j["peak_rss_mb"])
    return out


def _pps(a: argparse.Namespace) -> list[int]:
    return [int(v) for v in a.pp.split(",")]


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
    p.add_argument("--types", default="q4_0,q8_0",
                   help="q4_0, q8_0, f32 (make_moe_gguf.py) or a llama.cpp mix: " + ", ".join(LLAMA_MIXES))
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/mlxtral-bench"))
    p.add_argument("--pp", default="128,512", help="prompt lengths to prefill (decode after the first)")
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="best of N inside each engine run")
    p.add_argument("--rounds", type=int, default=3, help="alternating mlxtral / llama.cpp rounds")
    p.add_argument("--kv-dtype", default="float32", help="mlxtral's KV cache dtype")
    p.add_argument("--no-llamacpp", action="store_true", help="mlxtral alone")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    a = p.parse_args()
    pps = _pps(a)
    if not pps or min(pps) < 2 or a.tg < 2:
        p.error("--pp takes prompt lengths >= 2 and --tg at least 2")
    if a.worker:
        print(json.dumps(worker(a.worker, pps, a.tg, a.threads, a.repeat, a.kv_dtype)))
        return 0

    why_not = "--no-llamacpp" if a.no_llamacpp else llamacpp_ready()
    results: dict[str, dict] = {}
    ctx = max(pps) + a.tg + 8
    for qtype in a.types.split(","):
        model = ensure_model(a.cache_dir, qtype)
        size_mb = model.stat().st_size / 2**20
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
                print(f"round {rnd + 1} {qtype}: {json.dumps(row)}", file=sys.stderr, flush=True)
    summary = summarize(results, pps, why_not is None)
    doc = {"threads": a.threads, "pp": pps, "tg": a.tg, "repeat": a.repeat, "rounds": a.rounds,
           "kv_dtype": a.kv_dtype, "llamacpp": why_not or "ok", "models": results, "summary": summary}
    if a.json:
        print(json.dumps(doc, indent=1))
    else:
        print_table(doc)
    return 0


def _columns(pps: list[int]) -> list[tuple[str, str, str]]:
    """(title, mlxtral key, llama.cpp key) per column; decode first."""
    cols = [("decode temp 1", "temp1_tg", "tg"), ("decode greedy", "greedy_tg", "tg"),
            ("decode bare", "bare_tg", "tg")]
    cols += [(f"prefill {pp}", f"temp1_pp{pp}", f"pp{pp}") for pp in pps]  # through model.stream
    return cols


def summarize(results: dict[str, dict], pps: list[int], with_llama: bool) -> dict:
    out = {}
    for qtype, res in results.items():
        ms = [r["mlxtral"] for r in res["rounds"]]
        s: dict = {"mlxtral_rss_mb": max(m["peak_rss_mb"] for m in ms)}
        s["rss_ratio"] = round(s["mlxtral_rss_mb"] / (res["file_mb"] + res["kv_mb_mlxtral"]), 3)
        for title, mk, lk in _columns(pps):
            s[f"mlxtral {title}"] = max(m.get(mk, 0.0) for m in ms)
            if with_llama:
                ls = [r["llama.cpp"] for r in res["rounds"]]
                s[f"llama {title}"] = max(x[lk] for x in ls)
                rs = [round(m.get(mk, 0.0) / x[lk], 3) if x[lk] else 0.0 for m, x in zip(ms, ls, strict=True)]
                s[f"ratios {title}"] = rs
                s[f"ratio {title}"] = round(statistics.median(rs), 3)
        if with_llama:
            s["llama_rss_mb"] = max(r["llama.cpp"]["peak_rss_mb"] for r in res["rounds"])
            s["llama_rss_ratio"] = round(s["llama_rss_mb"] / (res["file_mb"] + res["kv_mb_llamacpp"]), 3)
        out[qtype] = s
    return out


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 150)  # a file or a pipe: not cut at 80 columns
    with_llama = doc["llamacpp"] == "ok"
    cols = _columns(doc["pp"])
    t = Table(title=f"mlxtral (model.stream) vs llama.cpp: decode {doc['tg']} tokens, "
                    f"{doc['threads']} threads, best of {doc['repeat']}, {doc['rounds']} alternating rounds")
    for col in ("model", "engine", *[f"{c[0]} tok/s" for c in cols], "peak RSS MB", "RSS / (file+KV)"):
        t.add_column(col, justify="left" if col in ("model", "engine") else "right")
    for qtype in doc["models"]:
        s = doc["summary"][qtype]
        t.add_row(qtype.upper(), "mlxtral", *[f"{s['mlxtral ' + c[0]]:.1f}" for c in cols],
                  f"{s['mlxtral_rss_mb']:.0f}", f"{s['rss_ratio']:.2f}")
        if with_llama:
            t.add_row("", "llama.cpp", *[f"{s['llama ' + c[0]]:.1f}" for c in cols],
                      f"{s['llama_rss_mb']:.0f}", f"{s['llama_rss_ratio']:.2f}")
            t.add_row("", "[bold]ratio (median)[/bold]",
                      *[f"[bold]{s['ratio ' + c[0]]:.2f}x[/bold]" for c in cols],
                      f"{s['mlxtral_rss_mb'] / s['llama_rss_mb']:.2f}x", "")
        t.add_section()
    con.print(t)
    if with_llama:
        for qtype, s in doc["summary"].items():
            con.print(f"{qtype.upper()} per-round ratios: "
                      + "; ".join(f"{c[0]} {s['ratios ' + c[0]]}" for c in cols))
    else:
        con.print(f"[yellow]llama.cpp not run ({doc['llamacpp']}): mlxtral alone[/yellow]")
    loads = [r["load_avg"] for res in doc["models"].values() for r in res["rounds"]
             if r["load_avg"] is not None]
    if loads:
        con.print(f"load average during the runs: {min(loads):.1f} .. {max(loads):.1f} "
                  f"(a shared machine: compare ratios, not absolute numbers)")


if __name__ == "__main__":
    sys.exit(main())
