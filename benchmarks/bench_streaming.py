#!/usr/bin/env python3
"""A model larger than RAM: mlxtral (experts streamed through its expert cache) against llama.cpp
(memory-mapped, ``--no-repack``) on the same file, in the same run.

    python benchmarks/bench_streaming.py /path/mixtral-q4_0.gguf [--pp 64] [--tg 64] [--runs 2]
        [--balloon 11] [--llamacpp-python ~/llamacpp/bin/python] [--json results.json]

Settings: this machine as it is, and smaller machines simulated by ``../shared/bench/balloon.py
GIB`` holding memory for both engines (11 GiB: a 16 GB laptop; 17 GiB: an 8 GB one); then mlxtral
alone under explicit ``--budgets`` (a 16 GB laptop's 10 GB, and a budget small enough that decode
is bound by the disk). In each, per run:

- the page cache is dropped first (needs root; the table says whether it was), so every run of
  either engine starts from a cold disk: nothing of the file is in memory;
- the engines alternate (which goes first flips every run), each in its own process;
- mlxtral: ``mlxtral.load`` with its default memory decision, a random prompt of ``--pp`` tokens
  and ``--tg`` tokens through ``model.stream`` with sampling at temperature 1, a different prompt
  and seed every run (the same tokens would route to the same experts);
- llama.cpp: ``../shared/bench/llamacpp_speed.py --no-repack --repeat 1`` (its prompt is fixed,
  but its page cache starts cold each run as ours does);
- peak RSS is each process's own VmHWM; decode bytes read per token and the hit rates come from
  the expert cache; the disk's O_DIRECT read bandwidth is measured in the same setting, giving the
  physical limit tok/s <= bandwidth / bytes read per decoded token.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_expert_io import drop_caches, run_reader  # noqa: E402


def vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(model: str, pp: int, tg: int, seed: int, budget: str | None) -> None:
    """One mlxtral run in this process: prints one JSON line."""
    import numpy as np

    import mlxtral

    t0 = time.perf_counter()
    m = mlxtral.load(model, memory_budget=budget)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    ids = [1] + rng.integers(3, m.config.vocab_size, pp - 1).tolist()
    cache = getattr(m.backend, "experts", None)
    after_prefill = None
    stats = None
    n = 0
    for r in m.stream(ids, max_tokens=tg, temperature=1.0, seed=seed):
        if after_prefill is None and cache is not None:
            after_prefill = cache.snapshot()
        n += r.token is not None
        if r.stats is not None:
            stats = r.stats
    out = {"engine": "mlxtral", "seed": seed, "load_s": round(load_s, 2), "pp": pp,
           "tg": stats.generation_tokens, "pp_tok_s": round(stats.prompt_tps, 3),
           "tg_tok_s": round(stats.generation_tps, 3), "peak_rss_mb": round(vmhwm() / 2**20, 1),
           "plan": m.memory_plan.describe() if m.memory_plan else None}
    if cache is not None and after_prefill is not None:
        dec = cache.snapshot().minus(after_prefill)
        allc = cache.snapshot()
        out.update(decode_bytes_per_token=round(dec.bytes_read / max(stats.generation_tokens - 1, 1)),
                   decode_hit_rate=round(dec.hit_rate, 4), prefetch_accuracy=round(allc.prefetch_accuracy, 4),
                   hit_rate=round(allc.hit_rate, 4), bytes_read=allc.bytes_read, cache_slots=cache.capacity)
    print(json.dumps(out), flush=True)


def disk_bandwidth(model: str, n: int = 40) -> float:
    """GB/s reading ``n`` random experts with the expert cache's own reader (cold cache)."""
    import numpy as np

    from mlxtral.expert_cache.layout import expert_layout
    from mlxtral.expert_cache.reader import IO_THREADS
    from mlxtral.formats.detect import open_checkpoint

    ckpt = open_checkpoint(Path(model))
    layout = expert_layout(ckpt.args, ckpt.tensors, ckpt.path)
    rng = np.random.default_rng(int(time.time()))
    picks = [(int(rng.integers(layout.n_layers)), int(rng.integers(layout.n_experts))) for _ in range(n)]
    drop_caches()
    seconds = run_reader(layout, picks, True, IO_THREADS)
    return sum(layout.expert_bytes(li, e) for li, e in picks) / seconds / 1e9


def run_json(cmd: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"],
                "wall_s": round(wall, 1)}
    d = json.loads(lines[-1])
    d["wall_s"] = round(wall, 1)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--pp", type=int, default=64)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2, help="runs per engine per setting")
    ap.add_argument("--balloons", default="11,17",
                    help="GiB held by ../shared/bench/balloon.py in the next settings: 11 leaves a 16 GB "
                         "laptop's memory, 17 an 8 GB one's ('' for none)")
    ap.add_argument("--budgets", default="10GB,6GB",
                    help="mlxtral-only settings: memory budgets ('' for none)")
    ap.add_argument("--only", help="run only the settings whose name contains this")
    ap.add_argument("--memory-budget", default=None, help="mlxtral's budget (default: its own decision)")
    ap.add_argument("--llamacpp-python", default=os.environ.get("MLXTRAL_LLAMACPP_PYTHON",
                                                               str(Path.home() / "llamacpp/bin/python")))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.model, a.pp, a.tg, a.seed, a.memory_budget)
        return 0
    settings = [("as-is", 0.0, None)]
    settings += [(f"balloon {float(g):g} GiB", float(g), None) for g in a.balloons.split(",") if g.strip()]
    settings += [(f"budget {b}", 0.0, b) for b in a.budgets.split(",") if b.strip()]
    if a.only:
        settings = [s for s in settings if a.only in s[0]]
    base_seed = int(time.time()) % 100000
    results = []
    for si, (name, gib, budget) in enumerate(settings):
        balloon = None
        if gib:
            balloon = subprocess.Popen([sys.executable, str(SHARED / "balloon.py"), str(gib), "100000"],
                                       stdout=subprocess.PIPE, text=True)
            balloon.stdout.readline()  # "balloon: holding ..."
        try:
            bw0 = disk_bandwidth(a.model)
            rows = []
            for run in range(a.runs):
                order = ["mlxtral", "llama.cpp"] if (run + si) % 2 == 0 else ["llama.cpp", "mlxtral"]
                if budget:
                    order = ["mlxtral"]
                for eng in order:
                    cold = drop_caches()
                    seed = base_seed + 100 * si + 2 * run + (eng == "llama.cpp")
                    if eng == "mlxtral":
                        cmd = [sys.executable, __file__, a.model, "--worker", "--pp", str(a.pp), "--tg",
                               str(a.tg), "--seed", str(seed)]
                        if budget or a.memory_budget:
                            cmd += ["--memory-budget", budget or a.memory_budget]
                    else:
                        cmd = [a.llamacpp_python, str(SHARED / "llamacpp_speed.py"), a.model, "--no-repack",
                               "--pp", str(a.pp), "--tg", str(a.tg), "--repeat", "1"]
                    r = run_json(cmd, timeout=3600)
                    r.update(setting=name, run=run, engine=eng, cold_page_cache=cold)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            bw1 = disk_bandwidth(a.model)  # the disk drifts: measured before and after the setting
            bw = (bw0 + bw1) / 2
            for r in rows:
                r.update(disk_gbs=round(bw, 3), disk_gbs_before_after=[round(bw0, 3), round(bw1, 3)])
                if r.get("decode_bytes_per_token"):
                    r["disk_limit_tok_s"] = round(bw * 1e9 / r["decode_bytes_per_token"], 3)
            results += rows
        finally:
            if balloon is not None:
                balloon.kill()
                balloon.wait()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    _table(results)
    return 0


def _table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="larger than RAM: mlxtral (streamed experts) vs llama.cpp (mmap, --no-repack)")
    for c in ("setting", "run", "engine", "prefill tok/s", "decode tok/s", "peak RSS GB", "wall s",
              "MB read/token", "hit rate", "prefetch acc.", "disk GB/s", "disk limit tok/s"):
        t.add_column(c)
    for r in results:
        if "error" in r:
            t.add_row(r["setting"], str(r["run"]), r["engine"], "error: " + " ".join(r["error"]))
            continue
        bpt = r.get("decode_bytes_per_token")
        t.add_row(r["setting"], str(r["run"]), r["engine"], f"{r['pp_tok_s']:.2f}", f"{r['tg_tok_s']:.2f}",
                  f"{r['peak_rss_mb'] * 2**20 / 1e9:.2f}", f"{r['wall_s']:.0f}",
                  f"{bpt / 1e6:.0f}" if bpt is not None else "-",
                  f"{r['decode_hit_rate']:.1%}" if "decode_hit_rate" in r else "-",
                  f"{r['prefetch_accuracy']:.1%}" if "prefetch_accuracy" in r else "-",
                  f"{r['disk_gbs']:.2f}", str(r.get("disk_limit_tok_s", "-")))
    Console(width=200).print(t)


if __name__ == "__main__":
    raise SystemExit(main())
