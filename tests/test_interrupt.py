"""A conversion killed mid-way by a real signal (SIGINT = Ctrl-C, SIGTERM, SIGHUP), in a subprocess
running the installed ``mlxtral`` script: it exits 128 + signal with one line, leaves no OUT and no
temporary file, keeps a previous OUT untouched, and never modifies SRC."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import random_weights, tiny_args, write_gguf

SCRIPT = Path(sys.executable).parent / "mlxtral"


@pytest.fixture(scope="module")
def big_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~250 MB of F32: a few seconds of conversion on one thread, time to send a signal."""
    args = tiny_args(n_experts=8, dim=384, hidden_dim=1024, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=64)
    return write_gguf(tmp_path_factory.mktemp("src") / "big.gguf", random_weights(args, seed=5), args)


def _snapshot(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


@pytest.mark.parametrize("sig,previous", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                          (signal.SIGTERM, True), (signal.SIGHUP, False)])
def test_convert_killed_midway_leaves_nothing(tmp_path: Path, big_src: Path, sig: int,
                                              previous: bool) -> None:
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"
    out = tmp_path / "out.gguf"
    if previous:
        out.write_bytes(b"the previous output")
    before = _snapshot(big_src)
    env = {**os.environ, "MLXTRAL_CONVERT_THREADS": "1"}
    cmd = [str(SCRIPT), "convert", str(big_src), str(out), "--q4", *(["--force"] if previous else [])]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            tmps = [f for f in tmp_path.iterdir() if ".tmp-" in f.name]
            if tmps and tmps[0].stat().st_size > (1 << 20):  # mid-way: data is being written
                break
            time.sleep(0.005)
        assert p.poll() is None, ("the conversion ended before the signal", p.communicate())
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + sig, (p.returncode, err.decode()[-2000:])
    text = err.decode()
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert "interrupted" in last or "terminated" in last
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == (["out.gguf"] if previous else []), left  # no partial OUT, no temporary file
    if previous:
        assert out.read_bytes() == b"the previous output"
    assert _snapshot(big_src) == before  # SRC untouched
