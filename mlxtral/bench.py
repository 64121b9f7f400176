"""``mlxtral bench``: llama-bench style speed of prompt processing (pp) and generation (tg).

- pp: a prompt of ``pp`` tokens (BOS + random ids, as llama-bench) prefilled into an empty cache.
- tg: ``tg`` tokens decoded one at a time from an empty cache (random ids, so routing varies as
  in real text). Sampling is not timed: this measures the model, as llama-bench does.
- One untimed warm-up (JIT compilation, page cache), then ``repeats`` timed runs: mean ± std.
- The seed figures (Apple M3 Max fp16 13 tok/s; M2 Ultra llama.cpp 52 tok/s) are scaled to this
  machine: each is an efficiency (tok/s over the machine's bandwidth / active bytes per token),
  and the same efficiency applied to this machine's bandwidth and this model's active bytes gives
  the tok/s those setups would reach here.
- ``--compare llama.cpp``: runs llama.cpp (llama-cpp-python) on the same file in a subprocess of
  an interpreter that has it, and prints the ratios.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.errors import MlxtralError, UsageError
from mlxtral.rss import peak_rss
from mlxtral.wording import plural

# (label, tok/s, bandwidth GB/s, active GB per token, memory used GB, note) from FACTS.md.
SEEDS = [
    ("Apple M3 Max, fp16", 13.0, 400.0, 25.8, 87.0, "seed figure"),
    ("Apple M2 Ultra, llama.cpp Q4_0", 52.0, 800.0, 7.3, None, "seed figure"),
]


@dataclass
class Timing:
    runs: list[float]  # tok/s of each timed run

    @property
    def mean(self) -> float:
        return statistics.fmean(self.runs) if self.runs else 0.0

    @property
    def std(self) -> float:
        return statistics.stdev(self.runs) if len(self.runs) > 1 else 0.0

    @property
    def best(self) -> float:
        return max(self.runs) if self.runs else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"mean": round(self.mean, 3), "std": round(self.std, 3), "best": round(self.best, 3),
                "runs": [round(r, 3) for r in self.runs]}

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


def measure_bandwidth(mb: int = 256, threads: int | None = None, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: ``threads`` threads summing their slices of a ``mb`` MB array."""
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    n = mb * (1 << 20) // 8
    a = np.ones(n, dtype=np.float64)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats + 1):  # the first pass faults the pages in
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        best = max(best, a.nbytes / dt / 1e9)
    return best


def seed_rows(bandwidth_gbs: float, active_bytes: int, ours_tg: float) -> list[dict[str, Any]]:
    """The seed figures scaled to this machine (see the module docstring)."""
    ceiling = bandwidth_gbs * 1e9 / active_bytes if active_bytes else 0.0
    rows = []
    for label, tps, bw, active_gb, mem, _ in SEEDS:
        eff = tps / (bw / active_gb)
        rows.append({"setup": label, "tok_s": tps, "bandwidth_gbs": bw, "active_gb": active_gb,
                     "memory_gb": mem, "efficiency": round(eff, 4),
                     "scaled_here_tok_s": round(eff * ceiling, 2)})
    rows.append({"setup": "mlxtral, this machine", "tok_s": round(ours_tg, 2),
                 "bandwidth_gbs": round(bandwidth_gbs, 2), "active_gb": round(active_bytes / 1e9, 4),
                 "memory_gb": None, "efficiency": round(ours_tg / ceiling, 4) if ceiling else None,
                 "scaled_here_tok_s": round(ours_tg, 2)})
    return rows


def run_bench(model: Any, pp: int = 512, tg: int = 128, repeats: int = 3, seed: int = 0,
              warmup: bool = True, progress: Any = None) -> dict[str, Any]:
    """Time prefill of ``pp`` tokens and decode of ``tg`` tokens on a loaded :class:`mlxtral.Model`."""
    if pp < 0 or tg < 0 or (pp == 0 and tg == 0):
        raise UsageError("-p and -n must be >= 0 and not both 0")
    if repeats < 1:
        raise UsageError(f"-r must be >= 1, got {repeats}")
    need = max(pp, tg + 1)
    if need > model.config.max_position_embeddings:
        raise UsageError(f"-p/-n need {plural(need, 'position')} but the model's context is "
                         f"{model.config.max_position_embeddings}")
    be = model.backend
    vocab = model.config.vocab_size
    bos = getattr(model.tokenizer, "bos_id", None) if model.tokenizer is not None else None
    rng = np.random.default_rng(seed)
    cache = be.new_cache(need + 1)

    def prompt(n: int) -> list[int]:
        ids = rng.integers(3, vocab, n).tolist()
        if bos is not None and n:
            ids[0] = bos
        return ids

    def one_pp() -> float:
        ids = prompt(pp)
        cache.trim(0)
        t0 = time.perf_counter()
        be.forward(ids, cache)
        return pp / (time.perf_counter() - t0)

    def one_tg() -> float:
        ids = prompt(tg)
        cache.trim(0)
        t0 = time.perf_counter()
        for t in ids:
            be.forward([t], cache)
        return tg / (time.perf_counter() - t0)

    if warmup:
        if progress:
            progress("warm-up")
        cache.trim(0)
        be.forward(prompt(min(max(pp, 2), 16)), cache)
        be.forward(prompt(1), cache)
    pps, tgs = [], []
    for r in range(repeats):
        if pp:
            if progress:
                progress(f"pp{pp} run {r + 1}/{repeats}")
            pps.append(one_pp())
        if tg:
            if progress:
                progress(f"tg{tg} run {r + 1}/{repeats}")
            tgs.append(one_tg())
    return {"pp": pp, "tg": tg, "repeats": repeats, "pp_tok_s": Timing(pps), "tg_tok_s": Timing(tgs),
            "peak_memory": max(peak_rss(), int(be.peak_memory()))}  # the process's, as the stats line


# ---- llama.cpp ---------------------------------------------------------------------------------

_SNIPPET = r'''
import json, resource, sys, time
import numpy as np
from llama_cpp import Llama
model = sys.argv[1]
pp, tg, threads, repeat = (int(x) for x in sys.argv[2:6])
llm = Llama(model_path=model, n_ctx=pp + tg + 8, n_batch=max(pp, 8), n_threads=threads,
            n_threads_batch=threads, verbose=False)
rng = np.random.default_rng(0)
n_vocab = llm.n_vocab()
pps, tgs = [], []
for _ in range(repeat):
    llm.reset()
    if pp:
        prompt = [llm.token_bos()] + rng.integers(3, n_vocab, pp - 1).tolist()
        t0 = time.perf_counter(); llm.eval(prompt); pps.append(pp / (time.perf_counter() - t0))
    llm.reset()
    if tg:
        steps = rng.integers(3, n_vocab, tg).tolist()
        t0 = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
        tgs.append(tg / (time.perf_counter() - t0))
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"engine": "llama.cpp", "pp_tok_s": max(pps, default=0.0), "tg_tok_s": max(tgs, default=0.0),
                  "pp_runs": pps, "tg_runs": tgs, "peak_rss_mb": rss_mb}))
'''


def find_llamacpp_python(explicit: str | None = None) -> str | None:
    """An interpreter with llama_cpp: ``explicit``, $MLXTRAL_LLAMACPP_PYTHON, ~/llamacpp/bin/python,
    or this one if it can import llama_cpp."""
    from mlxtral.display import term_safe
    from mlxtral.env import env_path

    env = env_path("MLXTRAL_LLAMACPP_PYTHON")
    for cand, name in ((explicit, "--llamacpp-python "), (env, "MLXTRAL_LLAMACPP_PYTHON="),
                       (str(Path.home() / "llamacpp" / "bin" / "python"), None)):
        if not cand:
            continue
        if _is_file(Path(cand).expanduser()):
            return str(Path(cand).expanduser())
        if name is not None:
            raise UsageError(f"{name}{term_safe(cand, 80)}: no such interpreter")
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    return None


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # a name too long for the system, say
        return False


def shared_speed_script() -> Path | None:
    """``../shared/bench/llamacpp_speed.py`` beside the repository, if this is a checkout."""
    p = Path(__file__).resolve().parents[2] / "shared" / "bench" / "llamacpp_speed.py"
    return p if p.is_file() else None


def run_llamacpp(model_path: str | Path, pp: int, tg: int, repeats: int, threads: int,
                 python: str | None = None, timeout: float = 1800) -> dict[str, Any]:
    """llama.cpp's pp/tg on the same file, in a subprocess. Raises MlxtralError when unavailable."""
    py = find_llamacpp_python(python)
    if py is None:
        raise MlxtralError("llama.cpp comparison needs llama-cpp-python: pass --llamacpp-python PATH "
                           "(an interpreter that can `import llama_cpp`) or set MLXTRAL_LLAMACPP_PYTHON")
    script = shared_speed_script()
    if script is not None and pp > 0 and tg > 0:
        cmd = [py, str(script), str(model_path), "--pp", str(pp), "--tg", str(tg), "--threads", str(threads),
               "--repeat", str(repeats)]
    else:
        cmd = [py, "-c", _SNIPPET, str(model_path), str(pp), str(tg), str(threads), str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MlxtralError(f"llama.cpp did not finish within {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MlxtralError(f"llama.cpp failed on {model_path}: {tail}")
    res = json.loads(lines[-1])
    res["python"] = py
    res["script"] = str(script) if script is not None and pp > 0 and tg > 0 else "embedded"
    return res
