"""Checkpoint loaders: the same random model written as HF, original, GGUF and MLX loads identically."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_models import (
    hf_config,
    hf_state_dict,
    mlx_state_dict,
    permute_hf,
    random_weights,
    round_weights,
    tiny_args,
    torch_save,
    write_gguf,
    write_hf,
    write_mlx,
    write_original,
    write_safetensors,
)

from mlxtral.errors import FormatError
from mlxtral.formats.detect import detect_format, open_checkpoint
from mlxtral.formats.hf import load_hf, permute_rows
from mlxtral.formats.native import to_native
from mlxtral.formats.original import load_original
from mlxtral.formats.safetensors import open_safetensors
from mlxtral.formats.torch_zip import load_torch_zip
from mlxtral.qtensor import AffineTensor
from mlxtral.quant.affine import affine_dequantize, pack_codes, unpack_codes
from mlxtral.quant.gguf_affine import affine_to_q4_1

ARGS = tiny_args()
DENSE = tiny_args(n_experts=0)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_weights(ARGS, seed=1)


@pytest.fixture(scope="module")
def dense_weights() -> dict[str, np.ndarray]:
    return random_weights(DENSE, seed=2)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("formats")


def assert_same(tensors: dict, ref: dict[str, np.ndarray], atol: float = 0.0) -> None:
    assert set(tensors) == set(ref)
    for k, r in ref.items():
        got = tensors[k].dequantize()
        assert got.shape == r.shape, k
        if atol == 0.0:
            np.testing.assert_array_equal(got, r, err_msg=k)
        else:
            np.testing.assert_allclose(got, r, atol=atol, rtol=0, err_msg=k)


def is_file_view(a: np.ndarray) -> bool:
    """A zero-copy, read-only view (of a memory map), not an owned copy."""
    return not a.flags.owndata and not a.flags.writeable


# ---- HF ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_hf_dtypes_load_exactly(root: Path, weights, dtype: str) -> None:
    folder = write_hf(root / f"hf_{dtype}", weights, ARGS, dtype=dtype)
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "hf"
    assert ckpt.args.n_experts == 4 and ckpt.args.dim == 64 and not ckpt.args.tie_word_embeddings
    assert_same(ckpt.tensors, round_weights(weights, dtype))
    want = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype]
    for name in ("token_embd.weight", "blk.0.attn_v.weight", "blk.1.ffn_down.3.weight",
                 "blk.0.attn_q.weight"):
        assert ckpt.tensors[name].qtype == want
    for name in ("token_embd.weight", "blk.0.attn_v.weight", "blk.1.ffn_down.3.weight", "output.weight"):
        assert is_file_view(ckpt.tensors[name].data), name
    for name in ("blk.0.attn_norm.weight", "output_norm.weight", "blk.1.ffn_gate_inp.weight"):
        assert ckpt.tensors[name].qtype == "F32"
    assert ckpt.tokenizer is not None and ckpt.tokenizer.kind == "sentencepiece"


def test_hf_sharded_with_index(root: Path, weights) -> None:
    folder = write_hf(root / "hf_sharded", weights, ARGS, dtype="bf16", shards=3)
    assert len(list(folder.glob("model-*.safetensors"))) == 3
    assert_same(load_hf(folder).tensors, round_weights(weights, "bf16"))


def test_hf_tied_embeddings(root: Path) -> None:
    args = tiny_args(tie_word_embeddings=True)
    w = random_weights(args, seed=3)
    assert "output.weight" not in w
    ckpt = load_hf(write_hf(root / "hf_tied", w, args))
    assert ckpt.args.tie_word_embeddings and "output.weight" not in ckpt.tensors
    assert_same(ckpt.tensors, w)


def test_hf_tokenizer_json_only(root: Path, weights) -> None:
    folder = write_hf(root / "hf_tokjson", weights, ARGS, tokenizer=False)
    (folder / "tokenizer.json").write_text("{}")
    tok = load_hf(folder).tokenizer
    assert tok is not None and tok.kind == "hf" and tok.path == folder


def test_hf_pytorch_model_bin(root: Path, weights) -> None:
    folder = root / "hf_bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(ARGS)))
    torch_save(folder / "pytorch_model.bin", hf_state_dict(weights, ARGS), "bf16")
    assert_same(open_checkpoint(folder).tensors, round_weights(weights, "bf16"))


def test_qk_permutation_roundtrip() -> None:
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    hf = permute_hf(w, 8)
    np.testing.assert_array_equal(permute_rows(w, 8, inverse=False), hf)
    np.testing.assert_array_equal(permute_rows(hf, 8, inverse=True), w)


def _rope_interleaved(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """Naive loop: rotate pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d) (Meta/Mistral, llama.cpp)."""
    d = x.shape[-1]
    out = x.copy()
    for i in range(d // 2):
        a = pos * theta ** (-2 * i / d)
        c, s = np.cos(a), np.sin(a)
        out[..., 2 * i] = x[..., 2 * i] * c - x[..., 2 * i + 1] * s
        out[..., 2 * i + 1] = x[..., 2 * i] * s + x[..., 2 * i + 1] * c
    return out


def test_unpermuted_qk_with_interleaved_rope_equals_transformers_attention_scores(weights) -> None:
    """The internal convention is right: interleaved RoPE on our q/k gives the same q.k scores as
    transformers' rotate-half RoPE on HF's permuted q_proj/k_proj."""
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    hd, nh, nkv, theta = ARGS.head_dim, ARGS.n_heads, ARGS.n_kv_heads, ARGS.rope_theta
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, ARGS.dim)).astype(np.float32)
    wq, wk = weights["blk.0.attn_q.weight"], weights["blk.0.attn_k.weight"]
    sd = hf_state_dict(weights, ARGS)
    hq, hk = sd["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.k_proj.weight"]
    pos = np.arange(5)
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([pos[:, None] * inv, pos[:, None] * inv], axis=-1)
    cos, sin = torch.tensor(np.cos(emb))[None], torch.tensor(np.sin(emb))[None]
    q_hf = torch.tensor((x @ hq.T).reshape(5, nh, hd).transpose(1, 0, 2), dtype=torch.float64)[None]
    k_hf = torch.tensor((x @ hk.T).reshape(5, nkv, hd).transpose(1, 0, 2), dtype=torch.float64)[None]
    q_hf, k_hf = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    q_ours = np.stack([_rope_interleaved((x @ wq.T).reshape(5, nh, hd)[p].astype(np.float64), p, theta)
                       for p in range(5)])  # [pos, head, hd]
    k_ours = np.stack([_rope_interleaved((x @ wk.T).reshape(5, nkv, hd)[p].astype(np.float64), p, theta)
                       for p in range(5)])
    for h in range(nh):
        g = h // (nh // nkv)
        s_hf = q_hf[0, h].numpy() @ k_hf[0, g].numpy().T
        s_ours = q_ours[:, h] @ k_ours[:, g].T
        np.testing.assert_allclose(s_ours, s_hf, rtol=1e-9, atol=1e-9)


def test_transformers_loads_our_hf_folder(root: Path, weights) -> None:
    pytest.importorskip("transformers")
    from tiny_models import hf_reference_model

    folder = write_hf(root / "hf_for_tf", weights, ARGS)
    model = hf_reference_model(folder)
    q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(q, permute_hf(weights["blk.1.attn_q.weight"], ARGS.n_heads))
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), weights["output.weight"])


def test_transformers_saved_folder_loads(root: Path) -> None:
    """A folder written by transformers' own save_pretrained (independent writer)."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                        num_experts_per_tok=2, tie_word_embeddings=False)
    folder = root / "tf_saved"
    MixtralForCausalLM(cfg).save_pretrained(folder)
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "hf" and ckpt.args.n_experts == 3 and ckpt.args.hidden_dim == 96
    ref = load_file(folder / "model.safetensors")
    t = ckpt.tensors
    np.testing.assert_array_equal(t["blk.1.attn_q.weight"].dequantize(),
                                  permute_rows(ref["model.layers.1.self_attn.q_proj.weight"], 4, True))
    np.testing.assert_array_equal(permute_hf(t["blk.0.attn_k.weight"].dequantize(), 2),
                                  ref["model.layers.0.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(t["blk.1.ffn_up.2.weight"].dequantize(),
                                  ref["model.layers.1.block_sparse_moe.experts.2.w3.weight"])
    np.testing.assert_array_equal(t["blk.0.ffn_gate_inp.weight"].dequantize(),
                                  ref["model.layers.0.block_sparse_moe.gate.weight"])


# ---- original ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,dtype,shards",
                         [("pth", "f32", 1), ("pth", "bf16", 3), ("safetensors", "f16", 1)])
def test_original_loads_exactly(root: Path, weights, fmt: str, dtype: str, shards: int) -> None:
    folder = write_original(root / f"orig_{fmt}_{dtype}_{shards}", weights, ARGS, fmt=fmt, dtype=dtype,
                            shards=shards)
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "original" and ckpt.args.n_experts == 4
    assert_same(ckpt.tensors, round_weights(weights, dtype))
    assert is_file_view(ckpt.tensors["blk.0.attn_q.weight"].data)  # no permutation: zero-copy
    assert ckpt.tokenizer is not None and ckpt.tokenizer.kind == "sentencepiece"
    assert ckpt.tokenizer.path == folder / "tokenizer.model"


def test_original_tokenizer_versioned_name(root: Path, weights) -> None:
    folder = write_original(root / "orig_tokv", weights, ARGS, fmt="safetensors")
    (folder / "tokenizer.model").rename(folder / "tokenizer.model.v3")
    assert load_original(folder).tokenizer.path == folder / "tokenizer.model.v3"


def test_original_tensor_in_two_shards_is_refused(root: Path, weights) -> None:
    folder = write_original(root / "orig_dup", weights, ARGS, shards=2)
    shutil.copy(folder / "consolidated.00.pth", folder / "consolidated.02.pth")
    with pytest.raises(FormatError, match="in both"):
        load_original(folder)


# ---- all formats agree ---------------------------------------------------------------------------
def test_hf_original_gguf_identical(root: Path, weights) -> None:
    hf = open_checkpoint(write_hf(root / "agree_hf", weights, ARGS))
    orig = open_checkpoint(write_original(root / "agree_orig", weights, ARGS))
    gg = open_checkpoint(write_gguf(root / "agree.gguf", weights, ARGS))
    assert gg.format == "gguf"
    for ck in (hf, orig, gg):
        assert_same(ck.tensors, weights)
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                    "n_experts", "n_experts_per_tok", "tie_word_embeddings"):
            assert getattr(ck.args, key) == getattr(ARGS, key), (ck.format, key)
        assert ck.args.norm_eps == pytest.approx(ARGS.norm_eps) and ck.args.rope_theta == ARGS.rope_theta


def test_gguf_legacy_per_expert_layout(root: Path, weights) -> None:
    gg = open_checkpoint(write_gguf(root / "legacy.gguf", weights, ARGS, legacy_experts=True, vocab=False))
    assert_same(gg.tensors, weights)


def test_dense_model_all_formats(root: Path, dense_weights) -> None:
    w = dense_weights
    assert "blk.0.ffn_gate.0.weight" in w and "blk.0.ffn_gate_inp.weight" not in w
    for ck in (open_checkpoint(write_hf(root / "dense_hf", w, DENSE, dtype="bf16")),
               open_checkpoint(write_original(root / "dense_orig", w, DENSE, dtype="bf16"))):
        assert not ck.args.is_moe
        assert_same(ck.tensors, round_weights(w, "bf16"))
    gg = open_checkpoint(write_gguf(root / "dense.gguf", w, DENSE, vocab=False))
    assert_same(gg.tensors, w)


# ---- MLX -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,gs,sdt,native", [
    (4, 64, "f16", "Q4_1"), (4, 32, "bf16", "Q4_1"), (4, 128, "f32", "Q4_1"),
    (8, 64, "f16", "F16"), (3, 32, "f16", "Q4_1"), (6, 64, "bf16", "F16"), (2, 64, "f16", "Q4_1"),
    (5, 128, "bf16", "F16"),
])
def test_mlx_quantized_folder(root: Path, weights, bits: int, gs: int, sdt: str, native: str) -> None:
    """Quantized modules load as zero-copy AffineTensors of the file's bits and group size, equal to
    mx.dequantize of what was written; the NumPy backend's form (Q4_1 / F16) equals them too."""
    pytest.importorskip("mlx.core")
    args = ARGS
    w = weights
    if gs == 128:  # dim 64 rows cannot hold groups of 128
        args = tiny_args(dim=128, head_dim=32)
        w = random_weights(args, seed=4)
    folder, ref = write_mlx(root / f"mlx_{bits}_{gs}_{sdt}", w, args, bits=bits, group_size=gs,
                            scale_dtype=sdt)
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "mlx"
    big = ckpt.tensors["blk.1.ffn_down.2.weight"]
    assert isinstance(big, AffineTensor) and (big.bits, big.group_size) == (bits, gs)
    assert big.qtype == f"affine{bits}/g{gs}" and is_file_view(big.data)
    assert ckpt.tensors["blk.0.ffn_gate_inp.weight"].qtype == "F32"  # 8-bit router override -> f32
    assert_same(ckpt.tensors, ref, atol=1e-6)  # q/k un-permuted with their scales and biases
    nat = {n: to_native(t, n) for n, t in ckpt.tensors.items()}
    assert nat["blk.1.ffn_down.2.weight"].qtype == native
    # Q4_1: exact up to f32 rounding of q*d+m; F16: plus one f16 rounding of each weight
    tol = 1e-6 if native == "Q4_1" else 2e-3
    if sdt == "f32" and native == "Q4_1":
        tol = 2e-3  # f32 scales are rounded to f16
    assert_same(nat, ref, atol=tol)


def test_mlx_mixed_precision_null_group_size_and_other_modes(root: Path, weights) -> None:
    """mlx-lm's mixed-precision folders (``--quant-predicate mixed_3_6``) give a module's group size
    as null (MLX's default for the mode, also the top level's): it loads as that; a mode other than
    affine (mxfp4: no biases) is named, not reported as missing biases."""
    pytest.importorskip("mlx.core")
    folder, ref = write_mlx(root / "mlx_mixed", weights, ARGS, bits=4, group_size=64)
    cfg = json.loads((folder / "config.json").read_text())
    routers = [k for k in cfg["quantization"] if k.endswith("block_sparse_moe.gate")]
    assert routers
    for k in routers:
        cfg["quantization"][k] = {"group_size": None, "bits": 8, "mode": "affine"}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_same(open_checkpoint(folder).tensors, ref, atol=1e-6)
    cfg["quantization"][routers[0]] = {"group_size": None, "bits": 4, "mode": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="mode 'mxfp4' is not supported"):
        open_checkpoint(folder)


def test_mlx_unquantized_detected_by_switch_mlp_names(root: Path, weights) -> None:
    folder = root / "mlx_plain"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(ARGS)))
    write_safetensors(folder / "model.safetensors", mlx_state_dict(weights, ARGS))
    assert detect_format(folder) == "mlx"
    ckpt = open_checkpoint(folder)
    assert_same(ckpt.tensors, weights)
    assert is_file_view(ckpt.tensors["blk.1.ffn_up.3.weight"].data)


def test_mlx4_to_q4_1_matches_gguf_dequantize() -> None:
    """The nibble repack against gguf.quants' own Q4_1 decoder and a naive bit loop."""
    import gguf

    rng = np.random.default_rng(5)
    w = rng.integers(0, 2**32, size=(3, 16), dtype=np.uint32)  # 3 rows of 128 weights
    s = rng.standard_normal((3, 2)).astype(np.float16)
    b = rng.standard_normal((3, 2)).astype(np.float16)
    naive = np.empty((3, 128), np.float32)
    for r in range(3):
        for i in range(128):
            q = (int(w[r, i // 8]) >> (4 * (i % 8))) & 15
            naive[r, i] = q * np.float32(s[r, i // 64]) + np.float32(b[r, i // 64])
    blocks = affine_to_q4_1(w, s, b, 64, "float16")
    got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1).reshape(3, 128)
    np.testing.assert_allclose(got, naive, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(affine_dequantize(w, s, b, 4, 64, "float16"), naive, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_unpack_mlx_matches_mlx(bits: int) -> None:
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    wq, s, b = mx.quantize(mx.array(x), group_size=32, bits=bits)
    ref = np.array(mx.dequantize(wq, s, b, group_size=32, bits=bits))
    got = affine_dequantize(np.array(wq), np.array(s), np.array(b), bits, 32, "float32")
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    codes = unpack_codes(np.array(wq), bits)
    assert codes.max() < 2**bits
    np.testing.assert_array_equal(pack_codes(codes, bits), np.array(wq))  # the inverse, bit for bit


# ---- readers against independent references ------------------------------------------------------
def test_safetensors_reader_matches_safetensors_package(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    data = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
            "f16": rng.standard_normal(7).astype(np.float16),
            "u32": rng.integers(0, 2**32, (2, 4), dtype=np.uint32),
            "i32": rng.integers(-9, 9, (4,), dtype=np.int32),
            "u8": np.arange(9, dtype=np.uint8).reshape(3, 3),
            "f64": rng.standard_normal(2), "empty": np.zeros((0, 3), np.float32), "scalar": np.float32(2.5)}
    save_file({k: np.asarray(v) for k, v in data.items()}, str(tmp_path / "a.safetensors"))
    st = open_safetensors(tmp_path / "a.safetensors")
    ref = load_file(str(tmp_path / "a.safetensors"))
    assert set(st.keys()) == set(ref)
    for k, v in ref.items():
        assert st[k].data.dtype == v.dtype and st[k].shape == v.shape
        np.testing.assert_array_equal(st[k].data, v)
    assert st["u32"].dtype == "U32" and is_file_view(st["u32"].data)


def test_safetensors_bf16_matches_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = torch.randn(4, 6).to(torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "b.safetensors"))
    q = open_safetensors(tmp_path / "b.safetensors")["w"].qtensor()
    assert q.qtype == "BF16"
    np.testing.assert_array_equal(q.dequantize(), t.float().numpy())


def test_torch_zip_reader_dtypes_views_and_parameters(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    base = torch.randn(6, 4)
    sd = {
        "f32": base, "f16": base.half(), "bf16": base.bfloat16(), "i64": torch.arange(5),
        "t": base.t(),  # non-contiguous view of base's storage
        "row": base[2],  # offset view sharing the storage
        "param": torch.nn.Parameter(torch.ones(3)),
        "step": 7,  # non-tensor entries are ignored
    }
    torch.save(sd, tmp_path / "x.pth")
    got, _mm = load_torch_zip(tmp_path / "x.pth")
    assert set(got) == {"f32", "f16", "bf16", "i64", "t", "row", "param"}
    np.testing.assert_array_equal(got["f32"].data, base.numpy())
    np.testing.assert_array_equal(got["f16"].data, base.half().numpy())
    assert got["bf16"].dtype == "BF16"
    np.testing.assert_array_equal(got["bf16"].qtensor().dequantize(), base.bfloat16().float().numpy())
    np.testing.assert_array_equal(got["i64"].data, np.arange(5))
    np.testing.assert_array_equal(got["t"].data, base.numpy().T)
    np.testing.assert_array_equal(got["row"].data, base.numpy()[2])
    np.testing.assert_array_equal(got["param"].data, np.ones(3, np.float32))
    assert is_file_view(got["f32"].data)


# ---- detection -----------------------------------------------------------------------------------
def test_detect_refuses_unknown_inputs(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"hello world")
    with pytest.raises(FormatError, match="not a GGUF"):
        open_checkpoint(tmp_path / "x.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="not a checkpoint folder"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "params.json").write_text("{}")
    with pytest.raises(FormatError, match="consolidated"):
        open_checkpoint(tmp_path / "p")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text(json.dumps(hf_config(ARGS) | {
        "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(FormatError, match="gptq"):
        open_checkpoint(tmp_path / "q")
