"""The interactive chat loop behind ``mlxtral chat`` (separate from the CLI so tests can drive it).

One :class:`ChatLoop` holds the conversation, a KV-cache session and the sampling settings. Each
user turn extends the ids the model has already seen (previous prompt + generated ids + the
template's end-of-turn token + the new user turn), so the history is never prefilled again.
Commands: ``/reset``, ``/system TEXT``, ``/stats``, ``/exit`` (and ``/help``). Ctrl-C stops the
current answer and keeps the chat; Ctrl-D (end of input) leaves.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from mlxtral.display import text_safe
from mlxtral.errors import ContextOverflowError, MlxtralError, Terminated
from mlxtral.sampling import RANDOM_SEED, SEED_MAX
from mlxtral.wording import plural

HELP = """commands:
  /reset        start a new conversation (keeps the system prompt)
  /system TEXT  set the system prompt and start a new conversation (/system alone clears it)
  /stats        statistics of the last answer and of the conversation
  /exit         leave (Ctrl-D too); Ctrl-C stops the current answer"""


def _behind(e: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``e``'s chain (causes and contexts, 5 deep), or None: numba
    turns an exception a signal handler raises inside a kernel into a SystemError over it."""
    for _ in range(5):
        if e is None or isinstance(e, kind):
            return e
        e = e.__cause__ or e.__context__
    return None


def is_interrupt(e: BaseException) -> bool:
    """A KeyboardInterrupt, or the SystemError numba turns one into when it lands in a kernel."""
    return _behind(e, KeyboardInterrupt) is not None


def terminated_by(e: BaseException) -> Terminated | None:
    """The :class:`~mlxtral.errors.Terminated` (SIGTERM/SIGHUP) behind ``e``, such as the
    SystemError numba raises when the signal's exception lands in a kernel; None if there is none."""
    return _behind(e, Terminated)  # type: ignore[return-value]


@contextmanager
def deferred_sigint() -> Iterator[dict[str, bool]]:
    """While inside, the first Ctrl-C only sets ``flag["stop"]`` (a second one raises as usual).

    A KeyboardInterrupt raised while a numba kernel returns surfaces as a SystemError, so
    generation is stopped at a token boundary instead (see :func:`stream_interruptibly`).
    """
    flag = {"stop": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    old = None
    if threading.current_thread() is threading.main_thread():
        try:
            old = signal.signal(signal.SIGINT, on_sigint)
        except (ValueError, OSError):
            old = None
    try:
        yield flag
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def stream_interruptibly(gen: Generator[Any, None, None], flag: dict[str, bool]) -> Iterator[Any]:
    """Yield ``gen``'s responses; once ``flag["stop"]`` is set, end it cleanly so that its last
    response (with the stats, ``finish_reason == "interrupted"``) still comes."""
    for r in gen:
        yield r
        if r.stats is not None:
            return
        if flag["stop"]:
            try:
                last = gen.throw(KeyboardInterrupt)
            except StopIteration:
                return
            yield last
            return


@dataclass
class SamplingOptions:
    max_tokens: int = 512
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                    seed=self.seed)


@dataclass
class Turn:
    """What one answer produced (for tests and /stats)."""

    text: str
    ids: list[int]
    stats: Any
    finish_reason: str


@dataclass
class ChatLoop:
    model: Any
    options: SamplingOptions = field(default_factory=SamplingOptions)
    system: str | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    show_stats: bool = True
    echo: bool = False  # write each user line to ``err`` as "> line" (piped input, for transcripts)

    def __post_init__(self) -> None:
        # text written to a terminal has its control characters shown, not obeyed (display.text_safe)
        self._out_text = text_safe if _isatty(self.out) else str
        self._err_text = text_safe if _isatty(self.err) else str
        self.session = self.model.new_session()
        self.messages: list[dict[str, str]] = []
        self._fed: list[int] | None = None  # prompt ids + generated ids of the last answer
        self._clean_end = False  # the last answer ended with the template's end of turn
        self.turns: list[Turn] = []
        self.failed = 0  # turns refused (a message the context cannot hold)
        self._seed_step = 0

    # ---- conversation state ----------------------------------------------------------------
    def reset(self) -> None:
        self.messages = []
        self._fed = None
        self._clean_end = False
        self.session.reset()

    def _base_messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, user_text: str) -> list[int]:
        """Ids of the whole conversation plus ``user_text``, extending what the cache holds."""
        msgs = self._base_messages() + self.messages + [{"role": "user", "content": user_text}]
        tok = self.model.tokenizer
        if self._fed is not None and self._clean_end and self.messages:
            try:
                from mlxtral.tokenizer.chat import apply_chat_template, chat_delta

                prefix = apply_chat_template(tok, msgs[:-1], add_generation_prompt=False)
                eot = next((i for i in reversed(prefix) if i in tok.eos_ids), None)
                if eot is not None:
                    delta = chat_delta(tok, msgs, cached_through_eot=True)
                    return [*self._fed, eot, *delta]
            except (ImportError, MlxtralError):
                pass
        return self.model.apply_chat_template(msgs)

    # ---- one answer ------------------------------------------------------------------------
    def _fit(self, user_text: str) -> list[int]:
        """The prompt ids for ``user_text``; when the conversation and room for an answer (the
        smaller of --max-tokens and a quarter of the context) no longer fit, its oldest turns are
        dropped, as llama-cli's context shift drops old tokens (the system prompt stays); none when
        the message would not fit even alone (it is refused, the conversation kept)."""
        ids = self.prompt_ids(user_text)
        ctx = self.session.cache.max_context
        mt = self.options.max_tokens
        room = min(mt if mt > 0 else ctx, max(ctx // 4, 1))
        kept = self.messages, self._fed, ids
        dropped = 0
        while len(ids) + room > ctx and self.messages:
            self.messages = self.messages[2:]  # the oldest user message and its answer
            self._fed = None  # the cache no longer holds a prefix of the conversation's text
            dropped += 1
            ids = self.prompt_ids(user_text)
        if dropped and len(ids) >= ctx:  # refused whatever is dropped: the conversation stays whole
            self.messages, self._fed, ids = kept
            return ids
        if dropped:
            what = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
            self.err.write(f"[dropped {what} to fit the context of {plural(ctx, 'token')}]\n")
            self.err.flush()
        return ids

    def answer(self, user_text: str) -> Turn | None:
        """Stream the model's answer to ``user_text`` to ``out``; None if nothing was generated."""
        ids = self._fit(user_text)
        opts = self.options.kwargs()
        seed = opts["seed"]
        if seed is not None and seed != RANDOM_SEED:  # a different but reproducible draw each turn
            opts["seed"] = (seed + self._seed_step) % (SEED_MAX + 1)
        self._seed_step += 1
        parts: list[str] = []
        gen: list[int] = []
        stats = None
        finish = "interrupted"
        try:
            with deferred_sigint() as flag:
                answer = self.model.stream(ids, session=self.session, chat=True, **opts)
                for r in stream_interruptibly(answer, flag):
                    if r.text:
                        parts.append(r.text)
                        self.out.write(self._out_text(r.text))
                        self.out.flush()
                    if r.token is not None:
                        gen.append(r.token)
                    if r.stats is not None:
                        stats = r.stats
                        finish = r.finish_reason or r.stats.finish_reason
        except (KeyboardInterrupt, SystemError) as e:
            if not is_interrupt(e):
                raise
            # A second Ctrl-C (e.g. during a long prefill): the cache may hold a half-written
            # chunk, so start it again next turn.
            self.session.reset()
            self.out.write("\n")
            self.err.write("[stopped]\n")
            self.err.flush()
            return None
        text = "".join(parts)
        self.out.write("\n")
        self.out.flush()
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        self._fed = ids + gen
        self._clean_end = finish == "stop"
        if finish == "interrupted":
            self.err.write("[stopped]\n")
        elif finish == "context_length":
            self.err.write(f"[the context is full ({plural(self.session.cache.max_context, 'token')}): the "
                           "next turn drops the oldest ones; /reset starts a new conversation, a larger "
                           "--max-context holds more]\n")
        elif finish == "length":
            self.err.write(f"[cut at --max-tokens {self.options.max_tokens}]\n")
        if stats is not None and self.show_stats:
            self.err.write(stats.summary() + "\n")
        self.err.flush()
        turn = Turn(text, gen, stats, finish)
        self.turns.append(turn)
        return turn

    # ---- commands --------------------------------------------------------------------------
    def stats_text(self) -> str:
        used = len(self.session.tokens)
        ctx = self.session.cache.max_context
        lines = [f"conversation: {plural(len(self.messages) // 2, 'turn')}, {plural(used, 'token')} in the "
                 f"KV cache of {ctx} ({100 * used / ctx:.1f}%)"]
        if self.system:
            lines.append(f"system prompt: {self.system!r}")
        if self.turns and self.turns[-1].stats is not None:
            lines.append("last answer: " + self.turns[-1].stats.summary())
        return "\n".join(lines)

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        cmd, _, arg = line.strip().partition(" ")
        cmd = cmd.lower()
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd == "/reset":
            self.reset()
            self.err.write("[new conversation]\n")
        elif cmd == "/system":
            self.system = arg.strip() or None
            self.reset()
            self.err.write("[system prompt cleared; new conversation]\n" if self.system is None
                           else "[system prompt set; new conversation]\n")
        elif cmd == "/stats":
            self.err.write(self.stats_text() + "\n")
        elif cmd in ("/help", "/?"):
            self.err.write(HELP + "\n")
        else:
            self.err.write(f"unknown command {cmd} (/help lists them)\n")
        self.err.flush()
        return True

    # ---- the loop --------------------------------------------------------------------------
    def run(self, lines: Iterable[str]) -> int:
        """Answer every line (commands start with '/'); returns the number of answers
        (``failed``: the turns refused, a message longer than the context)."""
        n = 0
        for line in lines:
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            if text.lstrip().startswith("/"):
                if not self.command(text):
                    break
                continue
            if self.echo:
                self.err.write(f"> {self._err_text(text)}\n")
                self.err.flush()
            try:
                if self.answer(text) is not None:
                    n += 1
            except ContextOverflowError as e:
                self.failed += 1
                self.err.write(f"error: {e}\n")
                self.err.flush()
        return n


def _isatty(f: TextIO) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def read_piped(stream: TextIO) -> Iterator[str]:
    """Lines of a non-interactive stdin, invalid UTF-8 replaced by U+FFFD."""
    buf = getattr(stream, "buffer", None)
    if buf is None:
        yield from stream
        return
    for raw in buf:
        yield raw.decode("utf-8", errors="replace")


def read_interactive(prompt: Callable[[], str], err: TextIO) -> Iterator[str]:
    """Lines typed at a terminal; Ctrl-C at the prompt clears the line, Ctrl-D ends."""
    while True:
        try:
            yield prompt()
        except KeyboardInterrupt:
            err.write("\n(Ctrl-D or /exit to leave)\n")
            err.flush()
        except EOFError:
            err.write("\n")
            return
