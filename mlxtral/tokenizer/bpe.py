"""Byte-level BPE (GPT-2 style): GGUF ``tokenizer.ggml.model = gpt2`` and HF ``tokenizer.json``.

Text is split into words by the pre-tokenizer regexes, each word's UTF-8 bytes are mapped to
printable characters (GPT-2's byte-to-unicode table), then pairs are merged by merge rank
(lowest first, leftmost on ties, with a heap) as llama.cpp's ``llm_tokenizer_bpe`` does. Short
words are cached.
"""
from __future__ import annotations

from collections.abc import Sequence

from mlxtral.display import show
from mlxtral.errors import TokenizerError
from mlxtral.tokenizer.base import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    Tokenizer,
    byte_value,
    mergeable,
)
from mlxtral.tokenizer.merge import merge_pairs
from mlxtral.tokenizer.pretok import PreTokenizer
from mlxtral.tokenizer.special import SpecialSplitter


def _bytes_to_unicode() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}
# str.translate table: a latin-1 decoded byte string -> GPT-2's printable characters.
_TRANSLATE = {b: c for b, c in BYTE_TO_UNICODE.items()}


def parse_merges(merges: Sequence[str | Sequence[str]]) -> dict[tuple[str, str], int]:
    """``["a b", ...]`` (or ``[["a", "b"], ...]``) -> {(a, b): rank}; the first occurrence wins."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, m in enumerate(merges):
        if isinstance(m, str):
            cut = m.find(" ", 1)
            if cut < 0:
                raise TokenizerError(f"malformed BPE merge {show(m, 60)} (rank {rank}): expected 'a b'")
            pair = (m[:cut], m[cut + 1 :])
        elif isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(x, str) for x in m):
            pair = (m[0], m[1])
        else:
            raise TokenizerError(f"malformed BPE merge {show(m, 60)} (rank {rank}): expected 'a b' or "
                                 "a pair of strings")
        ranks.setdefault(pair, rank)
    return ranks


class ByteLevelBPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str | Sequence[str]],
        pretokenizer: PreTokenizer,
        *,
        token_types: Sequence[int] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = False,
        ignore_merges: bool = False,
        chat_template: str | None = None,
        vocab_ranks: dict[str, int] | None = None,
    ) -> None:
        """``vocab_ranks`` (tiktoken-style vocabularies such as Mistral's tekken): the rank of a pair
        is the rank of the token its concatenation makes, and ``merges`` is not used."""
        self._tokens = list(tokens)
        self.vocab_size = len(self._tokens)
        if not self.vocab_size:
            raise TokenizerError("empty vocabulary")
        types = list(token_types) if token_types is not None else [NORMAL] * self.vocab_size
        if len(types) != self.vocab_size:
            raise TokenizerError(f"{len(types)} token types for {self.vocab_size} tokens")
        self._types = [int(t) for t in types]
        self._ids: dict[str, int] = {}
        self._merge_ids: dict[str, int] = {}  # the tokens merging text may produce
        for i, t in enumerate(self._tokens):
            self._ids[t] = i  # the last duplicate wins, as in llama.cpp
            if mergeable(self._types[i]):
                self._merge_ids[t] = i
        self._ranks = parse_merges(merges) if vocab_ranks is None else {}
        self._vocab_ranks = vocab_ranks
        self._pre = pretokenizer
        self.ignore_merges = ignore_merges
        for name, i in (("bos", bos_id), ("eos", eos_id)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{name} token id {i} is outside the vocabulary ({self.vocab_size})")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self._bytes = [self._surface(i) for i in range(self.vocab_size)]
        always = [(t, i) for i, t in enumerate(self._tokens) if self._types[i] == USER_DEFINED]
        on_request = [(t, i) for i, t in enumerate(self._tokens) if self._types[i] in (CONTROL, UNKNOWN)]
        self._splitter = SpecialSplitter(always, on_request)
        self._cache: dict[str, tuple[int, ...]] = {}
        self.eos_ids = self._eot_ids()

    def _surface(self, i: int) -> bytes:
        t, text = self._types[i], self._tokens[i]
        if t in (CONTROL, USER_DEFINED, UNKNOWN):
            return text.encode("utf-8")
        if t == BYTE:
            b = byte_value(text)
            if b is None:
                raise TokenizerError(f"token {i} is a BYTE token but its text {show(text, 40)} is not <0xHH>")
            return bytes([b])
        out = bytearray()
        for c in text:
            b = UNICODE_TO_BYTE.get(c)
            if b is None:
                out += c.encode("utf-8", errors="replace")
            else:
                out.append(b)
        return bytes(out)

    # ------------------------------------------------------------------ encoding
    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """Ids of one byte-mapped word: llama.cpp's (and HF tokenizers') BPE, the lowest-ranked
        adjacent pair merged first (leftmost on ties), with a heap: O(n log n) in the word length."""
        ids = self._merge_ids
        if self.ignore_merges and word in ids:
            return (ids[word],)
        ranks, vranks = self._ranks, self._vocab_ranks
        if vranks is None:
            syms = merge_pairs(list(word), lambda a, b: ranks.get((a, b)))
        else:
            syms = merge_pairs(list(word), lambda a, b: vranks.get(a + b))
        out: list[int] = []
        for p in syms:
            i = ids.get(p)
            if i is not None:
                out.append(i)
                continue
            for c in p:  # not in the vocabulary: one token per byte; bytes without one are
                j = ids.get(c)  # dropped, as HF tokenizers and llama.cpp do
                if j is not None:
                    out.append(j)
        return tuple(out)

    def _encode_fragment(self, text: str, out: list[int], plain: bool) -> None:
        # merging only ever produces mergeable (normal) tokens: plain text needs nothing more
        cache = self._cache
        for word in self._pre.split(text):
            ids = cache.get(word)
            if ids is None:
                mapped = word.encode("utf-8").decode("latin-1").translate(_TRANSLATE)
                ids = self._bpe_word(mapped)
                if len(cache) < 200_000 and len(word) <= 256:
                    cache[word] = ids
            out.extend(ids)

    # ------------------------------------------------------------------ vocabulary
    def id_to_piece(self, i: int) -> str:
        self._check_id(i)
        return self._tokens[i]

    def token_to_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def token_type(self, i: int) -> int:
        return self._types[i]

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]
