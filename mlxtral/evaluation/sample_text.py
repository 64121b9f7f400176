"""A text every Python has, for perplexity runs where datasets cannot be downloaded: the standard
library's ``pydoc_data.topics`` (the language reference's topics, English prose with code, ~465 K
characters, ~110 K tokens with SmolLM2's vocabulary), topics in sorted order, blank line between.

    python -m mlxtral.evaluation.sample_text topics.txt
"""
from __future__ import annotations

import sys
from pathlib import Path


def sample_text() -> str:
    """The pydoc topics joined in sorted key order (the same text for a given Python version)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)) + "\n"


def write_sample_text(path: str | Path) -> int:
    """Write :func:`sample_text` as UTF-8 to ``path``; returns its size in bytes."""
    data = sample_text().encode("utf-8")
    Path(path).write_bytes(data)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m mlxtral.evaluation.sample_text OUT.txt\n")
        return 2
    n = write_sample_text(args[0])
    sys.stderr.write(f"wrote {args[0]} ({n} bytes, Python {sys.version.split()[0]}'s pydoc topics)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
