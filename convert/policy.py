"""Which type each tensor is written in, and the output precisions a user can ask for.

GGUF policy (``--q4``/``--q4_1``/``--q8``/``--f16``/``--bf16``/``--f32``):

- 1-D tensors (the RMSNorm weights) and the router ``ffn_gate_inp`` stay F32: they are tiny and
  the router's top-2 choice is sensitive to rounding.
- As llama-quantize's Q4_0/Q4_1/Q8_0 file types (``llama_tensor_get_type``): ``output.weight``
  (the embedding when tied) is Q6_K when the body is 4-bit, the logits being the most
  quantization-sensitive product in the model (Q8_0 when its rows are not a multiple of 256);
  with 8 experts ``attn_k``/``attn_v`` are Q8_0 ("trades just ~128MB" for Mixtral). A source
  tensor that is quantized already is not upgraded (more bits bring nothing back): it is copied.
- ``token_embd.weight`` follows the body (it is a lookup table: an error there affects one row
  per token, not every logit), as llama.cpp does for Q4_0/Q4_1/Q8_0.
- Everything else (attention, experts) gets the requested type; a matrix whose rows are not a
  multiple of 32 falls back to F16.
- The K-quant mixes (``--q2_k``, ``--q3_k_s``/``_m``/``_l``, ``--q4_k_s``/``_m``, ``--q5_k_s``/``_m``,
  ``--q6_k``; GGUF only) choose every tensor's type as llama-quantize does:
  :mod:`.kquant_mix`. Its upgrades requantize a quantized source like any other type.

MLX policy (``bits`` 4 or 8, ``group_size`` 32/64/128), as ``mlx_lm.convert`` quantizes Mixtral:
every linear layer, the experts, ``embed_tokens`` and ``lm_head`` are affine-quantized; the
router ``block_sparse_moe.gate`` is left unquantized (float32, like the norms).

No precision flag means ``--q4`` (:data:`DEFAULT_PRECISION`). A source tensor that is already
quantized (any GGUF block type, MLX affine) and would go to a *different* quantized type is
requantized: error on top of error (Q4_1 -> Q4_0 adds ~10% relative RMSE). As llama-quantize does,
that needs ``--allow-requantize`` (:func:`requantized`); copying blocks of the same type and
dequantizing to a float type (F16, BF16, F32) never do. The policy's own upgrade of
``output.weight`` (4-bit body -> Q8_0) keeps a source that is already 4-bit as it is (copied):
requantizing it could only add error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlxtral.errors import UsageError

from .kquant_mix import LEGACY, MixModel, is_mix
from .kquant_mix import file_type as mix_file_type
from .kquant_mix import tensor_type as mix_tensor_type

if TYPE_CHECKING:
    from mlxtral.config import ModelArgs

# user-facing precision name -> (GGUF type, MLX bits or None for an unquantized float dtype)
PRECISIONS: dict[str, tuple[str, int | None]] = {
    "q4": ("Q4_0", 4),
    "q4_1": ("Q4_1", None),
    "q5_0": ("Q5_0", None),
    "q5_1": ("Q5_1", None),
    "q8": ("Q8_0", 8),
    "f16": ("F16", None),
    "bf16": ("BF16", None),
    "f32": ("F32", None),
    # llama.cpp's K-quant mixes (GGUF only): per-tensor types from convert/kquant_mix.py
    "q2_k": ("Q2_K", None),
    "q3_k_s": ("Q3_K_S", None),
    "q3_k_m": ("Q3_K_M", None),
    "q3_k_l": ("Q3_K_L", None),
    "q4_k_s": ("Q4_K_S", None),
    "q4_k_m": ("Q4_K_M", None),
    "q5_k_s": ("Q5_K_S", None),
    "q5_k_m": ("Q5_K_M", None),
    "q6_k": ("Q6_K", None),
}
GGUF_QTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32")
DEFAULT_PRECISION = "q4"
DEFAULT_GROUP_SIZE = 64
DEFAULT_HELP = "no precision flag: --q4 (GGUF Q4_0, output.weight Q6_K as llama.cpp; MLX 4-bit, groups of 64)"
FLOAT_QTYPES = ("F32", "F16", "BF16", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Precision:
    """What the user asked for, in GGUF terms (``qtype``) and MLX terms (``bits``/``dtype``)."""

    qtype: str  # GGUF type of the body
    bits: int | None  # MLX affine bits, or None: unquantized
    float_dtype: str  # MLX dtype of unquantized weights and of scales/biases


def parse_precision(name: str, fmt: str) -> Precision:
    """``"q4"``/``"Q4_0"``/... -> :class:`Precision` for output format ``fmt`` ("gguf" | "mlx")."""
    key = name.lower().lstrip("-").replace("-", "_")
    by_qtype = {v[0].lower(): k for k, v in PRECISIONS.items()}
    key = by_qtype.get(key, key)
    if key in ("4bit", "4"):
        key = "q4"
    if key in ("8bit", "8"):
        key = "q8"
    if key not in PRECISIONS:
        raise UsageError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    qtype, bits = PRECISIONS[key]
    if fmt == "mlx" and key in ("q4_1", "q5_0", "q5_1"):
        raise UsageError(f"--{key} is a GGUF type; MLX output takes --q4, --q8, --f16, --bf16 or --f32")
    if fmt == "mlx" and is_mix(qtype):
        raise UsageError(f"--{key} is a GGUF K-quant mix; MLX output takes --q4, --q8, --f16, --bf16 or "
                         "--f32 (write a .gguf file for K-quants)")
    float_dtype = {"f16": "float16", "f32": "float32"}.get(key, "bfloat16")
    return Precision(qtype=qtype, bits=bits, float_dtype=float_dtype)


def is_f32_tensor(name: str, ndim: int) -> bool:
    """Norms (1-D) and the router stay float32 in every output."""
    return ndim == 1 or name.endswith("ffn_gate_inp.weight")


def is_quantized_type(qtype: str) -> bool:
    """A GGUF block type or an MLX affine type (``affine4/g64``), not a float type."""
    return qtype not in FLOAT_QTYPES


# GGUF types an MLX affine output of these bits holds exactly, in groups of 32 with float16 scales
# (mlxtral.quant.gguf_affine: Q4_0 -> scale d, bias -8d; Q4_1 -> d, m; Q8_0 -> d, -128d)
EXACT_TO_MLX = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
# K-quant groups' scale and min are a float16 times a 6-bit integer: exact in float32 scales only
FLOAT32_SCALES = {"Q4_K", "Q5_K"}
_AFFINE = re.compile(r"affine(\d)/g(\d{2,3})")


def exact_repack(src_qtype: str, out_qtype: str) -> bool:
    """Whether a ``src_qtype`` tensor is written as ``out_qtype`` without quantizing again: GGUF
    Q4_0/Q4_1/Q8_0 -> MLX affine of the same bits in groups of 32 (float16 scales), Q4_K/Q5_K ->
    affine 4/5-bit groups of 32 (each 32-weight sub-block's ``d*sc`` and ``-dmin*m``, float32
    scales), and MLX affine
    of 2 to 4 bits -> GGUF Q4_1 (codes fit a nibble; a group's scale and bias, rounded to float16,
    repeat per 32 weights: exact for float16 scales, and bfloat16 ones in float16's normal range)."""
    bits = EXACT_TO_MLX.get(src_qtype)
    if bits is not None:
        return out_qtype == f"affine{bits}/g32"
    m = _AFFINE.fullmatch(src_qtype)
    return m is not None and out_qtype == "Q4_1" and int(m[1]) <= 4 and int(m[2]) % 32 == 0


def requantized(src_qtype: str, out_qtype: str) -> bool:
    """Whether writing a ``src_qtype`` tensor as ``out_qtype`` quantizes already quantized values
    again (a copy of the same type, an exact repack (:func:`exact_repack`) and a float output do
    not)."""
    return (is_quantized_type(src_qtype) and is_quantized_type(out_qtype) and src_qtype != out_qtype
            and not exact_repack(src_qtype, out_qtype))


def gguf_tensor_type(name: str, shape: tuple[int, ...], qtype: str, src_qtype: str | None = None,
                     args: ModelArgs | None = None) -> str:
    """The GGUF type for the internal (or GGUF) tensor ``name`` when the body is ``qtype``
    (``src_qtype``: the source tensor's type, when known). A K-quant mix (``Q4_K_M``...) needs
    the model's ``args`` (layer count, experts, heads, tied embeddings)."""
    if is_f32_tensor(name, len(shape)):
        return "F32"
    if is_mix(qtype):
        if args is None:
            raise ValueError(f"the {qtype} mix needs the model's args to choose {name}'s type")
        return mix_tensor_type(qtype, name, shape, MixModel.from_args(args))
    want = qtype
    if qtype in LEGACY:  # llama-quantize's upgrades for its Q4_0/Q4_1/Q8_0 file types
        model = MixModel.from_args(args) if args is not None else MixModel(0, 0, 0, 0, False)
        want = mix_tensor_type(qtype, name, shape, model)
    if want != qtype and src_qtype in LEGACY:
        want = src_qtype  # quantized already: more bits cannot bring back what it lost; copied
    elif want != qtype and src_qtype is not None and exact_repack(src_qtype, qtype):
        want = qtype  # an MLX 4-bit source: repacked exactly beats requantized to more bits
    if want.startswith("Q") and shape[-1] % 32:
        want = "F16"
    return want


def gguf_file_type(qtype: str) -> int:
    """``general.file_type`` (llama.cpp's ``LlamaFileType``) for a body of ``qtype``."""
    import gguf

    if is_mix(qtype):
        return mix_file_type(qtype)
    return int({
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype])


def mlx_quantizes(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Whether the MLX writer affine-quantizes the internal tensor ``name``."""
    return not is_f32_tensor(name, len(shape)) and shape[-1] % group_size == 0
