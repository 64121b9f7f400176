"""The installed package holds every module: each package folder of the repo is listed in
pyproject.toml (a folder missing there is absent from a non-editable install, while an editable one,
as the test suite uses, still finds it)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")


def test_every_package_folder_is_listed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]  # package name -> folder
    found = set()
    for name, folder in dirs.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - found == set()


def test_the_cli_module_is_the_top_level_file() -> None:
    """``mlxtral/cli.py`` is a link to ``../cli.py`` (one file, installed as mlxtral.cli): an editor
    or ``sed -i`` that replaces the link with a copy would fork the two without any test noticing."""
    link = ROOT / "mlxtral" / "cli.py"
    assert link.is_symlink() and link.resolve() == (ROOT / "cli.py").resolve()
