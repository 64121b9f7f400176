"""The CPU kernels as one native library compiled ahead of time: the run itself needs no numba.

The kernels are numba code (``_kernels_*.py``, ``_decode_step_nb.py``). Compiled just in time they
cost every process numba and LLVM: ~65 MB to import numba, llvmlite's 180 MB library mapped, and
numba's hold on every kernel it loads, ~90-145 MB beside the model that a 16 GB laptop running
Mixtral, or a 465 MB bench model, pays in full. So once per install (in the precompile child,
:mod:`mlxtral.backends.precompile`) :mod:`mlxtral.backends.aot_build` compiles the very same
functions, for this CPU's features, with numba's ahead-of-time compiler into one Python extension
module (``mlxtral_kernels_<key>.so``, about 1.5 MB) and writes a manifest beside it: for each entry
point the argument types each of its exports takes, and the kernel modules' constants. A run then
loads that library (this module imports NumPy only) and calls it as it would call numba.

One arithmetic: the library is compiled from the same source, with the same flags, for the same
CPU name and features as numba's JIT compiles it (tested: bit-identical results). The key in the
file name hashes the kernel sources, this module and the builder, numba's and Python's versions, and
the CPU (its model and feature flags as the system reports them, and numba's ``NUMBA_CPU_NAME`` /
``NUMBA_CPU_FEATURES``), so a changed source or another CPU never loads a stale library.

Each call checks its arguments' types (dtype, dimensions, layout, writability, as
numba's ``typeof`` sees them) against the exports' and runs the one that matches; a call no export
matches (a kind of call the build did not see: a distributed rank's split steps) goes to the numba
function itself, imported then (:data:`misses` names them). Where the library cannot be built (no
C compiler, ``MLXTRAL_KERNEL_ISA`` forcing a path, ``MLXTRAL_NO_AOT=1``) the kernels run through
numba's JIT, as before.
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.env import env_flag

try:  # hashlib would load OpenSSL's library (3.6 MB resident) for a hash Python has built in
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - CPython always has it
    from hashlib import blake2b

HERE = Path(__file__).resolve().parent
FORMAT = 1
# the numba modules the library is built from, and the functions Python calls in each
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "_kernels_nb": ("worker_loop", "spin_pauses", "execute", "attend", "attend_f16", "top_k_softmax",
                    "run_one", "run_decode", "rope", "rms_norm", "prep_x", "fill_task", "pair_task",
                    "fill_attend_row"),
    "_kernels_kq": ("quantize_q8k",),
    "_kernels_tile": ("kq_tiles", "kq_group_acts"),
    "_decode_step_nb": ("decode_layers", "decode_batch", "decode_part", "decode_down", "batch_part",
                        "batch_down"),
}
SOURCES = ("_kernels_nb.py", "_kernels_kq.py", "_kernels_tile.py", "_kernels_iq.py", "_kernels_ir.py",
           "_decode_step_nb.py", "aot.py", "aot_build.py",
           "precompile.py", "decode_step.py")  # the build's workload: which calls it exports
_MAX_MANIFEST = 4 << 20

misses: set[str] = set()  # entry points a call fell back to numba for (the build never saw its types)


def _cpu_identity() -> str:
    """The CPU as the system reports it (model and feature flags), without LLVM."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            seen: set[str] = set()
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k in ("model name", "flags", "features", "cpu implementer", "cpu part") and k not in seen:
                    seen.add(k)
                    parts.append(f"{k}={' '.join(sorted(v.split()))}")
                if len(seen) >= 3 or line == "\n" and seen:
                    break
    except OSError:
        parts.append(platform.processor())
    return "|".join(parts)


@functools.cache
def _installed() -> bytes:
    """The digest of the kernels' sources and of numba's and llvmlite's versions: read once per
    process (a start-up asks for the key several times)."""
    h = blake2b(digest_size=16)
    for name in SOURCES:
        with open(HERE / name, "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    for pkg in ("numba", "llvmlite"):  # their versions (importlib.metadata costs ~2 MB of imports)
        spec = importlib.util.find_spec(pkg)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        try:
            h.update(pkg.encode() + ((origin.parent / "_version.py").read_bytes() if origin else b"none"))
        except OSError:
            h.update(pkg.encode() + b"?")
    return h.digest()


def library_key() -> str:
    """What a library must have been built for to be loaded here (see the module's text)."""
    h = blake2b(digest_size=16)
    h.update(_installed())
    for part in (str(FORMAT), sys.version, sys.implementation.cache_tag or "", _cpu_identity(),
                 os.environ.get("NUMBA_CPU_NAME", ""), os.environ.get("NUMBA_CPU_FEATURES", ""),
                 os.environ.get("NUMBA_OPT", "")):
        h.update(part.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:20]


def wanted() -> bool:
    """Whether this process should run the library (or build it): numba's JIT not disabled, no ISA
    forced (a forced path is compiled just in time, as for tests), not turned off."""
    if env_flag("MLXTRAL_NO_AOT") or env_flag("MLXTRAL_NO_NUMBA") or env_flag("MLXTRAL_NO_AVX2"):
        return False
    if os.environ.get("NUMBA_DISABLE_JIT", "0").strip() not in ("", "0"):
        return False
    return os.environ.get("MLXTRAL_KERNEL_ISA", "auto").strip().lower() in ("", "auto")


def to_build() -> bool:
    """Whether this run's precompile child is to build the library before the first kernel runs
    (wanted, not built, no failure noted, precompiling not turned off)."""
    if not wanted() or env_flag("MLXTRAL_NO_PRECOMPILE") or failure() is not None:
        return False
    try:
        lib, man, _ = paths()
        return not (lib.is_file() and man.is_file())
    except OSError:
        return False


def directory() -> Path:
    """Where the library lives: ``MLXTRAL_KERNEL_DIR``, else beside numba's cache of the kernels
    (``NUMBA_CACHE_DIR``, or this package's ``__pycache__`` when writable, as numba does), else the
    user's cache folder."""
    if d := os.environ.get("MLXTRAL_KERNEL_DIR"):
        return Path(d)
    if d := os.environ.get("NUMBA_CACHE_DIR"):
        return Path(d) / "mlxtral-kernels"
    here = HERE / "__pycache__"
    if os.access(here if here.is_dir() else HERE, os.W_OK):
        return here
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlxtral" / "kernels"


def paths(key: str | None = None) -> tuple[Path, Path, Path]:
    """(library, manifest, failure note) for ``key`` (this host's by default)."""
    key = key or library_key()
    d = directory()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    stem = d / f"mlxtral_kernels_{key}"
    return stem.with_name(stem.name + suffix), stem.with_suffix(".json"), stem.with_suffix(".failed")


# ---- argument types, as numba's typeof sees them ------------------------------------------------
def type_key(a: Any) -> Any:
    """``a``'s type as a hashable key, equal to :func:`aot_build.numba_key` of ``numba.typeof(a)``
    (dtype, dimensions, layout and writability for an array)."""
    if type(a) is np.ndarray:
        f = a.flags
        layout = "C" if f.c_contiguous else ("F" if f.f_contiguous else "A")
        return ("A", a.dtype.str, a.ndim, layout, f.writeable)  # (numba's typeof ignores alignment)
    if type(a) is tuple:
        return tuple(map(type_key, a))
    if type(a) is bool or isinstance(a, np.bool_):
        return "|b1"
    if type(a) is int:
        return "<i8"
    if type(a) is float:
        return "<f8"
    if isinstance(a, np.generic):
        return a.dtype.str
    return repr(type(a))  # never an export's: the call goes to numba


def from_json(k: Any) -> Any:
    """A key as JSON keeps it (lists) back to :func:`type_key`'s form (tuples)."""
    return tuple(from_json(x) for x in k) if isinstance(k, list) else k


class Entry:
    """One entry point: its exports by argument types, numba's function for anything else."""

    __slots__ = ("module", "name", "table")

    def __init__(self, module: str, name: str, table: dict[Any, Callable]) -> None:
        self.module, self.name, self.table = module, name, table

    def __call__(self, *args: Any) -> Any:
        return self.resolve(args)(*args)

    def resolve(self, args: tuple) -> Callable:
        """The function a call with ``args`` runs (the export, or numba's): a caller that makes
        the same call many times (a layer a call) looks it up once."""
        fn = self.table.get(tuple(map(type_key, args)))
        return self._jit() if fn is None else fn

    def _jit(self) -> Callable:
        misses.add(f"{self.module}.{self.name}")
        return getattr(importlib.import_module(f"mlxtral.backends.{self.module}"), self.name)


class Module:
    """What ``kernels`` and ``decode_step`` use of one numba module: its entry points and constants."""

    def __init__(self, name: str, entries: dict[str, Entry], constants: dict[str, Any]) -> None:
        self.__name__ = name
        self.__dict__.update(constants)
        self.__dict__.update(entries)


class Library:
    def __init__(self, path: Path, manifest: dict[str, Any], ext: Any) -> None:
        self.path, self.manifest, self.ext = path, manifest, ext
        self.isa = str(manifest.get("isa", "?"))
        self.modules: dict[str, Module] = {}
        for mod, spec in manifest["modules"].items():
            exported = spec["entries"]
            entries = {}
            for name in ENTRY_POINTS.get(mod, ()):  # one the build never saw called: numba's, always
                table = {from_json(k): getattr(ext, sym) for k, sym in exported.get(name, ())}
                entries[name] = Entry(mod, name, table)
            consts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec["constants"].items()}
            self.modules[mod] = Module(mod, entries, consts)

    def module(self, name: str) -> Module:
        return self.modules[name]

    def has(self, module: str, name: str, args: tuple) -> bool:
        """Whether a call of ``module.name`` with ``args`` runs from the library (not numba)."""
        entry = getattr(self.modules.get(module), name, None)
        return isinstance(entry, Entry) and tuple(map(type_key, args)) in entry.table

    def sigbus_handler(self) -> dict[str, int]:
        """The native SIGBUS handler's addresses (:mod:`mlxtral.formats.mapped`'s guard)."""
        handler, msg, length = self.ext.sigbus_handler()
        return {"handler": int(handler), "msg": int(msg), "len": int(length)}


_library: Library | None = None
_tried = False


def load(retry: bool = False) -> Library | None:
    """This host's library, or None (not wanted, not built, or built for something else)."""
    global _library, _tried
    if _library is not None or (_tried and not retry):
        return _library
    _tried = True
    if not wanted() or env_flag("MLXTRAL_AOT_BUILDING"):  # (the builder runs numba's own)
        return None
    try:
        key = library_key()
        lib_path, man_path, _ = paths(key)
        if not lib_path.is_file() or not man_path.is_file() or man_path.stat().st_size > _MAX_MANIFEST:
            return None
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
        if manifest.get("key") != key or manifest.get("format") != FORMAT:
            return None
        spec = importlib.util.spec_from_file_location(f"mlxtral_kernels_{key}", lib_path)
        if spec is None or spec.loader is None:
            return None
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
        if ext.build_id() != manifest.get("build_id"):  # a library and a manifest of two builds
            return None
        _library = Library(lib_path, manifest, ext)
    except (OSError, ImportError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # unreadable, nested past reason, or from another build: the JIT runs, as without one
    return _library


def failure() -> str | None:
    """Why the last build for this host failed, if it did (the note the builder left)."""
    try:
        note = paths()[2]
        return note.read_text(encoding="utf-8", errors="replace")[:500] if note.is_file() else None
    except OSError:
        return None
