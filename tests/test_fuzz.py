"""Property-based fuzzing of whole checkpoints through ``open_checkpoint``.

Valid tiny files (a Mixtral-shaped GGUF with a gpt2-style vocabulary and F32/F16/Q8_0/Q4_0
tensors; an HF folder with one ``model.safetensors``) are mutated by hypothesis: bytes flipped or
overwritten with boundary integers, the file truncated, chunks spliced (copied over, inserted,
deleted). Every outcome must be a clean :class:`MlxtralError` or a correct load; any other
exception, a crash or a hang (hypothesis ``deadline``) fails. Mutations only inside the tensor
data must still load, with exactly the mutated bytes.

The number of cases run is printed by ``test_fuzz_case_count`` (run with ``-s`` to see it).
``MLXTRAL_FUZZ_EXAMPLES=N`` runs N cases per property instead of the default (a longer campaign).
"""
from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import random_weights, tiny_args, write_hf

from mlxtral.errors import MlxtralError
from mlxtral.formats.detect import open_checkpoint
from mlxtral.formats.gguf_parse import parse_gguf

ARGS = tiny_args(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=32,
                 vocab_size=48, n_experts=2, n_experts_per_tok=1)
CASES = {"gguf": 0, "gguf_loaded": 0, "safetensors": 0, "safetensors_loaded": 0}
EXAMPLES = int(os.environ.get("MLXTRAL_FUZZ_EXAMPLES", "600"))
FUZZ = settings(max_examples=EXAMPLES, deadline=3000, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
Q = gguf.GGMLQuantizationType


class Source:
    """A valid file's bytes (short repr: hypothesis prints fixtures of failing cases)."""

    def __init__(self, data: bytes, header: int, folder: Path | None = None) -> None:
        self.data, self.header, self.folder = data, header, folder

    def __repr__(self) -> str:
        return f"<Source {len(self.data)} bytes, header {self.header}>"


# ---- valid sources -------------------------------------------------------------------------------
def write_fuzz_gguf(path: Path) -> Path:
    """A tiny Mixtral-shaped GGUF: metadata of most value types, a small gpt2 vocabulary, merged
    experts in Q8_0/Q4_0, attention in F16, norms and router F32."""
    a, w = ARGS, random_weights(ARGS, seed=11)
    g = gguf.GGUFWriter(str(path), "llama")
    g.add_block_count(a.n_layers)
    g.add_embedding_length(a.dim)
    g.add_feed_forward_length(a.hidden_dim)
    g.add_head_count(a.n_heads)
    g.add_head_count_kv(a.n_kv_heads)
    g.add_context_length(256)
    g.add_layer_norm_rms_eps(a.norm_eps)
    g.add_rope_freq_base(a.rope_theta)
    g.add_expert_count(a.n_experts)
    g.add_expert_used_count(a.n_experts_per_tok)
    g.add_vocab_size(a.vocab_size)
    tokens = ["<s>", "</s>"] + [f"t{i}" for i in range(a.vocab_size - 4)] + ["Ġa", "日"]
    g.add_tokenizer_model("gpt2")
    g.add_token_list(tokens)
    g.add_token_types([3, 3] + [1] * (a.vocab_size - 2))
    g.add_token_merges(["t 1", "Ġ a"])
    g.add_bos_token_id(0)
    g.add_add_bos_token(False)

    def put(name: str, x: np.ndarray, qt: Q) -> None:
        if qt == Q.F32:
            g.add_tensor(name, x.astype(np.float32))
        elif qt == Q.F16:
            g.add_tensor(name, x.astype(np.float16))
        else:
            g.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)

    put("token_embd.weight", w["token_embd.weight"], Q.Q8_0)
    put("output_norm.weight", w["output_norm.weight"], Q.F32)
    put("output.weight", w["output.weight"], Q.F16)
    for i in range(a.n_layers):
        b = f"blk.{i}."
        for t in ("attn_norm", "ffn_norm", "ffn_gate_inp"):
            put(b + t + ".weight", w[b + t + ".weight"], Q.F32)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            put(b + t + ".weight", w[b + t + ".weight"], Q.F16)
        for t, qt in (("gate", Q.Q4_0), ("up", Q.Q8_0), ("down", Q.Q4_0)):
            put(b + f"ffn_{t}_exps.weight",
                np.stack([w[b + f"ffn_{t}.{e}.weight"] for e in range(a.n_experts)]), qt)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return path


@pytest.fixture(scope="module")
def gguf_src(tmp_path_factory: pytest.TempPathFactory) -> Source:
    p = write_fuzz_gguf(tmp_path_factory.mktemp("fz") / "src.gguf")
    ckpt = open_checkpoint(p)  # the source itself is valid
    assert ckpt.args.n_experts == 2
    return Source(p.read_bytes(), parse_gguf(p).data_start)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory: pytest.TempPathFactory) -> Source:
    folder = write_hf(tmp_path_factory.mktemp("fz") / "hf", random_weights(ARGS, seed=5), ARGS,
                      dtype="bf16", tokenizer=False)
    open_checkpoint(folder)
    data = (folder / "model.safetensors").read_bytes()
    return Source(data, 8 + struct.unpack_from("<Q", data)[0], folder)


# ---- mutations -----------------------------------------------------------------------------------
BOUNDARY = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 255, 256, 2**31 - 1, 2**31, 2**32 - 1,
            2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]

_pos = st.one_of(st.integers(0, 1 << 9), st.integers(0, 1 << 13), st.floats(0, 1))  # int or fraction
_edit = st.one_of(
    st.tuples(st.just("byte"), _pos, st.integers(0, 255)),
    st.tuples(st.just("u32"), _pos, st.sampled_from(BOUNDARY).map(lambda v: v % 2**32)),
    st.tuples(st.just("u64"), _pos, st.sampled_from(BOUNDARY)),
    st.tuples(st.just("ascii"), _pos, st.sampled_from([b"]", b"{", b'"', b",", b"9", b"-", b"e", b"\xff"])),
    st.tuples(st.just("splice"), _pos, st.tuples(_pos, st.integers(1, 64))),
    st.tuples(st.just("insert"), _pos, st.tuples(_pos, st.integers(1, 64))),
    st.tuples(st.just("delete"), _pos, st.integers(1, 64)),
    st.tuples(st.just("truncate"), _pos, st.none()),
)
_edits = st.lists(_edit, min_size=1, max_size=4)


def _at(pos: int | float, n: int, header: int) -> int:
    """Integers index the file (mostly its header); floats are a fraction of the whole file."""
    if isinstance(pos, float):
        return min(int(pos * n), max(n - 1, 0))
    i = pos % max(header + 64, 1) if pos < (1 << 9) else pos
    return i % max(n, 1)


def mutate(data: bytes, edits: list, header: int) -> tuple[bytes, bool]:
    """Apply ``edits``; also say whether only tensor bytes changed (same length, all past ``header``)."""
    b = bytearray(data)
    data_only = True
    for kind, pos, arg in edits:
        if not b:
            break
        i = _at(pos, len(b), header)
        if kind == "byte":
            b[i] = arg
        elif kind in ("u32", "u64"):
            raw = struct.pack("<I" if kind == "u32" else "<Q", arg)
            b[i:i + len(raw)] = raw[:max(len(b) - i, 0)]
        elif kind == "ascii":
            b[i] = arg[0]
        elif kind == "splice":
            j, n = _at(arg[0], len(b), header), arg[1]
            chunk = bytes(b[j:j + n])
            b[i:i + len(chunk)] = chunk[:max(len(b) - i, 0)]
        elif kind == "insert":
            j, n = _at(arg[0], len(b), header), arg[1]
            b[i:i] = bytes(b[j:j + n])
        elif kind == "delete":
            del b[i:i + arg]
        else:  # truncate
            del b[i:]
        if kind in ("insert", "delete", "truncate") or i < header or len(b) != len(data):
            data_only = False
    return bytes(b), data_only and len(b) == len(data)


def _touch(ckpt) -> None:
    for q in ckpt.tensors.values():
        np.asarray(q.data).tobytes()  # every byte readable


# ---- the properties ------------------------------------------------------------------------------
@FUZZ
@given(edits=_edits)
def test_fuzz_gguf(tmp_path: Path, gguf_src, edits) -> None:
    data, data_only = mutate(gguf_src.data, edits, gguf_src.header)
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(data)
    CASES["gguf"] += 1
    try:
        ckpt = open_checkpoint(p)
    except MlxtralError as e:
        # a data-only mutation may only be refused for making a norm or router non-finite
        assert not data_only or "NaN or infinite" in str(e), f"tensor-data-only mutation refused: {e}"
        assert "\n" not in str(e) and str(p) in str(e)
        return
    CASES["gguf_loaded"] += 1
    _touch(ckpt)
    if data_only:  # same header: the views hold exactly the mutated bytes
        for t in parse_gguf(p).tensors:
            assert t.data.tobytes() == data[t.offset:t.offset + t.nbytes]


@FUZZ
@given(edits=_edits)
def test_fuzz_safetensors_folder(tmp_path: Path, hf_src, edits) -> None:
    folder = hf_src.folder
    data, data_only = mutate(hf_src.data, edits, hf_src.header)
    d = tmp_path / "hf"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    shutil.copy(folder / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(data)
    CASES["safetensors"] += 1
    try:
        ckpt = open_checkpoint(d)
    except MlxtralError as e:
        # a data-only mutation may only be refused for making a norm or router non-finite
        assert not data_only or "NaN or infinite" in str(e), f"tensor-data-only mutation refused: {e}"
        assert "\n" not in str(e)
        return
    CASES["safetensors_loaded"] += 1
    _touch(ckpt)


def test_fuzz_case_count(record_property) -> None:
    """Run after the fuzz tests: how many mutated files were tried, and how many still loaded."""
    print(f"\nfuzz cases run: {CASES}")
    record_property("fuzz_cases", dict(CASES))
    if CASES["gguf"]:
        assert CASES["gguf"] >= 100 and CASES["safetensors"] >= 100
