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
import re
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


PROBE_MB = 256


def _probe_threads(threads: int | None) -> int:
    return threads or max(1, min(os.cpu_count() or 1, 8))


def probe_address_space(mb: int = PROBE_MB, threads: int | None = None) -> int:
    """Bytes of address space :func:`measure_bandwidth` maps: its array and its threads' stacks."""
    return (mb << 20) + _probe_threads(threads) * (8 << 20) + (16 << 20)


def check_probe_fits(mb: int = PROBE_MB, threads: int | None = None) -> None:
    """:class:`AddressSpaceError` when ``ulimit -v`` leaves no room for the probe, naming it and
    ``--bandwidth`` (bench checks before its runs, the probe again before it maps)."""
    from mlxtral import address_space

    address_space.check_room(probe_address_space(mb, threads), "the memory-bandwidth probe (give "
                             "--bandwidth GB/s to skip it)")


def measure_bandwidth(mb: int = PROBE_MB, threads: int | None = None, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: ``threads`` threads summing their slices of a ``mb`` MB array."""
    check_probe_fits(mb, threads)
    threads = _probe_threads(threads)
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


MAX_TESTS = 16  # values in one -p or -n list


def parse_counts(flag: str, text: str) -> list[int]:
    """``-p``/``-n`` as llama-bench takes them: a token count or a comma list of them (``128,512``),
    each 0 or more; repeats dropped, order kept. :class:`UsageError` otherwise."""
    parts = text.split(",") if len(text) <= 20 * MAX_TESTS else []
    if not 0 < len(parts) <= MAX_TESTS or not all(re.fullmatch(r"[0-9]{1,9}", p.strip()) for p in parts):
        raise UsageError(f"{flag} {text[:40]!r}: a token count or a comma list of at most {MAX_TESTS} "
                         "(e.g. 128,512), each 0 or more")
    return list(dict.fromkeys(int(p) for p in parts))


@dataclass
class Test:
    kind: str  # "pp" (a prompt prefilled) or "tg" (tokens decoded one at a time)
    n: int
    timing: Timing

    @property
    def label(self) -> str:
        return f"{self.kind}{self.n}"


def run_tests(model: Any, pps: list[int], tgs: list[int], repeats: int = 3, seed: int = 0,
              warmup: bool = True, progress: Any = None) -> tuple[list[Test], int]:
    """Time each prefill of ``pps`` and each decode of ``tgs`` (0s skipped) on a loaded
    :class:`mlxtral.Model`, the tests taken in turn within each repetition (a drift of the machine
    spreads over all of them). -> (the tests in the order given, pp first; peak memory in bytes)."""
    tests = [Test("pp", n, Timing([])) for n in pps if n] + [Test("tg", n, Timing([])) for n in tgs if n]
    if not tests:
        raise UsageError("-p and -n must be >= 0 and not both 0")
    if repeats < 1:
        raise UsageError(f"-r must be >= 1, got {repeats}")
    need = max(max(pps, default=0), max(tgs, default=0) + 1)
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

    def one(t: Test) -> float:
        ids = prompt(t.n)
        cache.trim(0)
        t0 = time.perf_counter()
        if t.kind == "pp":
            be.forward(ids, cache)
        else:
            for tok in ids:
                be.forward([tok], cache)
        return t.n / (time.perf_counter() - t0)

    if warmup:
        if progress:
            progress("warm-up")
        cache.trim(0)
        be.forward(prompt(min(max(max(pps, default=0), 2), 16)), cache)
        be.forward(prompt(1), cache)
    for r in range(repeats):
        for t in tests:
            if progress:
                progress(f"{t.label} run {r + 1}/{repeats}")
            t.timing.runs.append(one(t))
    return tests, max(peak_rss(), int(be.peak_memory()))  # the process's, as the stats line


# ---- llama-bench's output formats ---------------------------------------------------------------

OUTPUTS = ("table", "md", "csv", "json", "jsonl")
CSV_FIELDS = ("engine", "model_filename", "model_type", "model_size", "model_n_params", "backends",
              "n_threads", "n_prompt", "n_gen", "avg_ts", "stddev_ts", "samples_ts")


def model_figures(ckpt: Any) -> dict[str, Any]:
    """llama-bench's model_type ("mixtral Q4_K_M"), model_size (bytes) and model_n_params."""
    from collections import Counter

    from mlxtral.info import file_type_name

    a = ckpt.args
    kind = file_type_name((ckpt.metadata or {}).get("general.file_type"))
    if kind is None or kind.startswith("unknown"):  # not a GGUF, or a type llama.cpp does not name
        by_type: Counter[str] = Counter()
        for q in ckpt.tensors.values():
            by_type[q.qtype] += q.nbytes
        kind = by_type.most_common(1)[0][0] if by_type else "?"  # the type most bytes are in
    return {"model_type": f"{'mixtral' if a.is_moe else 'llama'} {kind}",
            "model_size": sum(q.nbytes for q in ckpt.tensors.values()),
            "model_n_params": a.param_counts()[0]}


def result_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """A row per test and engine, in llama-bench's csv/json field names (those that apply): ours
    with every run, llama.cpp's with its best run (all its runner reports)."""
    rows = []
    base = {"model_filename": out["model"], "model_type": out.get("model_type", ""),
            "model_size": out.get("model_size", 0), "model_n_params": out.get("model_n_params", 0),
            "n_threads": out["threads"]}
    for t in out["tests"]:
        runs = t["tok_s"]["runs"]
        rows.append({"engine": "mlxtral", **base, "backends": out["backend"], "n_prompt": t["n_prompt"],
                     "n_gen": t["n_gen"], "avg_ts": t["tok_s"]["mean"], "stddev_ts": t["tok_s"]["std"],
                     "samples_ts": runs})
        if t.get("llama_cpp_tok_s"):
            best = t["llama_cpp_tok_s"]
            rows.append({"engine": "llama.cpp", **base, "backends": "CPU", "n_prompt": t["n_prompt"],
                         "n_gen": t["n_gen"], "avg_ts": best, "stddev_ts": None, "samples_ts": [best]})
    return rows


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    """``rows`` (:func:`result_rows`) as llama-bench's ``-o md``, ``csv`` or ``jsonl``."""
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_FIELDS)
        for r in rows:
            w.writerow([";".join(f"{x:.3f}" for x in r[k]) if k == "samples_ts" else
                        ("" if r[k] is None else r[k]) for k in CSV_FIELDS])
        return buf.getvalue()
    from mlxtral.display import term_safe

    lines = ["| model | size | params | backend | threads | test | t/s |",
             "| ------------------------------ | ---------: | ---------: | ---------- | ------: "
             "| ------------: | -------------------: |"]
    for r in rows:
        test = (f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}")
        ts = f"{r['avg_ts']:.2f}" + (f" ± {r['stddev_ts']:.2f}" if r["stddev_ts"] is not None else " (best)")
        engine = r["engine"] if r["engine"] != "mlxtral" else f"mlxtral {r['backends']}"
        name = term_safe(r["model_type"], 80).replace("|", "/")
        lines.append(f"| {name} | {r['model_size'] / (1 << 30):.2f} GiB | {r['model_n_params'] / 1e9:.2f} B "
                     f"| {engine} | {r['n_threads']} | {test} | {ts} |")
    return "\n".join(lines) + "\n"


# ---- llama.cpp ---------------------------------------------------------------------------------

_SNIPPET = r'''
import json, resource, sys, time
import numpy as np
from llama_cpp import Llama
model = sys.argv[1]
pps, tgs = ([int(x) for x in a.split(",") if int(x)] for a in sys.argv[2:4])
threads, repeat = int(sys.argv[4]), int(sys.argv[5])
top = max(pps + tgs + [1])
llm = Llama(model_path=model, n_ctx=top + 8, n_batch=max(pps + [8]), n_threads=threads,
            n_threads_batch=threads, verbose=False)
rng = np.random.default_rng(0)
n_vocab = llm.n_vocab()
runs = {f"pp{n}": [] for n in pps} | {f"tg{n}": [] for n in tgs}
llm.eval([llm.token_bos()] + [3] * min(top - 1, 15))  # warm-up, untimed (as ours)
llm.eval([4])
for _ in range(repeat):
    for n in pps:
        llm.reset()
        prompt = [llm.token_bos()] + rng.integers(3, n_vocab, n - 1).tolist()
        t0 = time.perf_counter(); llm.eval(prompt); runs[f"pp{n}"].append(n / (time.perf_counter() - t0))
    for n in tgs:
        llm.reset()
        steps = rng.integers(3, n_vocab, n).tolist()
        t0 = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
        runs[f"tg{n}"].append(n / (time.perf_counter() - t0))
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
best = {k: max(v) for k, v in runs.items()}
print(json.dumps({"engine": "llama.cpp", "pp_tok_s": best[f"pp{pps[0]}"] if pps else 0.0,
                  "tg_tok_s": best[f"tg{tgs[0]}"] if tgs else 0.0, "tests": best,
                  "pp_runs": runs[f"pp{pps[0]}"] if pps else [],
                  "tg_runs": runs[f"tg{tgs[0]}"] if tgs else [],
                  "peak_rss_mb": rss_mb}))
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


def run_llamacpp(model_path: str | Path, pps: list[int], tgs: list[int], repeats: int, threads: int,
                 python: str | None = None, timeout: float = 1800) -> dict[str, Any]:
    """llama.cpp's pp/tg tests on the same file, in a subprocess: ``tests`` {label: best tok/s},
    and ``pp_tok_s``/``tg_tok_s`` of the first of each. Raises MlxtralError when unavailable."""
    py = find_llamacpp_python(python)
    if py is None:
        raise MlxtralError("llama.cpp comparison needs llama-cpp-python: pass --llamacpp-python PATH "
                           "(an interpreter that can `import llama_cpp`) or set MLXTRAL_LLAMACPP_PYTHON")
    script = shared_speed_script()
    shared = script is not None and len(pps) == len(tgs) == 1 and pps[0] > 0 and tgs[0] > 0
    if shared:
        cmd = [py, str(script), str(model_path), "--pp", str(pps[0]), "--tg", str(tgs[0]), "--threads",
               str(threads), "--repeat", str(repeats)]
    else:
        cmd = [py, "-c", _SNIPPET, str(model_path), ",".join(map(str, pps)), ",".join(map(str, tgs)),
               str(threads), str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MlxtralError(f"llama.cpp did not finish within {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MlxtralError(f"llama.cpp failed on {model_path}: {tail}")
    res = json.loads(lines[-1])
    if "tests" not in res:  # the shared script's output: its one pp and one tg test
        res["tests"] = {f"pp{pps[0]}": res.get("pp_tok_s"), f"tg{tgs[0]}": res.get("tg_tok_s")}
    res["python"] = py
    res["script"] = str(script) if shared else "embedded"
    return res
