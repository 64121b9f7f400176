"""Build the kernels' native library (:mod:`mlxtral.backends.aot`) with numba's ahead-of-time
compiler, in the precompile child (:mod:`mlxtral.backends.precompile`), after it has run every
kernel through numba's JIT.

The exports are exactly the specializations that run made: for each entry point of
:data:`aot.ENTRY_POINTS`, every signature its numba dispatcher compiled, each compiled again from
the same Python function into one extension module. Three settings make it the JIT's code:

* numba's AOT compiler takes a CPU *name* only, with no features, and compiles the exported
  functions without ``nogil``. It is given the JIT's CPU name and feature string (what numba's
  disk cache keys on, and what ``_kernels_ir`` chose its ISA from), and its wrappers release the
  GIL as the ``nogil`` kernels do (the worker threads spin in ``worker_loop`` meanwhile).
* An entry point whose options are other than ``cache``/``nogil``/``inline``/``nopython`` (fastmath, another
  error model) is not exported: the pycc flags would not be its flags. Its calls stay on numba.

The library is written under a temporary name and renamed into place, the manifest last (a
library without its manifest is never loaded, nor one whose build id differs from its manifest's:
two processes building at once). A failed build leaves a note
(``mlxtral_kernels_<key>.failed``) so that later runs do not try again and ``mlxtral info`` can
say why; the kernels then run through numba's JIT.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from mlxtral.backends import aot

_PLAIN_OPTIONS = {"cache", "nogil", "inline", "nopython"}


def _plain(options: dict[str, Any]) -> bool:
    """Whether a dispatcher's options are ones the AOT flags reproduce (numba's defaults but nogil)."""
    extra = {k: v for k, v in options.items() if k not in _PLAIN_OPTIONS}
    return options.get("nopython", True) is True and all(k == "boundscheck" and not v
                                                         for k, v in extra.items())


def numba_key(t: Any) -> Any:
    """A numba type as :func:`aot.type_key` keys a value of it; None if no value typed so can be
    told apart at a call (then the signature is not exported)."""
    from numba.core import types
    from numba.np.numpy_support import as_dtype

    if isinstance(t, types.Array):
        if not t.aligned:  # typeof never makes one: no call is keyed so
            return None
        return ("A", as_dtype(t.dtype).str, t.ndim, t.layout, bool(t.mutable))
    if isinstance(t, types.BaseTuple) and not isinstance(t, types.BaseNamedTuple):
        keys = tuple(numba_key(x) for x in t.types)
        return None if any(k is None for k in keys) else keys
    if isinstance(t, (types.Integer, types.Float, types.Boolean)) and not isinstance(t, types.Literal):
        return as_dtype(t).str
    return None


def _constants(mod: Any) -> dict[str, Any]:
    """A module's constants (UPPER_CASE ints, floats, bools, strings, flat tuples of them)."""
    plain = (bool, int, float, str)
    out: dict[str, Any] = {}
    for k, v in vars(mod).items():
        if not (k[:1].isalpha() and k.upper() == k):
            continue
        if isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v)):
            out[k] = v
    return out


def _patch_pycc(features: str) -> None:
    """numba's AOT compiler as the JIT compiles (see the module's text)."""
    import numba.pycc.compiler as pycc_compiler
    from numba.core import codegen
    from numba.core.compiler import Flags

    class _NoGilFlags(Flags):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.release_gil = True

    pycc_compiler.Flags = _NoGilFlags  # type: ignore[attr-defined]
    codegen.AOTCPUCodegen._customize_tm_features = lambda self: features  # type: ignore[method-assign]


def _sigbus_export() -> Any:
    """A function returning the SIGBUS handler's addresses (:func:`mapped.handler_ir`, built into
    the library)."""
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from mlxtral.formats.mapped import handler_ir

    @intrinsic
    def _addresses(typingctx):  # type: ignore[no-untyped-def]
        sig = types.UniTuple(types.int64, 3)()

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            m = builder.module
            try:
                fn, buf, n = m.get_global("mlxtral_sigbus_handler"), m.get_global("mlxtral_sigbus_msg"), \
                    m.get_global("mlxtral_sigbus_len")
            except KeyError:
                fn, buf, n = handler_ir(m)
            i64 = ir.IntType(64)
            vals = [builder.ptrtoint(x, i64) for x in (fn, buf, n)]
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    def sigbus_handler():  # type: ignore[no-untyped-def]
        return _addresses()

    return njit(sigbus_handler)


def build() -> Path:
    """Compile the library for this host from what this process's dispatchers compiled; returns its
    path. Raises on any failure (the caller leaves the note)."""
    import importlib

    from numba.core import config
    from numba.core.registry import cpu_target
    from numba.pycc import CC

    key = aot.library_key()
    lib_path, man_path, note = aot.paths(key)
    target = lib_path.parent
    target.mkdir(parents=True, exist_ok=True)
    cg = cpu_target.target_context.codegen()
    cpu_name = config.CPU_NAME or cg._get_host_cpu_name()
    features = cg._tm_features
    _patch_pycc(features)
    from mlxtral.backends import _kernels_ir

    basename = f"mlxtral_kernels_{key}"
    cc = CC(basename)
    cc.target_cpu = cpu_name
    manifest: dict[str, Any] = {"format": aot.FORMAT, "key": key, "isa": _kernels_ir.ISA, "cpu": cpu_name,
                                "features": features, "modules": {}}
    n = 0
    for modname, names in aot.ENTRY_POINTS.items():
        mod = importlib.import_module(f"mlxtral.backends.{modname}")
        entries: dict[str, list] = {}
        for name in names:
            disp = getattr(mod, name)
            if not _plain(disp.targetoptions):
                continue
            exports = []
            for sig in disp.signatures:
                k = tuple(numba_key(t) for t in sig)
                if any(x is None for x in k):
                    continue
                ret = disp.overloads[sig].signature.return_type
                symbol = f"k{n}_{name}"
                n += 1
                cc.export(symbol, ret(*sig))(disp.py_func)
                exports.append([k, symbol])
            if exports:
                entries[name] = exports
        manifest["modules"][modname] = {"entries": entries, "constants": _constants(mod)}
    if n == 0:  # this process ran no kernel through numba (it ran a library's): nothing to build from
        raise RuntimeError("no kernel was compiled in this process")
    from numba.core import types

    cc.export("sigbus_handler", types.UniTuple(types.int64, 3)())(_sigbus_export().py_func)
    ident = int.from_bytes(os.urandom(7), "little")  # pairs this library with this manifest
    manifest["build_id"] = ident

    def build_id():  # type: ignore[no-untyped-def]
        return ident  # (a closure's value: a constant in the compiled code)

    cc.export("build_id", types.int64())(build_id)
    with tempfile.TemporaryDirectory(prefix="build-", dir=target) as tmp:
        cc.output_dir = tmp
        cc.compile()
        built = next(p for p in Path(tmp).iterdir() if p.name.startswith(basename) and p.is_file())
        os.replace(built, lib_path)
    tmp_man = man_path.with_name(man_path.name + f".tmp{os.getpid()}")
    tmp_man.write_text(json.dumps(manifest), encoding="utf-8")
    os.replace(tmp_man, man_path)
    note.unlink(missing_ok=True)
    _remove_stale(target, key)
    return lib_path


def _remove_stale(folder: Path, key: str) -> None:
    """Our own earlier libraries in ``folder`` (built from other sources, or for another CPU: a new
    one after every upgrade); only names this module writes, never anything else there."""
    if os.name != "posix":  # a loaded library cannot be removed elsewhere
        return
    own = re.compile(r"mlxtral_kernels_([0-9a-f]{20})(\.json|\.failed|\..*\.so|\.so)")
    for p in folder.iterdir():
        m = own.fullmatch(p.name)
        if m and m.group(1) != key and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def build_or_note() -> Path | None:
    """:func:`build`, or the failure noted beside where the library would be (see the text)."""
    if not aot.wanted():
        return None
    try:
        if not toolchain_ready():
            raise RuntimeError("no C compiler or no Python headers (Python.h) here")
        return build()
    except Exception as e:  # noqa: BLE001 - any failure: the JIT runs; the note says why
        try:
            note = aot.paths()[2]
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(f"{type(e).__name__}: {str(e)[:300]}\n", encoding="utf-8")
        except OSError:
            pass
        if os.environ.get("MLXTRAL_AOT_DEBUG"):
            traceback.print_exc(file=sys.stderr)
        return None


def toolchain_ready() -> bool:
    """Whether a C compiler and Python's headers are here (numba's AOT compiler needs both)."""
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    include = sysconfig.get_paths().get("include") or ""
    return shutil.which(cc) is not None and os.path.isfile(os.path.join(include, "Python.h"))
