"""Continuous batching at the step level: one worker thread owns the model.

Requests wait in a bounded queue (full: 503) and join the running batch between steps while fewer
than ``parallel`` sequences are active. A step takes at most ``prefill_chunk`` prompt tokens of the
sequences still prefilling (oldest first, a long prompt cut into chunks across steps) and one token
of every decoding sequence, samples the next token of each decoder and of each sequence whose prompt
just completed, and ends the sequences that are done. Each sequence has its own
:class:`~mlxtral.generate.Session` (KV cache), sampler, stop-string matcher and grammar constraint;
it leaves the batch when it ends or its client goes away, and its session goes back to the
:class:`~mlxtral.server.prompt_cache.PromptCache`.

On the NumPy backend a step with more than one sequence is **one forward** over all of them
(:func:`mlxtral.server.batched.step_batch`: the prefill chunks and the decoders' tokens side by side,
each at its own positions in its own KV cache), so the weights stream once per step and a newcomer's
prefill costs the decoders one slower step per chunk instead of separate forwards they wait for; the
budget bounds how long that step is. Every row computes as it does alone (batch-invariant kernels),
so a greedy request's text does not depend on what runs beside it. Other backends run one forward
per sequence (the prefill chunks, then each decoder).

Results reach the asyncio side as :class:`Event` objects through each request's queue
(``loop.call_soon_threadsafe``).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlxtral.generate import Session, _StopMatcher, _within_vocab
from mlxtral.sampling import Sampler
from mlxtral.server.prompt_cache import PromptCache
from mlxtral.server.protocol import ApiError, GenRequest, usage

_GONE = ApiError(499, "the client closed the request", type="client_closed", code="cancelled")


def failure(e: BaseException, what: str) -> ApiError:
    """The client's error for a failure in the worker: memory that ran out is a 503 (another
    request may fit later), with the address-space line under ``ulimit -v``; the rest a 500."""
    from mlxtral.address_space import explain, out_of_memory
    from mlxtral.errors import MlxtralError

    thread = isinstance(e, RuntimeError) and "can't start new thread" in str(e)[:200]  # threads are memory
    if out_of_memory(e) is not None or thread:
        why = explain(e)
        detail = str(why) if why is not None else ("cannot start a thread" if thread else "out of memory")
        return ApiError(503, f"{what}: {detail}", type="server_error", code="out_of_memory")
    msg = e.message if isinstance(e, MlxtralError) else f"{type(e).__name__}: {e}"
    return ApiError(500, f"{what}: {msg}", type="server_error")


@dataclass
class Event:
    """New text (and the logprobs of the tokens behind it); the last event has ``finish``."""

    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish: str | None = None
    usage: dict[str, Any] | None = None
    error: ApiError | None = None


class Handle:
    """The asyncio side of one request."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop, constraint: Any = None) -> None:
        self.req = req
        self.constraint = constraint
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.done = False  # the last event was read
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.last: Event | None = None  # the final event (finish and usage, or an error), once read

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, ev: Event) -> None:  # from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        while True:
            ev = await self.queue.get()
            if ev.finish is not None or ev.error is not None:
                self.last = ev
            yield ev
            if ev.finish is not None or ev.error is not None:
                return


class _Seq:
    """A sequence in the batch (worker thread only)."""

    def __init__(self, h: Handle, session: Session, cached: int, tokenizer: Any) -> None:
        self.h = h
        self.req = h.req
        self.session = session
        self.ids = h.req.prompt_ids
        self.pos = cached  # prompt tokens in the cache
        self.cached = cached
        self.logits: np.ndarray | None = None
        self.pending: int | None = None  # sampled, not yet fed
        self.sampler = Sampler(h.req.sampling)
        self.history = list(self.ids)
        self.generated: list[int] = []
        # a completion continues its prompt's text; a chat answer is text of its own
        self.decoder = tokenizer.stream_decoder(after=self.ids if h.req.continues else ())
        self.matcher = _StopMatcher(h.req.stop)


class Scheduler:
    def __init__(self, model: Any, parallel: int = 8, max_queue: int = 64, prefill_chunk: int = 128,
                 prompt_cache: PromptCache | None = None, batched: bool = True) -> None:
        self.model = model
        self.backend = model.backend
        self.tok = model.tokenizer
        self.parallel = parallel
        self.max_queue = max_queue
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            from mlxtral.errors import UsageError

            raise UsageError(f"prefill_chunk must be a whole number of prompt tokens >= 1, "
                             f"got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk  # prompt tokens per step
        self.cache = prompt_cache
        self.n_vocab = getattr(self.tok, "vocab_size", None)
        self.eos = set(getattr(self.tok, "eos_ids", set()))
        from mlxtral.server.batched import supports_batch

        self.batched = batched and supports_batch(self.backend)
        self._waiting: deque[Handle] = deque()
        self._active: list[_Seq] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mlxtral-scheduler", daemon=True)
        self.steps = 0

    # ---- the asyncio side -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, h: Handle) -> None:
        with self._cv:
            if self._stop:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            free = max(0, self.parallel - len(self._active))  # slots the worker fills at its next step
            if len(self._waiting) >= self.max_queue + free:
                # requests taken but not yet started count as running: they have their slots
                running = len(self._active) + min(len(self._waiting), free)
                queued = len(self._waiting) - min(len(self._waiting), free)
                raise ApiError(503, f"the server is busy: {running} of {self.parallel} slots running and "
                                    f"{queued} of {self.max_queue} queue places taken; retry later",
                               code="queue_full")
            self._waiting.append(h)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def status(self) -> dict[str, Any]:
        return {"slots": self.parallel, "active": len(self._active), "waiting": len(self._waiting),
                "max_queue": self.max_queue, "steps": self.steps,
                "prompt_cache": None if self.cache is None else
                {"entries": len(self.cache), "bytes": self.cache.nbytes, "max_bytes": self.cache.max_bytes}}

    def stop(self, timeout: float = 10.0) -> None:
        """End every request still here (their clients get an error) and stop the worker."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stop:
                    break
                while self._waiting and len(self._active) < self.parallel:
                    h = self._waiting.popleft()
                    if h.cancelled:
                        h.put(Event(error=_GONE))
                        continue
                    try:
                        self._admit(h)
                    except Exception as e:  # noqa: BLE001 - this request's failure, not the server's
                        h.put(Event(error=failure(e, "no room for another session")))
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - the worker must outlive any step
                for seq in list(self._active):
                    seq.h.put(Event(error=failure(e, "generation failed")))
                    seq.session.reset()
                    self._release(seq)
            self.steps += 1
        err = ApiError(503, "the server is shutting down", code="shutting_down")
        for seq in list(self._active):
            seq.h.put(Event(error=err))
            self._release(seq)
        with self._cv:
            while self._waiting:
                self._waiting.popleft().put(Event(error=err))

    def _admit(self, h: Handle) -> None:
        ids = h.req.prompt_ids
        session, shared = (None, 0) if self.cache is None else self.cache.take(ids)
        n = min(shared, len(ids) - 1)  # recompute at least one token: its logits start the answer
        if session is None:
            session = self.model.new_session()
        elif self.cache is not None:
            from mlxtral.server.prompt_cache import copy_prefix

            own = self.model.new_session()
            if copy_prefix(session.cache, own.cache, n):  # the entry stays for the others
                self.cache.put(session)
                session = own
        session.cache.trim(n)
        session.tokens = list(ids[:n])
        self._active.append(_Seq(h, session, n, self.tok))

    def _release(self, seq: _Seq) -> None:
        self._active.remove(seq)
        if self.cache is not None and seq.session.tokens:
            self.cache.put(seq.session)

    def _step(self) -> None:
        """At most ``prefill_chunk`` prompt tokens of the prefilling sequences (oldest first) and one
        token for every decoding one, in a single forward where the backend can
        (:func:`mlxtral.server.batched.step_batch`). The budget bounds how long the decoders wait
        per step."""
        decoding: list[_Seq] = []
        prefill: list[tuple[_Seq, int]] = []  # (sequence, prompt tokens this step)
        budget = self.prefill_chunk
        for seq in list(self._active):
            if seq.h.cancelled:
                seq.h.put(Event(error=_GONE))  # ends the handler still waiting, if any
                self._release(seq)
            elif seq.pos < len(seq.ids):
                if budget > 0:
                    n = min(budget, len(seq.ids) - seq.pos)
                    budget -= n
                    prefill.append((seq, n))
            elif seq.pending is not None:
                if seq.session.cache.offset + 1 >= seq.session.cache.max_context:
                    self._finish(seq, "length")
                else:
                    decoding.append(seq)
        if self.batched and len(decoding) + len(prefill) > 1:
            seqs = [s for s, _ in prefill] + decoding
            self._guard(seqs, self._mixed, (prefill, decoding))
            return
        for job in prefill:
            self._guard([job[0]], self._prefill, job)
        for seq in decoding:
            self._guard([seq], self._decode_one, seq)

    def _guard(self, seqs: list[_Seq], fn: Any, arg: Any) -> None:
        """Run ``fn(arg)``; a failure ends ``seqs`` with an error and leaves the others running."""
        try:
            fn(arg)
        except Exception as e:  # noqa: BLE001 - some sequences' failure must not stop the others
            for seq in seqs:
                if seq in self._active:
                    seq.h.put(Event(error=failure(e, "generation failed")))
                    seq.session.reset()
                    self._release(seq)

    def _prefill(self, job: tuple[_Seq, int]) -> None:
        seq, n = job
        part = list(seq.ids[seq.pos : seq.pos + n])
        seq.logits = self.backend.forward(part, seq.session.cache)
        seq.session.tokens.extend(part)
        seq.pos += len(part)
        if seq.pos == len(seq.ids):
            self._sample(seq)

    def _decode_one(self, seq: _Seq) -> None:
        assert seq.pending is not None
        seq.logits = self.backend.forward([seq.pending], seq.session.cache)
        seq.session.tokens.append(seq.pending)
        seq.pending = None
        self._sample(seq)

    def _mixed(self, job: tuple[list[tuple[_Seq, int]], list[_Seq]]) -> None:
        """One forward for the step: each prefilling sequence's chunk and each decoding sequence's
        pending token, every one at its own positions in its own cache; then sampling for the
        decoders and for the sequences whose prompt is now complete."""
        from mlxtral.server.batched import step_batch

        prefill, decoding = job
        runs = [list(s.ids[s.pos : s.pos + n]) for s, n in prefill] + [[s.pending] for s in decoding]
        seqs = [s for s, _ in prefill] + decoding
        logits = step_batch(self.backend, runs, [s.session.cache for s in seqs])  # [B, V]
        ready = []
        for seq, run, row in zip(seqs, runs, logits, strict=True):
            seq.session.tokens.extend(run)
            seq.logits = row
            if seq.pending is not None:  # a decoder
                seq.pending = None
                ready.append(seq)
            else:
                seq.pos += len(run)
                if seq.pos == len(seq.ids):
                    ready.append(seq)
        for seq in ready:
            self._guard([seq], self._sample, seq)

    def _sample(self, seq: _Seq) -> None:
        req = seq.req
        logits = _within_vocab(np.asarray(seq.logits, dtype=np.float32), self.n_vocab)  # [V]
        entry_lp = _log_softmax(logits) if req.logprobs else None
        x = logits
        if (req.frequency_penalty or req.presence_penalty) and seq.generated:
            ids, counts = np.unique(np.asarray(seq.generated, dtype=np.int64), return_counts=True)
            x = x.copy()
            x[ids] -= counts * req.frequency_penalty + req.presence_penalty
        con = seq.h.constraint
        if con is not None:
            x = con.mask(x)
        tok = seq.sampler(x, seq.history)
        if seq.h.first_token is None:
            seq.h.first_token = time.perf_counter()
        seq.history.append(tok)
        seq.generated.append(tok)
        entries = [self._entry(tok, entry_lp, req.top_logprobs, seq.decoder)] if entry_lp is not None else []
        if con is not None and tok not in self.eos:
            con.consume(tok)
        if tok in self.eos:  # not shown, nor in the logprobs
            self._finish(seq, "stop")
            return
        text, stopped = seq.matcher.feed(seq.decoder.add(tok))
        if stopped:
            seq.h.put(Event(text, entries))
            self._finish(seq, "stop", flush=False)
            return
        seq.h.put(Event(text, entries))
        if con is not None and (con.done or con.failed):
            self._finish(seq, "stop")
        elif req.max_tokens is not None and len(seq.generated) >= req.max_tokens:
            self._finish(seq, "length")
        else:
            seq.pending = tok

    def _finish(self, seq: _Seq, reason: str, flush: bool = True) -> None:
        tail = seq.matcher.feed(seq.decoder.flush())[0] + seq.matcher.flush() if flush else ""
        use = usage(len(seq.ids), len(seq.generated), seq.cached)
        seq.h.put(Event(tail, finish=reason, usage=use))
        self._release(seq)

    def _entry(self, tok: int, lp: np.ndarray, top: int, decoder: Any) -> dict[str, Any]:
        """The logprobs of token ``tok`` and the ``top`` likeliest, each as the text would show it
        here (``decoder``, before it adds ``tok``): a chat answer's first piece without its leading
        space, so that the entries' bytes add up to the text, as OpenAI's do."""
        e = self._token_info(tok, float(lp[tok]), decoder)
        if top:
            best = np.argpartition(-lp, top - 1)[:top]
            best = best[np.argsort(-lp[best], kind="stable")]
            e["top_logprobs"] = [self._token_info(int(i), float(lp[i]), decoder) for i in best]
        else:
            e["top_logprobs"] = []
        return e

    @staticmethod
    def _token_info(tok: int, lp: float, decoder: Any) -> dict[str, Any]:
        b = decoder.piece(tok)  # control tokens: no text
        return {"token": b.decode("utf-8", errors="replace"), "logprob": max(lp, -9999.0), "bytes": list(b)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """[V] float32 -> [V] float64 log-probabilities."""
    z = x.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())
