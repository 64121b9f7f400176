"""Restricted reader for PyTorch zip checkpoints (``consolidated.00.pth``, ``pytorch_model.bin``).

A torch file is a zip archive: ``<prefix>/data.pkl`` (a pickle describing the state dict),
``<prefix>/data/<key>`` (one raw storage per key, stored uncompressed), optionally
``<prefix>/byteorder`` (``little``/``big``). A pickle can run any code, so ``data.pkl`` is read
with an unpickler whose ``find_class`` knows only the few callables that rebuild tensors, mapped
to our own functions; anything else raises :class:`UnsafeCheckpointError` before it is called.
Torch is never imported.

Storages become zero-copy NumPy views of a read-only memory map of the archive (zip entries in
torch files are STORED, so each storage is a contiguous byte range of the file). Tensors come
back as :class:`TorchTensor` (dtype code in safetensors spelling, shape, view).
"""
from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.errors import FormatError, UnsafeCheckpointError
from mlxtral.formats.files import open_regular
from mlxtral.formats.safetensors import DTYPES, SafeTensor

# torch storage class name -> safetensors-style dtype code
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
MAX_PICKLE_BYTES = 256 * 1024 * 1024
MAX_DIMS = 8
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_MAGIC = 0x04034B50
# What zipfile raises on a damaged archive (found by fuzzing: bad UTF-8 names, unknown flags...)
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError, UnicodeDecodeError,
               NotImplementedError, struct.error, OverflowError, RuntimeError, zipfile.LargeZipFile)

TorchTensor = SafeTensor  # same shape of record: dtype code, shape, zero-copy view


class _Sealed:
    """No ``__dict__`` and no ``setattr``: a pickle's BUILD opcode cannot modify these objects."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"pickle tried to set attribute {name!r}")


class _StorageType(_Sealed):
    __slots__ = ("dtype",)  # safetensors-style code

    def __init__(self, dtype: str) -> None:
        object.__setattr__(self, "dtype", dtype)


class _Storage(_Sealed):
    """A storage: a 1-D view of its zip member."""

    __slots__ = ("dtype", "array")

    def __init__(self, dtype: str, array: np.ndarray) -> None:
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "array", array)


class _Allowed(_Sealed):
    """One of our functions, handed to the pickle in place of a torch callable."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> SafeTensor:
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("_rebuild_tensor_v2 called on something that is not a storage")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if not isinstance(storage_offset, int) or storage_offset < 0 or len(size) != len(stride):
        raise FormatError(f"bad tensor geometry (offset {storage_offset!r}, size {size}, stride {stride})")
    arr = storage.array
    numel = 1
    for d in size:
        numel *= d
    if numel == 0:
        return SafeTensor(storage.dtype, size, np.zeros(size, dtype=arr.dtype))
    if any(s < 0 for s in stride):
        raise FormatError(f"negative stride {stride}")
    last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride, strict=True))
    if last >= arr.shape[0]:
        raise FormatError(f"tensor of size {size} at offset {storage_offset} runs past its storage "
                          f"({arr.shape[0]} elements)")
    contiguous = []
    acc = 1
    for d in reversed(size):
        contiguous.append(acc)
        acc *= d
    if tuple(reversed(contiguous)) == stride or numel == 1:
        view = arr[storage_offset:storage_offset + numel].reshape(size)
    else:  # a strided view into a shared storage: still zero-copy, bounds checked above
        isz = arr.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(arr[storage_offset:], shape=size,
                                               strides=tuple(s * isz for s in stride), writeable=False)
    return SafeTensor(storage.dtype, size, view)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    if not isinstance(data, SafeTensor):
        raise UnsafeCheckpointError("_rebuild_parameter called on something that is not a tensor")
    return data


def _ordered_dict(*args: Any) -> OrderedDict:
    if args:
        raise UnsafeCheckpointError("OrderedDict built with arguments")
    return OrderedDict()


def _int_tuple(v: Any, what: str) -> tuple[int, ...]:
    if (not isinstance(v, (tuple, list)) or len(v) > MAX_DIMS
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 40 for x in v)):
        raise FormatError(f"bad tensor {what} {v!r}")
    return tuple(v)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _Allowed(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Allowed(_rebuild_parameter),
    ("collections", "OrderedDict"): _Allowed(_ordered_dict),
}
_ALLOWED.update({("torch", name): _StorageType(code) for name, code in STORAGE_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages: dict[str, tuple[int, int]], mm: mmap.mmap, byteorder: str,
                 path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._storages = storages  # key -> (file offset, byte length)
        self._mm = mm
        self._byteorder = byteorder
        self._path = path
        self._cache: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"pickle wants {module}.{name}, which is not a tensor-rebuilding function: refusing to "
                "run it (the checkpoint may be malicious)", self._path)
        return obj

    def persistent_load(self, pid: Any) -> _Storage:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or not isinstance(pid[4], int) or isinstance(pid[4], bool) or pid[4] < 0):
            raise UnsafeCheckpointError(f"unexpected persistent id {str(pid)[:80]}", self._path)
        stype, key, numel = pid[1], pid[2], pid[4]
        if key in self._cache:
            return self._cache[key]
        if key not in self._storages:
            raise FormatError(f"storage {key!r} is missing from the archive", self._path)
        off, length = self._storages[key]
        dt = DTYPES[stype.dtype]
        if numel * dt.itemsize > length:
            raise FormatError(f"storage {key!r} holds {length} bytes, {numel} x {stype.dtype} needed",
                              self._path)
        if self._byteorder == "big":
            arr = np.frombuffer(self._mm, dtype=dt.newbyteorder(">"), count=numel, offset=off).astype(dt)
        elif numel == 0:
            arr = np.zeros(0, dtype=dt)
        else:
            arr = np.frombuffer(self._mm, dtype=dt, count=numel, offset=off)
        st = _Storage(stype.dtype, arr)
        self._cache[key] = st
        return st


def _member_data_offset(f: Any, info: zipfile.ZipInfo, size: int, path: Path) -> int:
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise FormatError(f"zip member {info.filename!r}: local header past the end of the file", path)
    fields = _LOCAL_HEADER.unpack(raw)
    if fields[0] != _LOCAL_MAGIC:
        raise FormatError(f"zip member {info.filename!r}: bad local header", path)
    start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    if start + info.file_size > size:
        raise FormatError(f"zip member {info.filename!r} runs past the end of the file: truncated", path)
    return start


def is_torch_zip(path: str | Path) -> bool:
    try:
        with open_regular(path) as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def load_torch_zip(path: str | Path) -> tuple[dict[str, SafeTensor], mmap.mmap]:
    """Read a torch zip checkpoint's state dict: ``({name: tensor view}, the mmap to keep alive)``."""
    path = Path(path)
    if not is_torch_zip(path):
        raise FormatError("not a PyTorch zip checkpoint (old pre-1.6 torch format or not torch at all; "
                          "re-save it with torch.save from torch >= 1.6 or use safetensors)", path)
    try:
        f = open_regular(path)
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror})", path) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            zf = zipfile.ZipFile(f)
            infos = zf.infolist()
        except _ZIP_ERRORS as e:
            raise FormatError(f"corrupt zip archive ({e}): truncated download?", path) from None
        pkls = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pkls) != 1:
            raise FormatError("not a PyTorch checkpoint: expected exactly one <name>/data.pkl in the zip",
                              path)
        prefix = pkls[0].filename[: -len("data.pkl")]
        if pkls[0].file_size > MAX_PICKLE_BYTES:
            raise FormatError(f"data.pkl is {pkls[0].file_size} bytes: not plausible", path)
        storages: dict[str, tuple[int, int]] = {}
        byteorder = "little"
        try:
            pkl = zf.read(pkls[0])
            for info in infos:
                if info.filename == prefix + "byteorder":
                    byteorder = zf.read(info).decode("ascii", "replace").strip()
                if not info.filename.startswith(prefix + "data/"):
                    continue
                if (info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size
                        or info.flag_bits & 1):
                    raise FormatError(f"zip member {info.filename!r} is compressed or encrypted "
                                      "(torch never writes that)",
                                      path)
                storages[info.filename[len(prefix) + 5:]] = (_member_data_offset(f, info, size, path),
                                                              info.file_size)
        except _ZIP_ERRORS as e:
            raise FormatError(f"corrupt zip archive ({e})", path) from None
        if byteorder not in ("little", "big"):
            raise FormatError(f"unknown byteorder {byteorder!r}", path)
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise FormatError(f"cannot memory-map ({e})", path) from None
    try:
        obj = _RestrictedUnpickler(pkl, storages, mm, byteorder, path).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(e.message, path) from None
    except FormatError as e:
        raise FormatError(e.message, path) from None
    except Exception as e:  # any malformed pickle: never a traceback for the user
        raise FormatError(f"corrupt data.pkl ({e.__class__.__name__}: {str(e)[:100]})", path) from None
    return _state_dict(obj, path), mm


def _state_dict(obj: Any, path: Path) -> dict[str, SafeTensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # some trainers wrap the weights
    if not isinstance(obj, dict):
        raise FormatError(f"the checkpoint holds a {type(obj).__name__}, not a state dict", path)
    out: dict[str, SafeTensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise FormatError(f"state dict key {k!r} is not a string", path)
        if isinstance(v, SafeTensor):
            if (not isinstance(v.data, np.ndarray) or v.dtype not in DTYPES
                    or v.data.dtype != DTYPES[v.dtype] or tuple(v.data.shape) != v.shape):
                raise FormatError(f"tensor {k!r} was not rebuilt from a storage", path)
            out[k] = v
        # non-tensor entries (training step, config...) are ignored
    return out
