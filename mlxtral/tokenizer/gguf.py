"""Build a tokenizer from GGUF metadata (a dict of decoded ``tokenizer.*`` values).

The GGUF parser already checks every key's type; the values are checked again here because
``from_gguf_metadata`` is public and takes any mapping: a wrong type is one TokenizerError line.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mlxtral.errors import TokenizerError
from mlxtral.tokenizer.base import Tokenizer

_UNK = "tokenizer.ggml.unknown_token_id"


def _opt_int(md: Mapping[str, Any], key: str) -> int | None:
    v = md.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TokenizerError(f"{key} must be an integer, not {type(v).__name__}")
    return int(v)


def _opt_bool(md: Mapping[str, Any], key: str, default: bool) -> bool:
    v = md.get(key, default)
    if not isinstance(v, (bool, int, np.bool_, np.integer)):
        raise TokenizerError(f"{key} must be a bool, not {type(v).__name__}")
    return bool(v)


def _text(v: Any, key: str = "a tokenizer string") -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", errors="replace")
    raise TokenizerError(f"{key} must be a string, not {type(v).__name__}")


def _array(md: Mapping[str, Any], key: str, kinds: tuple[type, ...], what: str) -> list[Any] | None:
    v = md.get(key)
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        raise TokenizerError(f"{key} must be an array of {what}, not {type(v).__name__}")
    for k, x in enumerate(v):
        if not isinstance(x, kinds) or isinstance(x, bool):
            raise TokenizerError(f"{key}[{k}] must be {what[:-1]}, not {type(x).__name__}")
    return list(v)


def from_gguf_metadata(md: Mapping[str, Any], path: str | None = None) -> Tokenizer:
    """A tokenizer for ``tokenizer.ggml.model`` ``llama`` (SentencePiece) or ``gpt2`` (byte-level BPE)."""
    try:
        tok = _build(md)
    except TokenizerError as e:
        if path is not None and e.path is None:
            raise TokenizerError(e.message, path) from None
        raise
    tok.source = path
    if tok.chat_template:
        tok.template_source = path
    return tok


def _build(md: Mapping[str, Any]) -> Tokenizer:
    model = md.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError("no tokenizer in this GGUF (tokenizer.ggml.model is missing)")
    model = _text(model, "tokenizer.ggml.model")
    tokens = _array(md, "tokenizer.ggml.tokens", (str, bytes, bytearray), "strings")
    if not tokens:
        raise TokenizerError("tokenizer.ggml.tokens is missing or empty")
    tokens = [_text(t) for t in tokens]
    types = _array(md, "tokenizer.ggml.token_type", (int, np.integer), "integers")
    template = md.get("tokenizer.chat_template")
    template = _text(template, "tokenizer.chat_template") if template is not None else None
    bos = _opt_int(md, "tokenizer.ggml.bos_token_id")
    eos = _opt_int(md, "tokenizer.ggml.eos_token_id")

    if model == "llama":
        from mlxtral.tokenizer.llama_spm import LlamaSpmTokenizer

        return LlamaSpmTokenizer(
            tokens,
            _array(md, "tokenizer.ggml.scores", (int, float, np.integer, np.floating), "numbers"),
            types,
            bos_id=bos,
            eos_id=eos,
            unk_id=_opt_int(md, "tokenizer.ggml.unknown_token_id") if _UNK in md else 0,
            add_bos=_opt_bool(md, "tokenizer.ggml.add_bos_token", True),
            add_space_prefix=_opt_bool(md, "tokenizer.ggml.add_space_prefix", True),
            chat_template=template,
        )
    if model == "gpt2":
        from mlxtral.tokenizer.bpe import ByteLevelBPETokenizer
        from mlxtral.tokenizer.pretok import PreTokenizer

        merges = _array(md, "tokenizer.ggml.merges", (str, bytes, bytearray), "strings")
        if merges is None:
            raise TokenizerError("tokenizer.ggml.merges is missing (needed by a gpt2 vocabulary)")
        pre = md.get("tokenizer.ggml.pre")
        pre = _text(pre, "tokenizer.ggml.pre") if pre is not None else None
        pretok, ignore_merges = PreTokenizer.for_pre(pre)
        return ByteLevelBPETokenizer(
            tokens,
            [_text(m) for m in merges],
            pretok,
            token_types=types,
            bos_id=bos,
            eos_id=eos,
            add_bos=_opt_bool(md, "tokenizer.ggml.add_bos_token", False),
            ignore_merges=ignore_merges,
            chat_template=template,
        )
    from mlxtral.display import show

    raise TokenizerError(f"unsupported tokenizer.ggml.model {show(model, 40)} (supported: llama, gpt2)")
