"""What the JIT leaves in memory once every kernel is loaded, and giving it back.

Loading numba's cached kernels (``kernels.warmup``) leaves two things behind that the kernels never
use again:

* **llvmlite's code pages** (:func:`release_compiler_pages`): LLVM runs to load the cached objects,
  paging in ~65 MB of llvmlite's 180 MB shared library. They are clean file-backed pages, so
  ``MADV_PAGEOUT`` loses nothing: should LLVM run again, they fault back in from the file.
* **The linking modules** (:func:`release_linking_modules`): for every cached function numba
  parses, besides its machine code, its whole LLVM IR (the kernels it inlines included) and keeps
  it in case a function compiled later calls it and must link it in. Ours hold ~3 MB of bitcode,
  ~40 MB once parsed into LLVM's in-memory form. Each is dropped and kept as its bitcode instead,
  parsed again only if numba asks for it (a new specialization calling an old one): the machine
  code, which is what runs, is untouched.

Both are Linux memory matters (``malloc_trim`` hands the freed heap back to the system) and are
no-ops where they do not apply.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable
from typing import Any

from mlxtral.backends.pages import madvise_fn

_MADV_PAGEOUT = 21  # Linux >= 5.4


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def release_compiler_pages() -> int:
    """Page out llvmlite's read-only mappings; returns the bytes advised (0 off Linux, or on a
    kernel without ``MADV_PAGEOUT``). Another process mapping the same library keeps its pages in."""
    if not sys.platform.startswith("linux"):
        return 0
    madvise = madvise_fn()
    if madvise is None:
        return 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:  # paths need not be UTF-8
            maps = f.read().splitlines()
    except OSError:
        return 0
    done = 0
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "llvmlite" not in parts[5] or parts[1][1] == "w":
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if madvise(lo, hi - lo, _MADV_PAGEOUT) == 0:
            done += hi - lo
    return done


_lazy_classes: dict[type, type] = {}


def _lazy_class(cls: type) -> type:
    """``cls`` (numba's code library class) with ``_shared_module`` parsed from kept bitcode on
    first use after it was released."""
    lazy = _lazy_classes.get(cls)
    if lazy is None:
        def get(self: Any) -> Any:
            mod = self.__dict__.get("_mlxtral_shared")
            if mod is None and self.__dict__.get("_mlxtral_bitcode") is not None:
                import llvmlite.binding as ll

                mod = ll.parse_bitcode(self.__dict__["_mlxtral_bitcode"])
                self.__dict__["_mlxtral_shared"] = mod
            return mod

        def put(self: Any, value: Any) -> None:
            self.__dict__["_mlxtral_shared"] = value
            if value is None:
                self.__dict__["_mlxtral_bitcode"] = None

        lazy = type(cls.__name__, (cls,), {"_shared_module": property(get, put),
                                           "__module__": cls.__module__})
        _lazy_classes[cls] = lazy
    return lazy


def _libraries(dispatchers: Iterable[Any]) -> list[Any]:
    libs = []
    for d in dispatchers:
        for cres in list(getattr(d, "overloads", {}).values()):
            lib = getattr(cres, "library", None)
            if lib is not None:
                libs.append(lib)
    return libs


def release_linking_modules(dispatchers: Iterable[Any]) -> int:
    """Drop the parsed linking module of every loaded overload of ``dispatchers`` (numba
    dispatchers), keeping its bitcode to parse again on demand; then ``malloc_trim``. Returns the
    bitcode bytes whose modules were dropped. Libraries numba does not lay out as expected are
    left alone."""
    done = 0
    for lib in _libraries(dispatchers):
        state = lib.__dict__
        mod = state.get("_shared_module")
        if mod is None or "_mlxtral_bitcode" in state:
            continue
        try:
            bitcode = mod.as_bitcode()
            lazy = _lazy_class(type(lib))
            del state["_shared_module"]
            lib.__class__ = lazy
        except (AttributeError, TypeError):
            state.setdefault("_shared_module", mod)
            continue
        state["_mlxtral_bitcode"] = bitcode
        state["_mlxtral_shared"] = None
        done += len(bitcode)
        del mod
    trim_heap()
    return done


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing)."""
    if not sys.platform.startswith("linux"):
        return
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


_seen: dict[int, int] = {}  # id(dispatcher) -> how many overloads it had when last released


def release_new(*dispatchers: Any) -> None:
    """:func:`release_linking_modules` for those of ``dispatchers`` that loaded a specialization
    since the last call (a kernel loaded at its first use, after warmup): a dictionary lookup
    a dispatcher when nothing is new, so it can follow every call. Functions of the native library
    (:mod:`mlxtral.backends.aot`, no LLVM IR held) are passed over."""
    new = [d for d in dispatchers if hasattr(d, "overloads") and _seen.get(id(d)) != len(d.overloads)]
    if new:
        for d in new:
            _seen[id(d)] = len(d.overloads)
        release_linking_modules(new)
