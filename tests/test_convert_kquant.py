"""``mlxtral convert --q4_k_m`` and the other K-quant mixes: llama.cpp's per-tensor types.

Two tiny Mixtral-shaped F32 GGUFs (8 layers, a 300-odd piece SentencePiece vocabulary):

- ``A``: 8 experts, dim 256, ffn 256, 8 heads / 2 KV heads: every row a multiple of 256, so the
  K types are used as chosen, with llama.cpp's 8-expert rules;
- ``B``: 4 experts, dim 96, ffn 160, 4 heads / 1 KV head (GQA 4): no row a multiple of 256, so
  every choice goes through llama.cpp's fallback table (and the non-8-expert rules show).

Each is converted to every mix; the type of every tensor is compared with the tables below, which
were derived by hand from ``llama_tensor_get_type_impl`` and ``tensor_type_fallback`` in
llama.cpp's ``src/llama-quant.cpp`` (the rule behind each entry is in the comment next to it), not
computed by the code under test. The outputs are read by ``gguf.GGUFReader``, their
``general.file_type`` checked, their weights checked against the source through ``gguf.quants``'
dequantizers, and their logits (NumPy backend) compared with the F32 source's.

Until the K-quant block quantizers exist (``mlxtral/quant/kquants.py``), a stub writes
zero-scale K blocks so that the wiring can be tested; the tests that need real values skip.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from tiny_models import random_weights, write_gguf
from typer.testing import CliRunner

import mlxtral
from mlxtral.cli import app
from mlxtral.config import ModelArgs
from mlxtral.convert import convert
from mlxtral.convert.kquant_mix import MixModel, tensor_type, use_more_bits
from mlxtral.errors import UsageError
from mlxtral.quant import ggml

MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
KTYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
N_LAYERS = 8
# general.file_type: llama.h's LLAMA_FTYPE_MOSTLY_* (= gguf.LlamaFileType)
FILE_TYPE = {"Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
             "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}


def real_kquants() -> bool:
    try:
        ggml.quantize(np.zeros((1, 256), np.float32), "Q4_K")
    except (ValueError, KeyError, NotImplementedError):
        return False
    return True


HAVE_KQUANTS = real_kquants()
needs_kquants = pytest.mark.skipif(not HAVE_KQUANTS, reason="K-quant quantizers not there yet")


def L(*types: str) -> list[str]:  # noqa: N802 - a table row, per layer 0..7
    assert len(types) == N_LAYERS
    return list(types)


def every(t: str) -> list[str]:
    return [t] * N_LAYERS


# use_more_bits(i, 8): i < 8/8 || i >= 7*8/8 || (i - 8/8) % 3 == 2  ->  layers 0, 3, 6, 7
MORE = [0, 3, 6, 7]


def more_bits(hi: str, lo: str) -> list[str]:
    return [hi if i in MORE else lo for i in range(N_LAYERS)]


# ---- model A: 8 experts, rows of 256 -------------------------------------------------------------
# Rules (llama-quant.cpp, llama_tensor_get_type_impl), n_expert == 8, untied output:
#   output       : "new_type != Q8_0 -> Q6_K" (rows divisible by 256) for every K mix
#   token_embd   : no K-mix rule -> the mix's base type
#   attn_v       : "if (n_expert == 8) new_type = Q8_0" after all per-mix rules
#   attn_k       : "if (n_expert == 8) new_type = Q8_0"
#   attn_output  : n_expert == 8: Q5_K for Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M; else base
#   ffn_down     : Q2_K -> Q3_K; Q3_K_M -> i < n/16 (= 0: none) ? Q5_K : Q4_K; Q3_K_L -> Q5_K;
#                  Q4_K_M/Q5_K_M -> Q6_K where use_more_bits; Q4_K_S -> Q5_K where i < n/8 (layer 0)
#   attn_q, ffn_gate, ffn_up: base
A_TABLE: dict[str, dict[str, Any]] = {
    "Q2_K": dict(base="Q2_K", attn_output="Q5_K", ffn_down=every("Q3_K")),
    "Q3_K_S": dict(base="Q3_K", attn_output="Q5_K", ffn_down=every("Q3_K")),
    "Q3_K_M": dict(base="Q3_K", attn_output="Q5_K", ffn_down=every("Q4_K")),
    "Q3_K_L": dict(base="Q3_K", attn_output="Q3_K", ffn_down=every("Q5_K")),  # not in the 8-expert list
    "Q4_K_S": dict(base="Q4_K", attn_output="Q5_K",
                   ffn_down=L("Q5_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K", "Q4_K")),
    "Q4_K_M": dict(base="Q4_K", attn_output="Q5_K",
                   ffn_down=L("Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K")),
    "Q5_K_S": dict(base="Q5_K", attn_output="Q5_K", ffn_down=every("Q5_K")),
    "Q5_K_M": dict(base="Q5_K", attn_output="Q5_K",
                   ffn_down=L("Q6_K", "Q5_K", "Q5_K", "Q6_K", "Q5_K", "Q5_K", "Q6_K", "Q6_K")),
    "Q6_K": dict(base="Q6_K", attn_output="Q6_K", ffn_down=every("Q6_K")),
}
for _row in A_TABLE.values():
    _row.update(output="Q6_K", token_embd=_row["base"], attn_q=_row["base"], attn_k="Q8_0",
                attn_v=every("Q8_0"), ffn_gate=_row["base"], ffn_up=_row["base"])

# ---- model B: 4 experts, rows of 96 (attention, gate, up, embeddings) and 160 (down) -------------
# Rules, n_expert == 4 (the 8-expert rules do not apply), n_head / n_head_kv = 4:
#   output       : "nx % qk_k != 0 -> Q8_0"
#   attn_v       : Q2_K -> n_gqa >= 4 ? Q4_K : Q3_K; Q3_K_M -> i_attention_wv < 2 ? Q5_K : Q4_K;
#                  Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K where use_more_bits; Q4_K_S -> Q5_K where i < 4
#   attn_k       : base
#   attn_output  : Q2_K -> Q3_K; Q3_K_M -> Q4_K; Q3_K_L -> Q5_K; else base
#   ffn_down     : as for A
# then tensor_type_fallback (no row is a multiple of 256, all of 32):
#   Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0
FB = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
B_TABLE: dict[str, dict[str, Any]] = {
    "Q2_K": dict(base="Q4_0", attn_v=every("Q5_0"), attn_output="Q4_0", ffn_down=every("Q4_0")),
    "Q3_K_S": dict(base="Q4_0", attn_v=every("Q4_0"), attn_output="Q4_0", ffn_down=every("Q4_0")),
    "Q3_K_M": dict(base="Q4_0", attn_v=L("Q5_1", "Q5_1", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0"),
                   attn_output="Q5_0", ffn_down=every("Q5_0")),
    "Q3_K_L": dict(base="Q4_0", attn_v=every("Q5_1"), attn_output="Q5_1", ffn_down=every("Q5_1")),
    "Q4_K_S": dict(base="Q5_0", attn_v=L("Q5_1", "Q5_1", "Q5_1", "Q5_1", "Q5_0", "Q5_0", "Q5_0", "Q5_0"),
                   attn_output="Q5_0",
                   ffn_down=L("Q5_1", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0", "Q5_0")),
    "Q4_K_M": dict(base="Q5_0", attn_v=more_bits("Q8_0", "Q5_0"), attn_output="Q5_0",
                   ffn_down=more_bits("Q8_0", "Q5_0")),
    "Q5_K_S": dict(base="Q5_1", attn_v=every("Q5_1"), attn_output="Q5_1", ffn_down=every("Q5_1")),
    "Q5_K_M": dict(base="Q5_1", attn_v=more_bits("Q8_0", "Q5_1"), attn_output="Q5_1",
                   ffn_down=more_bits("Q8_0", "Q5_1")),
    "Q6_K": dict(base="Q8_0", attn_v=every("Q8_0"), attn_output="Q8_0", ffn_down=every("Q8_0")),
}
for _row in B_TABLE.values():
    _row.update(output="Q8_0", token_embd=_row["base"], attn_q=_row["base"], attn_k=_row["base"],
                ffn_gate=_row["base"], ffn_up=_row["base"])

ARGS_A = dict(dim=256, n_layers=N_LAYERS, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=256,
              n_experts=8, n_experts_per_tok=2)
ARGS_B = dict(dim=96, n_layers=N_LAYERS, n_heads=4, n_kv_heads=1, head_dim=24, hidden_dim=160,
              n_experts=4, n_experts_per_tok=2)
MODELS = {"A": (ARGS_A, A_TABLE), "B": (ARGS_B, B_TABLE)}


def expected_types(table: dict[str, Any], n_layers: int = N_LAYERS) -> dict[str, str]:
    """GGUF tensor name -> type, for every tensor of the file."""
    out = {"token_embd.weight": table["token_embd"], "output.weight": table["output"],
           "output_norm.weight": "F32"}
    for i in range(n_layers):
        b = f"blk.{i}."
        out.update({b + "attn_norm.weight": "F32", b + "ffn_norm.weight": "F32",
                    b + "ffn_gate_inp.weight": "F32",  # never quantized (llama.cpp: not even allowed)
                    b + "attn_q.weight": table["attn_q"], b + "attn_k.weight": table["attn_k"],
                    b + "attn_v.weight": table["attn_v"][i], b + "attn_output.weight": table["attn_output"],
                    b + "ffn_gate_exps.weight": table["ffn_gate"], b + "ffn_up_exps.weight": table["ffn_up"],
                    b + "ffn_down_exps.weight": table["ffn_down"][i]})
    return out


# ---- K-quant stub (until quant/kquants.py lands) -------------------------------------------------

@pytest.fixture(autouse=True)
def kquant_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the real quantizers: K blocks of zeros (scale 0: all weights 0), read back by
    gguf.quants. Enough to check types, sizes, metadata and the CLI."""
    if HAVE_KQUANTS:
        return
    real_q, real_dq = ggml.quantize, ggml.dequantize

    def quantize(x: np.ndarray, qtype: str, out: np.ndarray | None = None) -> np.ndarray:
        if qtype not in KTYPES:
            return real_q(x, qtype, out=out)
        shape = ggml.quantized_shape(tuple(np.shape(x)), qtype)
        if out is None:
            out = np.empty(shape, np.uint8)
        out[...] = 0
        return out

    def dequantize(data: np.ndarray, qtype: str, shape: Any = None, out: Any = None) -> np.ndarray:
        if qtype not in KTYPES:
            return real_dq(data, qtype, shape, out)
        from mlxtral.quant.dequant import dequantize_blocks

        bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        lshape = tuple(data.shape[:-1]) + (data.shape[-1] // ts * bs,)
        return dequantize_blocks(data, qtype, tuple(shape) if shape is not None else lshape)

    monkeypatch.setattr(ggml, "quantize", quantize)
    monkeypatch.setattr(ggml, "dequantize", dequantize)


# ---- sources -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentencePiece BPE model with byte fallback (gguf.GGUFReader reads it in no time)."""
    import sentencepiece

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "mixture", "of", "experts", "router", "token", "world"]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(300)]
    path = tmp_path_factory.mktemp("kq-tok") / "tokenizer.model"
    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, vocab_size=300, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, hard_vocab_limit=False, minloglevel=2)
    return path


def make_args(kw: dict[str, Any], vocab: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab, norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=512, **kw)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, spm: Path) -> dict[str, tuple[Path, ModelArgs]]:
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(spm)).vocab_size()
    root = tmp_path_factory.mktemp("kq-src")
    out = {}
    for key, (kw, _) in MODELS.items():
        args = make_args(kw, vocab)
        out[key] = (write_gguf(root / f"{key}.f32.gguf", random_weights(args, seed=3), args, spm=spm), args)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, tuple[Path, ModelArgs]]
              ) -> dict[tuple[str, str], Path]:
    """Every model in every mix (module scope: converted once; the stub is not active here, so the
    outputs are only built with the real quantizers; the stub tests convert on their own)."""
    root = tmp_path_factory.mktemp("kq-out")
    return {(key, mix): convert(src, root / f"{key}.{mix}.gguf", qtype=mix.lower(), progress=False).out
            for key, (src, _) in sources.items() for mix in MIXES}


def reader_types(path: Path) -> dict[str, str]:
    r = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in r.tensors}


def file_type_of(path: Path) -> int:
    f = gguf.GGUFReader(path).fields["general.file_type"]
    return int(f.parts[f.data[0]][0])


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["A", "B"])
def test_mix_types_and_file_type(tmp_path: Path, sources: dict[str, tuple[Path, ModelArgs]],
                                 key: str) -> None:
    """Every tensor's type, for every mix, is llama.cpp's; general.file_type too; GGUFReader reads it."""
    src, _ = sources[key]
    table = MODELS[key][1]
    for mix in MIXES:
        flag = mix.lower() if mix != "Q4_K_M" else "q4-k-m"  # dashes accepted as well
        out = convert(src, tmp_path / f"{mix}.gguf", qtype=flag, progress=False, force=True).out
        assert reader_types(out) == expected_types(table[mix]), mix
        assert file_type_of(out) == FILE_TYPE[mix] == int(gguf.LlamaFileType[f"MOSTLY_{mix}"])
        out.unlink()


@needs_kquants
@pytest.mark.parametrize("key", ["A", "B"])
def test_weights_and_logits(converted: dict[tuple[str, str], Path],
                            sources: dict[str, tuple[Path, ModelArgs]], key: str) -> None:
    """The outputs' weights, dequantized by gguf.quants, are the source's within each type's error;
    the models load (NumPy backend) and their logits stay close to the F32 source's."""
    src, args = sources[key]
    ref = {t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(src).tensors}
    ids = [1, 20, 45, 100, 7, 250, 33, 90, 12, 5]
    src_logits = mlxtral.load(src, backend="numpy", tokenizer=False).logits(ids)
    # relative RMSE bound per type on these Gaussian weights (Q2_K measures ~0.3 with llama.cpp)
    bound = {"F32": 0.0, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_1": 0.05, "Q5_0": 0.06, "Q5_K": 0.06, "Q4_0": 0.12,
             "Q4_K": 0.12, "Q3_K": 0.25, "Q2_K": 0.45}
    for mix in MIXES:
        out = converted[(key, mix)]
        for t in gguf.GGUFReader(out).tensors:
            x = ref[t.name]
            y = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(x.shape)
            err = float(np.sqrt(np.square(y - x).sum() / np.square(x).sum()))
            assert err <= bound[t.tensor_type.name], (mix, t.name, t.tensor_type.name, err)
        got = mlxtral.load(out, backend="numpy", tokenizer=False).logits(ids)
        rel = float(np.abs(got - src_logits).max() / src_logits.std())
        assert rel < TOL_LOGITS[mix], (key, mix, rel)


# max |logits - source logits| / std(source logits), per mix (random tiny models have no redundancy:
# a 2-3 bit body moves logits by about a standard deviation). Measured (A / B): Q2_K 1.31 / 0.74,
# Q3_K_S 1.03 / 1.00, Q3_K_M 0.99 / 0.56, Q3_K_L 1.27 / 0.59, Q4_K_S 0.63 / 0.38, Q4_K_M 0.59 / 0.32,
# Q5_K_S 0.43 / 0.46, Q5_K_M 0.47 / 0.40, Q6_K 0.25 / 0.08. Weights' worst relative RMSE: Q2_K 0.30,
# Q3_K 0.15, Q4_K 0.072, Q5_K 0.036, Q6_K 0.018, Q8_0 0.0056, Q4_0 0.089, Q5_0 0.044, Q5_1 0.039.
TOL_LOGITS = {"Q2_K": 2.5, "Q3_K_S": 2.0, "Q3_K_M": 2.0, "Q3_K_L": 2.0, "Q4_K_S": 1.2, "Q4_K_M": 1.2,
              "Q5_K_S": 0.9, "Q5_K_M": 0.9, "Q6_K": 0.5}


def test_mlx_output_refused(tmp_path: Path, sources: dict[str, tuple[Path, ModelArgs]]) -> None:
    src, _ = sources["A"]
    with pytest.raises(UsageError, match="GGUF K-quant mix"):
        convert(src, tmp_path / "mlx-out", fmt="mlx", qtype="q4_k_m", progress=False)
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "mlx-out"), "--q3-k-m"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "--q3_k_m is a GGUF K-quant mix" in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "mlx-out").exists()


def test_requantize_refused(tmp_path: Path, sources: dict[str, tuple[Path, ModelArgs]]) -> None:
    """A Q8_0 source: the mix would requantize it, refused without --allow-requantize (one line);
    with it, the tensors the mix keeps at Q8_0 (attn_k, attn_v) are copied as they are."""
    src, _ = sources["A"]
    q8 = convert(src, tmp_path / "q8.gguf", qtype="q8", progress=False).out
    with pytest.raises(UsageError, match=r"already quantized.*Q8_0 -> Q"):
        convert(q8, tmp_path / "k.gguf", qtype="q4_k_m", progress=False)
    assert not (tmp_path / "k.gguf").exists()
    r = CliRunner().invoke(app, ["convert", str(q8), str(tmp_path / "k.gguf"), "--q4_k_m"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--allow-requantize" in r.output, r.output
    res = convert(q8, tmp_path / "k.gguf", qtype="q4_k_m", progress=False, allow_requantize=True)
    assert reader_types(res.out) == expected_types(A_TABLE["Q4_K_M"])
    copied = {r.name for r in res.reports if r.copied}
    assert "blk.0.attn_v.weight" in copied and "blk.0.attn_k.weight" in copied
    assert "blk.0.attn_q.weight" not in copied


def test_cli_flags(tmp_path: Path, sources: dict[str, tuple[Path, ModelArgs]]) -> None:
    src, _ = sources["B"]
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "o.gguf"), "--q5_k_s"])
    assert r.exit_code == 0, r.output
    assert file_type_of(tmp_path / "o.gguf") == 16
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "p.gguf"), "--q5-k-s", "--q4_k_m"])
    assert r.exit_code == 2 and "choose one output type" in r.output


# ---- the rules on Mixtral 8x7B's real shape (32 layers): no model needed -------------------------

def test_mixtral_8x7b_layer_rules() -> None:
    """Mixtral 8x7B (32 layers, 8 experts, dim 4096, ffn 14336, 32/8 heads), by the same rules:
    use_more_bits(i, 32) = i < 4 || i >= 28 || (i - 4) % 3 == 2."""
    m = MixModel(n_layers=32, n_experts=8, n_heads=32, n_kv_heads=8, tied=False)
    more = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if use_more_bits(i, 32)] == more
    down = (8, 4096, 14336)

    def downs(mix: str) -> list[str]:
        return [tensor_type(mix, f"blk.{i}.ffn_down_exps.weight", down[1:], m) for i in range(32)]

    assert downs("Q4_K_M") == ["Q6_K" if i in more else "Q4_K" for i in range(32)]
    assert downs("Q3_K_M") == ["Q5_K", "Q5_K"] + ["Q4_K"] * 30  # i < 32/16
    assert downs("Q4_K_S") == ["Q5_K"] * 4 + ["Q4_K"] * 28  # i < 32/8
    assert downs("Q2_K") == ["Q3_K"] * 32
    for mix in MIXES:
        assert tensor_type(mix, "blk.5.attn_v.weight", (1024, 4096), m) == "Q8_0"
        assert tensor_type(mix, "blk.5.attn_k.weight", (1024, 4096), m) == "Q8_0"
        assert tensor_type(mix, "output.weight", (32000, 4096), m) == "Q6_K"
    # a dense Mistral 7B (32 layers, GQA 4): the attn_v rules show
    d = MixModel(n_layers=32, n_experts=0, n_heads=32, n_kv_heads=8, tied=False)
    v = [tensor_type("Q4_K_M", f"blk.{i}.attn_v.weight", (1024, 4096), d) for i in range(32)]
    assert v == ["Q6_K" if i in more else "Q4_K" for i in range(32)]
    assert tensor_type("Q2_K", "blk.0.attn_v.weight", (1024, 4096), d) == "Q4_K"  # n_gqa >= 4
    assert tensor_type("Q3_K_M", "blk.1.attn_v.weight", (1024, 4096), d) == "Q5_K"  # i < 2
    assert tensor_type("Q3_K_M", "blk.2.attn_v.weight", (1024, 4096), d) == "Q4_K"
    assert tensor_type("Q3_K_M", "blk.9.attn_output.weight", (4096, 4096), d) == "Q4_K"
    # tied embeddings: token_embd is quantized like the output
    t = MixModel(n_layers=30, n_experts=0, n_heads=9, n_kv_heads=3, tied=True)
    assert tensor_type("Q4_K_M", "token_embd.weight", (49152, 576), t) == "Q8_0"  # 576 % 256 != 0
    assert tensor_type("Q4_K_M", "token_embd.weight", (49152, 512), t) == "Q6_K"
    # rows not a multiple of 32: F16 after the fallback
    assert tensor_type("Q4_K_M", "blk.0.attn_q.weight", (72, 72), t) == "F16"


def test_legacy_types_follow_llamacpp() -> None:
    """--q4/--q4_1/--q8 take llama_tensor_get_type's upgrades for its Q4_0/Q4_1/Q8_0 file types (checked
    against llama.cpp's dry run by benchmarks/kquant_vs_llamacpp.py --mixes q4_0,q4_1,q8_0
    --types-only): output Q6_K (Q8_0 on rows not a multiple of 256 or a Q8_0 body), with 8 experts
    attn_k/attn_v Q8_0, a tied embedding like the output; a quantized source is copied, not upgraded."""
    from mlxtral.convert.policy import gguf_tensor_type

    moe = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=32000,
                    hidden_dim=14336, n_experts=8, n_experts_per_tok=2)
    for q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        assert gguf_tensor_type("output.weight", (32000, 4096), q, "F16", moe) == "Q6_K"
        assert gguf_tensor_type("output.weight", (32000, 576), q, "F16", moe) == "Q8_0"
        assert gguf_tensor_type("token_embd.weight", (32000, 4096), q, "F16", moe) == q  # untied
        assert gguf_tensor_type("blk.3.attn_v.weight", (1024, 4096), q, "F16", moe) == "Q8_0"
        assert gguf_tensor_type("blk.3.attn_k.weight", (1024, 4096), q, "F16", moe) == "Q8_0"
        assert gguf_tensor_type("blk.3.attn_q.weight", (4096, 4096), q, "F16", moe) == q
        assert gguf_tensor_type("blk.3.ffn_down_exps.weight", (4096, 14336), q, "F16", moe) == q
        # a source already at the body's type is copied, not upgraded (nothing to gain)
        assert gguf_tensor_type("blk.3.attn_v.weight", (1024, 4096), q, q, moe) == q
        assert gguf_tensor_type("output.weight", (32000, 4096), q, "Q8_0", moe) == "Q8_0"
    assert gguf_tensor_type("output.weight", (32000, 4096), "Q8_0", "F16", moe) == "Q8_0"
    dense = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=32000,
                      hidden_dim=14336)
    assert gguf_tensor_type("blk.3.attn_v.weight", (1024, 4096), "Q4_0", "F16", dense) == "Q4_0"
    tied = ModelArgs(dim=512, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=64, vocab_size=1000,
                     hidden_dim=1024, tie_word_embeddings=True)
    assert gguf_tensor_type("token_embd.weight", (1000, 512), "Q4_0", "F32", tied) == "Q6_K"


def test_cli_llama_quantize_type_names(tmp_path: Path, sources: dict[str, tuple[Path, ModelArgs]]) -> None:
    """--q4_0 / --q8_0 (llama-quantize's names) are --q4 / --q8; a clash names flags that exist."""
    src, _ = sources["B"]
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "o.gguf"), "--q8_0"])
    assert r.exit_code == 0, r.output
    assert file_type_of(tmp_path / "o.gguf") == 7  # MOSTLY_Q8_0
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "p.gguf"), "--q4_0", "--q8"])
    assert r.exit_code == 2 and "got --q4, --q8" in r.output
