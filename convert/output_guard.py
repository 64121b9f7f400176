"""What an output path may be, checked before any work and again just before it is replaced.

Writing OUT must never destroy anything the user did not name as output:
- OUT is never a source file, a folder that holds one, or a path inside the source, after
  resolving links (an HF cache snapshot is a folder of symlinks into ``blobs/``: OUT must not be,
  hold or sit inside any of those blobs either, nor be a hard link to one);
- an existing OUT is replaced only with ``--force``, and only when it is what we write: a GGUF file
  for GGUF output, a model folder (only files a model folder holds, no subfolders) for MLX output.
  A folder holding other files, or a file of another kind, is refused even with ``--force``.
"""
from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mlxtral.errors import UsageError

# Files an MLX/HF model folder holds; ``--force`` replaces a folder only if it holds nothing else.
_MODEL_FOLDER_FILE = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|params"
    r"|model\.safetensors\.index|preprocessor_config)\.json"
    r"|(model|consolidated)(-\d{1,6}-of-\d{1,6}|\.\d{1,6})?\.safetensors"
    r"|tokenizer\.model(\.v\d{1,3})?|tekken\.json|chat_template\.(jinja|json)|README\.md|\.gitattributes")
_MAX_WALK = 10_000  # source entries looked at (an HF folder has tens); beyond: refuse, do not guess
_MAX_LISTED = 3  # foreign entries named in a refusal


def source_paths(src: Path) -> list[Path]:
    """``src`` and, for a folder, every entry under it (two levels deep, as checkpoints are laid out),
    each both as named and resolved through its links."""
    paths = [Path(os.path.abspath(src)), src.resolve()]
    if src.is_dir():
        seen = 0
        stack = [(src, 0)]
        while stack:
            folder, depth = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                seen += 1
                if seen > _MAX_WALK:
                    raise UsageError(f"holds more than {_MAX_WALK} entries; convert from the model folder "
                                     "itself", src)
                p = Path(e.path)
                paths += [Path(os.path.abspath(p)), p.resolve()]
                if depth < 1 and e.is_dir(follow_symlinks=False):
                    stack.append((p, depth + 1))
    return list(dict.fromkeys(paths))


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or inside it."""
    return a == b or b in a.parents


def _ids(paths: Iterable[Path]) -> set[tuple[int, int]]:
    out = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out.add((st.st_dev, st.st_ino))
    return out


def check_not_source(out: Path, sources: list[Path]) -> None:
    """Refuse an OUT that is a source, holds one, or lies inside one (as named or through links)."""
    outs = [Path(os.path.abspath(out)), out.resolve()]
    for o in outs:
        for s in sources:
            if _within(o, s):
                raise UsageError(f"the output would be inside the source {s}" if o != s else
                                 "the output is the source itself", out)
            if _within(s, o):
                raise UsageError(f"the output holds the source ({s}): writing it would destroy it", out)
    if os.path.lexists(out) and _ids([out]) & _ids(sources):
        raise UsageError("the output is a link to a source file", out)


@dataclass(frozen=True)
class FileKind:
    """What an output file is, to recognise one that may be replaced: its first bytes, its name in
    messages, and what asked for the replacement."""

    magic: bytes
    name: str
    flag: str
    strict: bool = False  # replaced without the user's --force: never a link, never an empty file


GGUF_FILE = FileKind(b"GGUF", "a GGUF file", "--force")


def check_replaceable(out: Path, *, is_dir: bool, kind: FileKind = GGUF_FILE) -> None:
    """An existing OUT (``--force``) must be what we write: a file of ``kind`` (a GGUF file unless
    told), or a model folder."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        if kind.strict and not is_dir:
            raise UsageError(f"is a symbolic link; {kind.flag} replaces only {kind.name} (name the file "
                             "itself, or a new one)", out)
        return  # replacing a link replaces the link, never what it points to
    if not is_dir:
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"is not a file; {kind.flag} replaces only {kind.name}", out)
        with open(out, "rb") as f:
            magic = f.read(len(kind.magic))
        if (st.st_size or kind.strict) and magic != kind.magic:
            raise UsageError(f"is not {kind.name}; {kind.flag} replaces only {kind.name} (choose another "
                             "name)", out)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError("is a file; an MLX output is a folder and --force replaces only a model folder", out)
    foreign: list[str] = []
    with os.scandir(out) as it:
        for e in it:
            if not (_MODEL_FOLDER_FILE.fullmatch(e.name) and e.is_file(follow_symlinks=False)):
                foreign.append(e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))
                if len(foreign) > _MAX_LISTED:
                    break
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:_MAX_LISTED]) + (", ..." if len(foreign) > _MAX_LISTED
                                                                      else "")
        raise UsageError(f"holds files that are not a model's ({shown}); --force replaces only a model "
                         "folder: choose another OUT or empty it yourself", out)


def check_output(out: Path, *, is_dir: bool, force: bool, sources: list[Path] | None = None,
                 kind: FileKind = GGUF_FILE) -> None:
    """Everything about OUT that can be known before the work starts (see the module's doc)."""
    if sources:
        check_not_source(out, sources)
    if os.path.lexists(out):
        if not force:
            raise UsageError("already exists (use --force to replace it)", out)
        check_replaceable(out, is_dir=is_dir, kind=kind)
    if not out.parent.is_dir():
        raise UsageError("the parent folder does not exist", out)
