"""A conversion killed mid-way by a real signal (SIGINT = Ctrl-C, SIGTERM, SIGHUP), in a subprocess
running the installed ``mlxtral`` script, to a GGUF file and to an MLX folder, on one worker thread
and on the default count: it exits 128 + signal within 60 s (no hang at exit) with one line, leaves
no OUT and no temporary file, keeps a previous OUT untouched, and never modifies SRC. A write that
fails for real (a file size limit, as a full disk would) ends in one line naming OUT."""
from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import random_weights, tiny_args, write_gguf

SCRIPT = Path(sys.executable).parent / "mlxtral"
EXIT_WITHIN = 60.0  # seconds from the signal to the exit: a worker thread left waiting hangs it


@pytest.fixture(scope="module")
def big_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~250 MB of F32: a few seconds of conversion on one thread, time to send a signal."""
    args = tiny_args(n_experts=8, dim=384, hidden_dim=1024, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=64)
    return write_gguf(tmp_path_factory.mktemp("src") / "big.gguf", random_weights(args, seed=5), args)


def _snapshot(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def _tree(p: Path) -> dict[str, bytes]:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def _midway(folder: Path, fmt: str) -> bool:
    """Tensor data is being written into the temporary output (beyond the header and tokenizer):
    a GGUF grows as it is written; a safetensors shard is sized up front (sparse), so count its
    allocated blocks."""
    for f in folder.iterdir():
        if ".tmp-" not in f.name:
            continue
        if fmt == "gguf":
            return f.is_file() and f.stat().st_size > (1 << 20)
        for shard in f.glob("*.safetensors"):
            st = shard.stat()
            if getattr(st, "st_blocks", 1 << 20) * 512 > (1 << 20):
                return True
    return False


_SENT = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def _default_signals() -> None:
    """In the child, before exec: the signals the tests send get their default disposition back.
    Under ``nohup`` (SIGHUP ignored) or as a background job of a non-interactive shell (SIGINT
    ignored), the child would inherit the ignore, and mlxtral rightly keeps an inherited ignore:
    the signal would never arrive and the test would fail for a reason outside the code."""
    for sig in _SENT:
        signal.signal(sig, signal.SIG_DFL)


def _env(threads: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLXTRAL_CONVERT_THREADS"}
    if threads is not None:
        env["MLXTRAL_CONVERT_THREADS"] = threads
    return env


def _convert_cmd(src: Path, out: Path, fmt: str) -> list[str]:
    mlx = ["--format", "mlx"] if fmt == "mlx" else []
    return [str(SCRIPT), "convert", str(src), str(out), "--q4", *mlx]


def _message_lines(err: str) -> list[str]:
    """stderr without the progress bar's own line(s)."""
    return [ln for ln in err.splitlines() if ln.strip() and not ln.lstrip().startswith("converting")]


CASES = [  # output format, signal, a previous OUT to keep (--force), MLXTRAL_CONVERT_THREADS (None: default)
    ("gguf", signal.SIGINT, False, "1"),
    ("gguf", signal.SIGTERM, False, "1"),
    ("gguf", signal.SIGTERM, True, "1"),
    ("gguf", signal.SIGHUP, False, "1"),
    ("gguf", signal.SIGINT, False, None),
    ("gguf", signal.SIGTERM, True, None),
    ("mlx", signal.SIGINT, False, "1"),
    ("mlx", signal.SIGINT, False, None),
    ("mlx", signal.SIGINT, True, None),
    ("mlx", signal.SIGTERM, False, None),
    ("mlx", signal.SIGTERM, True, None),
    ("mlx", signal.SIGHUP, False, None),
]


PREVIOUS_GGUF = b"GGUF the previous output"

IDS = [f"{f}-{signal.Signals(s).name}-{'force' if p else 'new'}-threads-{t or 'default'}"
       for f, s, p, t in CASES]


@pytest.mark.parametrize("fmt,sig,previous,threads", CASES, ids=IDS)
def test_convert_killed_midway_leaves_nothing(tmp_path: Path, big_src: Path, fmt: str, sig: int,
                                              previous: bool, threads: str | None) -> None:
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    if previous:
        if fmt == "gguf":
            out.write_bytes(PREVIOUS_GGUF)  # --force replaces only a GGUF file
        else:
            out.mkdir()
            (out / "config.json").write_text("the previous output")
            (out / "model.safetensors").write_bytes(b"previous weights")
    kept = _tree(out) if previous and fmt == "mlx" else None
    before = _snapshot(big_src)
    cmd = [*_convert_cmd(big_src, out, fmt), *(["--force"] if previous else [])]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(threads),
                         preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None and not _midway(tmp_path, fmt):
            time.sleep(0.005)
        assert p.poll() is None, ("the conversion ended before the signal", p.communicate())
        p.send_signal(sig)
        sent = time.monotonic()
        try:
            _, err = p.communicate(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit {EXIT_WITHIN:.0f} s after signal {sig}: hung")
        took = time.monotonic() - sent
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    text = err.decode()
    assert p.returncode == 128 + sig, (p.returncode, text[-2000:])
    assert took < EXIT_WITHIN
    assert "Traceback" not in text, text[-2000:]
    lines = _message_lines(text)
    assert len(lines) == 1, lines  # one line, nothing else
    assert "interrupted" in lines[0] or "terminated" in lines[0], lines
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == ([out.name] if previous else []), left  # no partial OUT, no temporary file
    if previous and fmt == "gguf":
        assert out.read_bytes() == PREVIOUS_GGUF
    if kept is not None:
        assert _tree(out) == kept
    assert _snapshot(big_src) == before  # SRC untouched


def _limit_file_size(nbytes: int) -> None:
    """In the child: files larger than ``nbytes`` cannot be written (EFBIG instead of SIGXFSZ)."""
    _default_signals()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE") or not hasattr(signal, "SIGXFSZ"),
                    reason="needs RLIMIT_FSIZE and SIGXFSZ")
@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
def test_convert_write_error_names_out(tmp_path: Path, big_src: Path, fmt: str) -> None:
    """A real write error from the system mid-way (the file size limit: EFBIG, on the same code
    path as a full disk's ENOSPC) through the installed script: one line ``error: OUT: ...`` with
    the errno, exit 1, no OUT, no temporary file."""
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    p = subprocess.run(_convert_cmd(big_src, out, fmt), capture_output=True, env=_env(None), timeout=120,
                       preexec_fn=lambda: _limit_file_size(4 << 20))
    text = p.stderr.decode()
    assert p.returncode == 1, (p.returncode, text[-2000:])
    assert "Traceback" not in text, text[-2000:]
    lines = _message_lines(text)
    assert lines == [f"error: {out}: {os.strerror(errno.EFBIG)} (EFBIG, errno {errno.EFBIG})"], lines
    assert sorted(tmp_path.iterdir()) == []


WORKER_START_INTERRUPTED = """
import os, sys, threading
os.environ["MLXTRAL_CONVERT_THREADS"] = "4"
from mlxtral.convert import tensors
tensors.PARALLEL_MIN_ELEMS = 1
real_start = threading.Thread.start
def start(self):
    real_start(self)
    if self.name.startswith("mlxtral-convert"):
        raise KeyboardInterrupt  # Ctrl-C while Thread.start() waited for the new worker
threading.Thread.start = start
try:
    if sys.argv[1] == "scope":
        with tensors.worker_pool():
            tensors.map_rows(lambda lo, hi: lo, 64, 64)
    else:  # a pool nobody shuts down: the worst case
        tensors.WorkerPool(4).map(lambda i: i, [(i,) for i in range(8)])
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.parametrize("how", ["scope", "never-shut-down"])
def test_interrupted_worker_start_does_not_hang_the_exit(how: str) -> None:
    """A ThreadPoolExecutor whose first worker is interrupted while starting (not yet registered for
    the wake-up at exit) hangs the interpreter's exit in threading._shutdown; the convert workers are
    daemons and never keep the process alive."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", WORKER_START_INTERRUPTED, how], capture_output=True,
                       timeout=EXIT_WITHIN)
    assert p.returncode == 0 and p.stdout.decode().split() == ["interrupted"], p.stderr.decode()[-2000:]
    assert time.monotonic() - t0 < EXIT_WITHIN
