"""File-derived values in messages: bounded, and safe to print on a terminal.

Everything a checkpoint holds (tensor names, metadata strings, pickle objects, JSON values) is
written by whoever made the file. Three functions make such values fit for an error line or a table:

- :func:`show` renders any value as a short ``repr``-like string with a fixed budget: it visits at
  most :data:`MAX_NODES` objects (a pickle's tuple DAG of 2**100 leaves costs the same as a small
  one), cuts every string before formatting it, never formats a huge integer in full and never
  calls an unknown object's ``repr``; the result is at most ``limit`` characters.
- :func:`plain` is the same for a name shown without quotes (a tensor or file name).
- :func:`term_safe` renders control characters (C0, DEL, C1: ESC/CSI/OSC sequences), bidi
  overrides and other invisible format characters visibly as ``\\x1b``/``\\u202e`` escapes, so file
  text can neither drive the terminal nor reorder what is shown. The CLI applies it to every error
  line and to ``info``'s tables; :func:`text_safe`, its lighter form that keeps line breaks, to
  generated text and echoed input written to a terminal.
"""
from __future__ import annotations

import unicodedata
from typing import Any

MAX_NODES = 64  # objects one show() visits
MAX_INT_DIGITS = 40  # larger integers are shown by their size, not their digits
DEFAULT_LIMIT = 80
# Unicode categories rendered as escapes: control, format (bidi overrides, zero-width marks),
# surrogates (lone ones come from surrogateescape), line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape_char(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def term_safe(text: str, limit: int | None = None) -> str:
    """``text`` with every control, format or separator character written as a visible escape
    (``\\x1b``, ``\\x9b``, ``\\u202e``); cut to ``limit`` characters (with ``...``) if given."""
    cut = limit is not None and len(text) > limit
    if limit is not None:
        text = text[:limit]  # escaping only lengthens: never look at more than the limit
    if not text.isprintable():  # else plain printable text: nothing to escape
        text = "".join(_escape_char(c) if unicodedata.category(c) in _UNSAFE_CATEGORIES else c
                       for c in text)
    if limit is not None and (cut or len(text) > limit):
        return text[: max(limit - 3, 0)] + "..."
    return text


_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def markup_safe(value: Any, limit: int = 300) -> str:
    """``value`` (a path, a file name) for a rich markup string: terminal-safe (:func:`term_safe`)
    and escaped, so ``x[/dim]`` or ``[bold]`` in it is text, never markup."""
    from rich.markup import escape

    return escape(term_safe(str(value), limit))


def text_safe(text: str) -> str:
    """Generated text for a terminal: line breaks and tabs kept, every other control character
    (ESC, CSI, OSC: a vocabulary's token can hold ``\x1b]52;...``, which writes the clipboard) and
    the bidi controls written as visible escapes; everything else (emoji joiners included) as is.
    For a pipe or a file the CLI writes the text unchanged."""
    if text.isprintable() or all(c in "\n\t" or c.isprintable() for c in text):
        return text
    return "".join(_escape_char(c) if (c not in "\n\t" and unicodedata.category(c) == "Cc") or c in _BIDI
                   else c for c in text)


def plain(value: Any, limit: int = 100) -> str:
    """A name as is (no quotes), bounded and terminal-safe; a value that is not a string as
    :func:`show` renders it."""
    return term_safe(value, limit) if isinstance(value, str) else show(value, limit)


def _int_text(v: int) -> str:
    if -(10 ** MAX_INT_DIGITS) < v < 10 ** MAX_INT_DIGITS:
        return str(v)
    return f"<{'-' if v < 0 else ''}integer of {v.bit_length()} bits>"


def _scalar(v: Any, limit: int) -> str | None:
    """The text of a leaf value, or None for a container."""
    if v is None or isinstance(v, (bool, float)):
        return repr(v)
    if isinstance(v, int):
        return _int_text(v)
    if isinstance(v, str):
        return repr(v[: limit + 1])[: limit + 2]
    if isinstance(v, (bytes, bytearray)):
        return repr(bytes(v[: limit + 1]))[: limit + 3]
    if isinstance(v, (list, tuple, dict)):
        return None
    return f"<{type(v).__name__}>"  # an unknown object: its repr could run anything


def show(value: Any, limit: int = DEFAULT_LIMIT) -> str:
    """A ``repr``-like rendering of ``value`` of at most ``limit`` characters, made from at most
    :data:`MAX_NODES` objects whatever the value's size, depth or sharing, terminal-safe."""
    out: list[str] = []
    size = 0
    nodes = 0
    # a stack of pending pieces: either a value to render or a literal string
    stack: list[tuple[bool, Any]] = [(True, value)]
    while stack and size <= limit:
        is_value, item = stack.pop()
        if not is_value:
            out.append(item)
            size += len(item)
            continue
        nodes += 1
        if nodes > MAX_NODES:
            stack.append((is_value, item))  # unfinished: the result ends with "..."
            break
        text = _scalar(item, limit)
        if text is not None:
            out.append(text)
            size += len(text)
            continue
        if isinstance(item, dict):
            opener, closer = "{", "}"
            children: list[tuple[bool, Any]] = []
            for i, (k, v) in enumerate(item.items()):
                if i >= MAX_NODES:
                    children.append((False, ", ..."))
                    break
                if i:
                    children.append((False, ", "))
                children += [(True, k), (False, ": "), (True, v)]
        else:
            opener, closer = ("[", "]") if isinstance(item, list) else ("(", ")")
            children = []
            for i, v in enumerate(item):
                if i >= MAX_NODES:
                    children.append((False, ", ..."))
                    break
                if i:
                    children.append((False, ", "))
                children.append((True, v))
            if isinstance(item, tuple) and len(item) == 1:
                children.append((False, ","))
        out.append(opener)
        size += 1
        stack.append((False, closer))
        stack.extend(reversed(children))
    text = "".join(out)
    if stack or len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    return term_safe(text)
