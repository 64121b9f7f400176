"""Constrained decoding for ``response_format`` with llguidance (JSON schema -> grammar -> token masks).

llguidance needs the vocabulary as byte strings: :meth:`Tokenizer.token_bytes` gives them, and
control tokens get llguidance's ``\\xff`` prefix so that no grammar ever matches their text. The
:class:`Constraint` of one request masks the logits before sampling (ids outside the grammar get
-inf; the end-of-sequence ids are allowed only where the grammar may end) and consumes each sampled
token.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from mlxtral.server.protocol import ApiError

_PROBE = "\n"
_WHITESPACE = {"whitespace_flexible": True, "whitespace_pattern": "( |\\n[ \\t]{0,20})?"}
_lock = threading.Lock()
_tokenizers: dict[int, Any] = {}  # id(mlxtral tokenizer) -> (tokenizer, LLTokenizer)


def _llg() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ApiError(400, "response_format needs the package llguidance on the server "
                            "(pip install 'mlxtral[serve]')", "response_format") from None
    return llguidance


def schema_grammar(schema: Any) -> str:
    """An llguidance grammar for a JSON schema; 400 when the schema cannot be compiled.

    A little whitespace may come first: SentencePiece models start an answer with a space-prefixed
    piece (``▁{``), which the decoded text then drops. Whitespace between tokens is bounded as in
    llama.cpp's JSON grammars (one space, or a newline and up to 20 spaces/tabs), so a model cannot
    fill max_tokens with blanks; a schema's own ``x-guidance`` options take precedence."""
    llg = _llg()
    if isinstance(schema, dict):
        own = schema.get("x-guidance") or {}
        if not isinstance(own, dict):
            raise ApiError(400, "response_format: the schema's x-guidance must be an object",
                           "response_format")
        schema = {**schema, "x-guidance": {**_WHITESPACE, **own}}
    try:
        lark = "start: /[ \\t\\n]{0,4}/ doc\ndoc: %json " + json.dumps(schema)
        g = llg.LLMatcher.grammar_from_lark(lark)
        err = llg.LLMatcher.validate_grammar(g)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"response_format: invalid JSON schema ({str(e)[:300]})",
                       "response_format") from None
    if err:
        raise ApiError(400, f"response_format: unsupported JSON schema ({err.splitlines()[0][:300]})",
                       "response_format")
    return g


class _Vocab:
    """What llguidance's TokenizerWrapper reads: byte strings, eos/bos, and an encoder."""

    def __init__(self, tok: Any) -> None:
        from mlxtral.tokenizer.base import CONTROL, UNKNOWN, UNUSED, USER_DEFINED

        self.tok = tok
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else min(tok.eos_ids)
        self.bos_token_id = tok.bos_id
        tokens = []
        for i in range(tok.vocab_size):
            t = tok.token_type(i)
            b = tok.token_bytes(i)
            marker = t == USER_DEFINED and b.startswith(b"<") and b.endswith(b">")
            if t in (CONTROL, UNKNOWN, UNUSED) or marker:
                b = b"\xff" + b
            tokens.append(b)
        self.tokens = tokens
        self._probe = tok.encode_plain(_PROBE)

    def __call__(self, s: str | bytes) -> list[int]:
        """Ids whose bytes are exactly ``s``: a SentencePiece vocabulary prepends a space to the
        text it encodes, so ``s`` is encoded after a newline whose ids are then dropped."""
        if isinstance(s, bytes):
            s = s.decode("utf-8", errors="replace")
        if not s:
            return []
        ids = self.tok.encode_plain(s)
        if b"".join(self.tok.token_bytes(i) for i in ids) == s.encode("utf-8"):
            return ids
        ids = self.tok.encode_plain(_PROBE + s)
        if ids[: len(self._probe)] == self._probe:
            return ids[len(self._probe) :]
        return self.tok.encode_plain(s)


def ll_tokenizer(tok: Any) -> Any:
    """The LLTokenizer of an mlxtral tokenizer, built once (about 0.2 s for 50k ids)."""
    llg = _llg()
    with _lock:
        hit = _tokenizers.get(id(tok))
        if hit is not None and hit[0] is tok:
            return hit[1]
        lt = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tok)), eos_token=sorted(tok.eos_ids))
        _tokenizers[id(tok)] = (tok, lt)
        return lt


class Constraint:
    """One request's grammar state."""

    def __init__(self, tok: Any, grammar: str) -> None:
        llg = _llg()
        self.lt = ll_tokenizer(tok)
        self.matcher = llg.LLMatcher(self.lt, grammar, log_level=0)
        if self.matcher.is_error():
            raise ApiError(400, f"response_format: {self.matcher.get_error()[:300]}", "response_format")
        words = (self.lt.vocab_size + 31) // 32
        self._mask = np.full(words, -1, dtype=np.int32)  # [ceil(V/32)] bit i of word w: id 32w+i allowed

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` [V] with every id the grammar forbids at -inf (a copy)."""
        m = self._mask
        self.matcher.unsafe_compute_mask_ptr(m.ctypes.data, m.nbytes)
        allowed = np.unpackbits(m.view(np.uint8), bitorder="little")[: logits.shape[0]].astype(bool)  # [V]
        out = np.array(logits, dtype=np.float32, copy=True)
        out[~allowed[: out.shape[0]]] = -np.inf
        return out

    def consume(self, token: int) -> None:
        self.matcher.consume_token(int(token))

    @property
    def done(self) -> bool:
        """The grammar accepts nothing more (the text is complete)."""
        return bool(self.matcher.is_stopped())

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None
