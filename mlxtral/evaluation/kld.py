"""KL divergence against a reference run, as llama-perplexity's ``--kl-divergence-base FILE`` (save
the reference's log-probabilities) and ``--kl-divergence`` (compare with them).

The file is llama.cpp's own format (``tools/perplexity/perplexity.cpp``), so a base written by either
program is read by the other. All integers and floats little-endian:

- ``b"_logits_"``, int32 ``n_ctx``, int32 ``n_vocab``, int32 ``n_chunk``;
- int32 tokens ``[n_chunk * n_ctx]``: the text's tokens (not BOS-replaced), which also identify the
  text and tokenizer: a base from another text or vocabulary is refused with one line;
- per chunk, for each scored position (``n_ctx - 1 - n_ctx/2`` of them) a record of
  ``nv = 2 * ((n_vocab + 1) / 2) + 4`` uint16: float32 ``scale`` and float32 ``min_log_prob`` (4
  uint16), then one uint16 per vocabulary entry, ``round((logit - min_logit) / scale)`` where
  ``min_logit = max(min(logits), max(logits) - 16)`` and ``scale = (max_logit - min_logit) / 65535``;
  entries at or below ``min_logit`` are 0. A log-prob is ``scale * q + min_log_prob``: 16 bits per
  vocabulary entry, ``2 * nv`` bytes a scored token (64 KB for a 32000-token vocabulary; ctx 512
  scores 255 tokens a chunk: 16 MB a chunk).
"""
from __future__ import annotations

import contextlib
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.convert.output_guard import FileKind
from mlxtral.errors import FormatError, MlxtralError, UsageError
from mlxtral.evaluation.perplexity import (
    NllSums,
    Progress,
    bos_for_chunks,
    check_ctx,
    iter_chunks,
    scored_per_chunk,
    tokenize,
)

MAGIC = b"_logits_"
HEADER_BYTES = len(MAGIC) + 3 * 4
# what a base may replace (with no --force asked: never a link or an empty file)
BASE_FILE = FileKind(MAGIC, "a KL-divergence base file", "--kl-divergence-base", strict=True)
PERCENTILES = (("max", 1.0), ("p99_9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90),
               ("median", None), ("p10", 0.10), ("p5", 0.05), ("p1", 0.01), ("p0_1", 0.001), ("min", 0.0))
DELTA_P_PERCENTILES = (("max", 1.0), ("p99_9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90),
                       ("p75", 0.75), ("median", None), ("p25", 0.25), ("p10", 0.10), ("p5", 0.05),
                       ("p1", 0.01), ("p0_1", 0.001), ("min", 0.0))


def record_len(n_vocab: int) -> int:
    """uint16 values stored per scored token: 4 (two float32) + n_vocab rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    return HEADER_BYTES + 4 * n_chunk * n_ctx + 2 * n_chunk * scored_per_chunk(n_ctx) * record_len(n_vocab)


# ---- quantized log-probabilities --------------------------------------------------------------------


def quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """llama.cpp's ``log_softmax(n_vocab, logits, log_prob, tok)`` for each row, float32 arithmetic
    as there. ``logits`` float32 [n, vocab] -> uint16 [n, record_len(vocab)]."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, v = logits.shape
    mx = logits.max(axis=1)  # [n]
    mn = np.maximum(logits.min(axis=1), mx - np.float32(16))  # [n]
    sum_exp = np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)  # [n]
    log_sum_exp = np.log(sum_exp).astype(np.float32)
    min_log_prob = (mn - mx - log_sum_exp).astype(np.float32)  # [n]
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)  # [n]
    out = np.zeros((n, record_len(v)), dtype="<u2")
    out[:, 0:2] = scale.astype("<f4").view("<u2").reshape(n, 2)
    out[:, 2:4] = min_log_prob.astype("<f4").view("<u2").reshape(n, 2)
    nz = scale != 0
    if nz.any():
        inv = (np.float32(1) / scale[nz]).astype(np.float32)[:, None]  # [m, 1]
        x = logits[nz]
        q = np.rint(inv * (x - mn[nz][:, None])).astype(np.int64) & 0xFFFF  # nearest_int, stored as uint16
        q[~(x > mn[nz][:, None])] = 0
        out[np.flatnonzero(nz), 4:4 + v] = q
    return out


def _scale_and_min(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A record's float32 ``scale`` and ``min_log_prob`` (its first 4 uint16): [n, 1] each."""
    return rec[:, 0:2].copy().view("<f4"), rec[:, 2:4].copy().view("<f4")


def dequantize_log_probs(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """uint16 [n, nv] -> float32 [n, vocab] log-probabilities ``scale * q + min_log_prob``."""
    rec = np.ascontiguousarray(records, dtype="<u2")
    scale, min_lp = _scale_and_min(rec)  # [n, 1]
    return (scale * rec[:, 4:4 + n_vocab].astype(np.float32) + min_lp).astype(np.float32)


# ---- writing a base -----------------------------------------------------------------------------------


def _check_output(path: Path) -> None:
    """A base may replace a regular file, never a folder, pipe or device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise MlxtralError("its folder does not exist", path) from None
        return
    if stat.S_ISDIR(st.st_mode):
        raise UsageError("is a folder: --kl-divergence-base names the file to write", path)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError("not a regular file (a pipe, device or socket cannot hold a base)", path)


class BaseWriter:
    """Writes a base file under a temporary name beside ``path`` and puts it in place on success,
    as ``convert`` writes its output (:func:`convert.atomic.atomic_output`): a failed or interrupted
    run (Ctrl-C, SIGTERM, SIGHUP) leaves the old file, or nothing. ``path`` may replace only a base
    file, never a file of the model (any file of its folder) or the text."""

    def __init__(self, path: str | os.PathLike[str], n_ctx: int, n_vocab: int, n_chunk: int,
                 tokens: np.ndarray, protect: Sequence[str | os.PathLike[str]] = ()) -> None:
        from mlxtral.convert.output_guard import check_output, source_paths

        self.path = Path(path)
        _check_output(self.path)
        self.sources = [q for p in protect if os.path.lexists(p) for q in source_paths(Path(p))]
        check_output(self.path, is_dir=False, force=True, sources=self.sources, kind=BASE_FILE)
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, n_chunk
        self.tokens = tokens
        self.expected = n_chunk * scored_per_chunk(n_ctx)
        self.rows = 0
        self._stack = contextlib.ExitStack()

    def add(self, logits: np.ndarray) -> None:
        """One chunk's scored logits, float32 [n, vocab]."""
        if logits.shape[1] != self.n_vocab:
            raise MlxtralError(f"the model computes {logits.shape[1]} logits per token but its vocabulary "
                               f"has {self.n_vocab}", self.path)
        self.f.write(quantize_log_probs(logits).tobytes())
        self.rows += logits.shape[0]

    def __enter__(self) -> BaseWriter:
        from mlxtral.convert.atomic import atomic_output

        with self._stack as stack:
            tmp = stack.enter_context(atomic_output(self.path, is_dir=False, force=True, sources=self.sources,
                                                    kind=BASE_FILE))
            self.f = stack.enter_context(open(tmp, "wb"))  # noqa: SIM115
            self.f.write(MAGIC)
            self.f.write(np.asarray([self.n_ctx, self.n_vocab, self.n_chunk], dtype="<i4").tobytes())
            self.f.write(np.asarray(self.tokens[: self.n_chunk * self.n_ctx], dtype="<i4").tobytes())
            self._stack = stack.pop_all()  # kept open until __exit__
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None and self.rows != self.expected:  # never put a short base in place
            err = MlxtralError(f"only {self.rows} of {self.expected} rows were computed; the base was not "
                               "written", self.path)
            self._stack.__exit__(MlxtralError, err, None)
            raise err
        return bool(self._stack.__exit__(exc_type, exc, tb))


# ---- reading a base -------------------------------------------------------------------------------------


@dataclass
class BaseFile:
    """A base file's header and tokens; the records are read chunk by chunk (memory-mapped)."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int64 [n_chunk * n_ctx]
    ident: tuple[int, ...]  # _identity of the file when the header was read

    @property
    def records_offset(self) -> int:
        return HEADER_BYTES + 4 * self.n_chunk * self.n_ctx

    def chunk_records(self, i: int) -> np.ndarray:
        """uint16 [n_ctx - 1 - n_ctx/2, nv] of chunk ``i``, read from the file the header came from
        and checked (:func:`_check_records`)."""
        n, nv = scored_per_chunk(self.n_ctx), record_len(self.n_vocab)
        data = b""
        try:
            with open(self.path, "rb") as f:
                if _identity(os.fstat(f.fileno())) == self.ident:
                    f.seek(self.records_offset + 2 * i * n * nv)
                    data = f.read(2 * n * nv)
        except OSError:
            pass
        if len(data) != 2 * n * nv:  # replaced, cut or gone since the header was read
            raise FormatError("changed or went away while being read (another run writing it?)", self.path)
        records = np.frombuffer(data, dtype="<u2").reshape(n, nv)
        _check_records(records, self.path, i)
        return records


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """(device, inode, size, mtime): the same file, unchanged."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _check_records(records: np.ndarray, path: Path, chunk: int) -> None:
    """Every record's scale and minimum log-probability finite, the scale not negative (a base
    holding NaN would otherwise read as perfect agreement: every KL term NaN, then dropped)."""
    scale, min_lp = (a[:, 0] for a in _scale_and_min(records))  # [n]
    bad = np.flatnonzero(~(np.isfinite(scale) & np.isfinite(min_lp) & (scale >= 0)))
    if bad.size:
        j = int(bad[0])
        raise FormatError(f"chunk {chunk + 1}, token {j + 1}: scale {float(scale[j])!r} and minimum "
                          f"log-probability {float(min_lp[j])!r} are not a record's (finite, scale >= 0): "
                          "damaged or not a llama-perplexity base", path)


MAX_BASE_CTX = 1 << 20  # positions: beyond any model's context
MAX_BASE_TOKENS = 1 << 24  # tokens read whole (64 MB); a real base of that many is ~0.5 TB of records


def read_base(path: str | os.PathLike[str]) -> BaseFile:
    """The header of a base file (ours or llama-perplexity's), checked: magic, sane sizes, and a file
    size that matches them exactly. FormatError, one line, otherwise."""
    from mlxtral.formats.files import open_regular

    p = Path(path)
    try:
        f = open_regular(p)
    except FileNotFoundError:
        raise MlxtralError("file not found (write it first with --kl-divergence-base alone)", p) from None
    except IsADirectoryError:
        raise UsageError("is a folder, not a base file", p) from None
    with f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise FormatError("does not look like a file of log-probabilities (llama-perplexity's "
                              "--kl-divergence-base format)", p)
        n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(head, dtype="<i4", offset=8, count=3))
        if n_ctx < 3 or n_vocab < 1 or n_chunk < 1 or n_ctx > MAX_BASE_CTX:
            raise FormatError(f"bad header: n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}", p)
        if n_chunk * n_ctx > MAX_BASE_TOKENS:  # read before the records: bounded whatever the header says
            raise FormatError(f"holds {n_chunk} chunks of {n_ctx} tokens, more than the {MAX_BASE_TOKENS} "
                              "tokens a base file is read with (a base that large would be terabytes)", p)
        size = os.fstat(f.fileno()).st_size
        want = file_size(n_ctx, n_vocab, n_chunk)
        if size != want:
            raise FormatError(f"is {size} bytes but its header (ctx {n_ctx}, vocabulary {n_vocab}, "
                              f"{n_chunk} chunks) means {want}: truncated or not a base file", p)
        raw = f.read(4 * n_chunk * n_ctx)
        ident = _identity(os.fstat(f.fileno()))
    tokens = np.frombuffer(raw, dtype="<i4").astype(np.int64)
    return BaseFile(p, n_ctx, n_vocab, n_chunk, tokens, ident)


# ---- comparing --------------------------------------------------------------------------------------


@dataclass
class ChunkKL:
    """Per scored token of one chunk: KL(base || model), p(target) difference, NLLs, same top."""

    kld: np.ndarray  # float64 [n]
    p_diff: np.ndarray  # float32 [n]
    nll: np.ndarray  # float64 [n]
    nll_base: np.ndarray  # float64 [n]
    same_top: np.ndarray  # bool [n]


def kl_chunk(logits: np.ndarray, records: np.ndarray, targets: np.ndarray, n_vocab: int) -> ChunkKL:
    """llama.cpp's ``log_softmax(n_vocab, logits, base_log_prob, tok, kld)`` for each row:
    ``KL = sum_i p_base_i (log p_base_i - log p_i)`` over the entries with ``log p_base > -16``.
    ``logits`` float32 [n, vocab], ``records`` uint16 [n, nv], ``targets`` [n]."""
    logits = np.asarray(logits, dtype=np.float32)
    n = logits.shape[0]
    rows = np.arange(n)
    tg = np.asarray(targets, dtype=np.int64)
    imax = logits.argmax(axis=1)  # first maximum, as llama.cpp's strict >
    mx = logits[rows, imax]  # [n] float32
    sum_exp = np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)
    lse = np.log(sum_exp).astype(np.float32)  # [n]
    norm = (mx + lse).astype(np.float32)  # [n]: log p = logit - norm
    nll = (norm - logits[rows, tg]).astype(np.float32)
    base = dequantize_log_probs(records, n_vocab)  # [n, vocab] float32
    nll_base = -base[rows, tg]
    keep = base > np.float32(-16)
    terms = np.where(keep, np.exp(base) * (base - logits + norm[:, None]), np.float32(0))  # [n, vocab] f32
    kld = terms.sum(axis=1, dtype=np.float64)
    same = imax == base.argmax(axis=1)
    p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
    return ChunkKL(kld, p_diff, nll.astype(np.float64), nll_base.astype(np.float64), same)


def mean_and_uncertainty(s: float, s2: float, count: int) -> tuple[float, float]:
    """llama.cpp's: the mean and its standard error (0 for 10 values or fewer)."""
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def covariance(sa: float, sb: float, sab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float | None) -> float:
    """llama.cpp's interpolated percentile of sorted values; ``None`` is the median."""
    v = sorted_values
    if fraction is None:
        m = v.size // 2
        return float(0.5 * (v[m] + v[m - 1])) if v.size % 2 == 0 else float(v[m])
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction) * np.float32(v.size - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, v.size - 1)])


@dataclass
class KLSums:
    """llama.cpp's ``kl_divergence_result`` plus every token's KLD and delta-p (for percentiles)."""

    nll: float = 0.0
    nll2: float = 0.0
    nll_base: float = 0.0
    nll_base2: float = 0.0
    nll_nll_base: float = 0.0
    kld: float = 0.0
    kld2: float = 0.0
    p_diff: float = 0.0
    p_diff2: float = 0.0
    p_diff4: float = 0.0
    same_top: int = 0
    count: int = 0
    kld_values: list[np.ndarray] = field(default_factory=list)
    p_diff_values: list[np.ndarray] = field(default_factory=list)

    def add(self, c: ChunkKL) -> None:
        self.nll += float(c.nll.sum())
        self.nll2 += float((c.nll * c.nll).sum())
        self.nll_base += float(c.nll_base.sum())
        self.nll_base2 += float((c.nll_base * c.nll_base).sum())
        self.nll_nll_base += float((c.nll * c.nll_base).sum())
        self.kld += float(c.kld.sum())
        self.kld2 += float((c.kld * c.kld).sum())
        pd = c.p_diff.astype(np.float64)
        self.p_diff += float(pd.sum())
        self.p_diff2 += float((pd * pd).sum())
        self.p_diff4 += float((pd ** 4).sum())
        self.same_top += int(c.same_top.sum())
        self.count += int(c.kld.size)
        self.kld_values.append(c.kld.astype(np.float32))
        self.p_diff_values.append(c.p_diff)

    def summary(self) -> dict[str, Any]:
        """Every figure llama-perplexity prints at the end of ``--kl-divergence``."""
        n = self.count
        lp, lp_e = mean_and_uncertainty(self.nll, self.nll2, n)
        lb, lb_e = mean_and_uncertainty(self.nll_base, self.nll_base2, n)
        cov = covariance(self.nll, self.nll_base, self.nll_nll_base, n)
        ppl, ppl_base = math.exp(lp), math.exp(lb)
        ratio_e = math.sqrt(max(lp_e * lp_e + lb_e * lb_e - 2 * cov, 0.0))
        ppl_e, ppl_base_e = ppl * lp_e, ppl_base * lb_e
        kl, kl_e = mean_and_uncertainty(self.kld, self.kld2, n)
        pdm, pdm_e = mean_and_uncertainty(self.p_diff, self.p_diff2, n)
        mse, mse_e = mean_and_uncertainty(self.p_diff2, self.p_diff4, n)
        rms = math.sqrt(mse)
        top = self.same_top / n if n else 0.0
        kv = np.sort(np.concatenate(self.kld_values)) if self.kld_values else np.zeros(1, np.float32)
        pv = np.sort(np.concatenate(self.p_diff_values)) if self.p_diff_values else np.zeros(1, np.float32)
        return {
            "tokens_scored": n,
            "ppl": ppl, "ppl_stderr": ppl_e, "ppl_base": ppl_base, "ppl_base_stderr": ppl_base_e,
            "cor_ln_ppl": cov / (lp_e * lb_e) if lp_e and lb_e else None,
            "ln_ppl_ratio": lp - lb, "ln_ppl_ratio_stderr": ratio_e,
            "ppl_ratio": math.exp(lp - lb), "ppl_ratio_stderr": math.exp(lp - lb) * ratio_e,
            "ppl_diff": ppl - ppl_base,
            "ppl_diff_stderr": math.sqrt(max(ppl_e ** 2 + ppl_base_e ** 2 - 2 * ppl * ppl_base * cov, 0.0)),
            "kld": {"mean": kl, "stderr": kl_e, **{k: percentile(kv, f) for k, f in PERCENTILES}},
            "delta_p": {"mean": pdm, "stderr": pdm_e,
                        **{k: percentile(pv, f) for k, f in DELTA_P_PERCENTILES}, "rms": rms,
                        "rms_stderr": 0.5 / rms * mse_e if rms else 0.0},
            "same_top": top, "same_top_stderr": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        }


@dataclass
class KLDResult:
    """``--kl-divergence``: the overall figures (:meth:`KLSums.summary`) and one row per chunk (that
    chunk's own PPL of both, mean and max KLD, top-token agreement, RMS delta-p)."""

    overall: dict[str, Any]
    per_chunk: list[dict[str, Any]]
    ctx: int
    chunks: int
    base: str
    seconds: float = 0.0

    @property
    def ppl(self) -> float:
        return float(self.overall["ppl"])

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("ppl", "ppl_stderr", "ppl_base", "ppl_ratio", "tokens_scored"):
            d[k] = self.overall[k]
        return d


def _chunk_row(i: int, c: ChunkKL) -> dict[str, Any]:
    return {"chunk": i + 1, "ppl": math.exp(float(c.nll.mean())),
            "ppl_base": math.exp(float(c.nll_base.mean())),
            "kld_mean": float(c.kld.mean()), "kld_max": float(c.kld.max()),
            "same_top": float(c.same_top.mean()),
            "delta_p_rms": math.sqrt(float((c.p_diff.astype(np.float64) ** 2).mean()))}


def check_base_matches(base: BaseFile, vocab_size: int, tokens: np.ndarray | None) -> None:
    """Refuse (one line) a base computed over another vocabulary, or over another text/tokenizer when
    ``tokens`` (our tokenization of ``-f TEXT``) is given."""
    if base.n_vocab != vocab_size:
        raise UsageError(f"holds log-probabilities over {base.n_vocab} tokens but this model's vocabulary "
                         f"has {vocab_size}: it was computed with another model family", base.path)
    bad = np.flatnonzero((base.tokens < 0) | (base.tokens >= vocab_size))
    if bad.size:
        raise FormatError(f"token {int(bad[0])} of the base is id {int(base.tokens[bad[0]])}, outside the "
                          f"vocabulary (0..{vocab_size - 1})", base.path)
    if tokens is None:
        return
    n = base.tokens.size
    mine = np.asarray(tokens[:n], dtype=np.int64)
    if mine.size < n or not np.array_equal(mine, base.tokens):
        diff = int(np.flatnonzero(mine != base.tokens[:mine.size])[0]) if mine.size and not np.array_equal(
            mine, base.tokens[:mine.size]) else mine.size
        raise UsageError(f"was computed from another text or tokenizer: its tokens and this text's differ "
                         f"from token {diff} (of {n})", base.path)


def kl_divergence(model: Any, base_path: str | os.PathLike[str], text: str | Sequence[int] | None = None,
                  chunks: int | None = None, progress: Progress | None = None) -> KLDResult:
    """Compare ``model`` with the base saved by ``perplexity(..., kl_base=...)`` (or by
    llama-perplexity ``--kl-divergence-base``). The tokens come from the base; with ``text`` they
    are checked against its tokenization. ``chunks`` limits the run to the first chunks."""
    import time

    base = read_base(base_path)
    try:
        check_ctx(base.n_ctx, model.config.max_position_embeddings, allow_odd=True, name="its context")
    except UsageError as e:  # the base's own context: name the file, not a flag
        raise UsageError(e.message, base.path) from None
    check_base_matches(base, model.config.vocab_size, None if text is None else tokenize(model, text))
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer))
                               or chunks < 1):
        raise UsageError(f"chunks must be a whole number >= 1, got {chunks!r}")
    n_chunks = min(base.n_chunk, int(chunks)) if chunks is not None else base.n_chunk
    t0 = time.perf_counter()
    sums = KLSums()
    rows: list[dict[str, Any]] = []
    running = NllSums()  # the running PPL shown while it works
    if progress is not None:
        progress(0, n_chunks, float("nan"))
    for i, logits, targets in iter_chunks(model.logits, base.tokens, base.n_ctx, n_chunks,
                                          bos_for_chunks(model.tokenizer)):
        c = kl_chunk(logits, base.chunk_records(i), targets, base.n_vocab)
        sums.add(c)
        rows.append(_chunk_row(i, c))
        running.add(c.nll)
        if progress is not None:
            progress(i + 1, n_chunks, running.ppl)
    return KLDResult(sums.summary(), rows, base.n_ctx, n_chunks, str(base.path), time.perf_counter() - t0)


__all__ = ["BaseFile", "BaseWriter", "KLDResult", "dequantize_log_probs", "kl_divergence",
           "quantize_log_probs", "read_base", "record_len"]
