"""Writing an output never destroys what the user did not name as output (issue 16, data loss).

- OUT that is the source, holds it or lies inside it (as named, through symlinks as in an HF cache
  snapshot, or as a hard link) is refused, ``--force`` or not, before any work; every file stays.
- ``--force`` replaces only what we write: a GGUF file for GGUF output, a model folder for MLX output.
- Concurrent conversions to one new OUT: exactly one wins, the others fail and leave it alone.
Checked through the API (convert, upcycle, atomic_output) and the command line.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import random_weights, tiny_args, write_gguf, write_hf  # noqa: E402

from mlxtral.cli import app  # noqa: E402
from mlxtral.convert import convert  # noqa: E402
from mlxtral.convert.atomic import atomic_output, rename_noreplace  # noqa: E402
from mlxtral.errors import UsageError  # noqa: E402

runner = CliRunner()
SCRIPT = Path(sys.executable).parent / "mlxtral"


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under ``root``: path -> content hash (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "->" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("srcs")
    args = tiny_args()
    w = random_weights(args, 3)
    dense_args = tiny_args(n_experts=0)
    return {"gguf": write_gguf(d / "model.gguf", w, args, vocab=False),
            "hf": write_hf(d / "hf", w, args),
            "dense": write_gguf(d / "dense.gguf", random_weights(dense_args, 4), dense_args, vocab=False)}


def _project(tmp_path: Path, sources: dict[str, Path], kind: str) -> tuple[Path, Path]:
    """A user's project folder holding a checkpoint (``kind``) and notes of their own."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("my notes")
    src = sources[kind]
    if kind == "hf":
        import shutil

        shutil.copytree(src, proj / "hf")
        return proj, proj / "hf"
    (proj / "model.gguf").write_bytes(src.read_bytes())
    return proj, proj / "model.gguf"


# ---- OUT around, at or inside the source -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["gguf", "hf"])
@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
def test_out_holding_the_source_is_refused(tmp_path: Path, sources: dict[str, Path], kind: str,
                                           fmt: str) -> None:
    """`convert proj/model.gguf proj --format mlx --force` once wiped proj/."""
    proj, src = _project(tmp_path, sources, kind)
    before = snapshot(tmp_path)
    for out in (proj, tmp_path):  # the folder holding SRC and its parent
        with pytest.raises(UsageError, match="holds the source"):
            convert(src, out, fmt=fmt, qtype="q8", force=True, progress=False)
        r = runner.invoke(app, ["convert", str(src), str(out), "--format", fmt, "--force"])
        assert r.exit_code == 2 and "holds the source" in r.stderr, r.output
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_out_is_or_inside_the_source_is_refused(tmp_path: Path, sources: dict[str, Path], kind: str) -> None:
    proj, src = _project(tmp_path, sources, kind)
    before = snapshot(tmp_path)
    outs = [src] if kind == "gguf" else [src, src / "out.gguf", src / "model.safetensors", src / "sub"]
    for out in outs:
        with pytest.raises(UsageError):
            convert(src, out, fmt="gguf" if out.suffix != "" or kind == "gguf" else "mlx", qtype="q8",
                    force=True, progress=False)
    assert snapshot(tmp_path) == before


def _hf_cache(tmp_path: Path, hf: Path) -> tuple[Path, Path]:
    """An HF hub cache: snapshots/<rev>/* are relative symlinks into blobs/<sha>."""
    repo = tmp_path / "hub" / "models--x--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in hf.iterdir():
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / sha)
    return repo, snap


def test_out_resolving_to_a_blob_of_an_hf_cache_is_refused(tmp_path: Path, sources: dict[str, Path]) -> None:
    repo, snap = _hf_cache(tmp_path, sources["hf"])
    blob = (snap / "model.safetensors").resolve()
    link = tmp_path / "out.gguf"
    link.symlink_to(blob)  # OUT is a link to one of SRC's blobs
    hard = tmp_path / "hard.gguf"
    os.link(blob, hard)  # OUT is a hard link to one of them
    before = snapshot(tmp_path)
    cases = [(blob, "gguf"), (repo / "blobs", "mlx"), (repo, "mlx"), (link, "gguf"), (hard, "gguf")]
    for out, fmt in cases:
        with pytest.raises(UsageError):
            convert(snap, out, fmt=fmt, qtype="q8", force=True, progress=False)
        r = runner.invoke(app, ["convert", str(snap), str(out), "--format", fmt, "--force"])
        assert r.exit_code == 2 and r.stderr.startswith("error: "), (out, r.output)
    assert snapshot(tmp_path) == before
    # converting from the snapshot to a new OUT still works
    convert(snap, tmp_path / "new.gguf", qtype="q8", progress=False)


def test_upcycle_never_overwrites_its_source(tmp_path: Path, sources: dict[str, Path]) -> None:
    from mlxtral.upcycle import upcycle

    src = tmp_path / "dense.gguf"
    src.write_bytes(sources["dense"].read_bytes())
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    hard = tmp_path / "hard.gguf"
    os.link(src, hard)
    before = snapshot(tmp_path)
    for out in (src, link, hard):
        with pytest.raises(UsageError):
            upcycle(src, out, force=True)
        r = runner.invoke(app, ["upcycle", str(src), str(out), "--force"])
        assert r.exit_code == 2, r.output
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    with pytest.raises(UsageError, match="not a GGUF"):
        upcycle(src, notes, force=True)
    assert snapshot(tmp_path) == {**before, "notes.gguf": hashlib.sha256(b"not a model").hexdigest()}
    out = upcycle(src, tmp_path / "moe.gguf")
    with pytest.raises(UsageError, match="already exists"):
        upcycle(src, out)  # the API refuses without force too
    upcycle(src, out, force=True)


# ---- --force replaces only what we write ----------------------------------------------------------


def test_force_replaces_only_a_model_folder_or_a_gguf(tmp_path: Path, sources: dict[str, Path]) -> None:
    src = sources["gguf"]
    user = tmp_path / "stuff"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    nested = tmp_path / "nested"
    (nested / "sub").mkdir(parents=True)
    (nested / "config.json").write_text("{}")
    doc = tmp_path / "doc.gguf"
    doc.write_text("not a GGUF, but named like one")
    pdf = tmp_path / "paper.pdf"
    pdf.write_text("a file")
    before = snapshot(tmp_path)
    for out, fmt, what in ((user, "mlx", "not a model's"), (nested, "mlx", "not a model's"),
                           (doc, "gguf", "not a GGUF"), (user, "gguf", "not a file"),
                           (pdf, "mlx", "is a file")):
        with pytest.raises(UsageError, match=what):
            convert(src, out, fmt=fmt, qtype="q8", force=True, progress=False)
    assert snapshot(tmp_path) == before
    # what we wrote is replaced
    src = sources["hf"]
    m = tmp_path / "m"
    convert(src, m, fmt="mlx", qtype="q8", progress=False)
    convert(src, m, fmt="mlx", qtype="q4", force=True, progress=False)
    g = tmp_path / "g.gguf"
    convert(src, g, qtype="q8", progress=False)
    convert(src, g, qtype="q4", force=True, progress=False)
    assert g.read_bytes()[:4] == b"GGUF"


def test_force_checks_out_again_at_the_rename(tmp_path: Path) -> None:
    """A user's folder put at OUT while the work ran is not replaced by --force."""
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="not a model's"):
        with atomic_output(out, is_dir=True, force=True) as tmp:
            (tmp / "config.json").write_text("new")
            (out / "photos").mkdir()  # appears meanwhile
    assert (out / "config.json").read_text() == "{}" and (out / "photos").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---- concurrent conversions to one new OUT ----------------------------------------------------------


@pytest.mark.parametrize("is_dir", [False, True])
@pytest.mark.parametrize("native", [True, False])
def test_out_appearing_meanwhile_is_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 is_dir: bool, native: bool) -> None:
    import mlxtral.convert.atomic as atomic

    if not native:  # the fallbacks: a hard link for a file, rename (refusing non-empty) for a folder
        monkeypatch.setattr(atomic, "_noreplace_call", lambda: None)
    out = tmp_path / ("m" if is_dir else "x.gguf")
    with pytest.raises(UsageError, match="appeared while"):
        with atomic_output(out, is_dir=is_dir) as tmp:
            if is_dir:
                (tmp / "config.json").write_text("mine")
                out.mkdir()
                (out / "config.json").write_text("theirs")
            else:
                tmp.write_bytes(b"mine")
                out.write_bytes(b"theirs")
    assert ((out / "config.json") if is_dir else out).read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("native", [True, False])
def test_rename_noreplace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    import mlxtral.convert.atomic as atomic

    if not native:
        monkeypatch.setattr(atomic, "_noreplace_call", lambda: None)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    rename_noreplace(a, b)
    assert b.read_text() == "a" and not a.exists()
    a.write_text("a2")
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    assert b.read_text() == "a" and a.read_text() == "a2"
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("x")
    with pytest.raises(FileExistsError):
        rename_noreplace(d, b)


@pytest.mark.skipif(not SCRIPT.exists(), reason="the mlxtral script is not installed")
@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
def test_three_concurrent_converts_to_one_new_out(tmp_path: Path, sources: dict[str, Path], fmt: str) -> None:
    """Three `convert`s to the same new OUT at once: one writes it, the others fail, none replaces it."""
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    precs = ["--q8", "--q4", "--f16"]
    procs = [subprocess.Popen([str(SCRIPT), "convert", str(sources["hf"]), str(out), "--format", fmt, p],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in precs]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    wins = [i for i, (rc, _) in enumerate(results) if rc == 0]
    assert len(wins) == 1, results
    for i, (rc, err) in enumerate(results):
        if i != wins[0]:
            assert rc == 2 and ("already exists" in err or "appeared while" in err), err
            assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left
    import mlxtral

    mlxtral.load(out).logits([1, 2, 3])  # the winner's output is whole


_TRUNCATE_DURING_CONVERT = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from tiny_models import random_weights, tiny_args, write_gguf
import mlxtral.convert.gguf_writer as gw
from mlxtral.convert import convert
d = Path(sys.argv[1])
args = tiny_args()
src = write_gguf(d / "src.gguf", random_weights(args, 1), args)
orig = gw.write_gguf
def truncating(ckpt, tmp, *a, **kw):
    os.truncate(src, 8192)  # the source shrinks under its map once the output is being written
    return orig(ckpt, tmp, *a, **kw)
gw.write_gguf = truncating
convert(src, d / "out.gguf", qtype="q8", progress=False)
"""


def test_source_truncated_during_convert_is_one_line(tmp_path: Path) -> None:
    """SIGBUS from the truncated source: one line naming it and the unfinished temporary, exit 1."""
    code = _TRUNCATE_DURING_CONVERT.format(tests=str(Path(__file__).parent))
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    err = p.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert "src.gguf" in err and "SIGBUS" in err
    left = [q for q in tmp_path.iterdir() if q.name.startswith(".out.gguf.tmp-")]
    assert len(left) == 1 and str(left[0]) in err and not (tmp_path / "out.gguf").exists()
