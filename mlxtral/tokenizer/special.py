"""Splitting text around special tokens written in it (``<s>``, ``<|im_start|>``...).

As llama.cpp does: user-defined tokens are always matched; control and unknown tokens only
when the caller asks to parse special tokens. At each position the longest token wins, and the
leftmost match comes first.

The token texts come from the file, so matching is a walk down a character trie from each
position where a token can start (found by one character-class scan), never a regular expression
built from them: the cost is at most ``len(text) * MAX_SPECIAL_LEN`` steps, whatever the tokens.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from mlxtral.errors import TokenizerError

#: Longest special or added token text matched in text (real ones are under 40 characters).
MAX_SPECIAL_LEN = 256
#: All special and added token texts together (a trie node is ~100 bytes a character: ~200 MB at
#: most; the largest real sets, thousands of reserved tokens, are a few hundred kB).
MAX_SPECIAL_TOTAL = 1 << 20

_END = ""  # trie key of the token id ending at a node (token texts are never empty)
_Trie = dict[str, "_Trie | int"]


class _Matcher:
    """Leftmost-longest matching of a set of token texts."""

    def __init__(self, texts: dict[str, int]) -> None:
        self.root: _Trie = {}
        for t, i in texts.items():
            node = self.root
            for c in t:
                child = node.get(c)
                if child is None:
                    child = node[c] = {}
                node = child  # type: ignore[assignment]
            node[_END] = i
        firsts = "".join(sorted(self.root))
        self.starts = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]")

    def split(self, text: str) -> list[str | int]:
        out: list[str | int] = []
        pos = start = 0
        n = len(text)
        root, search = self.root, self.starts.search
        while start < n:
            m = search(text, start)
            if m is None:
                break
            i = m.start()
            node: _Trie = root
            best, best_end = None, i
            j = i
            while j < n:
                nxt = node.get(text[j])
                if nxt is None:
                    break
                node = nxt  # type: ignore[assignment]
                j += 1
                tid = node.get(_END)
                if tid is not None:
                    best, best_end = tid, j
            if best is None:
                start = i + 1
                continue
            if i > pos:
                out.append(text[pos:i])
            out.append(best)  # type: ignore[arg-type]
            pos = start = best_end
        if pos < n:
            out.append(text[pos:])
        return out


class SpecialSplitter:
    """``split(text, special)``: raw text fragments (str) and special token ids (int)."""

    def __init__(self, always: Iterable[tuple[str, int]], on_request: Iterable[tuple[str, int]]) -> None:
        self._always = {t: i for t, i in always if t}
        self._all = dict(self._always)
        self._all.update({t: i for t, i in on_request if t})
        total = 0
        for t, i in self._all.items():
            if len(t) > MAX_SPECIAL_LEN:
                raise TokenizerError(f"special token {i} is {len(t)} characters long "
                                     f"(special and added tokens are at most {MAX_SPECIAL_LEN})")
            total += len(t)
        if total > MAX_SPECIAL_TOTAL:
            raise TokenizerError(f"{len(self._all)} special and added tokens of {total} characters in all "
                                 f"(at most {MAX_SPECIAL_TOTAL})")
        self._m_always = _Matcher(self._always) if self._always else None
        self._m_all = _Matcher(self._all) if self._all else None

    def split(self, text: str, special: bool) -> list[str | int]:
        """``text`` as a list of raw text fragments (str) and special token ids (int)."""
        m = self._m_all if special else self._m_always
        if m is None:
            return [text] if text else []
        return m.split(text)
