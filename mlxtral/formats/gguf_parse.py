"""A fast, defensive GGUF v2/v3 parser: header, metadata, tensor infos, zero-copy tensor views.

Layout (little-endian): ``b"GGUF"``, u32 version, u64 tensor_count, u64 kv_count, the key/values
(string key, u32 value type, value), the tensor infos (string name, u32 n_dims, n_dims x u64 dims
innermost-first, u32 ggml type, u64 offset relative to the data start), padding to
``general.alignment`` (default 32), then the tensor data. A string is a u64 length + UTF-8 bytes;
an array is a u32 element type + u64 count + the elements.

Every count, length and offset is checked against the bytes that are left in the file before
anything is read or allocated, so a lying header (a tensor_count of 2**60, a string of 2**63
bytes, dims whose product overflows) is refused in microseconds. Any problem is one
:class:`~mlxtral.errors.FormatError` naming the file. Tensor data are zero-copy views of one
read-only :class:`numpy.memmap` of the file; string arrays are decoded in one tight loop (the
SmolLM2 vocabulary, 49152 tokens + 48900 merges, parses in tens of milliseconds).

Deliberately independent of the ``gguf`` package (importing it costs seconds); the tests check
that both read the same values and bytes.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.display import plain, show
from mlxtral.errors import FormatError
from mlxtral.formats.files import open_regular
from mlxtral.formats.mapped import watch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
INT64_MAX = (1 << 63) - 1
# No real vocabulary or merge list is near this; it bounds the Python objects a lying file can make.
MAX_ARRAY_LEN = 1 << 24
MAX_ARRAY_DEPTH = 3
MAX_STRING_BYTES = 64 << 20  # one metadata string (chat templates are tens of kB)
MAX_STRING_ARRAY_BYTES = 256 << 20  # all the strings of one array (a 256k vocabulary is ~4 MB)
MAX_KEY_BYTES = 64 << 10
MAX_NAME_BYTES = 1024  # llama.cpp's own limit on tensor names is 63 bytes
_CHUNK = 1 << 20

# ggml type id -> (name, block size in elements, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
# Element-wise types: their views come back typed (BF16 as its uint16 bits).
ELEMENT_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
}

# Metadata value types: id -> (name, struct format or None, size)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALARS: dict[int, tuple[str, str, np.dtype]] = {
    UINT8: ("uint8", "<B", np.dtype("u1")), INT8: ("int8", "<b", np.dtype("i1")),
    UINT16: ("uint16", "<H", np.dtype("<u2")), INT16: ("int16", "<h", np.dtype("<i2")),
    UINT32: ("uint32", "<I", np.dtype("<u4")), INT32: ("int32", "<i", np.dtype("<i4")),
    FLOAT32: ("float32", "<f", np.dtype("<f4")), BOOL: ("bool", "<B", np.dtype("u1")),
    UINT64: ("uint64", "<Q", np.dtype("<u8")), INT64: ("int64", "<q", np.dtype("<i8")),
    FLOAT64: ("float64", "<d", np.dtype("<f8")),
}
_INT_TYPES = (UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64)
_FLOAT_TYPES = (FLOAT32, FLOAT64)
_MIN_VALUE_BYTES = {t: s[2].itemsize for t, s in _SCALARS.items()} | {STRING: 8, ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

# Types the keys we read must have: "int", "float" (an int is accepted), "str", "bool",
# "[str]", "[float]", "[int]". Keys with the "{arch}." prefix are checked for the file's architecture.
ARCH_KEY_TYPES: dict[str, str] = {
    "context_length": "int", "embedding_length": "int", "block_count": "int",
    "feed_forward_length": "int", "attention.head_count": "int", "attention.head_count_kv": "int",
    "attention.key_length": "int", "attention.value_length": "int",
    "attention.layer_norm_rms_epsilon": "float",
    "rope.freq_base": "float", "rope.dimension_count": "int", "expert_count": "int",
    "expert_used_count": "int", "vocab_size": "int",
}
KEY_TYPES: dict[str, str] = {
    "general.architecture": "str", "general.alignment": "int", "general.name": "str",
    "tokenizer.ggml.model": "str", "tokenizer.ggml.pre": "str", "tokenizer.ggml.tokens": "[str]",
    "tokenizer.ggml.scores": "[float]", "tokenizer.ggml.token_type": "[int]",
    "tokenizer.ggml.merges": "[str]", "tokenizer.ggml.bos_token_id": "int",
    "tokenizer.ggml.eos_token_id": "int", "tokenizer.ggml.unknown_token_id": "int",
    "tokenizer.ggml.padding_token_id": "int", "tokenizer.ggml.add_bos_token": "bool",
    "tokenizer.ggml.add_eos_token": "bool", "tokenizer.ggml.add_space_prefix": "bool",
    "tokenizer.chat_template": "str",
}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a bool",
               "[str]": "an array of strings", "[float]": "an array of numbers",
               "[int]": "an array of integers"}


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    name: str
    qtype: str  # ggml type name: "F32", "Q4_0", ...
    shape: tuple[int, ...]  # NumPy order (outermost first); GGUF lists dims the other way round
    offset: int  # absolute offset of the first byte in the file
    nbytes: int
    data: np.ndarray  # zero-copy view: typed for element types, else uint8 [..., row_bytes]


@dataclass(eq=False)
class GGUFFile:
    path: Path
    version: int
    alignment: int
    data_start: int
    metadata: dict[str, Any]  # plain Python values; arrays as lists
    value_types: dict[str, int]  # key -> GGUF value type (ARRAY for arrays)
    array_types: dict[str, int]  # array key -> element type
    tensors: list[GGUFTensor]
    mm: np.memmap | None = field(repr=False, default=None)  # keeps the views valid

    def tensor(self, name: str) -> GGUFTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


class _Cursor:
    """Reads little-endian values from a buffer, checking every length against the end first."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.end = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> FormatError:
        return FormatError(what, self.path)

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes, "
                            f"only {self.end - self.pos} left in the file")

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str, limit: int | None = None) -> str:
        limit = MAX_STRING_BYTES if limit is None else limit
        n = self.u64(f"{what} length")
        self.need(n, what)
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long, more than the {limit} mlxtral accepts")
        start, self.pos = self.pos, self.pos + n
        try:
            return str(self.buf[start:self.pos], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def count(self, n: int, min_bytes: int, what: str) -> None:
        """``n`` items of at least ``min_bytes`` each must fit in what is left of the file."""
        left = self.end - self.pos
        if n * min_bytes > left:
            raise self.fail(f"{what} {n} is impossible: {n} items need at least {n * min_bytes} "
                            f"bytes, only {left} left in the file")

    def string_array(self, n: int, what: str) -> list[str]:
        """``n`` strings in one tight loop over 1 MiB ``bytes`` chunks (lengths checked as read)."""
        buf, pos, end = self.buf, self.pos, self.end
        start = pos
        unpack = struct.Struct("<Q").unpack_from
        out: list[str] = [""] * n
        base = pos  # file offset of chunk[0]
        chunk = bytes(buf[pos:min(end, pos + _CHUNK)])
        clen = len(chunk)
        i = 0
        try:
            for i in range(n):
                rel = pos - base
                if rel + 8 > clen:
                    if end - pos < 8:
                        raise self.fail(f"truncated: {what} element {i} of {n}")
                    base, rel, chunk = pos, 0, bytes(buf[pos:min(end, pos + max(_CHUNK, 8))])
                    clen = len(chunk)
                ln = unpack(chunk, rel)[0]
                if ln > end - pos - 8:
                    raise self.fail(f"truncated: {what} element {i} of {n} is {ln} bytes, "
                                    f"only {end - pos - 8} left in the file")
                if pos + 8 + ln - start > MAX_STRING_ARRAY_BYTES:
                    raise self.fail(f"{what} holds more than {MAX_STRING_ARRAY_BYTES} bytes of strings, "
                                    f"more than mlxtral accepts")
                stop = rel + 8 + ln
                if stop > clen:
                    base, rel = pos, 0
                    chunk = bytes(buf[pos:min(end, pos + max(_CHUNK, 8 + ln))])
                    clen, stop = len(chunk), 8 + ln
                out[i] = chunk[rel + 8:stop].decode("utf-8")
                pos += 8 + ln
        except UnicodeDecodeError:
            raise self.fail(f"{what} element {i} is not valid UTF-8") from None
        self.pos = pos
        return out


def _type_name(t: int) -> str:
    if t in _SCALARS:
        return _SCALARS[t][0]
    return {STRING: "string", ARRAY: "array"}.get(t, f"unknown type {t}")


def _read_value(cur: _Cursor, vtype: int, what: str, depth: int = 0) -> tuple[Any, int | None]:
    """One value of ``vtype``: (plain Python value, element type if an array)."""
    if vtype in _SCALARS:
        _, fmt, dt = _SCALARS[vtype]
        v = cur.scalar(fmt, dt.itemsize, what)
        return (bool(v) if vtype == BOOL else v), None
    if vtype == STRING:
        return cur.string(what), None
    if vtype != ARRAY:
        raise cur.fail(f"{what} has unknown value type {vtype}")
    if depth >= MAX_ARRAY_DEPTH:
        raise cur.fail(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
    etype = cur.u32(f"{what} element type")
    n = cur.u64(f"{what} length")
    if etype not in _MIN_VALUE_BYTES:
        raise cur.fail(f"{what} has unknown element type {etype}")
    cur.count(n, _MIN_VALUE_BYTES[etype], f"{what} length")
    if n > MAX_ARRAY_LEN:
        raise cur.fail(f"{what} has {n} elements, more than the {MAX_ARRAY_LEN} mlxtral accepts")
    if etype == STRING:
        return cur.string_array(n, what), etype
    if etype in _SCALARS:
        dt = _SCALARS[etype][2]
        arr = np.frombuffer(cur.buf, dtype=dt, count=n, offset=cur.pos)
        cur.pos += n * dt.itemsize
        return (arr.astype(bool) if etype == BOOL else arr).tolist(), etype
    return [_read_value(cur, etype, f"{what}[{i}]", depth + 1)[0] for i in range(n)], etype


def _check_key_type(key: str, want: str, value: Any, vtype: int, etype: int | None, path: Path) -> None:
    if want == "int":
        ok = vtype in _INT_TYPES
    elif want == "float":
        ok = vtype in _INT_TYPES or vtype in _FLOAT_TYPES
    elif want == "str":
        ok = vtype == STRING
    elif want == "bool":
        ok = vtype == BOOL
    elif want == "[str]":
        ok = vtype == ARRAY and etype == STRING
    elif want == "[float]":
        ok = vtype == ARRAY and etype in _INT_TYPES + _FLOAT_TYPES
    else:  # "[int]"
        ok = vtype == ARRAY and etype in _INT_TYPES
    if not ok:
        got = _type_name(vtype) + (f" of {_type_name(etype)}" if etype is not None else "")
        raise FormatError(f"metadata key {show(key)} must be {_TYPE_WORDS[want]}, got {got}", path)


def _check_types(md: dict[str, Any], vtypes: dict[str, int], etypes: dict[str, int], path: Path) -> None:
    for key, want in KEY_TYPES.items():
        if key in md:
            _check_key_type(key, want, md[key], vtypes[key], etypes.get(key), path)
    arch = md.get("general.architecture")
    if isinstance(arch, str):
        for suffix, want in ARCH_KEY_TYPES.items():
            key = f"{arch}.{suffix}"
            if key in md:
                _check_key_type(key, want, md[key], vtypes[key], etypes.get(key), path)


def _header(cur: _Cursor) -> tuple[int, int, int]:
    cur.need(4, "magic")
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
            raise cur.fail("big-endian GGUF is not supported (convert it on a little-endian machine)")
        if version == 1:
            raise cur.fail("GGUF version 1 is not supported (obsolete since 2023): re-convert the model")
        raise cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.u64("tensor_count")
    n_kv = cur.u64("kv_count")
    # Each tensor info and each key/value needs a minimum number of bytes: lying counts end here.
    cur.count(n_kv, _MIN_KV_BYTES, "kv_count")
    cur.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor_count")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.end - cur.pos:
        raise cur.fail(f"kv_count {n_kv} and tensor_count {n_tensors} cannot both fit in the file")
    return version, n_tensors, n_kv


def _metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    md: dict[str, Any] = {}
    vtypes: dict[str, int] = {}
    etypes: dict[str, int] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}", MAX_KEY_BYTES)
        shown = show(key)
        if key in md:
            raise cur.fail(f"duplicate metadata key {shown}")
        vtype = cur.u32(f"value type of {shown}")
        value, etype = _read_value(cur, vtype, f"metadata {shown}")
        md[key], vtypes[key] = value, vtype
        if etype is not None:
            etypes[key] = etype
    return md, vtypes, etypes


def _tensor_infos(cur: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor {i} name", MAX_NAME_BYTES)
        shown = show(name)
        if name in seen:
            raise cur.fail(f"duplicate tensor name {shown}")
        seen.add(name)
        n_dims = cur.u32(f"tensor {shown} n_dims")
        if n_dims > MAX_DIMS:
            raise cur.fail(f"tensor {shown} has {n_dims} dims (at most {MAX_DIMS})")
        cur.need(8 * n_dims, f"tensor {shown} dims")
        dims = struct.unpack_from(f"<{n_dims}q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        if any(d < 0 for d in dims):
            raise cur.fail(f"tensor {shown} has a negative dimension {list(dims)}")
        ttype = cur.u32(f"tensor {shown} type")
        offset = cur.u64(f"tensor {shown} offset")
        infos.append((name, dims, ttype, offset))
    return infos


def _tensor_layout(path: Path, name: str, dims: tuple[int, ...], ttype: int) -> tuple[str, int]:
    """(type name, byte size) of a tensor, checking its type and its row length."""
    if ttype not in GGML_TYPES:
        raise FormatError(f"tensor {show(name)} has unknown ggml type {ttype}", path)
    qtype, bs, ts = GGML_TYPES[ttype]
    if not dims and bs > 1:
        raise FormatError(f"tensor {show(name)}: a {qtype} tensor needs at least one dimension", path)
    if dims and dims[0] % bs:
        raise FormatError(f"tensor {show(name)}: {qtype} rows must be a multiple of {bs} elements, "
                          f"got {dims[0]}", path)
    numel = span = 1
    for d in dims:
        numel *= d  # Python ints: no overflow here, checked below
        span *= max(d, 1)  # an empty [2**62, 2**62, 0] is no array either
    nbytes = numel // bs * ts
    if numel > INT64_MAX or nbytes > INT64_MAX or span // bs * ts > INT64_MAX:
        raise FormatError(f"tensor {show(name)} dims {list(dims)} overflow 64 bits", path)
    return qtype, nbytes


def parse_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate a GGUF file; tensors are zero-copy views of one read-only memory map."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror})", path) from None
    if size < 24:
        with open_regular(path) as f:
            head = f.read(4)
        if head != GGUF_MAGIC:
            raise FormatError(f"not a GGUF file (magic {head!r}, expected b'GGUF')", path)
        raise FormatError(f"truncated: {size} bytes, a GGUF header needs 24", path)
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")  # by name: the expert cache reads mm.filename
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_size != len(mm):
                raise FormatError("the file changed while being opened", path)
            watch(path, f.fileno(), mm)  # a truncation while in use: one line, not a dead process
    except (OSError, ValueError) as e:
        from mlxtral.address_space import map_error  # ulimit -v: the whole file is mapped

        if isinstance(e, OSError) and (why := map_error(path, size, e)) is not None:
            raise why from None
        raise FormatError(f"cannot map the file ({plain(str(e))})", path) from None
    base = mm.view(np.ndarray)  # plain ndarray views; .base keeps the map alive
    cur = _Cursor(memoryview(base), path)
    version, n_tensors, n_kv = _header(cur)
    md, vtypes, etypes = _metadata(cur, n_kv)
    _check_types(md, vtypes, etypes, path)
    alignment = md.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 30:
        raise FormatError(f"general.alignment must be a power of two, got {alignment}", path)
    cur.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor_count")
    infos = _tensor_infos(cur, n_tensors)
    data_start = -(-cur.pos // alignment) * alignment
    if infos and data_start > size:
        raise FormatError(f"truncated: tensor data would start at byte {data_start}, "
                          f"past the end of the file ({size} bytes)", path)

    tensors: list[GGUFTensor] = []
    spans: list[tuple[int, int, str]] = []
    for name, dims, ttype, offset in infos:
        qtype, nbytes = _tensor_layout(path, name, dims, ttype)
        if offset % alignment:
            raise FormatError(f"tensor {show(name)} offset {offset} is not a multiple of the "
                              f"alignment {alignment}", path)
        start = data_start + offset
        if start + nbytes > size:
            raise FormatError(f"truncated: tensor {show(name)} ({nbytes} bytes at byte {start}) runs past "
                              f"the end of the file ({size} bytes)", path)
        shape = tuple(int(d) for d in reversed(dims))
        raw = base[start:start + nbytes]
        if qtype in ELEMENT_DTYPES:
            data = raw.view(ELEMENT_DTYPES[qtype]).reshape(shape)
        else:
            _, bs, ts = GGML_TYPES[ttype]
            row = shape[-1] // bs * ts
            data = raw.reshape(shape[:-1] + (row,))
        tensors.append(GGUFTensor(name, qtype, shape, start, nbytes, data))
        if nbytes:
            spans.append((start, start + nbytes, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise FormatError(f"tensors {show(a)} and {show(b)} overlap in the file", path)
    return GGUFFile(path, version, alignment, data_start, md, vtypes, etypes, tensors, mm)
