"""The tokenizer interface shared by every vocabulary kind, and the streaming decoder.

Decoding is defined once, on bytes: each id has a surface byte string (``token_bytes``), the
pieces are joined and decoded as UTF-8 with U+FFFD for invalid bytes. SentencePiece-style
vocabularies drop the leading space of the first text piece (the dummy prefix added at encode
time). ``StreamDecoder`` applies the same rule incrementally, so the concatenation of its
outputs always equals ``decode`` of the same ids.
"""
from __future__ import annotations

import codecs
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable

from mlxtral.tokenizer.special import SpecialSplitter

# GGUF token types (gguf.TokenType), also used for the other vocabulary kinds.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a turn in common chat formats (llama.cpp's end-of-generation list).
EOT_TEXTS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<|end_of_text|>",
)

_SURROGATE = re.compile("[\ud800-\udfff]")
_HEX = frozenset("0123456789abcdefABCDEF")
# token types that text merges into; CONTROL, USER_DEFINED, UNKNOWN, UNUSED and BYTE tokens never
# come out of merging text (as in sentencepiece): only the special-token splitter or the byte
# fallback produce them
_NOT_MERGEABLE = frozenset({UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE})


def mergeable(token_type: int) -> bool:
    """True for the token types a merge of text may produce (NORMAL, and unknown type numbers)."""
    return token_type not in _NOT_MERGEABLE


def byte_value(text: str) -> int | None:
    """The byte of a ``<0xHH>`` token text, None for anything else (``<0xZZ>``, ``<0x1>``...)."""
    if len(text) == 6 and text[:3] == "<0x" and text[5] == ">" and text[3] in _HEX and text[4] in _HEX:
        return int(text[3:5], 16)
    return None


def clean_text(text: str) -> str:
    """``text`` with lone surrogates (not encodable as UTF-8) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


class Tokenizer(ABC):
    """Text <-> token ids.

    Attributes:
        vocab_size: number of ids.
        bos_id / eos_id: begin / end of sequence ids (None if the vocabulary has none).
        eos_ids: every id that ends a turn (eos plus e.g. ChatML ``<|im_end|>``).
        add_bos: whether the file asks for BOS at the start of a prompt.
        chat_template: the Jinja chat template shipped with the file, if any.
        kind: ``"sentencepiece"`` | ``"llama"`` (GGUF SentencePiece) | ``"bpe"`` (byte-level BPE).
    """

    kind: str = ""
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    eos_ids: set[int]
    add_bos: bool = False
    chat_template: str | None = None
    #: Decode drops one leading space of the first text piece (SentencePiece dummy prefix).
    strip_leading_space: bool = False
    #: The file the vocabulary comes from, and the file the chat template comes from (for errors).
    source: str | None = None
    template_source: str | None = None
    #: The Mistral instruct format version the file states (tekken.json's ``config.version``).
    instruct_version: str | None = None
    _splitter: SpecialSplitter

    def encode(self, text: str, bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``bos`` prepends BOS; ``special`` parses control tokens in the text.

        As llama.cpp does, user-defined tokens (added tokens that are not special) written in the
        text are always matched; control tokens only with ``special``."""
        out: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        for frag in self._splitter.split(clean_text(text), special):
            if isinstance(frag, int):
                out.append(frag)
            else:
                self._encode_fragment(frag, out, False)
        return out

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: nothing in it becomes a control or user-defined token,
        whatever the vocabulary calls them (chat templates encode messages' contents this way, so
        a message cannot write the template's markers)."""
        out: list[int] = []
        text = clean_text(text)
        if text:
            self._encode_fragment(text, out, True)
        return out

    def special_fragments(self, text: str) -> list[str | int]:
        """``text`` split into raw text (str) and the ids of every special token written in it
        (control and user-defined alike): how a chat template's own text is read."""
        return self._splitter.split(clean_text(text), True)

    @abstractmethod
    def _encode_fragment(self, text: str, out: list[int], plain: bool) -> None:
        """Append the ids of ``text``, which holds no special token to split out; with ``plain``,
        no id of a control or user-defined token may be appended."""

    @abstractmethod
    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` as stored (``▁Hello``, ``<0x0A>``, ``ĠHello``...)."""

    @abstractmethod
    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry, or None."""

    @abstractmethod
    def token_type(self, i: int) -> int:
        """The GGUF token type of id ``i`` (NORMAL, CONTROL, BYTE, ...)."""

    @abstractmethod
    def token_bytes(self, i: int) -> bytes:
        """Surface bytes of id ``i`` in decoded text (control tokens: their text)."""

    def max_chars(self, n_tokens: int) -> int:
        """A bound on the characters ``n_tokens`` tokens can encode: text longer than this cannot fit
        them and is refused without being tokenized (an 8 MB prompt took minutes for a 4096-token
        context). Each token covers at most its longest piece's bytes; 4x spare for normalization."""
        if self._longest is None:
            self._longest = max((len(self.token_bytes(i)) for i in range(self.vocab_size)), default=1)
        return 4 * (n_tokens + 1) * max(self._longest, 1)

    _longest: int | None = None

    # ------------------------------------------------------------------ decoding
    def _check_id(self, i: int) -> None:
        if not 0 <= i < self.vocab_size:
            from mlxtral.errors import TokenizerError

            raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")

    def _piece_for_decode(self, i: int, first: bool, special: bool) -> tuple[bytes, bool]:
        """Bytes of id ``i`` in decoded text and whether it counts as a text piece.

        ``first`` is True while no text piece has been emitted yet.
        """
        self._check_id(i)
        t = self.token_type(i)
        if t == CONTROL or t == UNUSED:
            return (self.token_bytes(i) if special else b""), False
        b = self.token_bytes(i)
        if first and self.strip_leading_space and t == NORMAL and b.startswith(b" "):
            b = b[1:]
        return b, True

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of ``ids``; control tokens are dropped unless ``special``."""
        out: list[bytes] = []
        first = True
        for i in ids:
            b, is_text = self._piece_for_decode(int(i), first, special)
            if is_text:
                first = False
            out.append(b)
        return b"".join(out).decode("utf-8", errors="replace")

    @property
    def chat_template_name(self) -> str | None:
        """``"mistral"`` or ``"chatml"`` (see mlxtral.tokenizer.chat), None if neither applies."""
        from mlxtral.errors import TokenizerError
        from mlxtral.tokenizer.chat import template_name

        try:
            return template_name(self)
        except TokenizerError:
            return None

    def stream_decoder(self, special: bool = False, after: Iterable[int] = ()) -> StreamDecoder:
        """An incremental decoder: ``add(id)`` returns only complete new text. ``after``: the ids
        the text continues (a completion's prompt): once they hold text, the first new piece keeps
        its leading space (" Paris" after "The capital of France is"), as llama.cpp and OpenAI's
        completions give it; a chat answer starts its own text (no ``after``) and drops it."""
        dec = StreamDecoder(self, special)
        for i in after:
            if self._piece_for_decode(int(i), True, False)[1]:
                dec._first = False
                break
        return dec

    # ------------------------------------------------------------------ helpers
    def _eot_ids(self) -> set[int]:
        """eos plus the turn-ending control tokens this vocabulary has."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        for text in EOT_TEXTS:
            i = self.token_to_id(text)
            if i is not None and self.token_type(i) in (CONTROL, USER_DEFINED):
                ids.add(i)
        return ids

    # the names Hugging Face and mlx-lm tokenizers use
    @property
    def bos_token_id(self) -> int | None:
        return self.bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_id

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.eos_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


class StreamDecoder:
    """Turns generated ids into text as they come, never splitting a UTF-8 character.

    The concatenation of every ``add`` result and ``flush()`` equals ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self._tok = tokenizer
        self._special = special
        self._first = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        b, is_text = self._tok._piece_for_decode(int(token_id), self._first, self._special)
        if is_text:
            self._first = False
        return self._utf8.decode(b)

    def piece(self, token_id: int) -> bytes:
        """The bytes ``add(token_id)`` would add now: a token as this text shows it (a chat answer's
        first piece without its leading space), for logprobs that add up to the text."""
        return self._tok._piece_for_decode(int(token_id), self._first, self._special)[0]

    def flush(self) -> str:
        """The text still held back (an incomplete UTF-8 sequence becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
