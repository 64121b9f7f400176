"""Samplers, stop strings, and KV-cache reuse in the shared generation loop."""
from __future__ import annotations

import numpy as np
import pytest
from test_model import random_tensors, tiny_args

from mlxtral.backends.numpy_backend import NumpyBackend
from mlxtral.errors import ContextOverflowError, UsageError
from mlxtral.generate import Session, _StopMatcher, stream_generate
from mlxtral.sampling import Sampler, SamplingParams, apply_repetition_penalty


class ByteTokenizer:
    """Token i < 256 is byte i; multi-byte UTF-8 is only complete text once all bytes arrive."""

    eos_ids = {0}

    def stream_decoder(self):
        buf = bytearray()

        class D:
            def add(self, t: int) -> str:
                buf.append(t % 256)
                try:
                    s = buf.decode("utf-8")
                except UnicodeDecodeError:
                    return ""
                buf.clear()
                return s

            def flush(self) -> str:
                s = buf.decode("utf-8", errors="replace")
                buf.clear()
                return s

        return D()


def test_greedy_is_argmax() -> None:
    x = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingParams())(x) == 1


def test_top_k_1_is_greedy_at_any_temperature() -> None:
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    s = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=1))
    assert all(s(x) == int(x.argmax()) for _ in range(20))


def test_top_p_and_min_p_restrict_the_candidates() -> None:
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {s(x) for _ in range(200)} == {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.35, seed=0))  # keeps p >= 0.35 * 0.5
    assert {s(x) for _ in range(200)} == {0, 1}


def test_seed_makes_sampling_reproducible() -> None:
    x = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    a = [Sampler(SamplingParams(temperature=1.0, seed=7))(x) for _ in range(3)]
    b = Sampler(SamplingParams(temperature=1.0, seed=7))
    c = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert [b(x) for _ in range(10)] == [c(x) for _ in range(10)]
    assert len(set(a)) == 1


def test_sampling_follows_the_distribution() -> None:
    p = np.array([0.6, 0.3, 0.1])
    s = Sampler(SamplingParams(temperature=1.0, seed=3))
    draws = np.bincount([s(np.log(p).astype(np.float32)) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(draws, p, atol=0.03)


def test_repetition_penalty_as_llama_cpp() -> None:
    x = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    y = apply_repetition_penalty(x, [0, 1, 1], 2.0)
    np.testing.assert_allclose(y, [1.0, -4.0, 1.0])


def test_bad_sampling_parameters_are_users_errors() -> None:
    for kw in ({"temperature": -1}, {"top_p": 0.0}, {"min_p": 1.0}, {"top_k": -2}):
        with pytest.raises(UsageError):
            SamplingParams(**kw)


def test_stop_matcher_holds_back_partial_stop_strings() -> None:
    m = _StopMatcher(["STOP"])
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)
    assert m.feed("yy STO") == ("yy ", False)
    assert m.feed("P tail") == ("", True)


def _backend():
    args = tiny_args(vocab_size=256)
    return NumpyBackend(args, random_tensors(args, seed=5))


def test_session_reuses_the_cached_prefix_and_matches_a_fresh_run() -> None:
    be = _backend()
    tok = ByteTokenizer()
    prompt = [1, 65, 66, 67, 68]
    s = Session(be.new_cache(64))
    first = list(stream_generate(be, tok, prompt, s, max_tokens=6))
    gen = [r.token for r in first if r.token is not None]
    assert first[-1].stats.cached_tokens == 0
    follow = prompt + gen + [70, 71]
    again = list(stream_generate(be, tok, follow, s, max_tokens=5))
    st = again[-1].stats
    assert st.cached_tokens >= len(prompt) + len(gen) - 1
    fresh = list(stream_generate(be, tok, follow, Session(be.new_cache(64)), max_tokens=5))
    assert [r.token for r in again] == [r.token for r in fresh]


def test_max_tokens_eos_and_stats() -> None:
    be = _backend()
    out = list(stream_generate(be, ByteTokenizer(), [1, 2, 3], Session(be.new_cache(64)), max_tokens=4,
                               eos_ids=set()))
    st = out[-1].stats
    assert st.generation_tokens == 4 and st.finish_reason == "length"
    assert st.prompt_tokens == 3 and st.peak_memory > 0
    assert st.generation_tps > 0 and st.prompt_tps > 0
    assert "tok/s" in st.summary()


def test_prompt_longer_than_context_is_a_clear_error() -> None:
    be = _backend()
    with pytest.raises(ContextOverflowError, match="context"):
        list(stream_generate(be, ByteTokenizer(), list(range(1, 20)), Session(be.new_cache(16))))


def test_generation_stops_at_the_context_limit() -> None:
    be = _backend()
    out = list(stream_generate(be, ByteTokenizer(), [1, 2, 3], Session(be.new_cache(8)), max_tokens=50,
                               eos_ids=set()))
    assert out[-1].finish_reason == "context_length"
