"""Splitting text around special tokens written in it (``<s>``, ``<|im_start|>``...).

As llama.cpp does: user-defined tokens are always matched; control and unknown tokens only
when the caller asks to parse special tokens. Longer token texts win over shorter ones.
"""
from __future__ import annotations

import re
from collections.abc import Iterable


class SpecialSplitter:
    def __init__(self, always: Iterable[tuple[str, int]], on_request: Iterable[tuple[str, int]]) -> None:
        self._always = {t: i for t, i in always if t}
        self._all = dict(self._always)
        self._all.update({t: i for t, i in on_request if t})
        self._re_always = self._compile(self._always)
        self._re_all = self._compile(self._all)

    @staticmethod
    def _compile(texts: dict[str, int]) -> re.Pattern[str] | None:
        if not texts:
            return None
        alts = sorted(texts, key=lambda t: (-len(t), t))
        return re.compile("|".join(re.escape(t) for t in alts))

    def split(self, text: str, special: bool) -> list[str | int]:
        """``text`` as a list of raw text fragments (str) and special token ids (int)."""
        pat = self._re_all if special else self._re_always
        table = self._all if special else self._always
        if pat is None:
            return [text] if text else []
        out: list[str | int] = []
        pos = 0
        for m in pat.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(table[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out
