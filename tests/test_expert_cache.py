"""Experts streamed from disk (mlxtral.expert_cache): the same numbers as the resident model, on
both backends, with read-ahead on or off and either eviction policy, under a budget so small that
tokens miss and evict; the layout, the reader, the cache's bounds and the memory decision."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tiny_models import (
    BACKENDS,
    mlx_available,
    random_weights,
    raw_gguf_tensors,
    tiny_args,
    write_gguf,
    write_raw_gguf,
)

import mlxtral
from mlxtral import memory
from mlxtral.errors import FormatError, OutOfMemoryError, UsageError
from mlxtral.expert_cache import ExpertCache, expert_layout, parse_size, plan_memory
from mlxtral.expert_cache.reader import ExpertReader, Slot, slot_bytes
from mlxtral.formats.detect import open_checkpoint

ARGS = tiny_args(n_experts=8, vocab_size=320, max_position_embeddings=512)
CTX = 256
PROMPT = [1, *range(5, 83)]  # 79 tokens: the prefill runs a layer's experts in groups of 2


# K-quants need rows of 256: a wider model (the NumPy backend computes on the Q4_K blocks in the
# slot as they are read)
ARGS_K = tiny_args(n_experts=8, vocab_size=320, max_position_embeddings=512, dim=256, head_dim=64,
                   hidden_dim=256)


@pytest.fixture(scope="module", params=["Q4_0", "Q8_0", "Q4_K"])
def model_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("stream") / f"tiny-{request.param}.gguf"
    args = ARGS_K if request.param == "Q4_K" else ARGS
    return write_raw_gguf(p, raw_gguf_tensors(args, request.param, seed=2), args)


def smallest(path: Path, backend: str) -> int:
    """The smallest budget that streams: resident part, KV cache, working set, one layer's needs."""
    plan = plan_memory(open_checkpoint(path), backend, CTX, stream=True)
    assert plan.streaming and plan.cache_slots == plan.n_experts_all  # stream=True with no budget
    return plan.min_budget


def load(path: Path, backend: str, **kw: object) -> mlxtral.Model:
    return mlxtral.load(path, backend=backend, max_context=CTX, tokenizer=False, **kw)  # type: ignore[arg-type]


def greedy(m: mlxtral.Model, ids: list[int], n: int = 12) -> list[int]:
    """Prefill, then ``n`` tokens one at a time through the KV cache (argmax)."""
    cache = m.backend.new_cache(CTX)
    out = [int(np.argmax(m.backend.forward(ids, cache)))]
    for _ in range(n - 1):
        out.append(int(np.argmax(m.backend.forward([out[-1]], cache))))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("eviction", ["lfu", "lru"])
def test_streaming_changes_no_number(model_path: Path, backend: str, prefetch: bool, eviction: str) -> None:
    ref = load(model_path, backend)
    assert not ref.streaming
    m = load(model_path, backend, memory_budget=smallest(model_path, backend), stream_experts=True,
             prefetch=prefetch, eviction=eviction)
    assert m.streaming and m.memory_plan.cache_slots == m.memory_plan.min_slots
    np.testing.assert_array_equal(m.logits(PROMPT), ref.logits(PROMPT))  # prefill, grouped experts
    np.testing.assert_array_equal(m.logits(PROMPT[:3]), ref.logits(PROMPT[:3]))
    assert greedy(m, PROMPT[:9]) == greedy(ref, PROMPT[:9])  # decode, one token at a time, cached
    s = m.expert_cache_stats()
    assert (s["prefetched"] > 0) == prefetch
    if backend == "numpy":  # 2 slots, 2 layers: more reads than slots, experts were evicted
        assert s["misses"] + s["prefetched"] > 2 * s["cache_slots"]
        if not prefetch:  # every expert use is a read
            assert s["hits"] == 0
    assert s["bytes_read"] > 0 and s["tokens"] == 79 + 3 + 9 + 11


def test_wrong_guesses_cost_reads_not_answers(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = load(model_path, "numpy")
    plan = plan_memory(open_checkpoint(model_path), "numpy", CTX, stream=True)
    m = load(model_path, "numpy", memory_budget=plan.min_budget + 2 * plan.expert_bytes, stream_experts=True)
    assert m.memory_plan.cache_slots == 4
    cache = m.backend.experts

    def wrong(layer: int, experts: list[int]) -> None:  # read ahead exactly the experts not picked
        ExpertCache.prefetch(cache, layer, [e for e in range(ARGS.n_experts) if e not in experts])

    monkeypatch.setattr(cache, "prefetch", wrong)
    assert greedy(m, PROMPT[:20], 16) == greedy(ref, PROMPT[:20], 16)
    np.testing.assert_array_equal(m.logits(PROMPT), ref.logits(PROMPT))
    s = m.expert_cache_stats()
    assert s["prefetched"] > 0 and s["prefetch_accuracy"] < 1


def test_legacy_per_expert_layout_streams(tmp_path: Path) -> None:
    w = random_weights(ARGS, seed=4)
    merged = write_gguf(tmp_path / "merged.gguf", w, ARGS, vocab=False)
    legacy = write_gguf(tmp_path / "legacy.gguf", w, ARGS, legacy_experts=True, vocab=False)
    ref = load(merged, "numpy")
    m = load(legacy, "numpy", memory_budget=smallest(legacy, "numpy"), stream_experts=True)
    np.testing.assert_array_equal(m.logits(PROMPT), ref.logits(PROMPT))


@pytest.mark.parametrize("direct", [True, False])
def test_reader_reads_the_bytes_the_map_holds(model_path: Path, direct: bool) -> None:
    ckpt = open_checkpoint(model_path)
    layout = expert_layout(ckpt.args, ckpt.tensors, ckpt.path)
    reader = ExpertReader(layout, direct=direct)
    slot = Slot(slot_bytes(layout))
    try:
        for li in range(ARGS.n_layers):
            for e in range(ARGS.n_experts):
                raw = reader.read(li, e, slot)
                for kind, data in zip(("gate", "up", "down"), raw, strict=True):
                    q = ckpt.tensors[f"blk.{li}.ffn_{kind}.{e}.weight"]
                    assert data.shape == q.data.shape and data.dtype == q.data.dtype
                    assert not data.flags.writeable
                    np.testing.assert_array_equal(data, q.data)
    finally:
        reader.close()
    assert layout.total_bytes == sum(q.nbytes for n, q in ckpt.tensors.items() if n.count(".") == 4)


def test_cache_is_bounded_and_pins(model_path: Path) -> None:
    ckpt = open_checkpoint(model_path)
    layout = expert_layout(ckpt.args, ckpt.tensors, ckpt.path)
    cache = ExpertCache(layout, 3, lambda li, e, raw: (li, e), prefetch=True)
    try:
        with cache.use(0, [1, 2]) as forms:
            assert forms == [(0, 1), (0, 2)]
            cache.prefetch(1, [0, 1, 2, 3])  # one free slot: only expert 0 can be read ahead
            with cache.use(1, [5]) as f2:  # a demand read may evict the unused read-ahead, not a pin
                assert f2 == [(1, 5)]
            assert cache.cached(0, 1) and cache.cached(0, 2)
        assert len(cache._slots) <= 3 and cache.allocated_bytes <= 3 * cache.slot_bytes
        with pytest.raises(ValueError):
            with cache.use(0, [0, 1, 2, 3]):
                pass
    finally:
        cache.close()


def _bare_cache(path: Path, slots: int, policy: str) -> ExpertCache:
    """A cache of ``slots`` whose forms are the expert ids, no read-ahead, one reserve slot."""
    ckpt = open_checkpoint(path)
    layout = expert_layout(ckpt.args, ckpt.tensors, ckpt.path)
    return ExpertCache(layout, slots, lambda li, e, raw: e, prefetch=False, policy=policy, reserve=1)


def test_lfu_keeps_the_hot_expert_where_lru_lets_it_go(model_path: Path) -> None:
    kept = {}
    for policy in ("lfu", "lru"):
        cache = _bare_cache(model_path, 2, policy)
        for _ in range(5):
            with cache.use(0, [0]):
                pass
        for e in (1, 2, 3):  # a burst of cold experts
            with cache.use(0, [e]):
                pass
        kept[policy] = cache.cached(0, 0)
        cache.close()
    assert kept == {"lfu": True, "lru": False}


def test_lfu_keeps_hits_on_a_cycle_larger_than_the_cache(model_path: Path) -> None:
    """Tokens walk the layers in order: 12 experts used in turn through 5 slots. LRU hits nothing;
    LFU's protected set (5 - 1 reserve) hits 4 of 12 every round after the first."""
    hits = {}
    for policy in ("lfu", "lru"):
        cache = _bare_cache(model_path, 5, policy)
        for _ in range(10):
            for li in range(2):
                for e in range(6):
                    with cache.use(li, [e]):
                        pass
        hits[policy] = cache.stats.hits
        cache.close()
    assert hits == {"lfu": 9 * 4, "lru": 0}


def test_truncated_file_is_one_clear_error(tmp_path: Path) -> None:
    p = write_raw_gguf(tmp_path / "t.gguf", raw_gguf_tensors(ARGS, "Q4_0", seed=1), ARGS)
    m = load(p, "numpy", memory_budget=smallest(p, "numpy"), stream_experts=True)
    os.truncate(p, os.path.getsize(p) // 2)
    for _ in range(2):  # and again: a failed read leaves no entry waiting forever
        with pytest.raises(FormatError) as ei:
            m.logits(PROMPT)
        assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_parse_size() -> None:
    assert parse_size("12GB") == 12 * 10**9
    assert parse_size("150MB") == 150 * 10**6
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(" 4096 ") == 4096 and parse_size(4096) == 4096 and parse_size(None) is None
    for bad in ("12XB", "-1GB", "0", "", "GB", "1e9", "nan", "9" * 40, "1" * 100 + "GB", True):
        with pytest.raises(UsageError):
            parse_size(bad)  # type: ignore[arg-type]


def test_memory_decision(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = open_checkpoint(model_path)
    full = memory.estimate(ckpt, "numpy", CTX)
    assert plan_memory(ckpt, "numpy", CTX, budget=full.total).mode == "resident"
    assert plan_memory(ckpt, "numpy", CTX, budget=full.total, stream=False).mode == "resident"
    tight = plan_memory(ckpt, "numpy", CTX, budget=full.total - 1)
    assert tight.streaming and 2 <= tight.cache_slots < tight.n_experts_all
    assert tight.describe().startswith("streaming experts: ") and "expert cache of" in tight.describe()
    with pytest.raises(OutOfMemoryError) as ei:
        plan_memory(ckpt, "numpy", CTX, budget=tight.min_budget - 1)
    msg = str(ei.value)
    assert msg.startswith(str(model_path)) and "even with its experts streamed" in msg and "2 experts" in msg
    with pytest.raises(OutOfMemoryError, match="needs ~"):
        plan_memory(ckpt, "numpy", CTX, budget=full.total - 1, stream=False)
    # default budget: what is available, less a margin once the model does not fit
    from mlxtral.expert_cache import plan as plan_mod

    monkeypatch.setattr(memory, "available_memory", lambda: full.total)
    assert not load(model_path, "numpy").streaming
    monkeypatch.setattr(memory, "available_memory", lambda: full.total - 1)
    with pytest.raises(OutOfMemoryError, match=r"even with its experts streamed .* but only .* is available"):
        load(model_path, "numpy")
    monkeypatch.setattr(memory, "available_memory", lambda: tight.min_budget + plan_mod.MARGIN)
    m = load(model_path, "numpy", stream_experts=True)
    assert m.streaming and m.memory_plan.budget == tight.min_budget and m.memory_plan.cache_slots == 2


def test_dense_model_is_not_streamed(tmp_path: Path) -> None:
    dense = tiny_args(n_experts=0, vocab_size=320, max_position_embeddings=512)
    p = write_gguf(tmp_path / "dense.gguf", random_weights(dense), dense, vocab=False)
    ckpt = open_checkpoint(p)
    full = memory.estimate(ckpt, "numpy", CTX)
    with pytest.raises(OutOfMemoryError, match="needs ~"):
        plan_memory(ckpt, "numpy", CTX, budget=full.total - 1)
    assert not load(p, "numpy", stream_experts=True).streaming


@pytest.mark.skipif(not mlx_available(), reason="no mlx")
def test_mlx_smallest_cache_is_one_layer(model_path: Path) -> None:
    plan = plan_memory(open_checkpoint(model_path), "mlx", CTX, stream=True)
    assert plan.min_slots == ARGS.n_experts


def test_cli_memory_budget_streams(tmp_path: Path) -> None:
    import json

    from test_cli import script

    args = tiny_args(n_experts=8, max_position_embeddings=512)  # the real vocabulary: a tokenizer
    p = write_raw_gguf(tmp_path / "v.gguf", raw_gguf_tensors(args, "Q4_0", seed=5), args, vocab=True)
    plan = plan_memory(open_checkpoint(p), "numpy", CTX, stream=True)
    budget = str(plan.min_budget + plan.expert_bytes)  # 3 slots of 16 experts
    r = script("generate", p, "-p", "Hi", "-n", "6", "--temp", "0", "--memory-budget", budget,
               "--max-context", str(CTX), "--json", "--expert-stats")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stats"]["expert_cache"]["requests"] > 0
    assert out["expert_stats"]["expert_cache"]["cache_slots"] >= 2
    r = script("generate", p, "-p", "Hi", "-n", "4", "--memory-budget", budget, "--max-context", str(CTX))
    err = r.stderr.decode()
    assert r.returncode == 0 and "streaming experts: " in err and "hits, prefetch" in err
    r = script("info", p, "--memory-budget", budget, "--max-context", str(CTX), "--json")
    assert json.loads(r.stdout)["memory"]["mode"]["mode"] == "stream"
    r = script("generate", p, "-p", "Hi", "--memory-budget", "10kB")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "even with its experts streamed" in err
    r = script("generate", p, "-p", "Hi", "--memory-budget", "lots")
    err = r.stderr.decode()
    assert r.returncode == 2 and "invalid memory size" in err and "Traceback" not in err


def test_close_and_collection_stop_the_threads(model_path: Path) -> None:
    import gc
    import time

    def threads(m: mlxtral.Model) -> list:
        c = m.backend.experts
        return [*c.reader._threads, *([c._worker] if c._worker is not None else [])]

    with load(model_path, "numpy", memory_budget=smallest(model_path, "numpy"), stream_experts=True) as m:
        m.logits(PROMPT[:4])
        ts = threads(m)
        assert len(ts) >= 4 and all(t.is_alive() for t in ts)
    assert not any(t.is_alive() for t in ts)  # closed by the with block
    m2 = load(model_path, "numpy", memory_budget=smallest(model_path, "numpy"), stream_experts=True)
    m2.logits(PROMPT[:4])
    ts = threads(m2)
    del m, m2
    for _ in range(50):  # an unreachable model's cache is collected and its threads end
        gc.collect()
        if not any(t.is_alive() for t in ts):
            break
        time.sleep(0.1)
    assert not any(t.is_alive() for t in ts)
