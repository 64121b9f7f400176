"""Tokenizers (SentencePiece, GGUF llama/gpt2 vocabularies, HF folders) and chat templates.

    from mlxtral.tokenizer import load_tokenizer, apply_chat_template
    tok = load_tokenizer(checkpoint.tokenizer)
    ids = apply_chat_template(tok, [{"role": "user", "content": "Hello"}])
    dec = tok.stream_decoder()
    for i in generated: print(dec.add(i), end="")
    print(dec.flush())
"""
from __future__ import annotations

from mlxtral.tokenizer.base import StreamDecoder, Tokenizer
from mlxtral.tokenizer.chat import apply_chat_template, chat_delta, template_name, validate_messages
from mlxtral.tokenizer.gguf import from_gguf_metadata
from mlxtral.tokenizer.loader import check_tokenizer_fits, load_tokenizer
from mlxtral.tokenizer.spm import SentencePieceTokenizer

__all__ = [
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "apply_chat_template",
    "chat_delta",
    "check_tokenizer_fits",
    "from_gguf_metadata",
    "load_tokenizer",
    "template_name",
    "validate_messages",
]
