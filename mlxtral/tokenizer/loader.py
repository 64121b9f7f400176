"""``load_tokenizer``: one entry point for every tokenizer source a checkpoint can name."""
from __future__ import annotations

from pathlib import Path

from mlxtral.errors import TokenizerError
from mlxtral.formats import TokenizerSource
from mlxtral.tokenizer.base import Tokenizer


def load_tokenizer(source: TokenizerSource | str | Path) -> Tokenizer:
    """A tokenizer from a ``TokenizerSource`` (or a path: a ``tokenizer.model`` file or an HF folder)."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        source = TokenizerSource("hf", p) if p.is_dir() else TokenizerSource("sentencepiece", p)
    if source.kind == "sentencepiece":
        from mlxtral.tokenizer.spm import SentencePieceTokenizer

        if source.path is None:
            raise TokenizerError("a SentencePiece tokenizer source needs a path")
        template = source.metadata.get("tokenizer.chat_template") if source.metadata else None
        return SentencePieceTokenizer(source.path, chat_template=template)
    if source.kind == "gguf":
        from mlxtral.tokenizer.gguf import from_gguf_metadata

        return from_gguf_metadata(source.metadata, str(source.path) if source.path else None)
    if source.kind == "hf":
        from mlxtral.tokenizer.hf import load_hf_tokenizer

        if source.path is None:
            raise TokenizerError("a Hugging Face tokenizer source needs a folder")
        return load_hf_tokenizer(source.path)
    raise TokenizerError(f"unknown tokenizer source kind {source.kind!r} (sentencepiece, gguf or hf)")
