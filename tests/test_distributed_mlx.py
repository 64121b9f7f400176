"""Expert- and pipeline-parallel runs on the MLX backend (``--backend mlx --distributed ...``).

The ranks are launched with MLX's launcher (``mlx.launch --backend ring``) on localhost and their
logits compared with the single-process MLX run bit for bit: expert parallel by rows fills each
rank's columns of the pairs' activations and outputs into zero buffers and ``all_sum`` completes
them exactly (x + 0 = x), by whole experts each rank's (token, rank) pairs, before the usual
combine; pipeline parallel moves the hidden state as float32, which
holds every float16 value. A prompt of 40 tokens takes the MoE's sorted path (80 pairs >= 64) and
pipeline micro-batches; a 5-token prompt and the decode steps the unsorted one.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm
from test_distributed import MLXTRAL, ROOT, _launch, _launch_mpi, needs_mpi

from mlxtral.qtensor import QTensor

pytestmark = pytest.mark.skipif(not tm.mlx_available(), reason="no mlx")

SCRIPT = """
import sys, numpy as np, mlxtral
path, mode, dtype, out = sys.argv[1:5]
m = mlxtral.load(path, backend="mlx", dtype=None if dtype == "-" else dtype,
                 distributed=None if mode == "none" else mode, max_context=128)
ids = [int(i) for i in sys.argv[5].split(",")]
long = m.logits(ids)  # [40, vocab]: sorted MoE path, micro-batched pipeline
short = m.logits(ids[:5])  # [5, vocab]: unsorted path
greedy = [r.token for r in m.stream(ids[:7], max_tokens=8, temperature=0) if r.token is not None]
np.savez(out, long=long, short=short, greedy=np.array(greedy, dtype=np.int64))
m.close()
"""

IDS = [1, 415, 2936, 9060, 285, 10575, 754, 272, 17898, 3914, 304, 868, 13, 28705, 28740, 28750,
       22, 7, 3, 100, 50, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]


def _run(tmp_path: Path, model: Path, mode: str, n: int, dtype: str) -> dict[str, np.ndarray]:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{mode}{n}.npz"
    argv = [str(script), str(model), mode, dtype, str(out), ",".join(map(str, IDS))]
    if mode == "none":
        subprocess.run([sys.executable, *argv], check=True, timeout=300, cwd=ROOT)
    else:
        r = _launch(n, argv)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist-mlx")
    moe = tm.tiny_args(4, n_layers=6)
    q4 = tm.tiny_args(8, n_layers=3)
    dense = tm.tiny_args(0, n_layers=4)  # no experts at all: one FFN a layer
    return {
        "moe": tm.write_gguf(d / "moe.gguf", tm.random_weights(moe, seed=3), moe),
        "q4_0": tm.write_raw_gguf(d / "q4.gguf", tm.raw_gguf_tensors(q4, "Q4_0", seed=2), q4, vocab=True),
        "dense": tm.write_gguf(d / "dense.gguf", tm.random_weights(dense, seed=4), dense),
    }


@pytest.mark.parametrize(("model", "mode", "n", "dtype"), [
    ("moe", "expert", 2, "-"),
    ("moe", "expert-rows", 3, "-"),
    ("moe", "expert-rows", 2, "-"),
    ("moe", "pipeline", 3, "-"),
    ("q4_0", "expert", 2, "float16"),
    ("q4_0", "expert-rows", 3, "float16"),
    ("q4_0", "pipeline", 2, "float16"),
    ("dense", "pipeline", 2, "-"),
])
def test_equals_single_process(tmp_path: Path, models: dict[str, Path], model: str, mode: str, n: int,
                               dtype: str) -> None:
    one = _run(tmp_path, models[model], "none", 1, dtype)
    group = _run(tmp_path, models[model], mode, n, dtype)
    for key in ("long", "short", "greedy"):
        np.testing.assert_array_equal(group[key], one[key], err_msg=key)  # bit for bit


def test_cli_generate(models: dict[str, Path]) -> None:
    argv = ["generate", str(models["moe"]), "-p", "Hello there", "-n", "10", "--temp", "0",
            "--backend", "mlx", "--json"]
    one = subprocess.run([*MLXTRAL, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert one.returncode == 0, one.stderr
    r = _launch(2, ["--", *MLXTRAL, *argv, "--distributed", "expert"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == json.loads(one.stdout)["text"]  # rank 0 alone prints
    assert json.loads(r.stdout)["backend"] == "mlx"


@needs_mpi
def test_mpi_backend_equals_single_process(tmp_path: Path, models: dict[str, Path]) -> None:
    """By rows on MLX's MPI backend (``mlx.launch --backend mpi``): the single process's bits."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "mpi.npz"
    r = _launch_mpi(2, [sys.executable, str(script), str(models["moe"]), "expert-rows", "-", str(out),
                        ",".join(map(str, IDS))])
    assert "improperly" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    group, one = dict(np.load(out)), _run(tmp_path, models["moe"], "none", 1, "-")
    for key in ("long", "short", "greedy"):
        np.testing.assert_array_equal(group[key], one[key], err_msg=key)


# ---- in one process: a rank's share against the whole model (no launcher) -----------------------


class _Recorder:
    """Stands in for a group of 2: its all_sum returns this rank's own part unchanged."""

    size = 2

    def all_sum_mx(self, a: Any, what: str = "") -> Any:
        return a


def _tensors(args: Any, qtype: str) -> dict[str, QTensor]:
    if qtype == "F32":
        return {n: QTensor.from_float(x) for n, x in tm.random_weights(args, seed=5).items()}
    return tm.raw_gguf_tensors(args, qtype, seed=5)


def _share(args: Any, t: dict[str, QTensor], mode: str, rank: int, size: int, group: Any = None) -> Any:
    from mlxtral.backends.mlx_backend import MLXBackend
    from mlxtral.distributed.placement import place

    share = place(mode, rank, size, args)
    return MLXBackend(args, {n: q for n, q in t.items() if share.holds(n)}, dtype="float32", place=share,
                      group=group)


@pytest.mark.parametrize("qtype", ["F32", "Q4_0"])
@pytest.mark.parametrize("T", [1, 5, 40])  # decode, unsorted prefill, sorted prefill (80 pairs >= 64)
def test_expert_shares_sum_to_one_process(qtype: str, T: int) -> None:
    import mlx.core as mx

    from mlxtral.backends.mlx_backend import MLXBackend

    args = tm.tiny_args(8, n_layers=1, vocab_size=512)
    t = _tensors(args, qtype)
    one = MLXBackend(args, t, dtype="float32")
    rng = np.random.default_rng(T)
    x = mx.array(rng.standard_normal((T, args.dim)).astype(np.float32))  # [T, dim]
    inds = np.stack([rng.choice(8, 2, replace=False) for _ in range(T)]).astype(np.uint32)  # [T, 2]
    full = np.array(one.switch_glu(x, mx.array(inds), one.layers[0]))  # [T, 2, dim]
    total = np.zeros_like(full)
    for r in range(2):
        be = _share(args, t, "expert", r, 2, _Recorder())
        assert be.split and be.layers[0].gate.w.shape[0] == 4  # its 4 experts only
        part = np.array(be._switch_glu_split(x, mx.array(inds), be.layers[0], 0))  # [T, 2, dim]
        mine = (inds >= be.local.start) & (inds < be.local.stop)  # [T, 2]
        assert not part[~mine].any()  # the other rank's pairs: 0
        total += part
    np.testing.assert_array_equal(total, full)  # x + 0 = x: bit for bit


def test_pipeline_shares_chain_to_one_process() -> None:
    from mlxtral.backends.mlx_backend import MLXBackend

    args = tm.tiny_args(4, n_layers=5, vocab_size=512)
    t = _tensors(args, "Q4_0")
    one = MLXBackend(args, t, dtype="float32")
    ranks = [_share(args, t, "pipeline", r, 3) for r in range(3)]
    assert [len(b.held) for b in ranks] == [1, 2, 2] and ranks[1].embed is None and ranks[2].output is None
    c1 = one.new_cache(64)
    caches = [b.new_cache(64) for b in ranks]
    assert len(caches[1].keys) == 2  # a rank's KV cache: its layers only
    for chunk in ([1, 7, 3, 9, 11, 2], [5], [6]):  # a prompt, then two decode steps
        p0 = c1.offset
        want = one.forward(chunk, c1, all_logits=True)  # [T, vocab]
        h = None
        for b, c in zip(ranks, caches, strict=True):
            h = b.hidden(chunk, c, h)  # [T, dim]
        got = ranks[0].logits(h, p0 + 1)
        np.testing.assert_array_equal(got, want)
