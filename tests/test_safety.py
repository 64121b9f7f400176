"""Bad and hostile checkpoints: every one is a clean MlxtralError, refused before large allocations,
and no pickle ever runs foreign code."""
from __future__ import annotations

import json
import os
import pickle
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import (
    hf_config,
    random_weights,
    tiny_args,
    torch_save,
    write_hf,
    write_original,
    write_safetensors,
)

from mlxtral.errors import ConfigError, FormatError, MlxtralError, UnsafeCheckpointError
from mlxtral.formats.detect import open_checkpoint
from mlxtral.formats.hf import load_hf
from mlxtral.formats.original import load_original
from mlxtral.formats.safetensors import open_safetensors
from mlxtral.formats.torch_zip import load_torch_zip

ARGS = tiny_args(vocab_size=320)  # a small vocab keeps these files tiny
BIG = 1 << 20  # "large allocation": anything over 1 MiB while refusing a bad file


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_weights(ARGS, seed=7)


def refused_small(fn, exc: type[Exception] = FormatError, match: str | None = None) -> None:
    """``fn()`` raises ``exc`` without allocating more than BIG bytes on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(exc, match=match):
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BIG, f"peak {peak} bytes before refusing"


# ---- safetensors -------------------------------------------------------------------------------
def raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", n: int | None = None) -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return path


def small_st(tmp_path: Path) -> Path:
    return write_safetensors(tmp_path / "ok.safetensors", {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16),
        "c": np.arange(4, dtype=np.uint32)})


def test_safetensors_truncated(tmp_path: Path) -> None:
    good = small_st(tmp_path).read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    for cut in (0, 3, 8, 9, 8 + n - 1, 8 + n + 10, len(good) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(good[:cut])
        with pytest.raises(FormatError, match=str(p.name)):
            open_safetensors(p)


@pytest.mark.parametrize("header,data,n,match", [
    (b"{}", b"", 1 << 62, "not plausible"),
    (b"{}", b"", 1 << 20, "past the end"),
    (b"\xff\xfe not json", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "past the end"),
    ({"a": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}, b"\0" * 8, None,
     "past the end"),
    ({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "needs"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs"),
    ({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40, 0], "data_offsets": [0, 0]}}, b"", None,
     "bad shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "bad data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8, None, "bad data_offsets"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad shape"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unsupported dtype"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "missing dtype"),
    ({"a": [1]}, b"", None, "not an object"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"__metadata__": {"x": 1}}, b"", None, "__metadata__"),
])
def test_safetensors_lying_headers(tmp_path: Path, header, data: bytes, n, match: str) -> None:
    p = raw_safetensors(tmp_path / "bad.safetensors", header, data, n)
    refused_small(lambda: open_safetensors(p), FormatError, match)


# ---- hostile pickles -----------------------------------------------------------------------------
def torch_like_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None,
                   compress: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for k, v in (storages or {}).items():
            z.writestr(f"archive/data/{k}", v, compress_type=zipfile.ZIP_DEFLATED if compress else None)
        z.writestr("archive/version", "3\n")
    return path


class _Reduce:
    def __init__(self, fn, args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    m = str(marker)
    return {
        "os.system": pickle.dumps({"w": _Reduce(os.system, (f"touch {m}",))}, protocol=2),
        "builtins.open": pickle.dumps({"w": _Reduce(open, (m, "w"))}, protocol=2),
        "builtins.eval": pickle.dumps(_Reduce(eval, (f"open({m!r}, 'w').write('x')",)), protocol=4),
        "exec-proto0": (f"cbuiltins\nexec\n(V open({m!r}, 'w').write('x')\ntR.").encode(),
        "subprocess": pickle.dumps(_Reduce(__import__("subprocess").call, (["touch", m],)), protocol=2),
        "importlib": b"\x80\x02cimportlib\nimport_module\nX\x02\x00\x00\x00osq\x00\x85R.",
        "torch.load-chain": b"\x80\x02ctorch\nload\nX\x01\x00\x00\x00x\x85R.",
        # a torch-looking name that is not a tensor rebuilder
        "torch._utils-other": b"\x80\x02ctorch._utils\n_import_dotted_name\nX\x02\x00\x00\x00os\x85R.",
        # BUILD trying to rewrite an allowed callable's attributes
        "build-on-allowed": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
                             b"N}X\x08\x00\x00\x00__code__K\x01s\x86b."),
    }


@pytest.mark.parametrize("kind", list(hostile_pickles(Path("x"))))
def test_hostile_pickle_never_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    p = torch_like_zip(tmp_path / "consolidated.00.pth", hostile_pickles(marker)[kind])
    with pytest.raises(UnsafeCheckpointError, match="consolidated.00.pth"):
        load_torch_zip(p)
    assert not marker.exists()


def test_hostile_torch_save_in_original_folder(tmp_path: Path, weights) -> None:
    """A real torch.save of a state dict that also holds a malicious object, in an original folder."""
    torch = pytest.importorskip("torch")
    folder = write_original(tmp_path / "orig", weights, ARGS, fmt="pth")
    marker = tmp_path / "pwned"
    sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
    sd["evil"] = _Reduce(os.system, (f"touch {marker}",))
    torch.save(sd, folder / "consolidated.00.pth")
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|nt.system"):
        open_checkpoint(folder)
    assert not marker.exists()


def test_legacy_plain_pickle_pth_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "consolidated.00.pth"
    p.write_bytes(hostile_pickles(marker)["os.system"])
    with pytest.raises(FormatError, match="not a PyTorch zip"):
        load_torch_zip(p)
    assert not marker.exists()


def _tensor_pickle(key: str, numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """data.pkl for {"w": tensor}, opcode by opcode as torch writes it, with our own geometry."""
    def uni(x: str) -> bytes:
        return b"X" + struct.pack("<I", len(x)) + x.encode()

    def ints(t: tuple[int, ...]) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in t) + b"t"

    pid = b"(" + uni("storage") + b"ctorch\nFloatStorage\n" + uni(key) + uni("cpu")
    pid += ints((numel,))[1:-1] + b"tQ"
    hooks = b"ccollections\nOrderedDict\n)R"
    args = b"(" + pid + b"K\x00" + ints(size) + ints(stride) + b"\x89" + hooks + b"t"
    return b"\x80\x02}" + uni("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs."


@pytest.mark.parametrize("size,stride,storage_bytes,match", [
    ((4, 4), (4, 1), 64, None),  # the valid baseline
    ((1 << 20, 1 << 20), (1 << 20, 1), 64, "runs past its storage"),
    ((4, 4), (4, 1), 32, "holds 32 bytes"),
    ((4, 4), (-4, 1), 64, "bad tensor stride"),
    ((1 << 30, 1 << 30, 0), (0, 0, 1), 64, "bad tensor size"),  # empty, of a shape no array has
    ((1 << 20, 1 << 20), (0, 0), 64, "more than once"),  # one float posing as 4 TB: an expanded view
    ((4, 4), (1, 1), 64, "more than once"),  # overlapping rows
    ((4, 4), (1, 4), 64, None),  # a transposed (column-major) view is fine
])
def test_pth_lying_geometry(tmp_path: Path, size, stride, storage_bytes: int, match) -> None:
    pkl = _tensor_pickle("0", 16, size, stride)
    p = torch_like_zip(tmp_path / "x.pth", pkl, {"0": b"\0" * storage_bytes})
    if match is None:
        got, _ = load_torch_zip(p)
        np.testing.assert_array_equal(got["w"].data, np.zeros((4, 4), np.float32))
    else:
        refused_small(lambda: load_torch_zip(p), FormatError, match)


def test_pth_missing_storage_and_compressed_member(tmp_path: Path) -> None:
    pkl = _tensor_pickle("0", 16, (4, 4), (4, 1))
    p = torch_like_zip(tmp_path / "a.pth", pkl, {})
    with pytest.raises(FormatError, match="missing from the archive"):
        load_torch_zip(p)
    p = torch_like_zip(tmp_path / "b.pth", pkl, {"0": b"\0" * 64}, compress=True)
    with pytest.raises(FormatError, match="compressed"):
        load_torch_zip(p)


def test_pth_truncated(tmp_path: Path, weights) -> None:
    torch_save(tmp_path / "x.pth", {"a": weights["blk.0.attn_q.weight"]})
    good = (tmp_path / "x.pth").read_bytes()
    for cut in (10, len(good) // 2, len(good) - 30):
        p = tmp_path / f"cut{cut}.pth"
        p.write_bytes(good[:cut])
        with pytest.raises(FormatError):
            load_torch_zip(p)


# ---- folders -------------------------------------------------------------------------------------
def test_hf_missing_shard(tmp_path: Path, weights) -> None:
    folder = write_hf(tmp_path / "hf", weights, ARGS, shards=3, tokenizer=False)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FormatError, match="model-00002-of-00003.safetensors is missing"):
        open_checkpoint(folder)


def test_hf_index_lies(tmp_path: Path, weights) -> None:
    folder = write_hf(tmp_path / "hf", weights, ARGS, shards=2, tokenizer=False)
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "model-00002-of-00002.safetensors" if idx["weight_map"][name].startswith(
        "model-00001") else "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match="does not hold it"):
        load_hf(folder)
    idx["weight_map"][name] = "../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FormatError, match="outside the folder"):
        load_hf(folder)


@pytest.mark.parametrize("change,match", [
    ({"intermediate_size": 256}, "disagree with the config"),
    ({"num_local_experts": 8}, "missing"),
    ({"num_local_experts": 2}, "not used"),
    ({"num_hidden_layers": 3}, "missing: blk.2"),
    ({"tie_word_embeddings": True}, None),  # a stored lm_head wins: loads fine
    # a config that implies billions of tensors is refused by arithmetic, not by listing them
    ({"num_hidden_layers": 16_000_000, "num_local_experts": 4096}, "implies 196736000003 tensors"),
])
def test_hf_config_disagrees_with_tensors(tmp_path: Path, weights, change: dict, match) -> None:
    folder = write_hf(tmp_path / "hf", weights, ARGS, tokenizer=False)
    (folder / "config.json").write_text(json.dumps(hf_config(ARGS) | change))
    if match is None:
        assert "output.weight" in load_hf(folder).tensors
    else:
        with pytest.raises(FormatError, match=match):
            load_hf(folder)


def test_hf_config_missing_key_and_bad_json(tmp_path: Path, weights) -> None:
    folder = write_hf(tmp_path / "hf", weights, ARGS, tokenizer=False)
    cfg = hf_config(ARGS)
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        open_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(MlxtralError, match="config.json"):
        open_checkpoint(folder)


def test_hf_extra_unknown_tensor(tmp_path: Path, weights) -> None:
    folder = write_hf(tmp_path / "hf", weights, ARGS, tokenizer=False)
    extra = tmp_path / "hf" / "model.safetensors"
    from mlxtral.formats.safetensors import open_safetensors as _open

    st = _open(extra)
    data = {k: np.array(v.data) for k, v in st.tensors.items()}
    del st
    data["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    write_safetensors(extra, data)
    with pytest.raises(FormatError, match="not used by the model: model.layers.0.self_attn.q_norm.weight"):
        load_hf(folder)


def test_original_truncated_shard(tmp_path: Path, weights) -> None:
    folder = write_original(tmp_path / "orig", weights, ARGS, shards=2)
    p = folder / "consolidated.01.pth"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(FormatError, match="consolidated.01.pth"):
        load_original(folder)


def test_original_params_disagree(tmp_path: Path, weights) -> None:
    folder = write_original(tmp_path / "orig", weights, ARGS, fmt="safetensors")
    p = json.loads((folder / "params.json").read_text())
    p["n_kv_heads"] = 4
    (folder / "params.json").write_text(json.dumps(p))
    with pytest.raises(FormatError, match="attn_k.weight"):
        open_checkpoint(folder)


# ---- fuzz ----------------------------------------------------------------------------------------
FUZZ_CASES = {"safetensors": 0, "pth": 0}


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


_edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6)
_cut = st.one_of(st.none(), st.integers(0, 1 << 12))


@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("fuzzsrc")
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16),
               "c": np.arange(4, dtype=np.uint32)}
    out = {"safetensors": write_safetensors(d / "x.safetensors", tensors).read_bytes()}
    pytest.importorskip("torch")
    torch_save(d / "x.pth", {"a": tensors["a"], "b": tensors["b"].astype(np.float32)}, "bf16")
    out["pth"] = (d / "x.pth").read_bytes()
    return out


def _load_and_touch(kind: str, p: Path) -> None:
    if kind == "safetensors":
        tensors = open_safetensors(p).tensors
    else:
        tensors, _ = load_torch_zip(p)
    for t in tensors.values():
        np.ascontiguousarray(t.data).tobytes()  # touch every byte of the view


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=_edits, cut=_cut)
def test_fuzz_mutated_files_fail_cleanly(tmp_path: Path, fuzz_sources, kind: str, edits, cut) -> None:
    """Random byte edits and truncations: a correct load or an MlxtralError, nothing else."""
    src = fuzz_sources[kind]
    if cut is not None and cut >= len(src):
        cut = None
    p = tmp_path / f"fuzz.{kind}"
    p.write_bytes(_mutate(src, edits if kind == "safetensors" else
                          [(pos % len(src), v) for pos, v in edits], cut))
    FUZZ_CASES[kind] += 1
    try:
        _load_and_touch(kind, p)
    except MlxtralError:
        pass


def test_fuzz_case_count() -> None:
    """Run after the fuzz tests: reports how many mutated files were tried."""
    print(f"fuzz cases run: {FUZZ_CASES}")



def test_mlx_folder_bad_quantization(tmp_path: Path, weights) -> None:
    pytest.importorskip("mlx.core")
    from tiny_models import write_mlx

    folder, _ = write_mlx(tmp_path / "mlx", weights, ARGS, bits=4, group_size=64)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"num_local_experts": 8}))
    refused_small(lambda: open_checkpoint(folder), FormatError, "missing: blk.0.ffn_gate.4")
    (folder / "config.json").write_text(json.dumps(cfg | {"quantization": {"group_size": 32, "bits": 4}}))
    with pytest.raises(FormatError, match="do not fit 4-bit groups of 32"):
        open_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps(cfg | {"quantization": {"group_size": 64, "bits": 4,
                                                                           "mode": "mxfp4"}}))
    with pytest.raises(FormatError, match="mxfp4"):
        open_checkpoint(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("where", ["hf-shard", "pth", "gguf-file", "safetensors-file"])
def test_pipes_and_devices_are_refused_not_waited_on(tmp_path: Path, weights, where: str) -> None:
    """A FIFO blocks open() forever and /dev/zero never ends: both are refused with one line.
    Run in a subprocess with a timeout, so a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    if where == "hf-shard":
        folder = write_hf(tmp_path / "hf", weights, ARGS, tokenizer=False)
        (folder / "model.safetensors").unlink()
        os.mkfifo(folder / "model-00001-of-00001.safetensors")
        target = folder
    elif where == "pth":
        folder = tmp_path / "orig"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4,
                                                        "hidden_dim": 128, "vocab_size": 32000}))
        os.mkfifo(folder / "consolidated.00.pth")
        target = folder
    elif where == "gguf-file":
        target = tmp_path / "model.gguf"
        os.mkfifo(target)
    else:
        target = Path("/dev/zero")
    code = ("import sys, mlxtral\nfrom mlxtral.errors import MlxtralError\n"
            "try:\n    mlxtral.load(sys.argv[1], backend='numpy')\nexcept MlxtralError as e:\n"
            "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("refused:"), (r.stdout, r.stderr[-1500:])
