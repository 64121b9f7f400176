"""A text every Python has, for perplexity runs where datasets cannot be downloaded: the standard
library's ``pydoc_data.topics`` (the language reference's topics, English prose with code, ~465 K
characters, ~110 K tokens with SmolLM2's vocabulary), topics in sorted order, blank line between.

    python -m mlxtral.evaluation.sample_text topics.txt
"""
from __future__ import annotations

import sys
from pathlib import Path

from mlxtral.convert.output_guard import FileKind
from mlxtral.display import term_safe
from mlxtral.errors import MlxtralError, UsageError


def sample_text() -> str:
    """The pydoc topics joined in sorted key order (the same text for a given Python version)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)) + "\n"


TEXT_FILE = FileKind(b"", "a file", "--force")  # --force replaces a regular file, nothing else


def write_sample_text(path: str | Path, force: bool = False) -> int:
    """Write :func:`sample_text` as UTF-8 to ``path`` (atomically; an existing file only with
    ``force``); returns its size in bytes."""
    from mlxtral.convert.atomic import atomic_output

    data = sample_text().encode("utf-8")
    with atomic_output(Path(path), is_dir=False, force=force, kind=TEXT_FILE) as tmp:
        tmp.write_bytes(data)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--" in args:  # what follows is a name, even one that starts with '-'
        i = args.index("--")
        head, names = args[:i], args[i + 1 :]
    else:
        head, names = [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]
    usage = "usage: python -m mlxtral.evaluation.sample_text [--force] OUT.txt\n"
    if {"-h", "--help"} & set(head):
        sys.stdout.write(usage)
        return 0
    force = "--force" in head
    args = names if not set(head) - {"--force"} else []
    if len(args) != 1:
        sys.stderr.write(usage)
        return 2
    if not args[0]:
        sys.stderr.write("error: the output file name is empty\n")
        return 2
    try:
        n = write_sample_text(args[0], force)
    except MlxtralError as e:
        sys.stderr.write(f"error: {term_safe(str(e), 500)}\n")
        return 2 if isinstance(e, UsageError) else 1
    sys.stderr.write(f"wrote {term_safe(args[0], 300)} ({n} bytes, Python {sys.version.split()[0]}'s pydoc "
                     "topics)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
