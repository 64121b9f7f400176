"""What a loaded model holds beside its file, kept small: embedding rows read from the file (not
faulted in through the map, 64 KB around each), the GGUF vocabulary held once (by the tokenizer),
rotary tables without a complex copy."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tiny_models import random_weights, raw_gguf_tensors, tiny_args, write_gguf, write_raw_gguf

import mlxtral
from mlxtral.backends import ops
from mlxtral.errors import FormatError
from mlxtral.formats.mapped import row_reader


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lean")
    args = tiny_args()
    return {"f32": write_gguf(d / "f32.gguf", random_weights(args, 0), args),
            "q8": write_raw_gguf(d / "q8.gguf", raw_gguf_tensors(args, "Q8_0"), args, vocab=True)}


@pytest.mark.parametrize("kind", ["f32", "q8"])
def test_embedding_rows_are_read_from_the_file_and_equal_the_maps(files: dict[str, Path], kind: str) -> None:
    m = mlxtral.load(files[kind], backend="numpy")
    be = m.backend
    assert be._embed_file is not None  # untied: the output does not read the whole table
    ids = [0, 5, 31999, 5, 17]
    assert np.array_equal(be.embed_rows(ids), be.embed.rows(ids))
    with pytest.raises(IndexError):
        be.embed_rows([32000])


def test_a_tied_or_unmapped_embedding_is_read_through_the_map() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert row_reader(a) is None  # not a view of a watched file


def test_a_file_cut_under_the_reader_is_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    p = tmp_path / "cut.gguf"
    p.write_bytes(files["q8"].read_bytes())
    m = mlxtral.load(p, backend="numpy")
    emb = m.backend.embed
    reader = row_reader(emb.data)
    assert reader is not None
    os.truncate(p, reader.offset + reader.row_bytes)  # only row 0 is left
    assert np.array_equal(reader.rows(np.array([0])), np.asarray(emb.data[:1]))
    with pytest.raises(FormatError, match="truncated"):
        reader.rows(np.array([3]))


def test_the_vocabulary_is_held_once(files: dict[str, Path]) -> None:
    m = mlxtral.load(files["q8"], backend="numpy")
    md = m.checkpoint.metadata
    assert "tokenizer.ggml.tokens" not in md and "tokenizer.ggml.scores" not in md
    assert "tokenizer.ggml.model" in md and "general.architecture" in md
    assert m.tokenizer.decode(m.tokenizer.encode("Hello world")) == "Hello world"


def test_rope_cis_is_cos_and_sin() -> None:
    r = ops.Rope(16, 1e6, 64)
    assert r.cis.dtype == np.complex64
    assert np.array_equal(r.cis.real, r.cos) and np.array_equal(r.cis.imag, r.sin)
