"""Environment variables mlxtral reads, each checked where it is read: a bad value is one line naming
the variable (:class:`UsageError`), never a traceback and never a silently different meaning.

Every reader takes the variable's name and its allowed range; the value shown in a message is cut
to a few dozen characters and escaped (:func:`mlxtral.display.term_safe`), whatever it holds. An
unset or empty variable is the default.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

from mlxtral.display import term_safe
from mlxtral.errors import UsageError

SHOWN_CHARS = 40  # at most this much of a bad value appears in a message
_MAX_NUMBER_CHARS = 32  # longer than any number we accept: refused before parsing
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def raw(name: str) -> str | None:
    """The variable's value with surrounding blanks removed; None when unset or empty."""
    v = os.environ.get(name)
    if v is None:
        return None
    v = v.strip()
    return v or None


def _bad(name: str, value: str, expected: str) -> UsageError:
    return UsageError(f"{name}={term_safe(value, SHOWN_CHARS)}: expected {expected}")


def env_int(name: str, default: int, lo: int, hi: int, what: str = "") -> int:
    """A whole number in ``[lo, hi]`` (``what`` names the unit in the message, e.g. "threads")."""
    v = raw(name)
    if v is None:
        return default
    expected = f"a whole number of {what} from {lo} to {hi}" if what else f"a whole number from {lo} to {hi}"
    digits = v[1:] if v[:1] == "+" else v
    if len(v) > _MAX_NUMBER_CHARS or not digits.isascii() or not digits.isdigit():
        raise _bad(name, v, expected)
    n = int(digits)
    if not lo <= n <= hi:
        raise _bad(name, v, expected)
    return n


def env_float(name: str, default: float, lo: float, hi: float, what: str = "") -> float:
    """A finite number in ``[lo, hi]``."""
    v = raw(name)
    if v is None:
        return default
    expected = f"a number of {what} from {lo:g} to {hi:g}" if what else f"a number from {lo:g} to {hi:g}"
    try:
        x = float(v) if len(v) <= _MAX_NUMBER_CHARS and v.isascii() else math.nan
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or not lo <= x <= hi:
        raise _bad(name, v, expected)
    return x


def env_flag(name: str) -> bool:
    """On (1, true, yes, on) or off (0, false, no, off, or unset), in any case."""
    v = raw(name)
    if v is None:
        return False
    low = v.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise _bad(name, v, "1 or 0 (true/false, yes/no, on/off)")


def env_choice(name: str, choices: Sequence[str]) -> str | None:
    """One of ``choices`` (case-insensitive, returned in lower case); None when unset."""
    v = raw(name)
    if v is None:
        return None
    low = v.lower()
    if low not in choices:
        raise _bad(name, v, "one of " + ", ".join(choices))
    return low


def env_path(name: str) -> str | None:
    """A path (not checked for existence here: the caller says what it must be); None when unset."""
    v = raw(name)
    if v is None:
        return None
    if len(v) > 4096:
        raise _bad(name, v, "a path of at most 4096 characters")
    return v
