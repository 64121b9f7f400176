"""JSON from a checkpoint's files (``config.json``, ``params.json``, safetensors headers, shard
indexes, tokenizer files): whatever the text, a Python value or one
:class:`~mlxtral.errors.MlxtralError` line.

Python's :func:`json.loads` raises ``ValueError`` for an integer of over 4300 digits,
``RecursionError`` for nesting deeper than the interpreter's stack, ``UnicodeDecodeError`` for
bytes that are not UTF-8, and silently keeps the last of two equal keys. :func:`parse_json` turns
each of those into one line naming the file:

- an integer longer than :data:`MAX_INT_DIGITS` digits is refused (no size, count or id needs more;
  tokenizer configs write ``1000000000000000019884624838656``, 31 digits);
- nesting too deep, bytes that are not UTF-8 and syntax errors are refused;
- with ``unique_keys`` (model definitions: ``config.json``, ``params.json``, safetensors headers,
  shard indexes), a key repeated in one object is refused: two readers of the same file (mlxtral,
  transformers, safetensors' Rust parser) must not see two different models.

``NaN``, ``Infinity`` and huge floats such as ``1e999`` (inf) parse as Python's ``json`` does, so
that the value's own check names the key (``rms_norm_eps must be a positive finite number, got
nan``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlxtral.display import show, term_safe
from mlxtral.errors import FormatError, MlxtralError

MAX_INT_DIGITS = 100


class _Refused(ValueError):
    """Raised inside the parser's hooks; becomes the caller's error class."""


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {digits} digits")
    return int(text)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Refused(f"the key {show(k, 60)} appears twice in one object")
            seen.add(k)
    return d


def parse_json(raw: bytes | str, path: str | Path | None, error: type[MlxtralError] = FormatError,
               subject: str = "", unique_keys: bool = False) -> Any:
    """The value of the JSON text ``raw`` (bytes must be UTF-8); ``error(message, path)`` for anything
    else. ``subject`` starts the message (``"safetensors header"`` -> ``safetensors header is not
    valid JSON (...)``); ``unique_keys`` refuses a key repeated in one object."""
    head = f"{subject} is not valid JSON" if subject else "not valid JSON"
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        hook = _unique_object if unique_keys else None
        return json.loads(text, parse_int=_parse_int, object_pairs_hook=hook)
    except RecursionError:
        raise error(f"{head} (nested too deeply)", path) from None
    except UnicodeDecodeError as e:
        raise error(f"{head} (not UTF-8 text: byte {e.start})", path) from None
    except json.JSONDecodeError as e:
        raise error(f"{head} ({e.msg} at line {e.lineno} column {e.colno})", path) from None
    except ValueError as e:  # _Refused, or anything else the decoder refuses
        raise error(f"{head} ({term_safe(str(e), 100)})", path) from None
