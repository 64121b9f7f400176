"""Restricted reader for PyTorch zip checkpoints (``consolidated.00.pth``, ``pytorch_model.bin``).

A torch file is a zip archive: ``<prefix>/data.pkl`` (a pickle describing the state dict),
``<prefix>/data/<key>`` (one raw storage per key, stored uncompressed), optionally
``<prefix>/byteorder`` (``little``/``big``). A pickle can run any code, so ``data.pkl`` is read
with an unpickler whose ``find_class`` knows only the few callables that rebuild tensors, mapped
to our own functions; anything else raises :class:`UnsafeCheckpointError` before it is called.
Torch is never imported.

The unpickler is Python's own pure-Python one, restricted further so that its work is bounded by
the pickle's size: only the opcodes torch writes are executed (no sets, no object construction
besides the allowed callables, no ``DUP``); tuples and MARKs nest at most :data:`MAX_NESTING` deep
and a tuple reaches at most :data:`MAX_TUPLE_WEIGHT_PER_BYTE` objects (repeats counted) per byte of
pickle, so a 210-byte DAG of 2**100 leaves (``DUP`` + ``TUPLE2`` x 100, or the same through the
memo) or a million nested one-tuples (hashing it overflows the C stack) is refused where it is
built; BUILD only sets attributes of an ``OrderedDict`` (torch's ``_metadata``). Every
file-derived value in a message goes through :func:`mlxtral.display.show`.

Storages become zero-copy NumPy views of a read-only memory map of the archive (zip entries in
torch files are STORED, so each storage is a contiguous byte range of the file). Tensors come
back as :class:`TorchTensor` (dtype code in safetensors spelling, shape, view).
"""
from __future__ import annotations

import io
import math
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.display import show, term_safe
from mlxtral.errors import FormatError, UnsafeCheckpointError
from mlxtral.formats.files import open_regular
from mlxtral.formats.mapped import watch
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
MAX_PICKLE_BYTES = 64 * 1024 * 1024  # ~500k tensors' worth; the pure-Python unpickler reads ~5 MB/s
MAX_DIMS = 8
MAX_NESTING = 32  # tuples in tuples, and open MARKs; torch nests 2 and 4 deep
MAX_TUPLE_WEIGHT_PER_BYTE = 4  # objects a tuple reaches (repeats counted) per byte of pickle
MAX_BYTEORDER_BYTES = 16
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
        raise UnsafeCheckpointError(f"pickle tried to set attribute {show(name)}")


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
        raise FormatError(f"bad tensor geometry (offset {show(storage_offset)}, size {size}, "
                          f"stride {stride})")
    arr = storage.array
    numel = 1
    for d in size:
        numel *= d
    if numel == 0:
        if math.prod(max(d, 1) for d in size) >= 1 << 40:  # an empty [2**39, 2**39, 0]: no array
            raise FormatError(f"bad tensor size {size}")
        return SafeTensor(storage.dtype, size, np.zeros(size, dtype=arr.dtype))
    if any(s < 0 for s in stride):
        raise FormatError(f"negative stride {stride}")
    # no element read twice (stride 0: an expanded view), as in any saved weight; else a tiny file
    # poses as a huge model. Dims by stride: each must step past everything the smaller ones reach
    reach = 0
    for st, d in sorted((st, d) for d, st in zip(size, stride, strict=True) if d > 1):
        if st <= reach:
            raise FormatError(f"tensor of size {size} with stride {stride} reads its elements more than "
                              "once (an expanded or overlapping view): not a saved weight")
        reach += (d - 1) * st
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
        raise FormatError(f"bad tensor {what} {show(v)}")
    return tuple(v)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _Allowed(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Allowed(_rebuild_parameter),
    ("collections", "OrderedDict"): _Allowed(_ordered_dict),
}
_ALLOWED.update({("torch", name): _StorageType(code) for name, code in STORAGE_DTYPES.items()})


_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
# What torch.save writes (protocol 2 by default, up to 5 on request), nothing else.
_TORCH_OPCODES = {code for code, name in _OPCODE_NAMES.items() if name in (
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "NONE", "NEWTRUE", "NEWFALSE", "BININT",
    "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "GLOBAL",
    "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
    "MEMOIZE")}


class _Dispatch(dict):
    """The pure-Python unpickler's opcode table, restricted: other opcodes are refused by name."""

    def __missing__(self, code: int) -> Any:
        what = _OPCODE_NAMES.get(code, f"byte {code}")
        raise UnsafeCheckpointError(f"pickle opcode {what}, which torch checkpoints never use")


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one: every opcode is ours to bound
    dispatch = _Dispatch({k: v for k, v in pickle._Unpickler.dispatch.items() if k in _TORCH_OPCODES})

    def __init__(self, data: bytes, storages: dict[str, tuple[int, int]], mm: mmap.mmap, byteorder: str,
                 path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._storages = storages  # key -> (file offset, byte length)
        self._mm = mm
        self._byteorder = byteorder
        self._path = path
        self._cache: dict[str, _Storage] = {}
        # every tuple built: id -> (the tuple, kept alive so its id stays its own; weight; depth)
        self._tuples: dict[int, tuple[tuple[Any, ...], int, int]] = {}
        self._size = len(data)
        self._max_weight = MAX_TUPLE_WEIGHT_PER_BYTE * len(data) + 64

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"pickle wants {term_safe(f'{module}.{name}', 100)}, which is not a tensor-rebuilding "
                "function: refusing to run it (the checkpoint may be malicious)", self._path)
        return obj

    # ---- tuples: the only containers hashing walks (dict keys), so their size is bounded -------
    def _tuple(self, items: tuple[Any, ...]) -> None:
        weight, depth = 1, 1
        for x in items:
            known = self._tuples.get(id(x)) if type(x) is tuple else None
            if known is not None:
                weight += known[1]
                depth = max(depth, known[2] + 1)
            else:
                weight += 1
        if depth > MAX_NESTING:
            raise FormatError(f"data.pkl nests tuples more than {MAX_NESTING} deep (torch nests 2)")
        if weight > self._max_weight:
            raise FormatError(f"data.pkl builds a tuple reaching more than {self._max_weight} objects "
                              f"from {self._size} bytes (shared references repeated: a pickle bomb)")
        if items:
            self._tuples[id(items)] = (items, weight, depth)
        self.append(items)

    def load_tuple(self) -> None:
        self._tuple(tuple(self.pop_mark()))

    def load_tuple1(self) -> None:
        self._tuple((self.stack.pop(),))

    def load_tuple2(self) -> None:
        b = self.stack.pop()
        a = self.stack.pop()
        self._tuple((a, b))

    def load_tuple3(self) -> None:
        c = self.stack.pop()
        b = self.stack.pop()
        a = self.stack.pop()
        self._tuple((a, b, c))

    def load_mark(self) -> None:
        if len(self.metastack) >= MAX_NESTING:
            raise FormatError(f"data.pkl nests containers more than {MAX_NESTING} deep (torch nests 4)")
        super().load_mark()

    def load_build(self) -> None:
        """BUILD: only torch's ``_metadata`` on an OrderedDict (string keys), never on our objects."""
        state = self.stack.pop()
        inst = self.stack[-1]
        if (type(inst) is not OrderedDict or type(state) is not dict
                or not all(type(k) is str for k in state)):
            raise UnsafeCheckpointError(f"pickle tried to set the state of a {type(inst).__name__}")
        inst.__dict__.update(state)

    dispatch[pickle.TUPLE[0]] = load_tuple
    dispatch[pickle.TUPLE1[0]] = load_tuple1
    dispatch[pickle.TUPLE2[0]] = load_tuple2
    dispatch[pickle.TUPLE3[0]] = load_tuple3
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.MARK[0]] = load_mark

    def persistent_load(self, pid: Any) -> _Storage:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or not isinstance(pid[4], int) or isinstance(pid[4], bool) or pid[4] < 0):
            raise UnsafeCheckpointError(f"unexpected persistent id {show(pid)}", self._path)
        stype, key, numel = pid[1], pid[2], pid[4]
        if key in self._cache:
            return self._cache[key]
        if key not in self._storages:
            raise FormatError(f"storage {show(key)} is missing from the archive", self._path)
        off, length = self._storages[key]
        dt = DTYPES[stype.dtype]
        if numel * dt.itemsize > length:
            raise FormatError(f"storage {show(key)} holds {length} bytes, {show(numel)} x {stype.dtype} "
                              "needed", self._path)
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
        raise FormatError(f"zip member {show(info.filename)}: local header past the end of the file", path)
    fields = _LOCAL_HEADER.unpack(raw)
    if fields[0] != _LOCAL_MAGIC:
        raise FormatError(f"zip member {show(info.filename)}: bad local header", path)
    start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    if start + info.file_size > size:
        raise FormatError(f"zip member {show(info.filename)} runs past the end of the file: truncated", path)
    return start


def _detail(e: BaseException) -> str:
    """An exception's message, bounded: never ``str(e)`` of an exception carrying a file's object
    (``KeyError(key)`` formats the key, which can be a DAG of 2**100 leaves)."""
    if isinstance(e, OSError) and e.strerror:
        return term_safe(e.strerror, 100)
    args = e.args
    if args and all(isinstance(a, str) for a in args):
        return term_safe(" ".join(" ".join(args).split()), 100)
    return show(args[0] if len(args) == 1 else args, 100)


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
            raise FormatError(f"corrupt zip archive ({_detail(e)}): truncated download?", path) from None
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
                    if info.file_size > MAX_BYTEORDER_BYTES:  # "little" or "big", never a megabyte
                        raise FormatError(f"the byteorder entry is {info.file_size} bytes long", path)
                    byteorder = zf.read(info).decode("ascii", "replace").strip()
                if not info.filename.startswith(prefix + "data/"):
                    continue
                if (info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size
                        or info.flag_bits & 1):
                    raise FormatError(f"zip member {show(info.filename)} is compressed or encrypted "
                                      "(torch never writes that)",
                                      path)
                storages[info.filename[len(prefix) + 5:]] = (_member_data_offset(f, info, size, path),
                                                              info.file_size)
        except _ZIP_ERRORS as e:
            raise FormatError(f"corrupt zip archive ({_detail(e)})", path) from None
        if byteorder not in ("little", "big"):
            raise FormatError(f"unknown byteorder {show(byteorder)}", path)
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            watch(path, f.fileno(), mm)  # a truncation while in use: one line, not a dead process
        except (OSError, ValueError) as e:
            from mlxtral.address_space import map_error  # ulimit -v: the whole file is mapped

            if isinstance(e, OSError) and (why := map_error(path, size, e)) is not None:
                raise why from None
            raise FormatError(f"cannot memory-map ({_detail(e)})", path) from None
    try:
        obj = _RestrictedUnpickler(pkl, storages, mm, byteorder, path).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(e.message, path) from None
    except FormatError as e:
        raise FormatError(e.message, path) from None
    except MemoryError:  # not the file's fault: the command's out-of-memory line
        raise
    except Exception as e:  # any malformed pickle: never a traceback for the user
        raise FormatError(f"corrupt data.pkl ({e.__class__.__name__}: {_detail(e)})", path) from None
    return _state_dict(obj, path), mm


def _state_dict(obj: Any, path: Path) -> dict[str, SafeTensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # some trainers wrap the weights
    if not isinstance(obj, dict):
        raise FormatError(f"the checkpoint holds a {type(obj).__name__}, not a state dict", path)
    out: dict[str, SafeTensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise FormatError(f"state dict key {show(k)} is not a string", path)
        if isinstance(v, SafeTensor):
            if (not isinstance(v.data, np.ndarray) or v.dtype not in DTYPES
                    or v.data.dtype != DTYPES[v.dtype] or tuple(v.data.shape) != v.shape):
                raise FormatError(f"tensor {show(k)} was not rebuilt from a storage", path)
            out[k] = v
        # non-tensor entries (training step, config...) are ignored
    return out
