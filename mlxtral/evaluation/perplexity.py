"""llama-perplexity's protocol (``tools/perplexity/perplexity.cpp``, ``perplexity()``), so that our
numbers compare with published ones.

- The whole text is tokenized once, BOS first where the vocabulary adds it.
- It is cut into ``n_chunks = floor(n_tokens / ctx)`` non-overlapping chunks (at most ``chunks``);
  llama.cpp refuses a text of fewer than ``2 * ctx`` tokens, and so do we.
- Each chunk is evaluated from an empty KV cache; where the vocabulary adds BOS, BOS replaces the
  chunk's first token (the input only: the targets are the text's own tokens).
- Only the second half is scored: the logits at positions ``first = ctx // 2`` .. ``ctx - 2``
  predict the tokens at ``first + 1`` .. ``ctx - 1`` (``ctx - 1 - first`` tokens a chunk).
- A token's NLL is ``log(sum(exp(l - max))) - (l[target] - max)``: the exponentials in float32,
  their sum and the NLL in float64, as llama.cpp accumulates them.
- ``PPL = exp(mean NLL)``; its standard error is llama.cpp's: ``sqrt((mean(NLL^2) - mean(NLL)^2) /
  (count - 1)) * PPL``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mlxtral.errors import UsageError
from mlxtral.wording import plural

DEFAULT_CTX = 512
#: progress(chunks_done, n_chunks, running_ppl): called with 0 (and NaN) before the first chunk
Progress = Callable[[int, int, float], None]


@dataclass
class PerplexityResult:
    """What one run measured. ``nll_per_chunk`` is the mean NLL of each chunk's scored tokens;
    ``running_ppl`` the estimate after each chunk (what llama-perplexity prints as ``[i]ppl``)."""

    ppl: float
    ppl_stderr: float
    chunks: int
    tokens_scored: int
    ctx: int
    n_tokens: int
    add_bos: bool
    nll_per_chunk: list[float] = field(default_factory=list)
    running_ppl: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_nll(self) -> float:
        return math.log(self.ppl)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class NllSums:
    """llama.cpp's accumulators: the sum of NLL and of NLL^2 (float64) and the count."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.nll2 = 0.0
        self.count = 0

    def add(self, nll: np.ndarray) -> None:
        nll = np.asarray(nll, dtype=np.float64)
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        self.count += int(nll.size)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count) if self.count else float("nan")

    @property
    def ppl_stderr(self) -> float:
        """As llama.cpp: ``sqrt((E[x^2] - E[x]^2) / (count - 1)) * PPL``; 0 when the variance is not
        positive (llama.cpp then prints an error instead of a number) or for one token."""
        if self.count < 2:
            return 0.0
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return math.sqrt(var / (self.count - 1)) * math.exp(mean) if var > 0 else 0.0


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each row's negative log-likelihood of its target, as llama.cpp's ``log_softmax``: the max and
    the differences in float32, ``expf`` in float32, the sum and the result in float64.
    ``logits`` float32 [n, vocab], ``targets`` int [n] -> float64 [n]."""
    logits = np.asarray(logits, dtype=np.float32)
    n = logits.shape[0]
    d = logits - logits.max(axis=1, keepdims=True)  # [n, vocab] float32, <= 0
    sum_exp = np.exp(d).sum(axis=1, dtype=np.float64)  # [n]
    picked = d[np.arange(n), np.asarray(targets, dtype=np.int64)].astype(np.float64)  # [n]
    return np.log(sum_exp) - picked


# ---- the plan: checks and chunking ---------------------------------------------------------------


def check_ctx(ctx: int, model_ctx: int | None = None, allow_odd: bool = False, name: str = "ctx") -> None:
    """``ctx`` fit for the protocol: an even number >= 4 (each chunk scores ``ctx/2 - 1`` tokens),
    at most the model's context length. UsageError otherwise, one line (``name``: the flag)."""
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)):
        raise UsageError(f"{name} must be an integer, got {type(ctx).__name__}")
    if ctx < 4:
        raise UsageError(f"{name} {ctx} is too small: each chunk scores its second half after the first "
                         "token, so it must be at least 4 (llama-perplexity's default is 512)")
    if ctx % 2 and not allow_odd:
        raise UsageError(f"{name} {ctx} is odd: use an even context (halves are scored; default 512)")
    if model_ctx is not None and ctx > model_ctx:
        raise UsageError(f"{name} {ctx} is above the model's context length {model_ctx}")


def n_chunks_for(n_tokens: int, ctx: int, chunks: int | None = None) -> int:
    """``floor(n_tokens / ctx)`` capped by ``chunks``; a text of fewer than ``2 * ctx`` tokens is
    refused as llama-perplexity refuses it."""
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer))
                               or chunks < 1):
        raise UsageError(f"chunks must be a whole number >= 1, got {chunks!r}")
    if n_tokens < 2 * ctx:
        raise UsageError(f"the text is {plural(n_tokens, 'token')} long; ctx {ctx} needs at least {2 * ctx} "
                         f"(as llama-perplexity: two chunks' worth), so use a longer text or a smaller ctx")
    n = n_tokens // ctx
    return min(n, int(chunks)) if chunks is not None else n


def scored_per_chunk(ctx: int) -> int:
    """Tokens scored in each chunk: positions ``ctx//2`` .. ``ctx-2`` predict the next one."""
    return ctx - 1 - ctx // 2


def chunk_input(tokens: np.ndarray, i: int, ctx: int, bos_id: int | None) -> list[int]:
    """The ids fed for chunk ``i``: ``tokens[i*ctx:(i+1)*ctx]`` with BOS in place of the first one
    when ``bos_id`` is given (the vocabulary adds BOS)."""
    ids = [int(t) for t in tokens[i * ctx:(i + 1) * ctx]]
    if bos_id is not None:
        ids[0] = int(bos_id)
    return ids


def iter_chunks(logits_fn: Callable[[list[int]], np.ndarray], tokens: np.ndarray, ctx: int, n_chunks: int,
                bos_id: int | None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Evaluate each chunk from an empty cache (``logits_fn(ids) -> float32 [ctx, vocab]``) and yield
    ``(i, logits [n, vocab] at positions first..ctx-2, targets [n] = tokens first+1..ctx-1)``."""
    first = ctx // 2
    for i in range(n_chunks):
        logits = logits_fn(chunk_input(tokens, i, ctx, bos_id))  # [ctx, vocab]
        start = i * ctx
        targets = np.asarray(tokens[start + first + 1:start + ctx], dtype=np.int64)  # [ctx - 1 - first]
        yield i, logits[first:ctx - 1], targets


# ---- model-facing ----------------------------------------------------------------------------------


def bos_for_chunks(tokenizer: Any) -> int | None:
    """The BOS id that starts every chunk, or None when the vocabulary adds no BOS."""
    if getattr(tokenizer, "add_bos", False) and getattr(tokenizer, "bos_id", None) is not None:
        return int(tokenizer.bos_id)
    return None


def tokenize(model: Any, text: str | Sequence[int]) -> np.ndarray:
    """The whole text tokenized once (BOS first where the vocabulary adds it), or ids as given."""
    if isinstance(text, str):
        ids = model.encode(text)
    else:
        ids = [int(t) for t in text]
        model._check_ids(ids)
    return np.asarray(ids, dtype=np.int64)


def perplexity_of_tokens(logits_fn: Callable[[list[int]], np.ndarray], tokens: np.ndarray, ctx: int,
                         n_chunks: int, bos_id: int | None, progress: Progress | None = None,
                         on_chunk: Callable[[int, np.ndarray, np.ndarray], None] | None = None
                         ) -> PerplexityResult:
    """The protocol over already-planned chunks; ``on_chunk(i, logits, targets)`` sees each chunk's
    scored logits (the KL base writer uses it)."""
    t0 = time.perf_counter()
    sums = NllSums()
    per_chunk: list[float] = []
    running: list[float] = []
    if progress is not None:
        progress(0, n_chunks, float("nan"))
    for i, logits, targets in iter_chunks(logits_fn, tokens, ctx, n_chunks, bos_id):
        nll = token_nll(logits, targets)
        sums.add(nll)
        per_chunk.append(float(nll.mean()))
        running.append(sums.ppl)
        if on_chunk is not None:
            on_chunk(i, logits, targets)
        if progress is not None:
            progress(i + 1, n_chunks, sums.ppl)
    return PerplexityResult(ppl=sums.ppl, ppl_stderr=sums.ppl_stderr, chunks=n_chunks,
                            tokens_scored=sums.count, ctx=ctx, n_tokens=int(len(tokens)),
                            add_bos=bos_id is not None, nll_per_chunk=per_chunk, running_ppl=running,
                            seconds=time.perf_counter() - t0)


def perplexity(model: Any, text: str | Sequence[int], ctx: int = DEFAULT_CTX, chunks: int | None = None,
               progress: Progress | None = None, kl_base: Any = None) -> PerplexityResult:
    """llama-perplexity's number for ``model`` over ``text`` (a string, or token ids as tokenized,
    BOS included where the vocabulary adds it). With ``kl_base`` (a path), the reference
    log-probabilities are also saved there for :func:`mlxtral.evaluation.kld.kl_divergence`."""
    check_ctx(ctx, model.config.max_position_embeddings)
    tokens = tokenize(model, text)
    n_chunks = n_chunks_for(len(tokens), ctx, chunks)
    bos = bos_for_chunks(model.tokenizer)
    if kl_base is None:
        return perplexity_of_tokens(model.logits, tokens, ctx, n_chunks, bos, progress)
    from mlxtral.evaluation.kld import BaseWriter

    model_path = getattr(model, "path", None)  # the base never replaces a file of the model
    with BaseWriter(kl_base, ctx, model.config.vocab_size, n_chunks, tokens,
                    protect=[model_path] if model_path is not None else []) as writer:
        return perplexity_of_tokens(model.logits, tokens, ctx, n_chunks, bos, progress,
                                    on_chunk=lambda i, lg, tg: writer.add(lg))


TEXT_LIMIT = 1 << 30  # a text file is read whole: 1 GiB at most (wikitext-103's train split is ~540 MB)


def read_text(path: Any) -> str:
    """A text file as llama-perplexity's ``-f`` reads it: the whole file, one trailing newline dropped;
    only a regular file of at most :data:`TEXT_LIMIT` bytes, valid UTF-8 (one-line errors)."""
    from mlxtral.errors import MlxtralError
    from mlxtral.formats.files import read_side_file

    data = read_side_file(path, MlxtralError, limit=TEXT_LIMIT)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlxtralError(f"not UTF-8 text (invalid byte at offset {e.start})", path) from None
    return text[:-1] if text.endswith("\n") else text
