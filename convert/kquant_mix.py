"""llama.cpp's K-quant mixes: the GGUF type of every tensor of a ``--q4_k_m`` (etc.) file.

A mix (``Q2_K``, ``Q3_K_S``/``_M``/``_L``, ``Q4_K_S``/``_M``, ``Q5_K_S``/``_M``, ``Q6_K``) is a base
type plus per-tensor upgrades. This module follows ``llama_tensor_get_type`` /
``llama_tensor_get_type_impl`` / ``tensor_type_fallback`` in ``src/llama-quant.cpp`` (llama.cpp as
vendored by llama-cpp-python 0.3.36; the same rules on llama.cpp master in 2026) for the ``llama``
architecture (Mistral, Mixtral) without an importance matrix or overrides:

- ``output.weight`` (and ``token_embd.weight`` when the embeddings are tied, i.e. there is no
  ``output.weight``): Q6_K; Q8_0 when its rows are not a multiple of 256.
- ``token_embd.weight`` (untied): the base type.
- ``attn_v``: Q2_K -> Q4_K if n_head / n_head_kv >= 4 else Q3_K; Q3_K_M -> Q5_K for the first two
  layers, then Q4_K; Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K where :func:`use_more_bits`; Q4_K_S ->
  Q5_K for the first four layers; a 70B llama (80 layers, GQA) bumps Q3_K/Q4_K to Q5_K; **8 experts:
  Q8_0** whatever the mix.
- ``attn_k``: 8 experts: Q8_0. ``attn_q``, ``ffn_gate``, ``ffn_up``: the base type.
- ``ffn_down`` (the merged ``ffn_down_exps`` counts once per layer; its layer is parsed from the
  name when the model has experts): Q2_K -> Q3_K; Q3_K_M -> Q5_K for layers < n/16, else Q4_K;
  Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K where :func:`use_more_bits`; Q4_K_S -> Q5_K for layers < n/8.
- ``attn_output``: 8 experts: Q5_K for Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M (the other mixes keep
  the base type, Q3_K_L included); otherwise Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K.
- Fallback, last: a type whose block (256 weights) does not divide the row length becomes
  Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (llama.cpp's table; older releases
  used IQ4_NL for Q2_K/Q3_K), and F16 if even 32 does not divide it.

The "n_expert >= 4" rules of llama.cpp (attn_v at Q4_K) belong to the IQ1/IQ2 mixes only, not to
these. llama.cpp counts the ``attn_v`` tensors in file order sorted by layer (``weight_name_comparer``);
with one ``attn_v`` per layer its counter is the layer index, which is what is used here.
Tensors llama.cpp never quantizes (1-D norms, the router ``ffn_gate_inp``) are the caller's: the
policy keeps them F32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# mix -> (base GGUF type, gguf.LlamaFileType member = llama.cpp's LLAMA_FTYPE_MOSTLY_*)
MIXES: dict[str, tuple[str, str]] = {
    "Q2_K": ("Q2_K", "MOSTLY_Q2_K"),  # general.file_type 10
    "Q3_K_S": ("Q3_K", "MOSTLY_Q3_K_S"),  # 11
    "Q3_K_M": ("Q3_K", "MOSTLY_Q3_K_M"),  # 12
    "Q3_K_L": ("Q3_K", "MOSTLY_Q3_K_L"),  # 13
    "Q4_K_S": ("Q4_K", "MOSTLY_Q4_K_S"),  # 14
    "Q4_K_M": ("Q4_K", "MOSTLY_Q4_K_M"),  # 15
    "Q5_K_S": ("Q5_K", "MOSTLY_Q5_K_S"),  # 16
    "Q5_K_M": ("Q5_K", "MOSTLY_Q5_K_M"),  # 17
    "Q6_K": ("Q6_K", "MOSTLY_Q6_K"),  # 18
}
# llama.cpp's Q4_0/Q4_1/Q8_0 file types go through the same function: only the rules that name no mix
# apply to them (output and tied embedding, the 8-expert attn_k/attn_v)
LEGACY: dict[str, str] = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0",
                          "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0"}
QK_K = 256
# tensor_type_fallback: a 256-block type on rows that are not a multiple of 256
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class MixModel:
    """What llama.cpp's choice depends on besides the tensor: the model's hyper-parameters."""

    n_layers: int
    n_experts: int  # 0: dense
    n_heads: int
    n_kv_heads: int
    tied: bool  # no output.weight: token_embd is the output matrix too

    @classmethod
    def from_args(cls, args: Any) -> MixModel:
        """From :class:`mlxtral.config.ModelArgs`."""
        return cls(args.n_layers, args.n_experts, args.n_heads, args.n_kv_heads,
                   bool(args.tie_word_embeddings))

    @property
    def n_gqa(self) -> int:
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's ``LLM_TYPE_70B`` for arch llama: 80 layers with grouped-query attention."""
        return self.n_experts != 8 and self.n_layers == 80 and self.n_heads != self.n_kv_heads


def is_mix(qtype: str) -> bool:
    return qtype in MIXES


def base_type(mix: str) -> str:
    return MIXES[mix][0] if mix in MIXES else mix


def file_type(mix: str) -> int:
    """``general.file_type`` as llama-quantize writes it for ``mix``."""
    import gguf

    return int(gguf.LlamaFileType[MIXES[mix][1]])


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third
    layer in between (C integer division; ``i - n/8 >= 0`` where the modulo is reached)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def category(name: str) -> str:
    """llama.cpp's ``tensor_get_category`` for the llama tensors (substring tests, in its order)."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def quantizable(name: str, ndim: int) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for the llama tensors."""
    return (ndim >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def _layer(name: str, n_layers: int) -> int:
    m = _LAYER.match(name)
    if m is None or int(m.group(1)) >= n_layers:
        raise ValueError(f"cannot tell the layer of tensor {name!r} (model of {n_layers} layers)")
    return int(m.group(1))


def block_size(qtype: str) -> int:
    if qtype in ("F32", "F16", "BF16"):
        return 1
    return QK_K if qtype.endswith("_K") else 32


def fallback(qtype: str, ncols: int) -> str:
    """``tensor_type_fallback``: a type that fits rows of ``ncols`` weights."""
    if ncols % block_size(qtype) == 0:
        return qtype
    out = FALLBACK.get(qtype, qtype)
    return out if ncols % block_size(out) == 0 else "F16"


def _choose(mix: str, name: str, ncols: int, m: MixModel) -> str:
    """``llama_tensor_get_type_impl`` for the llama architecture and the K mixes."""
    new = base_type(mix)
    cat = category(name)
    if cat == "output" or (m.tied and cat == "token_embd"):
        if ncols % QK_K:
            return "Q8_0"
        return "Q6_K" if new != "Q8_0" else new
    if cat == "attn_v":
        if mix not in MIXES:  # Q4_0/Q4_1/Q8_0
            return "Q8_0" if m.n_experts == 8 else new
        i, n = _layer(name, m.n_layers), m.n_layers  # i_attention_wv, n_attention_wv
        if mix == "Q2_K":
            new = "Q4_K" if m.n_gqa >= 4 else "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif mix == "Q3_K_L":
            new = "Q5_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = "Q6_K"
        elif mix == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if m.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if m.n_experts == 8:
            new = "Q8_0"  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
        return new
    if cat == "attn_k":
        return "Q8_0" if m.n_experts == 8 else new
    if cat == "ffn_down" and mix in MIXES:
        # with experts llama.cpp parses the layer from the name; dense, it counts the ffn_down
        # tensors, one per layer in layer order: the same number
        i, n = _layer(name, m.n_layers), m.n_layers
        if mix == "Q2_K":
            new = "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"  # llama is not Falcon: Q4_K past n/16
        elif mix == "Q3_K_L":
            new = "Q5_K"
        elif mix == "Q4_K_M":
            if use_more_bits(i, n):
                new = "Q6_K"
        elif mix == "Q5_K_M" and use_more_bits(i, n):
            new = "Q6_K"
        elif mix == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        return new
    if cat == "attn_output":
        if m.n_experts == 8:
            if mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                new = "Q5_K"
        else:
            new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, new)
        return new
    return new  # token_embd (untied), attn_q, ffn_gate, ffn_up: the base type


def tensor_type(mix: str, name: str, shape: tuple[int, ...], model: MixModel) -> str:
    """The GGUF type llama-quantize gives the quantizable tensor ``name`` (GGUF name, NumPy
    ``shape``: rows along the last axis; for merged experts one expert's shape) in a ``mix`` file
    (a K mix, or the plain Q4_0/Q4_1/Q8_0 file types)."""
    if mix not in MIXES and mix not in LEGACY:
        raise ValueError(f"unknown llama.cpp file type {mix!r}; one of {', '.join([*MIXES, *LEGACY])}")
    ncols = int(shape[-1])
    return fallback(_choose(mix, name, ncols, model), ncols)
