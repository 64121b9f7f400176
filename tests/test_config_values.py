"""Bad configuration values (HF config.json, original params.json, GGUF metadata): every one is a
one-line ConfigError naming the file and the key, never a TypeError, ZeroDivisionError, OverflowError,
ValueError or RecursionError; valid files keep loading as before.

Files are tiny valid checkpoints from tiny_models with one value changed: config.json / params.json
rewritten (raw JSON text where Python's json would not write the value, e.g. ``1e999``), GGUF values
overwritten in place at the key's offset (same type, same size).
"""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import (
    hf_config,
    params_json,
    random_weights,
    tiny_args,
    write_gguf,
    write_hf,
    write_original,
)
from typer.testing import CliRunner

import mlxtral
from mlxtral.cli import app
from mlxtral.errors import ConfigError, MlxtralError
from mlxtral.formats.detect import open_checkpoint
from mlxtral.formats.hf import load_hf
from mlxtral.formats.original import load_original

ARGS = tiny_args(vocab_size=320)  # dim 64, 4 heads / 2 KV heads, head_dim 16, 4 experts top 2
DEEP = "[" * 100_000


class Raw:
    """A JSON literal written as is (``1e999``, ``NaN``, a 5000-digit integer)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dump(obj: dict[str, Any]) -> str:
    """``json.dumps`` with :class:`Raw` values spliced in verbatim."""
    raws: list[str] = []

    def sub(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v

    text = json.dumps(sub(obj))
    for i, r in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', r)
    return text


def changed(d: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``d | change``, a key whose change is ``...`` removed."""
    out = d | change
    return {k: v for k, v in out.items() if v is not ...}


def refused(path: Path, match: str, exc: type[MlxtralError] = ConfigError, loader=mlxtral.load) -> str:
    with pytest.raises(exc, match=match) as ei:
        loader(path)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_weights(ARGS, seed=3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, weights) -> Path:
    return write_hf(tmp_path_factory.mktemp("hf") / "hf", weights, ARGS, tokenizer=False)


@pytest.fixture(scope="module")
def orig_dir(tmp_path_factory: pytest.TempPathFactory, weights) -> Path:
    return write_original(tmp_path_factory.mktemp("orig") / "orig", weights, ARGS, fmt="safetensors")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory, weights) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", weights, ARGS, vocab=False)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- valid files: unchanged behaviour -------------------------------------------------------------
def test_valid_files_load(hf_dir: Path, orig_dir: Path, gguf_file: Path) -> None:
    for p in (hf_dir, orig_dir, gguf_file):
        a = open_checkpoint(p).args
        assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, a.vocab_size) == (
            64, 2, 4, 2, 16, 128, 320)
        assert (a.n_experts, a.n_experts_per_tok, a.rope_dim) == (4, 2, 16)
        assert a.norm_eps == pytest.approx(1e-5) and a.rope_theta == 1e6


def test_valid_variants_still_accepted(tmp_path: Path, hf_dir: Path) -> None:
    """Integral floats, null optionals (defaults), head_dim derived, rope_parameters.rope_theta."""
    folder = copy_dir(hf_dir, tmp_path / "hf")
    cfg = hf_config(ARGS) | {"hidden_size": 64.0, "head_dim": None, "num_key_value_heads": 2,
                             "rope_theta": None, "rope_parameters": {"rope_theta": 5e5},
                             "rms_norm_eps": 1e-6, "max_position_embeddings": None, "sliding_window": 8,
                             "num_experts_per_tok": None}
    (folder / "config.json").write_text(json.dumps(cfg))
    a = open_checkpoint(folder).args
    assert (a.dim, a.head_dim, a.rope_theta, a.norm_eps) == (64, 16, 5e5, 1e-6)
    assert isinstance(a.dim, int) and a.max_position_embeddings == 32768 and a.sliding_window == 8
    assert a.n_experts_per_tok == 2


# ---- HF config.json -------------------------------------------------------------------------------
HF_CASES: list[tuple[dict[str, Any], str]] = [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_attention_heads": 0, "head_dim": ...}, "num_attention_heads must be a positive integer, got 0"),
    ({"hidden_size": Raw("1e999")}, "hidden_size must be a positive integer, got inf"),
    ({"hidden_size": Raw("NaN")}, "hidden_size must be a positive integer, got nan"),
    ({"hidden_size": Raw("-Infinity")}, "hidden_size must be a positive integer"),
    ({"hidden_size": 1e300}, "hidden_size must be at most 2\\*\\*24"),
    ({"hidden_size": 64.5}, "hidden_size must be a positive integer, got 64.5"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"hidden_size": 65, "head_dim": ...},
     r"hidden_size \(65\) must be a multiple of num_attention_heads \(4\)"),
    ({"num_hidden_layers": None}, "num_hidden_layers must not be null"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be a positive integer, got True"),
    ({"intermediate_size": -128}, "intermediate_size must be a positive integer"),
    ({"vocab_size": [320] * 1000}, r"vocab_size must be a positive integer, got \[320, 320.*\.\.\."),
    ({"vocab_size": (1 << 24) + 1}, "vocab_size must be at most 2\\*\\*24"),
    ({"head_dim": 0}, "head_dim must be a positive integer, got 0"),
    ({"num_key_value_heads": 3},
     r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"rms_norm_eps": "abc"}, "rms_norm_eps must be a positive finite number, got 'abc'"),
    ({"rms_norm_eps": [1]}, r"rms_norm_eps must be a positive finite number, got \[1\]"),
    ({"rms_norm_eps": Raw("NaN")}, "rms_norm_eps must be a positive finite number, got nan"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive finite number, got 0"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a positive finite number"),
    ({"rope_theta": Raw("Infinity")}, "rope_theta must be a positive finite number, got inf"),
    ({"rope_theta": 1e300}, "rope_theta must be a positive finite number"),
    ({"rope_theta": None, "rope_parameters": {"rope_theta": "1e6"}},
     "rope_parameters.rope_theta must be a positive finite number, got '1e6'"),
    ({"num_local_experts": "four"}, "num_local_experts must be a non-negative integer, got 'four'"),
    ({"num_local_experts": -1}, "num_local_experts must be a non-negative integer, got -1"),
    ({"num_local_experts": 5000}, "num_local_experts must be at most 4096"),
    ({"num_experts_per_tok": 5}, r"num_experts_per_tok must be between 1 and num_local_experts \(4\), got 5"),
    ({"num_experts_per_tok": 0}, r"num_experts_per_tok must be between 1 and num_local_experts \(4\), got 0"),
    ({"num_experts_per_tok": "2"}, "num_experts_per_tok must be a non-negative integer, got '2'"),
    ({"max_position_embeddings": -1}, "max_position_embeddings must be a positive integer, got -1"),
    ({"max_position_embeddings": "4k"}, "max_position_embeddings must be a positive integer, got '4k'"),
    ({"sliding_window": 0}, "sliding_window must be a positive integer, got 0"),
    ({"sliding_window": "4096"}, "sliding_window must be a positive integer, got '4096'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"model_type": 7}, "model_type must be a string, got 7"),
    # what the forward pass cannot compute (issue 16)
    ({"head_dim": 15}, "head_dim must be even \\(RoPE rotates pairs of values\\), got 15"),
    ({"hidden_size": 60, "head_dim": ...},
     r"the head size hidden_size / num_attention_heads must be even \(RoPE rotates pairs of values\), "
     "got 15"),
    ({"rms_norm_eps": 1e-50}, r"rms_norm_eps must be at least 1.18e-38 \(float32's smallest normal number: a "
                              r"smaller one underflows to 0 in the kernels\), got 1e-50"),
    ({"rms_norm_eps": 1e-39}, "rms_norm_eps must be at least 1.18e-38"),
    ({"rope_theta": 0.5}, r"rope_theta must be at least 1 \(RoPE's base: .*\), got 0.5"),
    ({"rope_theta": 1e-300}, "rope_theta must be at least 1"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling type 'llama3' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0]}}, "type 'longrope' is not supported"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object or null, got 'yarn'"),
    ({"rope_theta": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     "rope_parameters type 'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported \\(mlxtral computes SiLU-gated FFNs\\)"),
    ({"hidden_act": ["silu"]}, r"hidden_act \['silu'\] is not supported"),
]


@pytest.mark.parametrize("change,match", HF_CASES, ids=[m[:40] for _, m in HF_CASES])
def test_hf_bad_values(tmp_path: Path, hf_dir: Path, change: dict[str, Any], match: str) -> None:
    folder = copy_dir(hf_dir, tmp_path / "hf")
    cfg_path = folder / "config.json"
    cfg_path.write_text(dump(changed(hf_config(ARGS), change)))
    msg = refused(folder, match)
    assert msg.startswith(f"{cfg_path}: ")


def test_hf_json_nested_too_deep(tmp_path: Path, hf_dir: Path) -> None:
    folder = copy_dir(hf_dir, tmp_path / "hf")
    for text in (DEEP, '{"hidden_size": ' + DEEP):
        (folder / "config.json").write_text(text)
        assert "config.json" in refused(folder, "not valid JSON", MlxtralError)
        # the JSON reader itself (load_hf reads config.json without detection first)
        refused(folder, "nested too deeply", ConfigError, loader=load_hf)


def test_hf_json_huge_integer(tmp_path: Path, hf_dir: Path) -> None:
    """An integer of 5000 digits is a ValueError in Python's json (int_max_str_digits)."""
    folder = copy_dir(hf_dir, tmp_path / "hf")
    (folder / "config.json").write_text(dump(hf_config(ARGS) | {"hidden_size": Raw("9" * 5000)}))
    refused(folder, "not valid JSON", MlxtralError)
    refused(folder, "not valid JSON", ConfigError, loader=load_hf)


# ---- Mistral original params.json ----------------------------------------------------------------
ORIG_CASES: list[tuple[dict[str, Any], str]] = [
    ({"n_heads": 0, "head_dim": ...}, "n_heads must be a positive integer, got 0"),
    ({"dim": 1e999}, "dim must be a positive integer, got inf"),
    ({"n_layers": "1"}, "n_layers must be a positive integer, got '1'"),
    ({"n_kv_heads": 3}, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    ({"norm_eps": "abc"}, "norm_eps must be a positive finite number, got 'abc'"),
    ({"rope_theta": Raw("NaN")}, "rope_theta must be a positive finite number, got nan"),
    ({"rope_theta": 0}, "rope_theta must be a positive finite number, got 0"),
    ({"moe": {"num_experts": "four", "num_experts_per_tok": 2}},
     "moe.num_experts must be a non-negative integer, got 'four'"),
    ({"moe": {"num_experts": 4, "num_experts_per_tok": 9}},
     r"moe.num_experts_per_tok must be between 1 and moe.num_experts \(4\), got 9"),
    ({"moe": [4, 2]}, "'moe' must be an object"),
    ({"max_seq_len": "big"}, "max_seq_len must be a positive integer, got 'big'"),
    ({"vocab_size": None}, "vocab_size must not be null"),
    ({"hidden_dim": ...}, "missing required key 'hidden_dim'"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"dim": 60, "head_dim": ...}, "the head size dim / n_heads must be even .* got 15"),
    ({"norm_eps": 1e-50}, "norm_eps must be at least 1.18e-38"),
    ({"rope_theta": 1e-3}, "rope_theta must be at least 1"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
]


def test_original_params_all_strings(tmp_path: Path, orig_dir: Path) -> None:
    """The audit's reproducer: every int a string (TypeError before)."""
    folder = copy_dir(orig_dir, tmp_path / "orig")
    (folder / "params.json").write_text(json.dumps(
        {"dim": "64", "n_layers": "1", "n_heads": "4", "hidden_dim": "128", "vocab_size": "100"}))
    msg = refused(folder, "dim must be a positive integer, got '64'")
    assert msg.startswith(f"{folder / 'params.json'}: ")


@pytest.mark.parametrize("change,match", ORIG_CASES, ids=[m[:40] for _, m in ORIG_CASES])
def test_original_bad_values(tmp_path: Path, orig_dir: Path, change: dict[str, Any], match: str) -> None:
    folder = copy_dir(orig_dir, tmp_path / "orig")
    (folder / "params.json").write_text(dump(changed(params_json(ARGS), change)))
    msg = refused(folder, match)
    assert msg.startswith(f"{folder / 'params.json'}: ")
    refused(folder, match, loader=load_original)


def test_original_params_nested_too_deep(tmp_path: Path, orig_dir: Path) -> None:
    folder = copy_dir(orig_dir, tmp_path / "orig")
    (folder / "params.json").write_text(DEEP)
    assert "params.json" in refused(folder, "nested too deeply")


# ---- GGUF metadata -------------------------------------------------------------------------------
_VALUE_FORMATS = {4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q", 12: "<d"}  # GGUF value type -> struct


def set_kv(path: Path, key: str, value: float) -> Path:
    """Overwrite the (numeric) value of GGUF key ``key`` in place, keeping its type."""
    b = bytearray(path.read_bytes())
    enc = key.encode()
    pos = b.index(struct.pack("<Q", len(enc)) + enc) + 8 + len(enc)
    (vtype,) = struct.unpack_from("<I", b, pos)
    struct.pack_into(_VALUE_FORMATS[vtype], b, pos + 4, value)
    path.write_bytes(bytes(b))
    return path


def rename_kv(path: Path, key: str, new: str) -> Path:
    """Rename GGUF key ``key`` to ``new`` (same length): the key is then absent for mlxtral."""
    assert len(key) == len(new)
    b = path.read_bytes()
    enc = struct.pack("<Q", len(key)) + key.encode()
    assert b.count(enc) == 1
    path.write_bytes(b.replace(enc, struct.pack("<Q", len(new)) + new.encode()))
    return path


NAN, INF = math.nan, math.inf
GGUF_CASES: list[tuple[str, float, str]] = [
    ("llama.attention.head_count", 0, "llama.attention.head_count must be a positive integer, got 0"),
    ("llama.attention.head_count", 3, r"llama.attention.head_count \(3\) must be a multiple of "
                                      r"llama.attention.head_count_kv \(2\)"),
    ("llama.attention.head_count_kv", 0, "llama.attention.head_count_kv must be a positive integer, got 0"),
    ("llama.rope.dimension_count", 3, "llama.rope.dimension_count must be even and at most the head size 16, "
                                      "got 3"),
    ("llama.rope.dimension_count", 1000, "llama.rope.dimension_count must be even .* got 1000"),
    ("llama.rope.dimension_count", 0, "llama.rope.dimension_count must be a positive integer, got 0"),
    ("llama.attention.layer_norm_rms_epsilon", NAN,
     "llama.attention.layer_norm_rms_epsilon must be a positive finite number, got nan"),
    ("llama.attention.layer_norm_rms_epsilon", 0.0, "layer_norm_rms_epsilon must be a positive finite"),
    ("llama.attention.layer_norm_rms_epsilon", -1e-5, "rms_epsilon must be a positive finite number"),
    ("llama.rope.freq_base", 0.0, "llama.rope.freq_base must be a positive finite number, got 0.0"),
    ("llama.rope.freq_base", -10000.0, "llama.rope.freq_base must be a positive finite number, got -10000.0"),
    ("llama.rope.freq_base", NAN, "llama.rope.freq_base must be a positive finite number, got nan"),
    ("llama.rope.freq_base", INF, "llama.rope.freq_base must be a positive finite number, got inf"),
    ("llama.embedding_length", 0, "llama.embedding_length must be a positive integer, got 0"),
    ("llama.block_count", (1 << 24) + 1, "llama.block_count must be at most 2\\*\\*24"),
    ("llama.feed_forward_length", 0, "llama.feed_forward_length must be a positive integer, got 0"),
    ("llama.vocab_size", 0, "llama.vocab_size must be a positive integer, got 0"),
    ("llama.expert_count", 5000, "llama.expert_count must be at most 4096"),
    ("llama.expert_used_count", 5, r"llama.expert_used_count must be between 1 and llama.expert_count \(4\)"),
    ("llama.expert_used_count", 0, r"llama.expert_used_count must be between 1 and llama.expert_count \(4\)"),
    ("llama.context_length", 0, "llama.context_length must be a positive integer, got 0"),
    ("llama.attention.key_length", 15, "llama.attention.key_length must be even .*, got 15"),
    ("llama.attention.value_length", 8,
     r"llama.attention.value_length \(8\) must equal the key head size 16"),
    ("llama.attention.layer_norm_rms_epsilon", 1e-40,  # a float32 subnormal
     "llama.attention.layer_norm_rms_epsilon must be at least 1.18e-38"),
    ("llama.rope.freq_base", 0.5, "llama.rope.freq_base must be at least 1"),
]


@pytest.mark.parametrize("key,value,match", GGUF_CASES, ids=[f"{k[6:]}={v}" for k, v, _ in GGUF_CASES])
def test_gguf_bad_values(tmp_path: Path, gguf_file: Path, key: str, value: float, match: str) -> None:
    p = set_kv(Path(shutil.copy(gguf_file, tmp_path / "m.gguf")), key, value)
    assert refused(p, match).startswith(f"{p}: ")


def test_gguf_head_count_zero_head_dim_derived(tmp_path: Path, gguf_file: Path) -> None:
    """Without attention.key_length, head_dim is embedding_length / head_count: ZeroDivisionError before."""
    p = rename_kv(Path(shutil.copy(gguf_file, tmp_path / "m.gguf")),
                  "llama.attention.key_length", "llama.attention.key_lengtX")
    assert open_checkpoint(p).args.head_dim == 16  # still valid: derived
    set_kv(p, "llama.attention.head_count", 0)
    refused(p, "llama.attention.head_count must be a positive integer, got 0")
    set_kv(p, "llama.attention.head_count", 5)
    refused(p, r"llama.embedding_length \(64\) must be a multiple of llama.attention.head_count \(5\)")


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_info_one_line_error(tmp_path: Path, hf_dir: Path, orig_dir: Path, gguf_file: Path) -> None:
    orig = copy_dir(orig_dir, tmp_path / "orig")
    (orig / "params.json").write_text(json.dumps(
        {"dim": "64", "n_layers": "1", "n_heads": "4", "hidden_dim": "128", "vocab_size": "100"}))
    hf = copy_dir(hf_dir, tmp_path / "hf")
    (hf / "config.json").write_text(dump(hf_config(ARGS) | {"num_attention_heads": 0, "head_dim": None}))
    deep = copy_dir(hf_dir, tmp_path / "deep")
    (deep / "config.json").write_text(DEEP)
    gg = set_kv(Path(shutil.copy(gguf_file, tmp_path / "m.gguf")), "llama.rope.freq_base", NAN)
    runner = CliRunner()
    for path, file, problem in (
        (orig, orig / "params.json", "dim must be a positive integer, got '64'"),
        (hf, hf / "config.json", "num_attention_heads must be a positive integer, got 0"),
        (deep, deep / "config.json", "not valid JSON"),
        (gg, gg, "llama.rope.freq_base must be a positive finite number, got nan"),
    ):
        r = runner.invoke(app, ["info", str(path)])
        assert r.exit_code == 1, (r.exit_code, r.output)
        err = r.stderr
        assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: {file}: ") and problem in err, err
        assert r.stdout == ""


# ---- what the forward pass cannot compute: more than one value at a time ------------------------
def test_valid_rope_variants_still_accepted(tmp_path: Path, hf_dir: Path) -> None:
    """Plain RoPE spelled every way: null, "default", linear or dynamic by a factor of 1."""
    folder = copy_dir(hf_dir, tmp_path / "hf")
    for extra in ({"rope_scaling": None}, {"rope_scaling": {"type": "linear", "factor": 1.0}},
                  {"rope_scaling": {"rope_type": "default"}},
                  {"rope_scaling": {"type": "dynamic", "factor": 1}},
                  {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                  {"hidden_act": "silu"}, {"hidden_act": "swish"}, {"rope_theta": 1}):
        (folder / "config.json").write_text(json.dumps(hf_config(ARGS) | extra))
        open_checkpoint(folder)


def gguf_with_strings(path: Path, weights, kv: dict[str, str],
                      floats: dict[str, float] | None = None) -> Path:
    """tiny_models.write_gguf plus string (and float32) key/values, added with the name."""
    import gguf

    real = gguf.GGUFWriter.add_name

    def add_name(self, name: str) -> None:
        real(self, name)
        for k, v in kv.items():
            self.add_string(k, v)
        for k, f in (floats or {}).items():
            self.add_float32(k, f)

    gguf.GGUFWriter.add_name = add_name  # type: ignore[method-assign]
    try:
        return write_gguf(path, weights, ARGS, vocab=False)
    finally:
        gguf.GGUFWriter.add_name = real  # type: ignore[method-assign]


@pytest.mark.parametrize("kv,floats,match", [
    ({"llama.rope.scaling.type": "yarn"}, {"llama.rope.scaling.factor": 4.0},
     "llama.rope.scaling.type 'yarn' with factor 4.0 is not supported"),
    ({"llama.rope.scaling.type": "linear"}, {"llama.rope.scaling.factor": 2.0}, "'linear' with factor 2.0"),
    ({}, {"llama.rope.scale_linear": 4.0}, "llama.rope.scale_linear 4.0 is not supported"),
    ({"llama.rope.scaling.type": "none"}, {"llama.rope.scaling.factor": 0.0}, None),  # llama.cpp's "none"
    ({"llama.rope.scaling.type": "linear"}, {"llama.rope.scaling.factor": 1.0}, None),
])
def test_gguf_rope_scaling(tmp_path: Path, weights, kv, floats, match) -> None:
    p = gguf_with_strings(tmp_path / "m.gguf", weights, kv, floats)
    if match is None:
        open_checkpoint(p)
    else:
        assert refused(p, match).startswith(f"{p}: ")


@pytest.mark.parametrize("change,match", [
    ({"head_dim": 15}, "head_dim must be even"),
    ({"norm_eps": 1e-50}, "norm_eps must be at least 1.18e-38"),
    ({"norm_eps": 0.0}, "norm_eps must be a positive finite number"),
    ({"rope_theta": math.inf}, "rope_theta must be a positive finite number"),
    ({"rope_theta": 0.1}, "rope_theta must be at least 1"),
    ({"rope_dim": 7}, "rope_dim must be even and at most the head size 16, got 7"),
    ({"rope_dim": 32}, "rope_dim must be even and at most the head size 16, got 32"),
])
def test_api_model_args_refuse_what_the_forward_cannot_compute(change: dict[str, Any], match: str) -> None:
    """ModelArgs built in Python (not from a file) get the same checks: a ConfigError, never a
    ZeroDivisionError in rms_norm or a ValueError in RoPE later."""
    with pytest.raises(ConfigError, match=match):
        tiny_args(vocab_size=320, **change)


@pytest.mark.parametrize("args", [dict(head_dim=8, dim=64), dict(rope_dim=8), dict(n_kv_heads=1),
                                  dict(n_experts_per_tok=4), dict(norm_eps=1.2e-38), dict(rope_theta=1.0)])
def test_edge_values_that_validation_accepts_do_run(args: dict[str, Any]) -> None:
    """The other side of the contract: what validation accepts, the forward pass computes (finite)."""
    from mlxtral.backends.numpy_backend import NumpyBackend
    from mlxtral.qtensor import QTensor

    a = tiny_args(vocab_size=320, **args)
    be = NumpyBackend(a, {n: QTensor.from_float(x) for n, x in random_weights(a, 4).items()})
    assert np.isfinite(be.forward([1, 2, 3, 4], be.new_cache(8))).all()
