"""Samplers, stop strings, and KV-cache reuse in the shared generation loop."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tiny_models as tm
from test_model import random_tensors, tiny_args
from tiny_models import BACKENDS, mlx_available

import mlxtral
from mlxtral.backends.numpy_backend import NumpyBackend
from mlxtral.errors import ContextOverflowError, UsageError
from mlxtral.generate import GenerationResponse, Session, _StopMatcher, stream_generate
from mlxtral.sampling import Sampler, SamplingParams, apply_repetition_penalty


class ByteTokenizer:
    """Token i < 256 is byte i; multi-byte UTF-8 is only complete text once all bytes arrive."""

    eos_ids = {0}

    def stream_decoder(self, after=()):
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



class ScriptedBackend:
    """Generates ``script`` whatever the prompt: the logits after position p pick script[p - prompt]."""

    name = "scripted"

    def __init__(self, script: list[int], n_prompt: int) -> None:
        self.script, self.n_prompt = script, n_prompt

    def new_cache(self, max_context: int) -> Any:
        class C:
            offset = 0

            def trim(self, n: int) -> None:
                self.offset = min(self.offset, n)

        c = C()
        c.max_context = max_context
        return c

    def forward(self, ids, cache, all_logits: bool = False) -> np.ndarray:
        cache.offset += len(ids)
        x = np.zeros(256, dtype=np.float32)
        x[self.script[cache.offset - self.n_prompt]] = 1.0
        return x

    def peak_memory(self) -> int:
        return 1


@pytest.mark.parametrize(("script", "stop", "text"), [
    (b"abc\0", ["cX"], "abc"),  # "c" held back as a possible start of "cX", then EOS: still shown
    (b"abc\0", ["bc"], "a"),  # a stop string is cut, EOS or not
    (b"ab\xe4\xb8\0", [], "ab\ufffd"),  # EOS after an incomplete UTF-8 sequence: as tokenizer.decode
    (b"abcd", ["dX"], "abcd"),  # max_tokens after a held-back prefix
])
def test_text_held_back_at_the_end(script: bytes, stop: list[str], text: str) -> None:
    prompt = [1, 2, 3]
    be = ScriptedBackend(list(script) + [0] * 8, len(prompt))
    out = list(stream_generate(be, ByteTokenizer(), prompt, Session(be.new_cache(64)), max_tokens=len(script),
                               stop=stop))
    assert "".join(r.text for r in out) == text
    assert out[-1].finish_reason == ("length" if script[-1] else "stop")


# ---- end to end through mlxtral.load: a tiny random model with the real Mixtral tokenizer -------------
PROMPT = "The quick brown fox"
N_GEN = 24




@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory):
    args = tm.tiny_args()
    return tm.write_hf(tmp_path_factory.mktemp("gen") / "hf", tm.random_weights(args, seed=3), args)


def _run(model, session=None, **kw) -> tuple[list[int], list[str], str, GenerationResponse]:
    """(tokens yielded, their texts, the whole text, the final response) of one fresh-session run."""
    out = list(model.stream(PROMPT, session=session or model.new_session(), **kw))
    final = out[-1]
    assert final.token is None and final.stats is not None
    assert all(r.stats is None and r.token is not None for r in out[:-1])
    assert final.finish_reason == final.stats.finish_reason
    body = out[:-1]
    return [r.token for r in body], [r.text for r in body], "".join(r.text for r in out), final


def _stop_across_a_token_boundary(pieces: list[str]) -> tuple[str, int]:
    """A stop string made of the end of one generated token's text and the start of the next's,
    not at the very start of the output, and the number of tokens after which it is complete."""
    full = "".join(pieces)
    for k in range(2, len(pieces) - 1):
        a, b = pieces[k].strip(), pieces[k + 1].strip()
        if len(a) >= 2 and len(b) >= 2 and pieces[k + 1][0] == b[0]:
            s = pieces[k][-2:] + pieces[k + 1][:2]
            if full.find(s) > 0:
                n = next(i for i in range(1, len(pieces) + 1) if s in "".join(pieces[:i]))
                return s, n
    raise AssertionError(f"no usable stop string in {pieces!r}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_string_end_to_end(hf_dir, backend: str) -> None:
    model = mlxtral.load(hf_dir, backend=backend)
    toks, pieces, full, final = _run(model, max_tokens=N_GEN)
    assert final.finish_reason == "length" and len(toks) == N_GEN
    s, n = _stop_across_a_token_boundary(pieces)
    cut = full.find(s)

    gtoks, _, text, final = _run(model, max_tokens=N_GEN, stop=["never in this output \x01", s])
    assert text == full[:cut] and s not in text
    assert final.finish_reason == "stop" and final.stats.finish_reason == "stop"
    assert final.stats.generation_tokens == n < N_GEN
    assert gtoks == toks[: len(gtoks)] and len(gtoks) in (n - 1, n)  # the last only if it had text
    # generate(), with a single string for stop, through the model's own session
    assert model.generate(PROMPT, max_tokens=N_GEN, stop=s) == full[:cut]
    assert model.last_stats.finish_reason == "stop"
    # a stop string that never appears changes nothing
    assert _run(model, max_tokens=N_GEN, stop="never in this output \x01")[2] == full


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_end_to_end(hf_dir, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlxtral.load(hf_dir, backend=backend)
    assert model.tokenizer.eos_ids == {2}  # </s> of the real Mixtral vocabulary
    toks, pieces, full, _ = _run(model, max_tokens=N_GEN)
    assert 2 not in toks
    eos = toks[3]
    j = toks.index(eos)  # its first occurrence ends the generation
    monkeypatch.setattr(model.tokenizer, "eos_ids", {eos})
    gtoks, _, text, final = _run(model, max_tokens=N_GEN)
    assert gtoks == toks[:j] and text == "".join(pieces[:j])
    assert final.finish_reason == "stop" and final.stats.generation_tokens == j + 1
    assert model.generate(PROMPT, max_tokens=N_GEN) == "".join(pieces[:j])
    assert model.last_stats.finish_reason == "stop"
    # EOS as the very first token: nothing at all
    monkeypatch.setattr(model.tokenizer, "eos_ids", {toks[0]})
    gtoks, _, text, final = _run(model, max_tokens=N_GEN)
    assert gtoks == [] and text == "" and final.finish_reason == "stop"
    assert final.stats.generation_tokens == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_after_a_partial_stop_string_keeps_the_held_back_text(hf_dir, backend: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Text held back because it might begin a stop string is real output when EOS comes next."""
    model = mlxtral.load(hf_dir, backend=backend)
    toks, pieces, _, _ = _run(model, max_tokens=N_GEN)
    j = next(i for i in range(2, N_GEN) if len(pieces[i - 1]) >= 2 and toks[i] not in toks[:i])
    monkeypatch.setattr(model.tokenizer, "eos_ids", {toks[j]})
    stop = pieces[j - 1][-2:] + "\x01never"  # its first two characters end the text before EOS
    gtoks, _, text, final = _run(model, max_tokens=N_GEN, stop=[stop])
    assert gtoks == toks[:j] and final.finish_reason == "stop"
    assert text == "".join(pieces[:j])


# ---- MLX pipelined decoding (the Metal path) forced on MLX's CPU backend ---------------------------
@pytest.mark.skipif(not mlx_available(), reason="no mlx")
def test_pipelined_mlx_generation_equals_step_by_step(hf_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlxtral.load(hf_dir, backend="mlx")
    be = model.backend
    calls: list[int] = []
    real = be.decode_pipelined

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(be, "decode_pipelined", spy)
    n_prompt = len(model.prompt_ids(PROMPT))

    def both(session_ctx: int = 256, **kw):
        runs = []
        for flag in (False, True):
            monkeypatch.setattr(be, "pipeline_decode", flag)
            calls.clear()
            session = model.new_session(session_ctx)
            out, at_final = [], []
            for r in model.stream(PROMPT, session=session, **kw):
                out.append(r)
                if r.stats is not None:  # the cache as a caller sees it when the final response comes
                    at_final.append(session.cache.offset)
            final = out[-1]
            toks, pieces = [r.token for r in out[:-1]], [r.text for r in out[:-1]]
            assert bool(calls) == (flag and final.stats.generation_tokens > 1), (flag, kw)
            assert at_final == [session.cache.offset]
            runs.append((toks, pieces, "".join(r.text for r in out), final.finish_reason,
                         final.stats.generation_tokens, session.cache.offset, list(session.tokens)))
        assert runs[0] == runs[1], kw
        return runs[0]

    # greedy, to max_tokens; the cache holds the prompt and every token but the last
    toks, pieces, full, reason, n, offset, held = both(max_tokens=N_GEN)
    assert reason == "length" and n == N_GEN and offset == n_prompt + N_GEN - 1
    assert held[n_prompt:] == toks[:-1]
    # a stop string
    s, k = _stop_across_a_token_boundary(pieces)
    _, _, text, reason, n, offset, _ = both(max_tokens=N_GEN, stop=[s])
    assert text == full[: full.find(s)] and reason == "stop" and n == k
    # EOS in the middle
    monkeypatch.setattr(model.tokenizer, "eos_ids", {toks[5]})
    gtoks, _, _, reason, n, _, _ = both(max_tokens=N_GEN)
    assert reason == "stop" and gtoks == toks[: toks.index(toks[5])]
    monkeypatch.setattr(model.tokenizer, "eos_ids", {2})
    # the context limit: same tokens, same cache, finish "context_length"
    for extra in (2, 3, 7):
        gtoks, _, _, reason, n, offset, _ = both(session_ctx=n_prompt + extra, max_tokens=N_GEN)
        assert reason == "context_length" and n == extra and gtoks == toks[:extra]
        assert offset == n_prompt + extra - 1
    # max_tokens 1 and 2: the hook is used (or not) without changing anything
    for m in (1, 2):
        assert both(max_tokens=m)[0] == toks[:m]
    # a repetition penalty keeps the step-by-step loop even with the flag on
    monkeypatch.setattr(be, "pipeline_decode", True)
    calls.clear()
    _run(model, max_tokens=4, repetition_penalty=1.3)
    assert not calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_padded_embedding_never_samples_past_the_tokenizer(tmp_path, backend: str,
                                                           temperature: float) -> None:
    """An embedding with more rows than the tokenizer has ids (an HF config's vocab_size 32064 against a
    32000-piece tokenizer.model, as some fine-tunes ship): the padded ids are never sampled, even
    when they hold the largest logits."""
    args = tm.tiny_args(vocab_size=32064)
    w = tm.random_weights(args, 7)
    w["output.weight"][32000:] = 10 * np.abs(w["output.weight"]).max()  # the padded rows win every step
    path = tm.write_hf(tmp_path / "padded", w, args)
    m = mlxtral.load(path, backend=backend)
    assert m.tokenizer.vocab_size == 32000
    ids = [r.token for r in m.stream(m.tokenizer.encode("hello", bos=True), max_tokens=6,
                                     temperature=temperature, seed=0) if r.token is not None]
    assert ids and all(i < 32000 for i in ids)


def test_completion_keeps_its_leading_space_and_a_chat_answer_drops_it(hf_dir) -> None:
    """On a SentencePiece vocabulary the first new piece of a completion keeps its space (" Paris"
    after "The capital of France is", as llama.cpp and OpenAI's completions give it): prompt +
    text is the text of prompt + answer. A chat answer is text of its own and starts without it."""
    model = mlxtral.load(hf_dir, backend="numpy")
    tok = model.tokenizer
    assert tok.strip_leading_space
    p, q = tok.encode("The capital of France is"), tok.encode("The capital of France is Paris")
    assert q[: len(p)] == p
    for after, want in ((p, " Paris"), ((), "Paris")):
        dec = tok.stream_decoder(after=after)
        assert "".join(dec.add(i) for i in q[len(p):]) + dec.flush() == want
    for prompt, chat in ((PROMPT, None), ([{"role": "user", "content": PROMPT}], None), (PROMPT, True)):
        ids = model.prompt_ids(prompt, chat)
        out = list(model.stream(prompt, max_tokens=8, chat=chat, session=model.new_session()))
        gen = [r.token for r in out[:-1]]
        text = "".join(r.text for r in out)
        if isinstance(prompt, str) and not chat:
            assert text == tok.decode(ids + gen)[len(tok.decode(ids)):]
        else:
            assert text == tok.decode(gen)
        # ids given with chat=True are a chat's; without it, a completion's
        as_chat = chat or not isinstance(prompt, str)
        assert "".join(r.text for r in model.stream(ids, max_tokens=8, chat=as_chat,
                                                    session=model.new_session())) == text
    # a conversation ending with an assistant message is continued (a prefill): its answer goes on
    # from that text, as the completion of the same ids does, space kept
    msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Well, the"}]
    ids = model.prompt_ids(msgs)
    assert ids[-1] != tok.eos_id  # the message is left open
    text = model.generate(msgs, max_tokens=8, session=model.new_session())
    assert text == model.generate(ids, max_tokens=8, session=model.new_session())
