"""Generation shared by every backend: chunked prefill, KV-cache prefix reuse, sampling, stop
conditions, streaming text that never splits a UTF-8 character, and stats."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from mlxtral.errors import ContextOverflowError, UsageError
from mlxtral.rss import peak_rss
from mlxtral.sampling import Sampler, SamplingParams, check_whole
from mlxtral.wording import plural

MAX_STOPS = 64  # stop strings per generation
MAX_STOP_CHARS = 1024  # characters per stop string: the matcher holds back up to this much text per token


class Cache(Protocol):
    offset: int
    max_context: int

    def trim(self, n: int) -> None: ...


class Backend(Protocol):
    name: str

    def new_cache(self, max_context: int) -> Cache: ...

    def forward(self, ids: Sequence[int], cache: Cache, all_logits: bool = False) -> np.ndarray: ...

    def peak_memory(self) -> int: ...


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens of the prompt, cached ones included
    cached_tokens: int = 0  # of those, reused from the session's KV cache
    prompt_time: float = 0.0  # seconds to prefill the uncached ones
    generation_tokens: int = 0
    generation_time: float = 0.0
    peak_memory: int = 0  # bytes
    finish_reason: str = ""  # "stop", "length", "context_length", "interrupted"
    expert_cache: dict[str, Any] | None = None  # streamed experts: this generation's cache figures

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_tps"] = round(self.prompt_tps, 3)
        d["generation_tps"] = round(self.generation_tps, 3)
        d["peak_memory_gb"] = round(self.peak_memory / 1e9, 3)
        return d

    def summary(self) -> str:
        n = self.prompt_tokens - self.cached_tokens
        cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
        line = (
            f"prompt: {plural(n, 'token')}{cached}, {self.prompt_tps:.1f} tok/s | "
            f"generation: {plural(self.generation_tokens, 'token')}, {self.generation_tps:.1f} tok/s | "
            f"peak memory: {self.peak_memory / 1e9:.2f} GB"
        )
        c = self.expert_cache
        if c:
            ahead = (f"prefetch {c['prefetch_accuracy']:.0%} accurate" if c.get("prefetched")
                     else "no prefetch")  # --no-prefetch (or nothing read ahead): no accuracy to state
            mb = c["bytes_read_per_token"] / 1e6
            line += f" | experts: {c['hit_rate']:.0%} hits, {ahead}, {mb:.0f} MB read/token"
        return line


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response
    token: int | None  # the token just generated (None for the final flush)
    stats: GenerationStats | None = None  # set on the last response only
    finish_reason: str | None = None


@dataclass
class Session:
    """A KV cache plus the tokens it holds: later prompts sharing a prefix skip re-prefill."""

    cache: Cache
    tokens: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.cache.trim(0)
        self.tokens = []


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefill(backend: Backend, session: Session, ids: Sequence[int], chunk: int) -> tuple[np.ndarray, int]:
    """Bring the session to ``ids``, reusing the longest cached prefix. Returns (last logits, reused)."""
    if not ids:
        raise UsageError("the prompt is empty")
    cache = session.cache
    if len(ids) >= cache.max_context:
        raise ContextOverflowError(
            f"the prompt has {plural(len(ids), 'token')} and the context holds {cache.max_context}, leaving "
            "no room for an answer: shorten it or load the model with a larger max_context (on the command "
            "line: --max-context)"
        )
    n = min(common_prefix(session.tokens, ids), len(ids) - 1)  # recompute at least one token
    cache.trim(n)
    session.tokens = list(ids[:n])
    logits = None
    for s in range(n, len(ids), chunk):
        part = list(ids[s : s + chunk])
        logits = backend.forward(part, cache)
        session.tokens.extend(part)
    assert logits is not None
    return logits, n


def check_stops(stop: Sequence[str] | str, name: str = "stop") -> list[str]:
    """Stop strings as a list (one string is one stop string), at most :data:`MAX_STOPS` of at most
    :data:`MAX_STOP_CHARS` characters each (the matcher's work per token grows with their length);
    :class:`UsageError` otherwise."""
    stops = [stop] if isinstance(stop, str) else stop
    try:
        n = len(stops)
    except TypeError:
        raise UsageError(f"{name} must be a string or a list of strings") from None
    if n > MAX_STOPS:
        raise UsageError(f"{name}: at most {MAX_STOPS} stop strings, got {n}")
    out = []
    for s in stops:
        if not isinstance(s, str):
            raise UsageError(f"{name} must be a string or a list of strings, got a {type(s).__name__} in it")
        if len(s) > MAX_STOP_CHARS:
            raise UsageError(f"{name}: a stop string is at most {MAX_STOP_CHARS} characters, got one of "
                             f"{len(s)}")
        out.append(s)
    return out


class _StopMatcher:
    """Holds back text that may be the beginning of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out = self.pending[:i]
                self.pending = ""
                return out, True
        hold = 0
        for s in self.stops:
            for L in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:L]):
                    hold = max(hold, L)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(
    backend: Backend,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    session: Session,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    eos_ids: set[int] | None = None,
    prefill_chunk: int = 512,
    continues: bool = False,
) -> Iterator[GenerationResponse]:
    """Yield one response per generated token; the last one carries the stats.

    ``continues``: the text continues the prompt's (a completion: its first piece keeps its leading
    space); otherwise it is an answer of its own (a chat turn).

    The session keeps every token fed through the model; a sampled EOS (or the final token at
    ``max_tokens``) is not fed, so the next turn's prompt re-supplies it.
    """
    max_tokens = check_whole("max_tokens", max_tokens, 0)
    prefill_chunk = check_whole("prefill_chunk", prefill_chunk, 1)
    stop = check_stops(stop)
    sampler = Sampler(sampling or SamplingParams())
    # An embedding padded past the tokenizer (vocab 32000, 32064 rows): never sample an id the
    # tokenizer cannot decode.
    n_vocab = getattr(tokenizer, "vocab_size", None)
    eos = set(eos_ids if eos_ids is not None else getattr(tokenizer, "eos_ids", set()))
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    experts = getattr(backend, "experts", None)  # an ExpertCache when experts stream
    before = experts.snapshot() if experts is not None else None
    t0 = time.perf_counter()
    logits, reused = prefill(backend, session, prompt_ids, prefill_chunk)
    stats.cached_tokens = reused
    t1 = time.perf_counter()
    stats.prompt_time = t1 - t0
    decoder = tokenizer.stream_decoder(after=prompt_ids if continues else ())
    matcher = _StopMatcher(stop)
    history = list(prompt_ids)
    finish = "length"
    stop_string_hit = False
    cache = session.cache
    params = sampling or SamplingParams()
    # Optional backend hook (MLX): decode with the next step queued while this one is read back.
    pipelined = getattr(backend, "pipeline_decode", False) and params.repetition_penalty == 1.0
    steps: Iterator[int] | None = None
    try:
        for i in range(max_tokens):
            if steps is None:
                tok = sampler(_within_vocab(logits, n_vocab), history)
            else:
                nxt = next(steps, None)
                if nxt is None:
                    finish = "context_length"
                    break
                tok = nxt
            history.append(tok)
            stats.generation_tokens += 1
            if tok in eos:
                finish = "stop"
                break
            text, stopped = matcher.feed(decoder.add(tok))
            if stopped:
                if text:
                    yield GenerationResponse(text, tok)
                finish = "stop"
                stop_string_hit = True
                break
            yield GenerationResponse(text, tok)
            if i == max_tokens - 1:
                break
            if cache.offset - (steps is not None) + 1 >= cache.max_context:  # one step in flight
                finish = "context_length"
                break
            if pipelined and steps is None:
                on_device = backend.make_sampler(params)
                steps = backend.decode_pipelined(tok, cache, max_tokens - 1 - i,
                                                 lambda x, f=on_device: f(_within_vocab(x, n_vocab)))
            elif steps is None:
                logits = backend.forward([tok], cache)
            session.tokens.append(tok)
    except KeyboardInterrupt:
        finish = "interrupted"
    finally:
        if steps is not None:
            steps.close()  # trims the step still in flight off the cache
    # Past a stop string nothing is shown; any other end (EOS included) emits what was held back:
    # text that might have begun a stop string, an incomplete UTF-8 sequence.
    tail = "" if stop_string_hit else matcher.feed(decoder.flush())[0] + matcher.flush()
    stats.generation_time = time.perf_counter() - t1
    # the process's peak (weights, KV cache, Python...), never below what the backend itself counts
    # (MLX's own figure is only its allocator's; on Metal it may hold what RSS does not)
    stats.peak_memory = max(peak_rss(), int(backend.peak_memory()))
    stats.finish_reason = finish
    if experts is not None and before is not None:
        stats.expert_cache = experts.snapshot().minus(before).as_dict()
    yield GenerationResponse(tail, None, stats=stats, finish_reason=finish)


def _within_vocab(logits: Any, n_vocab: int | None) -> Any:
    """``logits`` [..., V] cut to the tokenizer's ``n_vocab`` ids when the embedding has more rows."""
    if n_vocab is not None and logits.shape[-1] > n_vocab:
        return logits[..., :n_vocab]
    return logits
