"""SentencePiece BPE from a GGUF vocabulary (``tokenizer.ggml.model = llama``), as llama.cpp does it.

Spaces become U+2581 and a space is prefixed to each text fragment; symbols start as single
characters and the adjacent pair whose concatenation is the highest-scoring vocabulary entry
is merged first (leftmost on ties); symbols that are not in the vocabulary fall back to
``<0xXX>`` byte tokens. When no vocabulary entry holds a non-U+2581 character followed by
U+2581 (true of SentencePiece vocabularies trained with whitespace splitting, e.g. Mistral's),
merges can never cross such a boundary, so the text is cut there and each word is merged on its
own and cached, giving the same ids much faster.
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
from mlxtral.tokenizer.special import SpecialSplitter

SPACE = "\u2581"


class LlamaSpmTokenizer(Tokenizer):
    kind = "llama"
    strip_leading_space = True

    def __init__(
        self,
        tokens: Sequence[str],
        scores: Sequence[float] | None,
        token_types: Sequence[int] | None,
        *,
        bos_id: int | None = 1,
        eos_id: int | None = 2,
        unk_id: int | None = 0,
        add_bos: bool = True,
        add_space_prefix: bool = True,
        chat_template: str | None = None,
        merges: dict[tuple[str, str], int] | None = None,
    ) -> None:
        self._ranks = merges  # ranked merges (a tokenizer.json's BPE model) instead of the scores
        self._tokens = list(tokens)
        n = self.vocab_size = len(self._tokens)
        if not n:
            raise TokenizerError("empty vocabulary")
        self._scores = [float(s) for s in scores] if scores is not None else [0.0] * n
        self._types = [int(t) for t in token_types] if token_types is not None else [NORMAL] * n
        if len(self._scores) != n or len(self._types) != n:
            raise TokenizerError(f"{n} tokens, {len(self._scores)} scores, {len(self._types)} token types")
        for name, i in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id)):
            if i is not None and not 0 <= i < n:
                raise TokenizerError(f"{name} token id {i} is outside the vocabulary (size {n})")
        self._ids: dict[str, int] = {}
        self._merge_ids: dict[str, int] = {}  # the tokens merging text may produce
        for i, t in enumerate(self._tokens):
            self._ids[t] = i  # the last duplicate wins, as in llama.cpp
            if mergeable(self._types[i]):
                self._merge_ids[t] = i
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.add_bos = add_bos and bos_id is not None
        self.add_space_prefix = add_space_prefix
        self.prefix_unless_space = False  # Hugging Face's Metaspace: no prefix on text that starts with one
        self.strip_leading_space = add_space_prefix  # decode drops the prefix encode added
        self.chat_template = chat_template
        self._byte_ids = [self._ids.get(f"<0x{b:02X}>") for b in range(256)]
        self._bytes = [self._surface(i) for i in range(n)]
        always = [(t, i) for i, t in enumerate(self._tokens) if self._types[i] == USER_DEFINED]
        on_request = [(t, i) for i, t in enumerate(self._tokens) if self._types[i] in (CONTROL, UNKNOWN)]
        self._splitter = SpecialSplitter(always, on_request)
        self._word_split = not any(self._crosses_space(t) for t in self._tokens)
        self._cache: dict[str, tuple[int, ...]] = {}
        self.eos_ids = self._eot_ids()

    @staticmethod
    def _crosses_space(t: str) -> bool:
        k = t.find(SPACE, 1)
        while k > 0:
            if t[k - 1] != SPACE:
                return True
            k = t.find(SPACE, k + 1)
        return False

    def _surface(self, i: int) -> bytes:
        t, text = self._types[i], self._tokens[i]
        if t == BYTE:
            b = byte_value(text)
            if b is None:
                raise TokenizerError(f"token {i} is a BYTE token but its text {show(text, 40)} is not <0xHH>")
            return bytes([b])
        if t == UNKNOWN:
            return " \u2047 ".encode()  # as sentencepiece renders <unk>
        if t == CONTROL:
            return text.encode("utf-8")
        return text.replace(SPACE, " ").encode("utf-8")

    # ------------------------------------------------------------------ encoding
    def _merge(self, text: str) -> tuple[int, ...]:
        """llama.cpp's llm_tokenizer_spm on one (already escaped) string."""
        ids, scores, ranks = self._merge_ids, self._scores, self._ranks

        def priority(a: str, b: str) -> float | None:
            if ranks is not None:  # Hugging Face's BPE with byte fallback: the lowest-ranked merge first
                return ranks.get((a, b))
            tid = ids.get(a + b)
            return None if tid is None else -scores[tid]  # the best-scored piece first

        out: list[int] = []
        for s in merge_pairs(list(text), priority):
            tid = ids.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for byte in s.encode("utf-8"):
                    bid = self._byte_ids[byte]
                    if bid is None:
                        if self.unk_id is None:
                            raise TokenizerError(f"byte {byte:#04x} has no <0x..> token and no <unk>",
                                                 self.source)
                        bid = self.unk_id
                    out.append(bid)
        return tuple(out)

    def _encode_text(self, text: str, out: list[int]) -> None:
        if not text:
            return
        if not self._word_split:
            out.extend(self._merge(text))
            return
        cache = self._cache
        start = 0
        n = len(text)
        while start < n:
            # a word: a run of U+2581 then everything up to the next U+2581
            k = start
            while k < n and text[k] == SPACE:
                k += 1
            e = text.find(SPACE, k)
            if e < 0:
                e = n
            word = text[start:e]
            ids = cache.get(word)
            if ids is None:
                ids = self._merge(word)
                if len(cache) < 200_000 and len(word) <= 256:
                    cache[word] = ids
            out.extend(ids)
            start = e

    def _encode_fragment(self, text: str, out: list[int], plain: bool) -> None:
        # merging only ever produces mergeable (normal) tokens, the fallback byte tokens and <unk>:
        # plain text needs nothing more
        if self.add_space_prefix and not (self.prefix_unless_space and text.startswith((" ", SPACE))):
            text = " " + text
        self._encode_text(text.replace(" ", SPACE), out)

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
