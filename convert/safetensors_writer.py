"""Streaming safetensors writer: the header is laid out from shapes first, data written piecewise.

Format: 8-byte little-endian header length, a JSON header (``dtype``, ``shape``,
``data_offsets`` per tensor, ``__metadata__``) padded with spaces to a multiple of 8, then the raw
data without holes. Tensors are placed 4-byte dtypes first so every uint32/float32 tensor stays
4-byte aligned in a memory map.
"""
from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

DTYPES = {"U32": 4, "F32": 4, "BF16": 2, "F16": 2, "U8": 1}


class SafetensorsWriter:
    """Declare every tensor (name, dtype, shape), then write each one, whole or in pieces."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata or {}
        self.entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.written: dict[str, int] = {}
        self.f: BinaryIO | None = None
        self.data_start = 0

    @staticmethod
    def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype]

    def declare(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if self.f is not None:
            raise RuntimeError("declare() after open()")
        if dtype not in DTYPES:
            raise ValueError(f"unsupported safetensors dtype {dtype}")
        self.entries[name] = (dtype, tuple(int(s) for s in shape))

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(d, s) for d, s in self.entries.values())

    def open(self) -> None:
        order = sorted(self.entries, key=lambda n: (-DTYPES[self.entries[n][0]], n))
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        pos = 0
        for n in order:
            dtype, shape = self.entries[n]
            size = self.nbytes(dtype, shape)
            self.offsets[n] = (pos, pos + size)
            header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
            pos += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.data_start = 8 + len(raw)
        self.f.truncate(self.data_start + pos)

    def write(self, name: str, data: np.ndarray, offset: int = 0) -> None:
        """Write ``data`` (raw bytes of the declared dtype) at byte ``offset`` inside ``name``."""
        if self.f is None:
            self.open()
        assert self.f is not None
        begin, end = self.offsets[name]
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        if begin + offset + buf.nbytes > end:
            raise ValueError(f"{name}: write past the end of the tensor")
        self.f.seek(self.data_start + begin + offset)
        self.f.write(buf)
        self.written[name] = self.written.get(name, 0) + buf.nbytes

    def close(self) -> None:
        """Finish the file: every declared tensor must have been written in full. Only on success:
        after an error, call :meth:`abort` (or use the writer as a context manager)."""
        if self.f is None:
            self.open()
        assert self.f is not None
        short = [n for n, (b, e) in self.offsets.items() if self.written.get(n, 0) != e - b]
        f, self.f = self.f, None
        f.close()
        if short:
            raise RuntimeError(f"{self.path}: tensors not fully written: {short[:3]}")

    def abort(self) -> None:
        """Close the file handle after an error, without the completeness check and without
        raising (the exception being handled is the one to report); the caller deletes the file."""
        f, self.f = self.f, None
        if f is not None:
            with contextlib.suppress(OSError):  # e.g. flushing the buffer onto a full disk again
                f.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
