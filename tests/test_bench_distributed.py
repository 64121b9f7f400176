"""The byte model of benchmarks/bench_distributed.py: weight bytes each rank reads per token."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mlxtral.config import ModelArgs

_spec = importlib.util.spec_from_file_location(
    "bench_distributed", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed.py")
bd = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(bd)  # type: ignore[union-attr]

L, E, VOCAB = 2, 4, 100
# bytes: a layer's non-expert tensors, one expert (3 tensors), the output, the embedding
LAYER, EXPERT, OUT, EMB = 1000, 300, 5000, 20 * VOCAB


def _args() -> ModelArgs:
    return ModelArgs(dim=64, n_layers=L, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                     vocab_size=VOCAB, n_experts=E, n_experts_per_tok=2, max_position_embeddings=64)


def _sizes() -> dict[str, int]:
    s = {"token_embd.weight": EMB, "output_norm.weight": 0, "output.weight": OUT}
    for li in range(L):
        s[f"blk.{li}.attn_q.weight"] = LAYER
        for e in range(E):
            for kind in ("gate", "up", "down"):
                s[f"blk.{li}.ffn_{kind}.{e}.weight"] = EXPERT // 3
    return s


def _used(rows: list[list[list[int]]]) -> np.ndarray:
    """[T, L, E] one-hot routing from each token's experts per layer."""
    u = np.zeros((len(rows), L, E))
    for t, per_layer in enumerate(rows):
        for li, es in enumerate(per_layer):
            u[t, li, es] = 1
    return u


def test_byte_parts() -> None:
    p = bd.byte_parts(_args(), _sizes())
    assert p["layer"] == [LAYER] * L
    assert p["expert"] == [[EXPERT] * E] * L
    assert p["head"] == OUT and p["embed"] == EMB // VOCAB


def test_single_and_expert_parallel() -> None:
    args, parts = _args(), bd.byte_parts(_args(), _sizes())
    # token 0: both layer-0 experts on rank 0; token 1: both on rank 1
    used = _used([[[0, 1], [0, 2]], [[2, 3], [1, 3]]])
    means, crit = bd.rank_bytes(parts, bd.placements("single", 1, args), used)
    one = L * LAYER + L * 2 * EXPERT + OUT + EMB // VOCAB
    assert means == [one] and crit == one
    means, crit = bd.rank_bytes(parts, bd.placements("expert", 2, args), used)
    # rank 0 (experts 0-1): token 0 uses 2 + 1, token 1 uses 0 + 1; rank 1: token 0 0 + 1, token 1 2 + 1
    # (each rank projects half the vocabulary)
    assert means[0] == pytest.approx(L * LAYER + (3 + 1) / 2 * EXPERT + OUT / 2 + EMB // VOCAB)
    assert means[1] == pytest.approx(L * LAYER + (1 + 3) / 2 * EXPERT + OUT / 2 + EMB // VOCAB)
    # the slower rank of each layer: 2 experts in layer 0, 1 in layer 1, both tokens
    assert crit == pytest.approx(L * LAYER + 3 * EXPERT + OUT / 2 + EMB // VOCAB)
    # by rows: each rank reads half of every expert a token uses, whichever they are
    means, crit = bd.rank_bytes(parts, bd.placements("expert-rows", 2, args), used)
    even = L * LAYER + L * 2 * EXPERT / 2 + OUT / 2 + EMB // VOCAB
    assert means == pytest.approx([even, even]) and crit == pytest.approx(even)


def test_pipeline_fills_the_layers_rank0_does_not_route() -> None:
    args, parts = _args(), bd.byte_parts(_args(), _sizes())
    used = _used([[[0, 1], []]])  # rank 0 saw layer 0 only
    means, crit = bd.rank_bytes(parts, bd.placements("pipeline", 2, args), used)
    assert means == pytest.approx([LAYER + 2 * EXPERT + OUT + EMB // VOCAB, LAYER + 2 * EXPERT])
    assert crit == pytest.approx(sum(means))


def test_file_share() -> None:
    args, sizes = _args(), _sizes()
    rows = bd.byte_parts(args, sizes)["rows"]
    r0, r1 = bd.placements("expert", 2, args)
    want = EMB + OUT + L * LAYER + L * 2 * EXPERT
    assert bd.file_share(sizes, r0, rows) == bd.file_share(sizes, r1, rows) == want
    r0, r1 = bd.placements("expert-rows", 2, args)  # half the rows of every expert
    assert bd.file_share(sizes, r0, rows) == bd.file_share(sizes, r1, rows) == want
    p0, p1 = bd.placements("pipeline", 2, args)
    assert bd.file_share(sizes, p0, rows) == EMB + OUT + LAYER + E * EXPERT
    assert bd.file_share(sizes, p1, rows) == LAYER + E * EXPERT


def test_labels_name_a_mode_and_a_backend() -> None:
    assert bd.split_label("expert") == ("expert", "ring")
    assert bd.split_label("expert-rows@mpi") == ("expert-rows", "mpi")


def test_descendants_find_the_ranks_under_a_launcher() -> None:
    """The MPI launch samples its ranks' memory: the processes under mpirun with the worker's flag."""
    import subprocess
    import sys
    import time

    inner = ("import subprocess, sys; "
             "subprocess.run([sys.executable, '-c', 'import time; time.sleep(5)', '--worker'])")
    p = subprocess.Popen([sys.executable, "-c", inner])
    try:
        found: list[int] = []
        for _ in range(50):
            found = bd._descendants(p.pid, "--worker")
            if found:
                break
            time.sleep(0.1)
        assert len(found) == 1 and found[0] != p.pid
    finally:
        p.kill()
        p.wait()


def test_the_free_communication_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0's token without its time in collectives: what the ranks would give on this host if
    communication were free and instant (the report's one-host ceiling)."""
    import argparse

    monkeypatch.setattr(bd, "tensor_bytes", lambda model: (_args(), _sizes()))
    used = _used([[[0, 2], [1, 3]]] * 3).tolist()
    single = {"tg_tok_s": 100.0, "pp_tok_s": 400.0, "decode_used": used, "peak_rss": [1e8], "base_rss": 1e7,
              "prefill_used": np.ones((L, E)).tolist()}
    expert = {**single, "tg_tok_s": 50.0, "peak_rss": [6e7, 6e7], "decode_comm_s": [0.008, 0.007],
              "decode_comm_bytes": [8192, 8192], "decode_forward_s": [0.019, 0.019], "decode_collectives": 10,
              "prefill_comm_bytes": [1e5, 1e5], "prefill_collectives": 3}
    a = argparse.Namespace(pp=16, tg=8, ranks=2)
    c = bd.summarize("m.gguf", [{"single": single, "expert": expert}], a)["expert"]["free_comm"]
    # 20 ms a token, 8 of them in 10 collectives: 12 ms without them, 83.3 tok/s, 0.83x of 100
    assert c["token_ms"] == pytest.approx(20) and c["comm_ms"] == pytest.approx(8)
    assert c["per_collective_us"] == pytest.approx(800)
    assert c["tg_tok_s"] == pytest.approx(83.33, abs=0.01)
    assert c["tg_vs_single"] == pytest.approx(0.833, abs=1e-3)
