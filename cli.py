"""mlxtral command line (installed as the module mlxtral.cli)."""
from __future__ import annotations


def main() -> None:
    print("mlxtral")
