"""Tokenizer files for an MLX / HF folder rebuilt from a GGUF's embedded vocabulary.

- ``tokenizer.ggml.model == "llama"`` (SentencePiece BPE): a ``tokenizer.model`` protobuf with the
  GGUF's pieces, scores and types, trainer spec BPE with byte fallback (when the vocabulary has
  byte pieces), the GGUF's unk/bos/eos/pad ids, and Mistral's normalizer: ``identity`` (no rule),
  dummy prefix (``tokenizer.ggml.add_space_prefix``, default on), escaped whitespace, extra
  whitespace kept (``tokenizer.ggml.remove_extra_whitespaces``, default off).
- ``"gpt2"`` (byte-level BPE): a ``tokenizer.json`` in Hugging Face ``tokenizers``' format: a BPE
  model (vocab + merges), the ``tokenizer.ggml.pre`` regexes as ``Split`` pre-tokenizers followed
  by ``ByteLevel`` (no regex of its own), a ``ByteLevel`` decoder, and the control / user-defined
  tokens as ``added_tokens``.
- beside a SentencePiece BPE ``tokenizer.model``, also its ``tokenizer.json`` (see
  :func:`tokenizer_json_from_spm`): recent transformers, which mlx-lm loads tokenizers through,
  convert a bare ``tokenizer.model`` of a ``mixtral`` model without the dummy prefix ("the" became
  "t" + "he"); real Mixtral folders ship a ``tokenizer.json`` for that reason.
- ``tokenizer_config.json`` with the bos/eos tokens, ``add_bos_token`` / ``add_eos_token`` and the
  GGUF's ``tokenizer.chat_template``.

And the reverse, for GGUF output: a byte-level BPE ``tokenizer.json`` (read by our own loader, so
the GGUF tokenizes exactly as the folder does) as a ``gpt2`` vocabulary (:func:`gguf_vocab_from_folder`):
tokens in id order (holes and the padding up to the model's vocabulary as ``[PADi]``, unused),
token types (added tokens: control when ``special``, else user-defined), merges as ``"a b"``, the
``tokenizer.ggml.pre`` name whose llama.cpp pre-tokenizer splits text as the file's does, the
bos/eos/unk/pad ids, ``add_bos_token`` and the chat template. A SentencePiece-style
``tokenizer.json`` alone (no ``tokenizer.model``: what mlx_lm.convert writes for Mixtral with
transformers 5) becomes a ``llama`` vocabulary (:func:`llama_vocab_from_tokenizer`).
"""
from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlxtral.display import show
from mlxtral.errors import TokenizerError

from .spm_proto import (
    BPE,
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    SpmModel,
    build_model,
    parse_model,
)

__all__ = ["write_gguf_tokenizer", "spm_model_from_gguf", "tokenizer_json_from_gguf",
           "tokenizer_json_from_spm", "write_spm_tokenizer_json", "gguf_vocab_from_folder",
           "llama_vocab_from_tokenizer", "pre_name"]


def _text(v: Any) -> str:
    return v.decode("utf-8", errors="replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _bytes(v: Any) -> bytes:
    return bytes(v) if isinstance(v, (bytes, bytearray)) else str(v).encode("utf-8")


def _opt_int(md: Mapping[str, Any], key: str, default: int | None) -> int | None:
    v = md.get(key)
    return default if v is None else int(v)


def _vocab(md: Mapping[str, Any]) -> tuple[list[Any], list[int]]:
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("the GGUF has no tokenizer.ggml.tokens")
    types = md.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    return list(tokens), types


def spm_model_from_gguf(md: Mapping[str, Any]) -> SpmModel:
    """The SentencePiece model a ``llama`` GGUF vocabulary describes."""
    tokens, types = _vocab(md)
    pieces = [_bytes(t) for t in tokens]
    if len(set(pieces)) != len(pieces):
        seen: set[bytes] = set()
        dup = next(p for p in pieces if p in seen or seen.add(p))  # type: ignore[func-returns-value]
        raise TokenizerError(f"the GGUF vocabulary holds the piece {show(dup)} twice; "
                             "a SentencePiece model cannot")
    scores = md.get("tokenizer.ggml.scores")
    scores = [float(s) for s in scores] if scores is not None else [0.0] * len(pieces)
    charsmap = md.get("tokenizer.ggml.precompiled_charsmap")
    if isinstance(charsmap, (bytes, bytearray)):
        charsmap = bytes(charsmap)
    elif charsmap is not None and len(charsmap):
        charsmap = bytes(bytearray(int(b) & 0xFF for b in charsmap))
    else:
        charsmap = b""
    unk = _opt_int(md, "tokenizer.ggml.unknown_token_id", 0)
    return SpmModel(
        pieces=pieces, scores=scores, types=types, model_type=BPE,
        byte_fallback=BYTE in types,
        unk_id=unk if unk is not None else 0,
        bos_id=_opt_int(md, "tokenizer.ggml.bos_token_id", -1),  # type: ignore[arg-type]
        eos_id=_opt_int(md, "tokenizer.ggml.eos_token_id", -1),  # type: ignore[arg-type]
        pad_id=_opt_int(md, "tokenizer.ggml.padding_token_id", -1),  # type: ignore[arg-type]
        add_dummy_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
        remove_extra_whitespaces=bool(md.get("tokenizer.ggml.remove_extra_whitespaces", False)),
        escape_whitespaces=True,
        normalizer_name="nmt_nfkc" if charsmap else "identity",
        precompiled_charsmap=charsmap,
    )


def tokenizer_json_from_gguf(md: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face ``tokenizer.json`` (dict) for a ``gpt2`` GGUF vocabulary."""
    from mlxtral.tokenizer.pretok import PreTokenizer

    tokens, types = _vocab(md)
    texts = [_text(t) for t in tokens]
    merges = md.get("tokenizer.ggml.merges")
    if not merges:
        raise TokenizerError("tokenizer.ggml.merges is missing (a gpt2 vocabulary needs it)")
    pre = md.get("tokenizer.ggml.pre")
    pretok, ignore_merges = PreTokenizer.for_pre(_text(pre) if pre is not None else None)
    vocab: dict[str, int] = {}
    added = []
    for i, (t, ty) in enumerate(zip(texts, types, strict=True)):
        if t in vocab:
            raise TokenizerError(f"the GGUF vocabulary holds the token {show(t)} twice "
                                 f"(ids {vocab[t]} and {i})")
        vocab[t] = i
        if ty in (CONTROL, USER_DEFINED):
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": ty == CONTROL})
    splits = [{"type": "Split", "pattern": {"Regex": p.pattern}, "behavior": "Isolated", "invert": False}
              for p in pretok.patterns]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, byte_level]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": [_text(m) for m in merges]},
    }


MAX_PIECE_CHARS = 1024  # sentencepiece trains pieces of at most 16 characters by default


def check_piece_lengths(m: SpmModel) -> None:
    """Refuse a normal piece longer than :data:`MAX_PIECE_CHARS`: the tokenizer.json's merges list
    every split of every piece, memory in the square of its length (a 200 KB piece: ~40 GB)."""
    for i, p in enumerate(m.pieces):
        n = len(p.decode("utf-8", "replace")) if len(p) > MAX_PIECE_CHARS else 0  # chars <= bytes
        if m.types[i] == NORMAL and n > MAX_PIECE_CHARS:
            raise TokenizerError(f"piece {i} is {n} characters long: a SentencePiece vocabulary's normal "
                                 f"pieces are short (at most {MAX_PIECE_CHARS} here)")


def tokenizer_json_from_spm(m: SpmModel) -> dict[str, Any]:
    """A Hugging Face ``tokenizer.json`` (dict) equivalent to a SentencePiece BPE model, built as
    transformers' ``LlamaConverter`` builds it: the merges are every split of a normal piece into
    two normal pieces, ranked by the merged piece's score (then by the parts' ids); the normalizer
    reproduces SentencePiece's (precompiled rules, extra-whitespace removal, dummy prefix, escaped
    spaces); a ``TemplateProcessing`` adds BOS."""
    if m.model_type != BPE:
        raise TokenizerError("only a SentencePiece BPE model can be written as a tokenizer.json")
    texts = [p.decode("utf-8", errors="replace") for p in m.pieces]
    vocab: dict[str, int] = {}
    for i, t in enumerate(texts):
        vocab.setdefault(t, i)
    normal = {t: i for i, t in enumerate(texts) if m.types[i] == NORMAL and vocab[t] == i}
    check_piece_lengths(m)
    ranked = []
    for piece, pid in normal.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        local = [(a, b) for a, b in local if a in normal and b in normal]
        local.sort(key=lambda ab: (normal[ab[0]], normal[ab[1]]))
        ranked.extend((-m.scores[pid], pid, a, b) for a, b in local)
    ranked.sort(key=lambda r: (r[0], r[1]))  # stable within a piece: its (left, right) id order
    merges = [[a, b] for _, _, a, b in ranked]
    norms: list[dict[str, Any]] = []
    if m.precompiled_charsmap:
        norms.append({"type": "Precompiled",
                      "precompiled_charsmap": base64.b64encode(m.precompiled_charsmap).decode("ascii")})
    if m.remove_extra_whitespaces:
        norms += [{"type": "Strip", "strip_left": True, "strip_right": True},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if m.add_dummy_prefix:
        norms.append({"type": "Prepend", "prepend": "\u2581"})
    if m.escape_whitespaces:
        norms.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    added = [{"id": i, "content": texts[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": m.types[i] in (CONTROL, UNKNOWN)}
             for i in range(len(texts)) if m.types[i] in (CONTROL, UNKNOWN, USER_DEFINED)]
    post = None
    if 0 <= m.bos_id < len(texts):
        bos = texts[m.bos_id]
        def part(kind: str, id_: str, type_id: int) -> dict[str, Any]:
            return {kind: {"id": id_, "type_id": type_id}}

        post = {"type": "TemplateProcessing",
                "single": [part("SpecialToken", bos, 0), part("Sequence", "A", 0)],
                "pair": [part("SpecialToken", bos, 0), part("Sequence", "A", 0),
                         part("SpecialToken", bos, 1), part("Sequence", "B", 1)],
                "special_tokens": {bos: {"id": bos, "ids": [m.bos_id], "tokens": [bos]}}}
    decoders: list[dict[str, Any]] = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}]
    if m.byte_fallback:
        decoders.append({"type": "ByteFallback"})
    decoders.append({"type": "Fuse"})
    if m.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = texts[m.unk_id] if 0 <= m.unk_id < len(texts) else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": norms} if norms else None,
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": m.byte_fallback,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def write_spm_tokenizer_json(model_file: Path, folder: Path) -> list[str]:
    """Write ``tokenizer.json`` for the SentencePiece ``model_file`` into ``folder`` when it is a BPE
    model (Mistral's and Llama's are); returns the names written (none for a unigram model)."""
    from mlxtral.formats.files import read_side_file

    m = parse_model(read_side_file(model_file, TokenizerError), model_file)
    if m.model_type != BPE:
        return []
    try:
        doc = tokenizer_json_from_spm(m)
    except TokenizerError as e:
        raise TokenizerError(e.message, e.path or model_file) from None
    (Path(folder) / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    return ["tokenizer.json"]


def tokenizer_config(md: Mapping[str, Any], kind: str, max_len: int) -> dict[str, Any]:
    tokens = md.get("tokenizer.ggml.tokens") or []

    def tok(key: str) -> str | None:
        i = md.get(key)
        return _text(tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else None

    cfg: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer" if kind == "llama" else "PreTrainedTokenizerFast",
        "bos_token": tok("tokenizer.ggml.bos_token_id"),
        "eos_token": tok("tokenizer.ggml.eos_token_id"),
        "unk_token": tok("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": max_len,
    }
    if kind == "llama":
        cfg["legacy"] = True
    template = md.get("tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = _text(template)
    return {k: v for k, v in cfg.items() if v is not None}


def write_gguf_tokenizer(md: Mapping[str, Any], folder: Path, max_len: int) -> list[str]:
    """Write the tokenizer files for the GGUF vocabulary ``md`` into ``folder``; returns their names."""
    model = md.get("tokenizer.ggml.model")
    kind = _text(model) if model is not None else None
    folder = Path(folder)
    if kind == "llama":
        spm = spm_model_from_gguf(md)
        (folder / "tokenizer.model").write_bytes(build_model(spm))
        written = ["tokenizer.model"]
        if spm.model_type == BPE:
            doc = json.dumps(tokenizer_json_from_spm(spm), ensure_ascii=False)
            (folder / "tokenizer.json").write_text(doc + "\n", encoding="utf-8")
            written.append("tokenizer.json")
    elif kind == "gpt2":
        doc = tokenizer_json_from_gguf(md)
        (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n",
                                               encoding="utf-8")
        written = ["tokenizer.json"]
    else:
        raise TokenizerError(f"cannot write tokenizer files for a {show(kind)} GGUF vocabulary "
                             "(only llama/SentencePiece and gpt2/byte-level BPE)")
    cfg = tokenizer_config(md, kind, max_len)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")
    return [*written, "tokenizer_config.json"]


# ---- a byte-level BPE tokenizer.json as a gpt2 GGUF vocabulary ---------------------------------------
# tokenizer.ggml.pre names llama.cpp knows, one per pre-tokenizer kind and ignore_merges flag (the
# first of llama.cpp's names for it); mlxtral.tokenizer.pretok holds the same table
PRE_NAMES = ("gpt-2", "llama-bpe", "dbrx", "smollm", "qwen2", "default", "falcon", "poro-chat", "viking",
             "tekken", "gpt-4o")
# splits the pre-tokenizers differ on: contractions in both cases, runs of 1-7 digits, spaces, tabs
# and newlines, punctuation runs, upper/lower-case words, letters of other scripts, emoji
PRE_PROBE = (
    "Hello world! I'm   HERE, you'LL see: don'T 3 33 333 4444 55555 1234567 x1y22z333 $5.99 a+b=c "
    "<tag>|pipe|^~ `tick` \n\t\r \n\n  \t trailing   \n CamelCaseWord ALLCAPS lowerUPPER "
    "Ünïcödé façade naïve ÉCOLE Ελληνικά русский 日本語の文 한국어 ١٢٣ ٣ 🤖🎉 👨‍👩‍👧 ...!!! ??? "
    "path/to/file.py foo_bar(x):\n    return x**2  # ok\n\n\n end"
)


def pre_name(pretok: Any, ignore_merges: bool, path: Path | None = None) -> str:
    """The ``tokenizer.ggml.pre`` value whose llama.cpp pre-tokenizer (regexes and ignore_merges)
    splits text as ``pretok`` does (same expressions, or the same pieces of :data:`PRE_PROBE`);
    a :class:`TokenizerError` when none does (llama.cpp refuses unknown names)."""
    from mlxtral.tokenizer.pretok import PreTokenizer

    ours = [p.pattern for p in pretok.patterns]
    want = None
    for name in PRE_NAMES:
        cand, ign = PreTokenizer.for_pre(name)
        if ign != ignore_merges:
            continue
        if [p.pattern for p in cand.patterns] == ours:
            return name
        if want is None:
            want = pretok.split(PRE_PROBE)
        if cand.split(PRE_PROBE) == want:
            return name
    raise TokenizerError("the pre-tokenizer of tokenizer.json matches none that llama.cpp knows "
                         f"({', '.join(PRE_NAMES)}), so a GGUF cannot carry it; convert to --format mlx",
                         path)


def _merge_text(a: str, b: str, path: Path) -> str:
    if not a or not b or " " in a[1:] or " " in b:  # "a b" must split back at its first space
        raise TokenizerError(f"the BPE merge {(a + ' ' + b)[:40]!r} cannot be stored in a GGUF "
                             "(a part holds a space)", path)
    return f"{a} {b}"


def llama_vocab_from_tokenizer(tok: Any, vocab_size: int, path: Path) -> dict[str, Any]:
    """``tokenizer.ggml.*`` values of a ``llama`` (SentencePiece) GGUF vocabulary for a
    SentencePiece-style tokenizer.json loaded on its own (no tokenizer.model): a piece's score is
    minus the rank of the first merge that makes it, so llama.cpp's best-score-first merging takes
    the merges in their order; pieces no merge makes score below every merge."""
    n = tok.vocab_size
    if n > vocab_size:
        raise TokenizerError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} "
                             "rows; a GGUF needs one row per token", path)
    tokens = [tok.id_to_piece(i) or f"[PAD{i}]" for i in range(n)]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types = [tok.token_type(i) for i in range(n)] + [UNUSED] * (vocab_size - n)
    made: dict[str, int] = {}
    for (a, b), r in tok._ranks.items():
        made.setdefault(a + b, r)
    lowest = -float(len(tok._ranks) + 1)
    scores = [-float(made[t]) if t in made else (lowest if len(t) > 1 else 0.0) for t in tokens]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.unknown_token_id": tok.unk_id,
        "tokenizer.ggml.add_bos_token": bool(tok.add_bos),
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": bool(tok.add_space_prefix),
        "tokenizer.chat_template": tok.chat_template,
    }
    return {k: v for k, v in md.items() if v is not None}


def gguf_vocab_from_folder(folder: Path, vocab_size: int) -> dict[str, Any]:
    """``tokenizer.ggml.*`` values (and ``tokenizer.chat_template``) for the byte-level BPE (or
    SentencePiece-style) ``tokenizer.json`` of ``folder``, as loaded by
    :func:`mlxtral.tokenizer.hf.load_hf_tokenizer`, padded to ``vocab_size`` tokens; every problem
    is a one-line error naming the file."""
    from mlxtral.config import read_json
    from mlxtral.tokenizer.hf import load_hf_tokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json"
    tok = load_hf_tokenizer(folder)
    if tok.kind == "llama" and getattr(tok, "_ranks", None) is not None:  # SentencePiece-style json
        return llama_vocab_from_tokenizer(tok, vocab_size, path)
    if tok.kind != "bpe":
        raise TokenizerError(f"expected a byte-level BPE tokenizer.json, got a {tok.kind} tokenizer", folder)
    n = tok.vocab_size
    if n > vocab_size:
        raise TokenizerError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} "
                             "rows; a GGUF needs one row per token", path)
    tokens = [tok.id_to_piece(i) for i in range(n)]
    types = [tok.token_type(i) for i in range(n)]
    for i in range(n):
        if types[i] == UNUSED and not tokens[i]:  # a hole in tokenizer.json's ids
            tokens[i] = f"[PAD{i}]"
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [UNUSED] * (vocab_size - n)
    ranks = tok._ranks  # (left, right) -> rank, the first occurrence of each merge
    if not ranks or getattr(tok, "_vocab_ranks", None) is not None:
        raise TokenizerError("a GGUF gpt2 vocabulary needs BPE merges, and this tokenizer has none (a "
                             "rank-only vocabulary); convert to --format mlx", path)
    merges = [_merge_text(a, b, path) for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    cfg_path = folder / "tokenizer_config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens[:n])}

    def special_id(key: str) -> int | None:
        v = cfg.get(key)
        text = v.get("content") if isinstance(v, dict) else v
        return ids.get(text) if isinstance(text, str) else None

    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_name(tok._pre, tok.ignore_merges, path),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.unknown_token_id": special_id("unk_token"),
        "tokenizer.ggml.padding_token_id": special_id("pad_token"),
        "tokenizer.ggml.add_bos_token": bool(tok.add_bos),
        "tokenizer.ggml.add_eos_token": cfg.get("add_eos_token") is True,
        "tokenizer.chat_template": tok.chat_template,
    }
    return {k: v for k, v in md.items() if v is not None}
