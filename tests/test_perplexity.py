"""`mlxtral perplexity` and KL divergence (mlxtral.evaluation): llama-perplexity's protocol against a
naive float64 implementation over ``model.logits``, chunking and BOS rules, the KL base file
(llama.cpp's format) written and read back, a model against itself, the CLI's errors and JSON,
NumPy vs MLX, and a streamed model."""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import (  # noqa: E402
    BACKENDS,
    random_weights,
    raw_gguf_tensors,
    tiny_args,
    write_gguf,
    write_raw_gguf,
)

import mlxtral  # noqa: E402
from mlxtral.cli import app  # noqa: E402
from mlxtral.errors import FormatError, MlxtralError, UsageError  # noqa: E402
from mlxtral.evaluation import kld  # noqa: E402
from mlxtral.evaluation.perplexity import n_chunks_for, token_nll  # noqa: E402

ARGS = tiny_args(n_experts=4, vocab_size=320, max_position_embeddings=256)
CTX = 16
runner = CliRunner()
TEXT = " ".join(f"the {w} of {v} is a {u} thing;" for w, v, u in zip(
    ["cat", "dog", "house", "river", "tree", "sky", "road", "book", "song", "stone"] * 3,
    ["night", "day", "town", "sea", "wood", "rain", "hill", "field", "lake", "snow"] * 3,
    ["small", "big", "blue", "red", "old", "new", "long", "short", "warm", "cold"] * 3, strict=True))


@pytest.fixture(scope="module")
def raw_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Q8_0 MoE GGUF without a vocabulary (ids given directly)."""
    p = tmp_path_factory.mktemp("ppl") / "tiny-q8.gguf"
    return write_raw_gguf(p, raw_gguf_tensors(ARGS, "Q8_0", seed=3), ARGS)


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny F32 MoE GGUF with the real Mixtral vocabulary (adds BOS)."""
    args = tiny_args(max_position_embeddings=64)
    return write_gguf(tmp_path_factory.mktemp("pplv") / "tiny-vocab.gguf", random_weights(args, 5), args)


def load_raw(path: Path, backend: str = "numpy", bos: int | None = None, **kw: object) -> mlxtral.Model:
    m = mlxtral.load(path, backend=backend, tokenizer=False, **kw)  # type: ignore[arg-type]
    m.tokenizer = SimpleNamespace(add_bos=bos is not None, bos_id=bos)
    return m


def ids_of(n: int, seed: int = 0, bos: int | None = None) -> list[int]:
    ids = np.random.default_rng(seed).integers(3, ARGS.vocab_size, size=n).tolist()
    return [bos, *ids[1:]] if bos is not None else ids


def naive(m: mlxtral.Model, ids: list[int], ctx: int, bos: int | None, chunks: int | None = None
          ) -> tuple[float, float, int, int]:
    """An independent reading of perplexity.cpp: float64 log-softmax of each chunk's full logits."""
    n_chunks = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    nlls = []
    for c in range(n_chunks):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        lg = m.logits(chunk).astype(np.float64)
        logp = lg - lg.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        for j in range(ctx // 2, ctx - 1):
            nlls.append(-logp[j, ids[c * ctx + j + 1]])
    x = np.asarray(nlls)
    ppl = float(np.exp(x.mean()))
    return ppl, float(np.sqrt(x.var() / (x.size - 1)) * ppl), n_chunks, x.size


# ---- the protocol ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bos", [None, 1])
def test_protocol_matches_naive(raw_path: Path, bos: int | None) -> None:
    m = load_raw(raw_path, bos=bos)
    ids = ids_of(5 * CTX + 7, bos=bos)
    r = m.perplexity(ids, ctx=CTX)
    ppl, se, n_chunks, scored = naive(m, ids, CTX, bos)
    assert (r.chunks, r.tokens_scored) == (n_chunks, scored) == (5, 5 * (CTX // 2 - 1))
    assert r.ppl == pytest.approx(ppl, rel=1e-6)
    assert r.ppl_stderr == pytest.approx(se, rel=1e-5)
    assert r.add_bos == (bos is not None) and len(r.nll_per_chunk) == len(r.running_ppl) == 5
    assert r.running_ppl[-1] == pytest.approx(r.ppl) and r.n_tokens == len(ids)
    r2 = m.perplexity(ids, ctx=CTX, chunks=2)
    assert (r2.chunks, r2.tokens_scored) == (2, 2 * (CTX // 2 - 1))
    assert r2.ppl == pytest.approx(naive(m, ids, CTX, bos, chunks=2)[0], rel=1e-6)
    assert r2.nll_per_chunk == pytest.approx(r.nll_per_chunk[:2], rel=1e-9)


@pytest.mark.parametrize("bos", [None, 1])
def test_chunks_fed_from_an_empty_cache_with_bos(raw_path: Path, bos: int | None) -> None:
    m = load_raw(raw_path, bos=bos)
    fed: list[list[int]] = []
    real = m.logits
    m.logits = lambda ids: (fed.append(list(ids)), real(ids))[1]  # type: ignore[method-assign]
    ids = ids_of(3 * CTX + 5, seed=1, bos=bos)
    m.perplexity(ids, ctx=CTX)
    assert len(fed) == 3
    for c, chunk in enumerate(fed):
        want = ids[c * CTX:(c + 1) * CTX]
        assert len(chunk) == CTX and chunk[1:] == want[1:]
        assert chunk[0] == (bos if bos is not None else want[0])


def test_token_nll_is_float64_log_softmax() -> None:
    rng = np.random.default_rng(0)
    lg = (rng.standard_normal((7, 50)) * 5).astype(np.float32)
    tg = rng.integers(0, 50, 7)
    x = lg.astype(np.float64)
    ref = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1) - x[np.arange(7), tg]
    got = token_nll(lg, tg)
    assert got.dtype == np.float64 and np.allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_chunk_counts_and_short_text() -> None:
    assert n_chunks_for(1024, 512) == 2 and n_chunks_for(1535, 512) == 2 and n_chunks_for(5000, 512) == 9
    assert n_chunks_for(5000, 512, 3) == 3 and n_chunks_for(5000, 512, 99) == 9
    with pytest.raises(UsageError, match="1023 tokens long; ctx 512 needs at least 1024"):
        n_chunks_for(1023, 512)


@pytest.mark.parametrize("ctx, msg", [(2, "too small"), (7, "odd"), (512, "above the model's context")])
def test_bad_ctx(raw_path: Path, ctx: int, msg: str) -> None:
    m = load_raw(raw_path)
    with pytest.raises(UsageError, match=msg):
        m.perplexity(ids_of(2000), ctx=ctx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype, rel", [("F32", 1e-5), ("Q8_0", 5e-3)])
def test_backends_agree(tmp_path: Path, backend: str, qtype: str, rel: float) -> None:
    """Same numbers on both backends: to rounding in F32; within 0.5% on Q8_0, where the NumPy
    kernels quantize the activations to int8 as llama.cpp does and MLX does not."""
    path = tmp_path / f"{qtype}.gguf"
    if qtype == "F32":
        write_gguf(path, random_weights(ARGS, 3), ARGS, vocab=False)
    else:
        write_raw_gguf(path, raw_gguf_tensors(ARGS, qtype, seed=3), ARGS)
    ids = ids_of(4 * CTX, seed=4, bos=1)
    ref = naive(load_raw(path, "numpy", bos=1), ids, CTX, 1)[0]
    r = load_raw(path, backend, bos=1).perplexity(ids, ctx=CTX)
    assert r.ppl == pytest.approx(ref, rel=rel) and r.tokens_scored == 4 * (CTX // 2 - 1)


def test_streamed_model(raw_path: Path) -> None:
    from mlxtral.expert_cache import plan_memory
    from mlxtral.formats.detect import open_checkpoint

    ids = ids_of(3 * CTX, seed=5)
    ref = load_raw(raw_path).perplexity(ids, ctx=CTX)
    budget = plan_memory(open_checkpoint(raw_path), "numpy", 256, stream=True).min_budget
    with load_raw(raw_path, memory_budget=budget, stream_experts=True, max_context=256) as m:
        assert m.streaming
        r = m.perplexity(ids, ctx=CTX)
    assert r.ppl == ref.ppl and r.nll_per_chunk == ref.nll_per_chunk


# ---- the KL base file ----------------------------------------------------------------------------------


def c_log_softmax(logits: np.ndarray) -> list[int]:
    """perplexity.cpp's quantizing log_softmax for one row, element by element in float32."""
    f = np.float32
    mx, mn = f(logits.max()), f(logits.min())
    mn = max(mn, f(mx - f(16)))
    s = 0.0
    for v in logits:
        s += float(np.exp(f(v - mx)))
    lse = f(np.log(s))
    min_lp = f(f(mn - mx) - lse)
    scale = f(f(mx - mn) / f(65535))
    out = [int(x) for x in np.array([scale, min_lp], dtype="<f4").view("<u2")]
    if scale == 0:  # memset
        return out + [0] * len(logits)
    inv = f(f(1) / scale)
    for v in logits:
        out.append(int(np.rint(f(inv * f(v - mn)))) if v > mn else 0)
    return [int(x) for x in out]


def test_quantize_is_llamacpps() -> None:
    rng = np.random.default_rng(1)
    lg = (rng.standard_normal((4, 33)) * 6).astype(np.float32)
    lg[1, :] = 1.5  # a flat row: scale 0, codes 0
    lg[2, 5] = 40.0  # one dominant logit: the 16-nat floor applies
    q = kld.quantize_log_probs(lg)
    assert q.shape == (4, kld.record_len(33)) == (4, 38) and q.dtype == np.dtype("<u2")
    for i in range(4):
        assert q[i, :37].tolist() == c_log_softmax(lg[i])
        assert q[i, 37] == 0  # padding to an even count
    lp = kld.dequantize_log_probs(q, 33)
    x = lg.astype(np.float64)
    true = x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
    keep = true > true.max(1, keepdims=True) - 16
    step = (lg.max(1) - np.maximum(lg.min(1), lg.max(1) - 16)) / 65535
    assert np.all(np.abs(lp - true)[keep] <= (step[:, None] * 0.5 + 1e-5).repeat(33, 1)[keep])


def read_like_llamacpp(path: Path, n_scored: int) -> tuple[int, int, int, list[int], list[np.ndarray]]:
    """perplexity.cpp's kl_divergence() reads: magic, n_ctx, n_vocab, n_chunk, tokens, then chunk by
    chunk ``n_scored * nv`` uint16 records."""
    with open(path, "rb") as f:
        assert f.read(8) == b"_logits_"
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", f.read(12))
        tokens = list(struct.unpack(f"<{n_ctx * n_chunk}i", f.read(4 * n_ctx * n_chunk)))
        nv = 2 * ((n_vocab + 1) // 2) + 4
        recs = [np.frombuffer(f.read(2 * n_scored * nv), dtype="<u2").reshape(n_scored, nv)
                for _ in range(n_chunk)]
        assert f.read() == b""
    return n_ctx, n_vocab, n_chunk, tokens, recs


@pytest.mark.parametrize("bos", [None, 1])
def test_base_round_trip_and_self_kld(raw_path: Path, tmp_path: Path, bos: int | None) -> None:
    m = load_raw(raw_path, bos=bos)
    ids = ids_of(3 * CTX + 9, seed=6, bos=bos)
    base = tmp_path / "base.kld"
    r = m.perplexity(ids, ctx=CTX, kl_base=base)
    n_scored = CTX - 1 - CTX // 2
    n_ctx, n_vocab, n_chunk, tokens, recs = read_like_llamacpp(base, n_scored)
    assert (n_ctx, n_vocab, n_chunk) == (CTX, ARGS.vocab_size, 3) and tokens == ids[:3 * CTX]
    assert base.stat().st_size == kld.file_size(CTX, ARGS.vocab_size, 3)
    assert not list(tmp_path.glob(".*tmp*"))
    for c in range(3):  # the records are the model's log-probs at the scored positions
        chunk = list(ids[c * CTX:(c + 1) * CTX])
        if bos is not None:
            chunk[0] = bos
        lg = m.logits(chunk)[CTX // 2:CTX - 1]
        np.testing.assert_array_equal(recs[c], kld.quantize_log_probs(lg))
    b = kld.read_base(base)
    assert (b.n_ctx, b.n_vocab, b.n_chunk) == (CTX, ARGS.vocab_size, 3)
    np.testing.assert_array_equal(b.chunk_records(2), recs[2])
    res = m.kl_divergence(base)  # the tokens come from the base
    o = res.overall
    assert o["tokens_scored"] == r.tokens_scored and res.chunks == 3 and len(res.per_chunk) == 3
    assert abs(o["kld"]["mean"]) < 1e-5 and o["kld"]["max"] < 1e-4 and o["same_top"] == 1.0
    assert o["ppl"] == pytest.approx(r.ppl, rel=1e-6) and o["ppl_ratio"] == pytest.approx(1, abs=1e-4)
    assert all(c["same_top"] == 1.0 for c in res.per_chunk)
    assert m.kl_divergence(base, text=ids, chunks=1).chunks == 1


def test_kld_of_another_model(raw_path: Path, tmp_path: Path) -> None:
    m = load_raw(raw_path)
    other = write_raw_gguf(tmp_path / "other.gguf", raw_gguf_tensors(ARGS, "Q4_0", seed=3), ARGS)
    ids = ids_of(2 * CTX, seed=7)
    base = tmp_path / "base.kld"
    m.perplexity(ids, ctx=CTX, kl_base=base)
    o = load_raw(other).kl_divergence(base).overall
    k = o["kld"]
    assert k["mean"] > 1e-3 and k["max"] >= k["p99"] >= k["median"] >= k["min"]
    assert 0 <= o["same_top"] < 1 and o["ppl"] != pytest.approx(o["ppl_base"], rel=1e-6)


def test_base_refusals(raw_path: Path, tmp_path: Path) -> None:
    m = load_raw(raw_path)
    ids = ids_of(2 * CTX, seed=8)
    base = tmp_path / "base.kld"
    m.perplexity(ids, ctx=CTX, kl_base=base)
    with pytest.raises(UsageError, match="another text or tokenizer"):
        m.kl_divergence(base, text=ids_of(2 * CTX, seed=9))
    small = tiny_args(n_experts=4, vocab_size=256, max_position_embeddings=256)
    p = write_raw_gguf(tmp_path / "v256.gguf", raw_gguf_tensors(small, "Q8_0"), small)
    with pytest.raises(UsageError, match="over 320 tokens but this model's vocabulary has 256"):
        load_raw(p).kl_divergence(base)
    cut = tmp_path / "cut.kld"
    cut.write_bytes(base.read_bytes()[:-2])
    with pytest.raises(FormatError, match="truncated"):
        m.kl_divergence(cut)
    junk = tmp_path / "junk.kld"
    junk.write_bytes(b"not a base file at all")
    with pytest.raises(FormatError, match="does not look like"):
        m.kl_divergence(junk)
    with pytest.raises(MlxtralError, match="not found"):
        m.kl_divergence(tmp_path / "missing.kld")
    # records whose scale / minimum are NaN (or a negative scale) read as perfect agreement (KL 0):
    # refused, naming the chunk and token
    data = base.read_bytes()
    at = len(data) - 2 * kld.record_len(320)  # the last record: chunk 2's last scored token
    for j, (scale, lo) in enumerate(((np.nan, -3.0), (1e-3, np.inf), (-1e-3, -3.0))):
        bad = tmp_path / f"nan{j}.kld"
        bad.write_bytes(data[:at] + np.array([scale, lo], dtype="<f4").tobytes() + data[at + 8 :])
        with pytest.raises(FormatError, match=rf"chunk 2, token {kld.scored_per_chunk(CTX)}: scale .* "
                                              "not a record's"):
            m.kl_divergence(bad)
    with pytest.raises(UsageError, match="is a folder"):
        m.perplexity(ids, ctx=CTX, kl_base=tmp_path)
    # the base replaced or cut while a run reads it (chunk by chunk): one line, not a mmap traceback
    # and not another file's records read under the first one's header
    bf = kld.read_base(base)
    assert bf.chunk_records(1).shape == (kld.scored_per_chunk(CTX), kld.record_len(320))
    data = base.read_bytes()
    swapped = tmp_path / "swapped.kld"
    swapped.write_bytes(data)
    os.replace(swapped, base)  # the same bytes, another file
    with pytest.raises(FormatError, match="changed or went away while being read"):
        bf.chunk_records(1)
    bf = kld.read_base(base)
    base.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="changed or went away while being read"):
        bf.chunk_records(1)
    base.write_bytes(data)
    # a sparse file whose header claims a context (or a token count) beyond any: refused from the
    # header, before the tokens are read (1.2 GB went in before the context check)
    for n_ctx, n_chunk in ((100_000_000, 1), (1 << 16, 1 << 10)):
        sparse = tmp_path / f"sparse{n_ctx}.kld"
        with open(sparse, "wb") as f:
            f.write(kld.MAGIC + np.array([n_ctx, 1, n_chunk], dtype="<i4").tobytes())
            f.truncate(kld.file_size(n_ctx, 1, n_chunk))
        with pytest.raises(FormatError, match="bad header|more than the"):
            kld.read_base(sparse)


# ---- the command line ------------------------------------------------------------------------------------


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_cli_json_and_kld(vocab_path: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT + "\n")
    code, out, err = run("perplexity", str(vocab_path), "-f", str(text), "--ctx", "16", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert {"ppl", "ppl_stderr", "chunks", "tokens_scored", "per_chunk"} <= d.keys()
    m = mlxtral.load(vocab_path, backend="numpy")
    ids = m.encode(TEXT)
    assert ids[0] == 1 and d["add_bos"] is True and d["n_tokens"] == len(ids)
    assert d["chunks"] == len(ids) // 16 and d["tokens_scored"] == d["chunks"] * 7
    assert d["ppl"] == pytest.approx(naive(m, ids, 16, 1)[0], rel=1e-6)
    base = tmp_path / "b.kld"
    code, out, err = run("perplexity", str(vocab_path), "-f", str(text), "-c", "16", "--chunks", "2",
                         "--kl-divergence-base", str(base))
    assert code == 0, err
    assert "PPL" in out and base.exists()
    code, out, err = run("perplexity", str(vocab_path), "--kl-divergence-base", str(base), "--kl-divergence",
                         "--json")
    assert code == 0, err
    k = json.loads(out)
    assert k["chunks"] == 2 and k["tokens_scored"] == 14 and abs(k["overall"]["kld"]["mean"]) < 1e-5
    assert {"ppl", "ppl_stderr", "ppl_base", "ppl_ratio", "per_chunk"} <= k.keys()
    code, out, err = run("perplexity", str(vocab_path), "-f", str(text), "--kl-divergence-base", str(base),
                         "--kl-divergence")
    assert code == 0, err
    assert "Mean KLD" in out and "Same top token" in out
    other = tmp_path / "other.txt"
    other.write_text("completely different words here, " * 20)
    code, _, err = run("perplexity", str(vocab_path), "-f", str(other), "--kl-divergence-base", str(base),
                       "--kl-divergence")
    assert code == 2 and "another text or tokenizer" in err and len(err.strip().splitlines()) == 1


def test_cli_errors(vocab_path: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    ctx3 = tmp_path / "ctx3.kld"  # a base whose own context is too small: the file is named, no flag
    with open(ctx3, "wb") as f:
        f.write(kld.MAGIC + np.array([3, 320, 1], dtype="<i4").tobytes())
        f.truncate(kld.file_size(3, 320, 1))
    cases = [
        (["--kl-divergence-base", str(ctx3), "--kl-divergence"], 2, "ctx3.kld: its context 3 is too small"),
        (["-f", str(tmp_path / "missing.txt")], 1, "file not found"),
        (["-f", str(short), "--ctx", "16"], 2, "needs at least 32"),
        (["-f", str(text), "--ctx", "15"], 2, "--ctx 15 is odd"),
        (["-f", str(text), "--ctx", "2"], 2, "--ctx 2 is too small"),
        (["-f", str(text), "--ctx", "128"], 2, "--ctx 128: above the model's context length 64"),
        (["-f", str(text), "--chunks", "0"], 2, "--chunks 0"),
        (["-f", str(fifo)], 1, "not a regular file"),
        ([], 2, "-f FILE"),
        (["-f", str(text), "--kl-divergence"], 2, "needs --kl-divergence-base"),
        (["--kl-divergence-base", str(text), "--kl-divergence"], 1, "does not look like"),
        (["-f", str(text), "-c", "16", "--kl-divergence-base", str(text)], 2, "is the source itself"),
        (["-f", str(text), "-c", "16", "--kl-divergence-base", str(vocab_path)], 2, "is the source itself"),
        (["-f", str(text), "-c", "16", "--kl-divergence-base", str(short)], 2,
         "is not a KL-divergence base file"),
    ]
    for extra, code, msg in cases:
        c, _, err = run("perplexity", str(vocab_path), *extra)
        assert c == code and msg in err and len(err.strip().splitlines()) == 1, (extra, c, err)


def test_base_never_replaces_a_model_file_or_another_file(tmp_path: Path) -> None:
    """A base named after a file of the model's folder (or any file that is not a base) is refused
    before the work starts, and the file is left as it was; an old base is replaced."""
    from tiny_models import write_hf

    args = tiny_args(max_position_embeddings=64)
    folder = write_hf(tmp_path / "hf", random_weights(args, 6), args)
    weights = folder / "model.safetensors"
    before = weights.read_bytes()
    text = tmp_path / "t.txt"
    text.write_text(TEXT + "\n")
    code, _, err = run("perplexity", str(folder), "-f", str(text), "-c", "16", "--chunks", "1",
                       "--kl-divergence-base", str(weights))
    assert code == 2 and "would be inside the source" in err and len(err.strip().splitlines()) == 1, err
    assert weights.read_bytes() == before
    m = mlxtral.load(folder, backend="numpy")
    with pytest.raises(UsageError, match="inside the source|source itself"):
        m.perplexity(TEXT, ctx=16, chunks=1, kl_base=weights)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(UsageError, match="not a KL-divergence base file"):
        m.perplexity(TEXT, ctx=16, chunks=1, kl_base=notes)
    assert notes.read_text() == "mine"
    (tmp_path / "link").symlink_to(notes)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "empty").write_bytes(b"")
    for name, why in (("link", "symbolic link"), ("dangling", "symbolic link"), ("empty", "not a KL")):
        with pytest.raises(UsageError, match=why):
            m.perplexity(TEXT, ctx=16, chunks=1, kl_base=tmp_path / name)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "dangling").is_symlink()
    assert (tmp_path / "empty").read_bytes() == b"" and notes.read_text() == "mine"
    for name in ("link", "dangling", "empty"):
        (tmp_path / name).unlink()
    base = tmp_path / "b.kld"
    m.perplexity(TEXT, ctx=16, chunks=1, kl_base=base)
    old = base.read_bytes()
    m.perplexity(TEXT, ctx=16, chunks=2, kl_base=base)  # a base replaces a base
    assert base.read_bytes() != old and sorted(p.name for p in tmp_path.iterdir()) == [
        "b.kld", "hf", "notes.txt", "t.txt"]


def test_interrupted_base_leaves_the_old_one(raw_path: Path, tmp_path: Path) -> None:
    m = load_raw(raw_path)
    ids = ids_of(3 * CTX, seed=8)
    base = tmp_path / "base.kld"
    m.perplexity(ids, ctx=CTX, kl_base=base)
    old = base.read_bytes()
    calls = [0]
    logits = m.logits

    def dies(*a: object, **k: object) -> np.ndarray:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return logits(*a, **k)

    m.logits = dies  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        m.perplexity(ids_of(3 * CTX, seed=9), ctx=CTX, kl_base=base)
    assert base.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["base.kld"]


def test_help() -> None:
    code, out, _ = run("perplexity", "--help")
    assert code == 0 and "Examples" in out and "mlxtral perplexity" in out
    assert "mlxtral.evaluation.sample_text" in out and "--kl-divergence-base" in out


def test_sample_text(tmp_path: Path) -> None:
    from mlxtral.evaluation.sample_text import main, sample_text

    assert main([str(tmp_path / "t.txt")]) == 0
    text = (tmp_path / "t.txt").read_text(encoding="utf-8")
    assert text == sample_text() and len(text) > 100_000
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    for argv in ([str(mine)], [str(tmp_path)], [str(tmp_path / "no" / "t.txt")], ["--force", str(tmp_path)]):
        assert main(argv) == 2, argv  # one line, nothing replaced, no traceback
    assert mine.read_text() == "mine"
    assert main(["--force", str(mine)]) == 0 and mine.read_text(encoding="utf-8") == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "t.txt"]
    assert main([""]) == 2 and main(["--help"]) == 0 and main(["-h"]) == 0


def test_read_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxtral.evaluation import perplexity as ppl_mod

    p = tmp_path / "t.txt"
    p.write_bytes(b"one line\n\n")
    assert ppl_mod.read_text(p) == "one line\n"  # as llama.cpp's -f: one trailing newline dropped
    p.write_bytes(b"bad \xff byte")
    with pytest.raises(MlxtralError, match="not UTF-8"):
        ppl_mod.read_text(p)
    p.write_bytes(b"x" * 100)
    monkeypatch.setattr(ppl_mod, "TEXT_LIMIT", 50)
    with pytest.raises(MlxtralError, match="larger than"):
        ppl_mod.read_text(p)


def test_progress_reports_every_chunk(raw_path: Path) -> None:
    m = load_raw(raw_path)
    seen: list[tuple[int, int]] = []
    r = m.perplexity(ids_of(3 * CTX), ctx=CTX, progress=lambda d, n, p: seen.append((d, n)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)] and r.chunks == 3


def test_memory_plan_counts_a_chunks_logits(vocab_path: Path, tmp_path: Path) -> None:
    """perplexity holds a chunk's logits at once: the memory plan counts them, and a budget that
    cannot hold them is refused before the run, naming --ctx."""
    from mlxtral.expert_cache import plan_memory
    from mlxtral.formats.detect import open_checkpoint

    ckpt = open_checkpoint(vocab_path)
    one = plan_memory(ckpt, "numpy", 64, stream=False).full.working
    chunk = plan_memory(ckpt, "numpy", 64, stream=False, logits_rows=64).full.working
    assert chunk - one >= 3 * 63 * ckpt.args.vocab_size * 4
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    code, _, err = run("perplexity", str(vocab_path), "-f", str(text), "--ctx", "16",
                       "--memory-budget", "10MB")
    assert code == 1 and "--ctx" in err and len(err.strip().splitlines()) == 1, err
