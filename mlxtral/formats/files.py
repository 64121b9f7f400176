"""Opening checkpoint files and reading side files: regular files only. A FIFO blocks ``open()``
forever and a device (``/dev/zero``) never ends; both are refused up front with one line.

:func:`open_regular` opens a checkpoint (read in place, memory-mapped); :func:`read_side_file`
(and ``read_side_text`` / ``read_side_json``) reads a configuration, tokenizer or template file
whole, with a size cap per kind of file. Every side file the package reads goes through it."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from mlxtral.errors import FormatError, MlxtralError

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_regular(path: str | Path) -> BinaryIO:
    """``open(path, "rb")`` for a regular file (symlinks followed); :class:`FormatError` for
    anything else. OSErrors of the open itself (missing, no permission) propagate."""
    fd = os.open(path, os.O_RDONLY | _NONBLOCK)  # a FIFO without a writer: returns at once
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError("not a regular file (a pipe, device or socket cannot be a checkpoint)", path)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ---- side files: configuration, tokenizer and template files beside the weights ----------------
# A side file is read whole into memory, so each kind has a size cap proportionate to what a real
# one can be (with a wide margin): a FIFO, a device or a 9 GB "tokenizer_config.json" is refused
# with one line before anything is read. Largest real files seen: config.json ~50 KB,
# tokenizer_config.json ~2 MB (long added-token tables), tokenizer.json ~35 MB (Gemma 3),
# a SentencePiece tokenizer.model ~5 MB, tekken.json ~20 MB, a shard index ~10 MB.
_MB = 1 << 20
SIDE_FILE_LIMITS: dict[str, int] = {
    "config.json": 16 * _MB,
    "params.json": 16 * _MB,
    "generation_config.json": 16 * _MB,
    "special_tokens_map.json": 16 * _MB,
    "tokenizer_config.json": 16 * _MB,
    "added_tokens.json": 16 * _MB,
    "chat_template.jinja": 4 * _MB,
    "chat_template.json": 4 * _MB,
    "tokenizer.json": 128 * _MB,
    "tekken.json": 128 * _MB,
    "tokenizer.model": 64 * _MB,
    "model.safetensors.index.json": 64 * _MB,
    "pytorch_model.bin.index.json": 64 * _MB,
}
DEFAULT_SIDE_FILE_LIMIT = 16 * _MB


def side_file_limit(path: str | Path) -> int:
    """The size cap of a side file, by its name (``tokenizer.model.v3`` as ``tokenizer.model``)."""
    name = Path(path).name
    if name.startswith("tokenizer.model"):
        name = "tokenizer.model"
    elif name.endswith(".index.json"):
        name = "model.safetensors.index.json"
    elif name.startswith("tekken") and name.endswith(".json"):
        name = "tekken.json"
    return SIDE_FILE_LIMITS.get(name, DEFAULT_SIDE_FILE_LIMIT)


def _size(n: int) -> str:
    return f"{n / _MB:.1f} MB" if n >= _MB else f"{n} bytes"


def read_side_file(path: str | Path, error: type[MlxtralError] = FormatError,
                   limit: int | None = None) -> bytes:
    """The bytes of a side file (``config.json``, ``tokenizer.json``, ``chat_template.jinja``...).

    Only a regular file (symlinks followed) of at most ``limit`` bytes (default: the cap of its
    kind, :func:`side_file_limit`) is read, and never more than that many bytes even if it grows
    while being read. Anything else (missing, a folder, a pipe, a device, too large, unreadable)
    raises ``error`` (a :class:`MlxtralError` subclass) with one line naming the file."""
    cap = side_file_limit(path) if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error("file not found", path) from None
    except OSError as e:
        raise error(f"cannot read ({e.strerror or type(e).__name__})", path) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error("is a folder, not a file", path)
        if not stat.S_ISREG(st.st_mode):
            raise error("not a regular file (a pipe, device or socket is refused)", path)
        if st.st_size > cap:
            kind = f"a {Path(path).name} file" if limit is None else "this file"  # the caller named the cap
            raise error(f"is {_size(st.st_size)}: larger than {kind} can be (at most {_size(cap)})", path)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        chunks: list[bytes] = []
        got = 0
        while got <= cap:
            # ask for what the file holds (+1 to see growth): os.read allocates what is asked for
            b = os.read(fd, min(cap + 1 - got, max(st.st_size + 1 - got, 4096), 1 << 20))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > cap:
            raise error(f"grew past {_size(cap)} while being read", path)
        return b"".join(chunks)
    except OSError as e:
        raise error(f"cannot read ({e.strerror or type(e).__name__})", path) from None
    finally:
        os.close(fd)


def read_side_text(path: str | Path, error: type[MlxtralError] = FormatError,
                   limit: int | None = None) -> str:
    """A side file as UTF-8 text (a leading BOM dropped); invalid UTF-8 is ``error``, one line."""
    data = read_side_file(path, error, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"not UTF-8 text (invalid byte at offset {e.start})", path) from None


def read_side_json(path: str | Path, error: type[MlxtralError] = FormatError,
                   limit: int | None = None, unique_keys: bool = False) -> Any:
    """A side file parsed as JSON (any JSON value: the caller checks its type); what the parser
    refuses (syntax, nesting, huge integers, repeated keys with ``unique_keys``) is ``error``, one
    line (:func:`mlxtral.jsonfile.parse_json`)."""
    from mlxtral.jsonfile import parse_json

    return parse_json(read_side_text(path, error, limit), path, error, unique_keys=unique_keys)
