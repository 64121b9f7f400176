"""Counts in messages: ``1 token``, ``2 tokens``, ``0 tokens`` (every count goes through :func:`plural`)."""
from __future__ import annotations

_IRREGULAR = {"entry": "entries", "is": "are", "was": "were", "matrix": "matrices"}


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``f"{n} {noun}"`` with the noun in the plural unless ``n`` is 1 (``many``: the plural form,
    by default ``noun + "s"`` or a known irregular one)."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {many or _IRREGULAR.get(noun, noun + 's')}"
