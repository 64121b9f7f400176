"""``load_tokenizer``: one entry point for every tokenizer source a checkpoint can name."""
from __future__ import annotations

from pathlib import Path

from mlxtral.errors import TokenizerError
from mlxtral.formats import TokenizerSource
from mlxtral.tokenizer.base import Tokenizer


def load_tokenizer(source: TokenizerSource | str | Path) -> Tokenizer:
    """A tokenizer from a ``TokenizerSource`` (or a path: a ``tokenizer.model`` file or an HF folder).

    Every :class:`TokenizerError` names a file: the source's, when the error does not name one."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        kind = "hf" if p.is_dir() else "tekken" if p.suffix == ".json" else "sentencepiece"
        source = TokenizerSource(kind, p)
    where = source.folder if source.folder is not None else source.path
    try:
        tok = _load(source)
    except TokenizerError as e:
        if e.path is None and where is not None:
            raise TokenizerError(e.message, where) from None
        raise
    if tok.source is None and where is not None:
        tok.source = str(where)
    if tok.chat_template and tok.template_source is None:
        tok.template_source = tok.source
    return tok


def check_tokenizer_fits(tok: Tokenizer, n_embeddings: int, weights: str | Path | None = None) -> None:
    """TokenizerError unless every id ``tok`` can produce has a row in the model's embedding
    (``n_embeddings``, the model's vocabulary size): a larger tokenizer would look up rows that do
    not exist. An embedding larger than the tokenizer (padded vocabularies) is fine."""
    if tok.vocab_size > n_embeddings:
        where = f" ({weights})" if weights is not None else ""
        raise TokenizerError(f"the tokenizer has {tok.vocab_size} tokens but the model's embedding{where} "
                             f"has {n_embeddings} rows: ids {n_embeddings} to {tok.vocab_size - 1} have no "
                             "embedding", tok.source)


def _load(source: TokenizerSource) -> Tokenizer:
    if source.kind == "sentencepiece":
        if source.folder is not None:  # an HF folder's tokenizer.model, with its tokenizer_config.json
            from mlxtral.tokenizer.hf import load_hf_tokenizer

            return load_hf_tokenizer(source.folder)
        from mlxtral.tokenizer.spm import SentencePieceTokenizer

        if source.path is None:
            raise TokenizerError("a SentencePiece tokenizer source needs a path")
        template = source.metadata.get("tokenizer.chat_template") if source.metadata else None
        if template is not None and not isinstance(template, str):
            raise TokenizerError("the chat template must be a string", source.path)
        return SentencePieceTokenizer(source.path, chat_template=template)
    if source.kind == "tekken":
        from mlxtral.tokenizer.tekken import TekkenTokenizer

        if source.path is None:
            raise TokenizerError("a tekken tokenizer source needs a path")
        return TekkenTokenizer(source.path)
    if source.kind == "gguf":
        from mlxtral.tokenizer.gguf import from_gguf_metadata

        return from_gguf_metadata(source.metadata, str(source.path) if source.path else None)
    if source.kind == "hf":
        from mlxtral.tokenizer.hf import load_hf_tokenizer

        if source.path is None:
            raise TokenizerError("a Hugging Face tokenizer source needs a folder")
        return load_hf_tokenizer(source.path)
    from mlxtral.display import show

    raise TokenizerError(f"unknown tokenizer source kind {show(source.kind, 30)} (sentencepiece, tekken, "
                         "gguf or hf)")
