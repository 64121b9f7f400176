"""Build a tokenizer from GGUF metadata (a dict of decoded ``tokenizer.*`` values)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlxtral.errors import TokenizerError
from mlxtral.tokenizer.base import Tokenizer

_UNK = "tokenizer.ggml.unknown_token_id"


def _opt_int(md: Mapping[str, Any], key: str) -> int | None:
    v = md.get(key)
    return None if v is None else int(v)


def _text(v: Any) -> str:
    return v.decode("utf-8", errors="replace") if isinstance(v, (bytes, bytearray)) else str(v)


def from_gguf_metadata(md: Mapping[str, Any], path: str | None = None) -> Tokenizer:
    """A tokenizer for ``tokenizer.ggml.model`` ``llama`` (SentencePiece) or ``gpt2`` (byte-level BPE)."""
    try:
        return _build(md)
    except TokenizerError as e:
        if path is not None and e.path is None:
            raise TokenizerError(e.message, path) from e
        raise


def _build(md: Mapping[str, Any]) -> Tokenizer:
    model = md.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError("no tokenizer in this GGUF (tokenizer.ggml.model is missing)")
    model = _text(model)
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("tokenizer.ggml.tokens is missing or empty")
    tokens = [_text(t) for t in tokens]
    types = md.get("tokenizer.ggml.token_type")
    template = md.get("tokenizer.chat_template")
    template = _text(template) if template is not None else None
    bos = _opt_int(md, "tokenizer.ggml.bos_token_id")
    eos = _opt_int(md, "tokenizer.ggml.eos_token_id")

    if model == "llama":
        from mlxtral.tokenizer.llama_spm import LlamaSpmTokenizer

        return LlamaSpmTokenizer(
            tokens,
            md.get("tokenizer.ggml.scores"),
            types,
            bos_id=bos,
            eos_id=eos,
            unk_id=_opt_int(md, "tokenizer.ggml.unknown_token_id") if _UNK in md else 0,
            add_bos=bool(md.get("tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
            chat_template=template,
        )
    if model == "gpt2":
        from mlxtral.tokenizer.bpe import ByteLevelBPETokenizer
        from mlxtral.tokenizer.pretok import PreTokenizer

        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("tokenizer.ggml.merges is missing (needed by a gpt2 vocabulary)")
        pre = md.get("tokenizer.ggml.pre")
        pretok, ignore_merges = PreTokenizer.for_pre(_text(pre) if pre is not None else None)
        return ByteLevelBPETokenizer(
            tokens,
            [_text(m) for m in merges],
            pretok,
            token_types=types,
            bos_id=bos,
            eos_id=eos,
            add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
            ignore_merges=ignore_merges,
            chat_template=template,
        )
    raise TokenizerError(f"unsupported tokenizer.ggml.model {model!r} (supported: llama, gpt2)")
