"""safetensors reader: validated header, then zero-copy NumPy views of a read-only memory map.

File layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}``),
then the data region; offsets are relative to the data region.

Everything in the header is checked before anything is mapped or allocated: header length
against the file size, every dtype known, every shape made of sane non-negative integers,
``numel x itemsize == end - begin``, offsets inside the data region, no two tensors overlapping.
Any violation is a :class:`FormatError` naming the file.

Tensors come back as :class:`SafeTensor` (dtype code, shape, a zero-copy view; BF16 as the
uint16 bits). ``SafeTensor.qtensor()`` wraps F32/F16/BF16 as a :class:`QTensor` without copying.
Integer dtypes (MLX's uint32-packed weights) stay raw NumPy arrays.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.display import plain, show
from mlxtral.errors import FormatError
from mlxtral.formats.files import open_regular
from mlxtral.formats.mapped import watch
from mlxtral.jsonfile import parse_json
from mlxtral.qtensor import QTensor

# safetensors dtype code -> NumPy dtype of the stored bytes (little-endian)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # bfloat16 bits; NumPy has no bfloat16
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
MAX_DIMS = 8
MAX_DIM = 1 << 40


@dataclass(frozen=True, eq=False)
class SafeTensor:
    dtype: str  # safetensors code: "F32", "BF16", "U32", ...
    shape: tuple[int, ...]
    data: np.ndarray  # zero-copy, read-only view of the file (BF16 as uint16)

    def qtensor(self) -> QTensor:
        """F32/F16/BF16 (zero-copy) or F64 (converted) as a QTensor; other dtypes are an error."""
        if self.dtype in ("F32", "F16", "BF16"):
            return QTensor(self.dtype, self.shape, self.data)
        if self.dtype == "F64":
            return QTensor("F32", self.shape, self.data.astype(np.float32))
        raise ValueError(f"{self.dtype} tensor is not a float weight")

    def float32(self) -> np.ndarray:
        """A float32 copy (small tensors: norms, routers)."""
        if self.dtype == "BF16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data.astype(np.float32)


class SafetensorsFile:
    """One open ``.safetensors`` file. Keep the object alive as long as its views are in use."""

    def __init__(self, path: Path, tensors: dict[str, SafeTensor], metadata: dict[str, str],
                 mm: mmap.mmap | None) -> None:
        self.path = path
        self.tensors = tensors
        self.metadata = metadata
        self._mmap = mm

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> SafeTensor:
        return self.tensors[name]

    def keys(self) -> list[str]:
        return list(self.tensors)


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str | Path) -> tuple[dict[str, _Entry], dict[str, str], int, int]:
    """Parse and validate the header only: (entries, ``__metadata__``, data start, file size)."""
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise FormatError(f"not a safetensors file ({size} bytes, shorter than the 8-byte header "
                                  "length)", path)
            (n,) = struct.unpack("<Q", f.read(8))
            if n < 2 or n > MAX_HEADER_BYTES:
                raise FormatError(f"safetensors header length {n} is not plausible (file truncated or "
                                  "not safetensors)", path)
            if 8 + n > size:
                raise FormatError(f"safetensors header length {n} runs past the end of the file "
                                  f"({size} bytes): truncated", path)
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror})", path) from None
    # huge integers, deep nesting and a tensor named twice are one line too
    header = parse_json(raw, path, FormatError, "safetensors header", unique_keys=True)
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not a JSON object", path)
    data_start = 8 + n
    data_len = size - data_start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError("safetensors __metadata__ must map strings to strings", path)
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        entries[name] = _check_entry(name, info, data_len, path)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise FormatError(f"tensors {show(n0)} and {show(n1)} overlap (bytes {b0}-{e0} and {b1}-...)",
                              path)
    return entries, meta, data_start, size


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(name: str, info: Any, data_len: int, path: Path) -> _Entry:
    if not isinstance(info, dict):
        raise FormatError(f"tensor {show(name)}: header entry is not an object", path)
    dtype = info.get("dtype")
    shape = info.get("shape")
    offs = info.get("data_offsets")
    if not isinstance(dtype, str):
        raise FormatError(f"tensor {show(name)}: missing dtype", path)
    if dtype not in DTYPES:
        raise FormatError(f"tensor {show(name)}: unsupported dtype {show(dtype)}", path)
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        raise FormatError(f"tensor {show(name)}: bad shape {show(shape)}", path)
    if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
            or not 0 <= offs[0] <= offs[1]):
        raise FormatError(f"tensor {show(name)}: bad data_offsets {show(offs)}", path)
    begin, end = offs
    if end > data_len:
        raise FormatError(f"tensor {show(name)}: data_offsets {offs} run past the end of the data "
                          f"({data_len} bytes): truncated or lying header", path)
    numel = span = 1
    for d in shape:
        numel *= d  # Python ints: no overflow
        span *= max(d, 1)
    if numel == 0 and span > MAX_DIM:  # an empty [2**40, 2**40, 0]: no array is that shape
        raise FormatError(f"tensor {show(name)}: bad shape {show(shape)}", path)
    nbytes = numel * DTYPES[dtype].itemsize
    if nbytes != end - begin:
        raise FormatError(f"tensor {show(name)}: shape {shape} of {dtype} needs {nbytes} bytes but "
                          f"data_offsets span {end - begin}", path)
    return _Entry(name, dtype, tuple(shape), begin, end)


def open_safetensors(path: str | Path) -> SafetensorsFile:
    """Validate the header, then memory-map the file read-only and return zero-copy views."""
    path = Path(path)
    entries, meta, data_start, size = read_header(path)
    mm: mmap.mmap | None = None
    if size > data_start:
        try:
            with open_regular(path) as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                watch(path, f.fileno(), mm)  # a truncation while in use: one line, not a dead process
        except (OSError, ValueError) as e:
            from mlxtral.address_space import map_error  # ulimit -v: the whole file is mapped

            if isinstance(e, OSError) and (why := map_error(path, size, e)) is not None:
                raise why from None
            raise FormatError(f"cannot memory-map ({plain(str(e))})", path) from None
        if len(mm) != size:
            raise FormatError("file changed size while being opened", path)
    tensors: dict[str, SafeTensor] = {}
    for name, e in entries.items():
        dt = DTYPES[e.dtype]
        count = (e.end - e.begin) // dt.itemsize
        if count == 0 or mm is None:
            arr = np.zeros(e.shape, dtype=dt)
        else:
            arr = np.frombuffer(mm, dtype=dt, count=count, offset=data_start + e.begin).reshape(e.shape)
        tensors[name] = SafeTensor(e.dtype, e.shape, arr)
    return SafetensorsFile(path, tensors, meta, mm)


def tensor_names(path: str | Path) -> list[str]:
    """Names in a safetensors file, reading only (and validating) its header."""
    entries, _, _, _ = read_header(path)
    return list(entries)
