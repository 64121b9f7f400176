"""Memory-mapped checkpoint files that change while in use: one clear line, never a silent crash.

Tensors are zero-copy views of read-only memory maps. If the file is truncated or rewritten in
place while a model runs (a download restarting, ``cp`` over it, a converter writing the same
path), two things can happen:

- a page past the new end of the file is touched: the kernel sends ``SIGBUS``. A Python-level
  handler cannot help (it only runs after the faulting load returns, and the load re-executes and
  faults forever), so :func:`install_sigbus_guard` installs, once per process, a native handler
  JIT-compiled with llvmlite (numba's compiler, already a dependency) through libc's ``signal()``:
  it ``write(2)``s a fixed line naming the mapped model files and calls ``_exit(1)``. It never
  re-enters Python, allocates nothing and calls only async-signal-safe functions. The NumPy
  backend, whose kernels read the maps, installs it before numba's warm-up (which then pages
  LLVM's code out again: the guard costs no resident memory); a process that only parses files
  (``mlxtral info``) does not load LLVM for it.
- the pages still exist but hold other bytes: the model would compute garbage. The NumPy backend
  calls :func:`check_unchanged` before each forward pass: an ``fstat`` of each file behind its
  tensors (on a descriptor of the mapped inode, so a file *replaced* by rename, whose old inode
  the map still holds, is not a change) against its size and modification time at load.

:func:`watch` registers a file when a loader maps it (GGUF, safetensors, torch zip); the entry goes
away with the map.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.display import term_safe
from mlxtral.errors import FormatError

_MESSAGE_BYTES = 4096
_SUFFIX = (": a model file changed or was truncated while mlxtral was using it (SIGBUS); "
           "reload it once it is complete\n")


@dataclass
class MappedFile:
    path: str
    fd: int  # our own descriptor of the mapped inode
    size: int
    mtime_ns: int


_lock = threading.RLock()  # re-entrant: a map collected while the lock is held forgets itself
_files: dict[int, MappedFile] = {}  # id(mapping object) -> file; removed when the mapping dies
_guard: dict[str, Any] = {}  # the JIT engine (kept alive forever) and the message buffer's addresses
_unfinished: list[str] = []  # outputs being written (a conversion's temporary): named in the message


def note_unfinished(path: str | Path | None) -> None:
    """Name ``path`` (an output being written, which a SIGBUS exit cannot delete) in the handler's
    message, or stop naming it (None)."""
    with _lock:
        _unfinished[:] = [str(path)] if path is not None else []
    _update_message()


def watch(path: str | Path, fd: int, owner: Any) -> None:
    """Register the file open as ``fd`` and mapped by ``owner`` (an ``mmap.mmap`` or
    ``np.memmap``) until ``owner`` is collected (the SIGBUS guard names it once installed)."""
    own = os.dup(fd)
    st = os.fstat(own)
    f = MappedFile(str(path), own, st.st_size, st.st_mtime_ns)
    key = id(owner)
    with _lock:
        _files[key] = f
    weakref.finalize(owner, _forget, key, f).atexit = False  # the process's end closes the descriptor
    _update_message()


def _forget(key: int, f: MappedFile) -> None:
    with _lock:
        if _files.get(key) is f:
            del _files[key]
    try:
        os.close(f.fd)
    except OSError:
        pass
    _update_message()


def files_backing(arrays: Iterable[Any]) -> list[MappedFile]:
    """The watched files that ``arrays`` (NumPy views) are views of."""
    with _lock:
        if not _files:
            return []
        known = dict(_files)
    found: dict[int, MappedFile] = {}
    for a in arrays:
        obj, hops = a, 0
        while obj is not None and hops < 16:  # view -> view -> memmap -> mmap (or memoryview -> mmap)
            f = known.get(id(obj))
            if f is not None:
                found[id(f)] = f
                break
            obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
            hops += 1
    return list(found.values())


class RowReader:
    """Rows of a C-contiguous 2-D array that is a view of a watched file, read from the file
    (``preadv`` into the result) rather than through the map. Touching a mapped page makes the
    kernel map up to 64 KB around it ("fault-around") from the page cache: a few hundred embedding
    lookups make a whole embedding table resident (18 MB on the bench model, 74 MB of Mixtral's at
    Q4_K), where reading them costs the rows' bytes only."""

    def __init__(self, f: MappedFile, offset: int, like: np.ndarray) -> None:
        self.f, self.offset, self.like = f, offset, like
        self.row_bytes = like.strides[0]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """``like[idx]`` read from the file: [len(idx), ...] of ``like``'s dtype."""
        n_rows = self.like.shape[0]
        out = np.empty((len(idx), *self.like.shape[1:]), dtype=self.like.dtype)
        flat = out.reshape(len(idx), -1).view(np.uint8)  # [n, row_bytes]
        for j, i in enumerate(idx.tolist()):
            if not 0 <= i < n_rows:
                raise IndexError(f"row {i} of {n_rows}")
            if os.preadv(self.f.fd, [flat[j]], self.offset + i * self.row_bytes) != self.row_bytes:
                raise FormatError("the file was truncated while in use: reload the model once it is complete",
                                  self.f.path)
        return out


def row_reader(a: np.ndarray) -> RowReader | None:
    """A :class:`RowReader` for ``a`` (a C-contiguous 2-D view of a watched file's map), or None
    (not such a view, or no ``preadv`` here)."""
    if not hasattr(os, "preadv") or a.ndim != 2 or not a.flags.c_contiguous or a.size == 0:
        return None
    with _lock:
        known = dict(_files)
    obj, hops = a, 0
    while obj is not None and hops < 16:  # view -> view -> memmap -> mmap (or memoryview -> mmap)
        f = known.get(id(obj))
        if f is not None:
            if isinstance(obj, np.ndarray):  # np.memmap: its first byte is the file's byte ``offset``
                start = obj.ctypes.data - int(getattr(obj, "offset", 0))
            else:  # mmap.mmap, mapped from the file's start
                start = np.frombuffer(obj, dtype=np.uint8).ctypes.data
            return RowReader(f, a.ctypes.data - start, a)
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        hops += 1
    return None


def check_unchanged(files: Iterable[MappedFile]) -> None:
    """:class:`FormatError` (one line naming the file) if one of ``files`` changed since it was mapped."""
    for f in files:
        try:
            st = os.fstat(f.fd)
        except OSError:  # our descriptor was closed: the map is gone, nothing reads it
            continue
        if st.st_size != f.size:
            how = "truncated" if st.st_size < f.size else "grew"
            raise FormatError(f"the file {how} from {f.size} to {st.st_size} bytes while in use: reload the "
                              "model once it is complete", f.path)
        if st.st_mtime_ns != f.mtime_ns:
            raise FormatError("the file was rewritten while in use: reload the model once it is complete",
                              f.path)


# ---- the SIGBUS guard ------------------------------------------------------------------------------
def _update_message() -> None:
    """Write ``error: <paths>: ...`` into the handler's buffer (read only when the signal comes)."""
    if "msg" not in _guard:
        return
    with _lock:
        paths = [f.path for f in _files.values()]
    names = ", ".join(dict.fromkeys(term_safe(p) for p in paths)) or "a memory-mapped file"
    head = names.encode("utf-8", "replace")
    suffix = _SUFFIX
    if _unfinished:
        left = term_safe(_unfinished[0], 512)
        suffix = _SUFFIX.rstrip("\n") + f"; the unfinished output {left} is left behind: delete it\n"
    room = _MESSAGE_BYTES - len(suffix.encode()) - len("error: ")
    if len(head) > room:
        head = head[: room - 3] + b"..."
    data = b"error: " + head + suffix.encode()
    ctypes.c_int64.from_address(_guard["len"]).value = 0  # a signal now writes nothing half-made
    ctypes.memmove(_guard["msg"], data, len(data))
    ctypes.c_int64.from_address(_guard["len"]).value = len(data)


def install_sigbus_guard(compiled: Callable[[], dict[str, int]] | None = None) -> bool:
    """Install the native SIGBUS handler once per process; False where it cannot be (no SIGBUS,
    no llvmlite): a truncated file then kills the process with the system's own message.
    ``compiled``: the handler's addresses (``handler``, ``msg``, ``len``) from code compiled ahead
    of time (the kernels' native library), so that LLVM is not loaded for it."""
    if "ok" in _guard:
        return _guard["ok"]
    with _lock:
        if "ok" not in _guard:
            try:
                if not hasattr(signal, "SIGBUS"):
                    raise OSError("no SIGBUS on this platform")
                _guard.update(compiled() if compiled is not None else _compile_handler())
                libc = ctypes.CDLL(None, use_errno=True)
                libc.signal.restype = ctypes.c_void_p
                libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
                old = libc.signal(int(signal.SIGBUS), _guard["handler"])
                _guard["ok"] = old != ctypes.c_void_p(-1).value  # SIG_ERR
            except Exception:  # no SIGBUS (Windows), no llvmlite, no JIT: keep the default
                _guard["ok"] = False
    _update_message()
    return _guard["ok"]


def handler_ir(m: Any) -> tuple[Any, Any, Any]:
    """``void handler(int) { if (xchg(&taken, 1) == 0) { write(2, msg, len); _exit(1); } for (;;)
    pause(); }`` with ``msg``/``len`` globals we fill, built into the llvmlite module ``m``: when
    several threads fault at once, one writes the line and ends the process, the others wait for
    that (one line, never cut short). -> (handler, msg, len). Also compiled into the kernels' native
    library (:mod:`mlxtral.backends.aot_build`)."""
    from llvmlite import ir

    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    buf = ir.GlobalVariable(m, ir.ArrayType(i8, _MESSAGE_BYTES), name="mlxtral_sigbus_msg")
    buf.initializer = ir.Constant(ir.ArrayType(i8, _MESSAGE_BYTES), None)
    n = ir.GlobalVariable(m, i64, name="mlxtral_sigbus_len")
    n.initializer = ir.Constant(i64, 0)
    write = ir.Function(m, ir.FunctionType(i64, [i32, i8.as_pointer(), i64]), name="write")
    exit_ = ir.Function(m, ir.FunctionType(ir.VoidType(), [i32]), name="_exit")
    pause = ir.Function(m, ir.FunctionType(i32, []), name="pause")
    taken = ir.GlobalVariable(m, i32, name="mlxtral_sigbus_taken")
    taken.initializer = ir.Constant(i32, 0)
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [i32]), name="mlxtral_sigbus_handler")
    entry, first, wait = (fn.append_basic_block(n) for n in ("entry", "first", "wait"))
    b = ir.IRBuilder(entry)
    old = b.atomic_rmw("xchg", taken, ir.Constant(i32, 1), "seq_cst")
    b.cbranch(b.icmp_unsigned("==", old, ir.Constant(i32, 0)), first, wait)
    b = ir.IRBuilder(first)
    ptr = b.gep(buf, [ir.Constant(i32, 0), ir.Constant(i32, 0)])
    b.call(write, [ir.Constant(i32, 2), ptr, b.load(n)])
    b.call(exit_, [ir.Constant(i32, 1)])
    b.unreachable()
    b = ir.IRBuilder(wait)  # another thread is writing the line and ending the process
    b.call(pause, [])
    b.branch(wait)
    return fn, buf, n


def _compile_handler() -> dict[str, Any]:
    """:func:`handler_ir` compiled with llvmlite, in this process."""
    import llvmlite.binding as llvm
    from llvmlite import ir

    if not hasattr(signal, "SIGBUS"):
        raise OSError("no SIGBUS on this platform")
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    m = ir.Module(name="mlxtral_sigbus")
    m.triple = llvm.get_process_triple()
    handler_ir(m)
    mod = llvm.parse_assembly(str(m))
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine()
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    return {"engine": engine, "handler": engine.get_function_address("mlxtral_sigbus_handler"),
            "msg": engine.get_global_value_address("mlxtral_sigbus_msg"),
            "len": engine.get_global_value_address("mlxtral_sigbus_len")}
