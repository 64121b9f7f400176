"""Tiny random models written in every checkpoint format, from one set of weights (test helper).

``random_weights(args, seed)`` gives float32 weights in the internal layout (GGUF-style names,
interleaved-pair q/k rows, one 2-D tensor per expert). The writers put the *same* model on disk as
an HF folder (q/k rows permuted as HF does), a Mistral original folder (``torch.save`` .pth or
``consolidated.safetensors``), a GGUF (merged ``ffn_*_exps`` or legacy per-expert tensors, real
Mixtral SentencePiece vocabulary) and an mlx-lm folder (MLX affine quantization). ``torch``,
``transformers`` and ``mlx`` are test-only references, imported lazily.
"""
from __future__ import annotations

import importlib.resources
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlxtral.config import ModelArgs
from mlxtral.formats import expected_shapes
from mlxtral.qtensor import QTensor, bf16_to_f32, f32_to_bf16


def mlx_available() -> bool:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


# parametrize a test over both backends; the MLX case skips where mlx is not installed
BACKENDS = ["numpy", pytest.param("mlx", marks=pytest.mark.skipif(not mlx_available(), reason="no mlx"))]

# ---- model ---------------------------------------------------------------------------------------


def tiny_args(n_experts: int = 4, **kw: Any) -> ModelArgs:
    """dim 64, 2 layers, 4 heads / 2 KV heads, hidden 128, 4 experts top 2, the real 32000 vocab."""
    base: dict[str, Any] = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                                vocab_size=32000, norm_eps=1e-5, rope_theta=1e6, n_experts=n_experts,
                                n_experts_per_tok=2 if n_experts else 0, max_position_embeddings=4096)
    base.update(kw)
    return ModelArgs(**base)


def random_weights(args: ModelArgs, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights for every tensor ``args`` implies, internal names and layout."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("_norm.weight"):
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("ffn_gate_inp.weight"):
            x = 0.5 * rng.standard_normal(shape)
        else:
            x = (0.5 / np.sqrt(shape[-1])) * rng.standard_normal(shape)
        out[name] = x.astype(np.float32)
    return out


def round_weights(weights: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The float32 values a file of ``dtype`` ("f32", "f16", "bf16") stores for ``weights``."""
    if dtype == "f32":
        return dict(weights)
    if dtype == "f16":
        return {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}
    if dtype == "bf16":
        return {k: bf16_to_f32(f32_to_bf16(v)) for k, v in weights.items()}
    raise ValueError(dtype)


def permute_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved-pair q/k rows -> HF's rotate-half layout (FACTS.md's formula)."""
    dim = w.shape[1]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(-1, dim)


def tokenizer_path() -> Path:
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


# ---- safetensors (a tiny writer, independent of the reader) ---------------------------------------
_ST_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint32): "U32",
             np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8", np.dtype(np.float64): "F64",
             np.dtype(np.int64): "I64"}


class BF16:
    """Marks a uint16 array as bfloat16 bits for :func:`write_safetensors`."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits


def write_safetensors(path: Path, tensors: dict[str, np.ndarray | BF16],
                      metadata: dict[str, str] | None = None) -> Path:
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    off = 0
    for name, t in tensors.items():
        if isinstance(t, BF16):
            code, arr = "BF16", np.ascontiguousarray(t.bits, dtype="<u2")
        else:
            arr = np.ascontiguousarray(t)
            code = _ST_CODES[arr.dtype]
        b = arr.tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return path


def _cast(x: np.ndarray, dtype: str) -> np.ndarray | BF16:
    if dtype == "f32":
        return x.astype(np.float32)
    if dtype == "f16":
        return x.astype(np.float16)
    if dtype == "bf16":
        return BF16(f32_to_bf16(x))
    raise ValueError(dtype)


# ---- HF ------------------------------------------------------------------------------------------
def hf_config(args: ModelArgs) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if args.is_moe else "MistralForCausalLM"],
        "model_type": "mixtral" if args.is_moe else "mistral",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2, "sliding_window": None, "torch_dtype": "float32",
    }
    if args.is_moe:
        cfg.update(num_local_experts=args.n_experts, num_experts_per_tok=args.n_experts_per_tok)
    return cfg


def hf_state_dict(weights: dict[str, np.ndarray], args: ModelArgs) -> dict[str, np.ndarray]:
    """Internal float32 weights -> HF names and layout (q/k permuted)."""
    sd: dict[str, np.ndarray] = {"model.embed_tokens.weight": weights["token_embd.weight"],
                                 "model.norm.weight": weights["output_norm.weight"]}
    if "output.weight" in weights:
        sd["lm_head.weight"] = weights["output.weight"]
    for i in range(args.n_layers):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = weights[b + "attn_norm.weight"]
        sd[h + "post_attention_layernorm.weight"] = weights[b + "ffn_norm.weight"]
        sd[h + "self_attn.q_proj.weight"] = permute_hf(weights[b + "attn_q.weight"], args.n_heads)
        sd[h + "self_attn.k_proj.weight"] = permute_hf(weights[b + "attn_k.weight"], args.n_kv_heads)
        sd[h + "self_attn.v_proj.weight"] = weights[b + "attn_v.weight"]
        sd[h + "self_attn.o_proj.weight"] = weights[b + "attn_output.weight"]
        if args.is_moe:
            sd[h + "block_sparse_moe.gate.weight"] = weights[b + "ffn_gate_inp.weight"]
            for e in range(args.n_experts):
                for src, dst in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
                    x = weights[b + f"ffn_{src}.{e}.weight"]
                    sd[h + f"block_sparse_moe.experts.{e}.{dst}.weight"] = x
        else:
            for src in ("gate", "up", "down"):
                sd[h + f"mlp.{src}_proj.weight"] = weights[b + f"ffn_{src}.0.weight"]
    return sd


def write_hf(folder: Path, weights: dict[str, np.ndarray], args: ModelArgs, dtype: str = "f32",
             shards: int = 1, tokenizer: bool = True) -> Path:
    """An HF folder: config.json, model.safetensors (or ``shards`` files with the index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(args), indent=1))
    sd = {k: _cast(v, dtype) for k, v in hf_state_dict(weights, args).items()}
    if shards == 1:
        write_safetensors(folder / "model.safetensors", sd, {"format": "pt"})
    else:
        names = list(sd)
        parts = np.array_split(np.arange(len(names)), shards)
        wm: dict[str, str] = {}
        for j, idx in enumerate(parts):
            fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(folder / fname, {names[i]: sd[names[i]] for i in idx}, {"format": "pt"})
            wm.update({names[i]: fname for i in idx})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if tokenizer:
        shutil.copy(tokenizer_path(), folder / "tokenizer.model")
    return folder


# ---- Mistral original ----------------------------------------------------------------------------
def params_json(args: ModelArgs) -> dict[str, Any]:
    p: dict[str, Any] = {"dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim,
                         "hidden_dim": args.hidden_dim, "n_heads": args.n_heads,
                         "n_kv_heads": args.n_kv_heads, "norm_eps": args.norm_eps,
                         "vocab_size": args.vocab_size, "rope_theta": args.rope_theta}
    if args.is_moe:
        p["moe"] = {"num_experts_per_tok": args.n_experts_per_tok, "num_experts": args.n_experts}
    return p


def original_state_dict(weights: dict[str, np.ndarray], args: ModelArgs) -> dict[str, np.ndarray]:
    sd = {"tok_embeddings.weight": weights["token_embd.weight"], "norm.weight": weights["output_norm.weight"],
          "output.weight": weights["output.weight"]}
    for i in range(args.n_layers):
        b, o = f"blk.{i}.", f"layers.{i}."
        for src, dst in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("output", "wo")):
            sd[o + f"attention.{dst}.weight"] = weights[b + f"attn_{src}.weight"]
        sd[o + "attention_norm.weight"] = weights[b + "attn_norm.weight"]
        sd[o + "ffn_norm.weight"] = weights[b + "ffn_norm.weight"]
        if args.is_moe:
            sd[o + "feed_forward.gate.weight"] = weights[b + "ffn_gate_inp.weight"]
            for e in range(args.n_experts):
                for src, dst in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
                    sd[o + f"feed_forward.experts.{e}.{dst}.weight"] = weights[b + f"ffn_{src}.{e}.weight"]
        else:
            for src, dst in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
                sd[o + f"feed_forward.{dst}.weight"] = weights[b + f"ffn_{src}.0.weight"]
    return sd


def torch_save(path: Path, sd: dict[str, np.ndarray], dtype: str = "f32") -> Path:
    import torch

    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    torch.save({k: torch.from_numpy(np.array(v, dtype=np.float32)).to(tdt) for k, v in sd.items()}, path)
    return path


def write_original(folder: Path, weights: dict[str, np.ndarray], args: ModelArgs, fmt: str = "pth",
                   dtype: str = "f32", shards: int = 1) -> Path:
    """params.json + consolidated.00.pth (torch.save; ``shards`` files of whole tensors) or
    consolidated.safetensors, and the real Mixtral tokenizer.model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params_json(args), indent=1))
    sd = original_state_dict(weights, args)
    if fmt == "safetensors":
        write_safetensors(folder / "consolidated.safetensors", {k: _cast(v, dtype) for k, v in sd.items()})
    else:
        names = list(sd)
        for j, idx in enumerate(np.array_split(np.arange(len(names)), shards)):
            torch_save(folder / f"consolidated.{j:02d}.pth", {names[i]: sd[names[i]] for i in idx}, dtype)
    shutil.copy(tokenizer_path(), folder / "tokenizer.model")
    return folder


# ---- GGUF ----------------------------------------------------------------------------------------
def add_vocab(w: Any, path: Path) -> int:
    """The Mixtral SentencePiece vocabulary as tokenizer.ggml.* keys (as llama.cpp's converter)."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    return sp.vocab_size()


def write_gguf(path: Path, weights: dict[str, np.ndarray], args: ModelArgs, legacy_experts: bool = False,
               dtype: str = "f32", vocab: bool = True, spm: Path | None = None) -> Path:
    """An F32 (or F16) GGUF, arch ``llama``; merged ``ffn_*_exps`` or legacy per-expert tensors.
    ``vocab=False`` leaves the 32000-token vocabulary out (gguf's reader parses it slowly); ``spm``:
    another SentencePiece model for the vocabulary."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-mlxtral-test")
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    if args.is_moe:
        w.add_expert_count(args.n_experts)
        w.add_expert_used_count(args.n_experts_per_tok)
    w.add_file_type(0 if dtype == "f32" else 1)
    w.add_vocab_size(add_vocab(w, spm or tokenizer_path()) if vocab else args.vocab_size)

    def put(name: str, x: np.ndarray) -> None:
        small = x.ndim == 1 or name.endswith("ffn_gate_inp.weight")
        w.add_tensor(name, x.astype(np.float32 if small or dtype == "f32" else np.float16))

    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        if name in weights:
            put(name, weights[name])
    for i in range(args.n_layers):
        b = f"blk.{i}."
        for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"):
            put(b + t + ".weight", weights[b + t + ".weight"])
        if not args.is_moe:
            for t in ("gate", "up", "down"):
                put(b + f"ffn_{t}.weight", weights[b + f"ffn_{t}.0.weight"])
            continue
        put(b + "ffn_gate_inp.weight", weights[b + "ffn_gate_inp.weight"])
        for t in ("gate", "up", "down"):
            per = [weights[b + f"ffn_{t}.{e}.weight"] for e in range(args.n_experts)]
            if legacy_experts:
                for e, x in enumerate(per):
                    put(b + f"ffn_{t}.{e}.weight", x)
            else:
                put(b + f"ffn_{t}_exps.weight", np.stack(per))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- MLX (mlx-lm layout, quantized with mlx itself) ----------------------------------------------
def mlx_state_dict(weights: dict[str, np.ndarray], args: ModelArgs) -> dict[str, np.ndarray]:
    """HF names with mlx-lm's stacked ``switch_mlp`` experts, float32."""
    hf = hf_state_dict(weights, args)
    out = {k: v for k, v in hf.items() if ".experts." not in k}
    if args.is_moe:
        for i in range(args.n_layers):
            for t, src in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                out[f"model.layers.{i}.block_sparse_moe.switch_mlp.{t}_proj.weight"] = np.stack(
                    [hf[f"model.layers.{i}.block_sparse_moe.experts.{e}.{src}.weight"]
                     for e in range(args.n_experts)])
    return out


def write_mlx(folder: Path, weights: dict[str, np.ndarray], args: ModelArgs, bits: int = 4,
              group_size: int = 64, scale_dtype: str = "f16", router_bits: int | None = 8
              ) -> tuple[Path, dict[str, np.ndarray]]:
    """An mlx-lm folder quantized with ``mlx.core.quantize``. Returns (folder, reference) where the
    reference is ``mx.dequantize`` of what was written, float32, in the internal layout."""
    import mlx.core as mx

    folder.mkdir(parents=True, exist_ok=True)
    mdt = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}[scale_dtype]
    quant: dict[str, Any] = {"group_size": group_size, "bits": bits}
    files: dict[str, np.ndarray | BF16] = {}
    deq: dict[str, np.ndarray] = {}
    for name, x in mlx_state_dict(weights, args).items():
        mod = name[: -len(".weight")]
        if x.ndim == 1:
            files[name] = _cast(x, scale_dtype)
            deq[name] = round_weights({"x": x}, scale_dtype)["x"]
            continue
        b, gs = bits, group_size
        if router_bits and mod.endswith("block_sparse_moe.gate"):
            b, gs = router_bits, 64
            quant[mod] = {"group_size": gs, "bits": b}
        wq, s, bi = mx.quantize(mx.array(x).astype(mdt), group_size=gs, bits=b)
        files[mod + ".weight"] = np.array(wq)
        for part, t in (("scales", s), ("biases", bi)):
            t32 = np.array(t.astype(mx.float32))
            files[f"{mod}.{part}"] = _cast(t32, scale_dtype)  # exact: t already has scale_dtype
        deq[name] = np.array(mx.dequantize(wq, s.astype(mx.float32), bi.astype(mx.float32),
                                           group_size=gs, bits=b))
    cfg = hf_config(args)
    cfg["quantization"] = quant
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    write_safetensors(folder / "model.safetensors", files, {"format": "mlx"})
    shutil.copy(tokenizer_path(), folder / "tokenizer.model")
    ref = _internal_from_hf_like(deq, args)
    return folder, ref


def _internal_from_hf_like(sd: dict[str, np.ndarray], args: ModelArgs) -> dict[str, np.ndarray]:
    """Inverse of :func:`mlx_state_dict` (q/k un-permuted), for references."""
    out = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(args.n_layers):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        out[b + "attn_norm.weight"] = sd[h + "input_layernorm.weight"]
        out[b + "ffn_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
        for hf_n, n_h, ours in (("q", args.n_heads, "q"), ("k", args.n_kv_heads, "k")):
            w = sd[h + f"self_attn.{hf_n}_proj.weight"]
            out[b + f"attn_{ours}.weight"] = w.reshape(n_h, 2, w.shape[0] // n_h // 2, -1).transpose(
                0, 2, 1, 3).reshape(w.shape)
        out[b + "attn_v.weight"] = sd[h + "self_attn.v_proj.weight"]
        out[b + "attn_output.weight"] = sd[h + "self_attn.o_proj.weight"]
        if args.is_moe:
            out[b + "ffn_gate_inp.weight"] = sd[h + "block_sparse_moe.gate.weight"]
            for t in ("gate", "up", "down"):
                st = sd[h + f"block_sparse_moe.switch_mlp.{t}_proj.weight"]
                for e in range(args.n_experts):
                    out[b + f"ffn_{t}.{e}.weight"] = st[e]
        else:
            for t in ("gate", "up", "down"):
                out[b + f"ffn_{t}.0.weight"] = sd[h + f"mlp.{t}_proj.weight"]
    return out


# ---- transformers reference ----------------------------------------------------------------------
def hf_reference_model(folder: Path) -> Any:
    """transformers' Mixtral/Mistral model loaded from an HF folder written by :func:`write_hf`
    (float32, eval mode): the reference implementation for logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return model


def hf_reference_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """float32 ``[len(ids), vocab]`` logits of transformers' model on ``ids``."""
    import torch

    model = hf_reference_model(folder)
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long)).logits[0]
    return out.float().numpy()


# ---- GGUF types no Python quantizer writes (K-quants, IQ4): random blocks ------------------------
# byte offsets of each type's float16 super-scales (d, and dmin/m where the type has one) and the
# largest |code x sub-scale| a weight reaches, so blocks can be scaled to weights of about +-amp
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,)}
_REACH = {"Q4_0": 8, "Q4_1": 15, "Q5_0": 16, "Q5_1": 31, "Q8_0": 128, "Q2_K": 45, "Q3_K": 128,
          "Q4_K": 945, "Q5_K": 1953, "Q6_K": 4096, "IQ4_NL": 127, "IQ4_XS": 4064}


def random_gguf_blocks(qtype: str, shape: tuple[int, ...], rng: np.random.Generator, amp: float = 0.1
                       ) -> np.ndarray:
    """Valid random raw blocks of GGUF ``qtype`` for a ``[..., n]`` tensor: random codes and
    sub-scales, finite float16 super-scales sized so weights stay within about ``amp``."""
    import gguf

    gt = gguf.GGMLQuantizationType[qtype]
    bs, ts = gguf.GGML_QUANT_SIZES[gt]
    n_blocks = int(np.prod(shape)) // bs
    b = rng.integers(0, 256, (n_blocks, ts), dtype=np.uint8)
    for i, off in enumerate(_F16_FIELDS[qtype]):
        v = rng.uniform(0.3, 1.0, n_blocks) * amp / _REACH[qtype]
        if i == 1 and qtype in ("Q4_1", "Q5_1"):  # m is a value, not a scale
            v = -rng.uniform(0.3, 1.0, n_blocks) * amp
        b[:, off : off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return b.reshape(*shape[:-1], shape[-1] // bs * ts)


Q4_K_M = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output.": "Q6_K", "*": "Q4_K"}  # llama.cpp's mix


def raw_gguf_tensors(args: ModelArgs, qtype: str | dict[str, str], seed: int = 0) -> dict[str, QTensor]:
    """Every matrix as random valid blocks of GGUF ``qtype`` (or per name fragment: a dict to a
    type, ``"*"`` for the rest); norms and routers float32 from :func:`random_weights`."""
    rng = np.random.default_rng(seed)
    out: dict[str, QTensor] = {}
    for name, x in random_weights(args, seed).items():
        if x.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            out[name] = QTensor.from_float(x)
            continue
        t = qtype if isinstance(qtype, str) else next(v for k, v in qtype.items() if k in name or k == "*")
        amp = 1.0 if name == "token_embd.weight" else 2.0 / np.sqrt(x.shape[-1])
        out[name] = QTensor(t, x.shape, random_gguf_blocks(t, x.shape, rng, amp))
    return out


def add_kv(w: Any, kv: dict[str, Any] | None) -> None:
    """Key/values into a gguf.GGUFWriter: a string, an int (uint32), a list (an array), or
    ``(value, vtype[, subtype])`` to give the types."""
    for k, v in (kv or {}).items():
        if isinstance(v, tuple):
            w.add_key_value(k, *v)
        elif isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_uint32(k, v)


def write_raw_gguf(path: Path, tensors: dict[str, QTensor], args: ModelArgs, vocab: bool = False,
                   general: dict[str, Any] | None = None) -> Path:
    """Internal-layout tensors as they are (raw blocks of any type), experts merged into
    ``ffn_*_exps``, arch ``llama``; the real vocabulary only with ``vocab``; ``general``: more
    ``general.*`` keys (str, int as uint32, list of str)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    add_kv(w, general)
    for add, v in ((w.add_context_length, args.max_position_embeddings), (w.add_embedding_length, args.dim),
                   (w.add_block_count, args.n_layers), (w.add_feed_forward_length, args.hidden_dim),
                   (w.add_head_count, args.n_heads), (w.add_head_count_kv, args.n_kv_heads),
                   (w.add_rope_dimension_count, args.head_dim), (w.add_layer_norm_rms_eps, args.norm_eps),
                   (w.add_rope_freq_base, args.rope_theta), (w.add_expert_count, args.n_experts),
                   (w.add_expert_used_count, args.n_experts_per_tok)):
        add(v)
    w.add_vocab_size(add_vocab(w, tokenizer_path()) if vocab else args.vocab_size)
    merged: dict[str, list[QTensor]] = {}
    for name, q in tensors.items():
        parts = name.split(".")
        key = f"blk.{parts[1]}.{parts[2]}_exps.weight" if len(parts) == 5 else name  # blk.N.ffn_up.E.weight
        merged.setdefault(key, []).append(q)
    for name, qs in merged.items():
        data = np.stack([q.data for q in qs]) if name.endswith("_exps.weight") else qs[0].data
        if qs[0].qtype == "F32":
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qs[0].qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
