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
- ``tokenizer_config.json`` with the bos/eos tokens, ``add_bos_token`` / ``add_eos_token`` and the
  GGUF's ``tokenizer.chat_template``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlxtral.errors import TokenizerError

from .spm_proto import BPE, BYTE, CONTROL, NORMAL, USER_DEFINED, SpmModel, build_model

__all__ = ["write_gguf_tokenizer", "spm_model_from_gguf", "tokenizer_json_from_gguf"]


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
        raise TokenizerError(f"the GGUF vocabulary holds the piece {dup!r} twice; "
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
            raise TokenizerError(f"the GGUF vocabulary holds the token {t!r} twice (ids {vocab[t]} and {i})")
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
        (folder / "tokenizer.model").write_bytes(build_model(spm_model_from_gguf(md)))
        written = ["tokenizer.model"]
    elif kind == "gpt2":
        doc = tokenizer_json_from_gguf(md)
        (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n",
                                               encoding="utf-8")
        written = ["tokenizer.json"]
    else:
        raise TokenizerError(f"cannot write tokenizer files for a {kind!r} GGUF vocabulary "
                             "(only llama/SentencePiece and gpt2/byte-level BPE)")
    cfg = tokenizer_config(md, kind, max_len)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")
    return [*written, "tokenizer_config.json"]
