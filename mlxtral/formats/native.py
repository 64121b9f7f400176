"""Checkpoint tensors -> the types the NumPy kernels compute on (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, IQ4_NL, IQ4_XS and the K-quants Q2_K .. Q6_K: :data:`mlxtral.qtensor.NATIVE_TYPES`).

Loaders hand out tensors as the file stores them; the NumPy backend and the converters call
:func:`to_native` per tensor, when they need it (the MLX backend reads the stored forms directly):

- native types, every GGUF block type the loader accepts except Q8_K, stay as they are (views of
  the file, no copy: :func:`native_form` reports their own bytes);
- the one other block type :data:`~mlxtral.qtensor.BLOCK_TYPES` admits (Q8_K, an activation type
  no model file uses) -> ``Q8_0``, requantized from float32, where it dequantizes; vectors -> F32
  (``q4_k_to_q4_1`` remains for a Q4_K tensor should Q4_K ever leave the native types);
- MLX affine 2, 3 and 4 bits, groups a multiple of 32 -> ``Q4_1``, exactly: codes fit in a nibble,
  and each group becomes ``group_size / 32`` blocks sharing its scale and bias (rounded to float16:
  exact for float16 files; bfloat16 values convert exactly unless below float16's normal range);
- MLX affine 5, 6 and 8 bits -> F16.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxtral.display import plain
from mlxtral.errors import FormatError
from mlxtral.qtensor import NATIVE_TYPES, AffineTensor, QTensor, Tensor


def native_form(t: Tensor) -> tuple[str, int]:
    """(type, bytes) that :func:`to_native` turns ``t`` into, without converting anything."""
    n = int(np.prod(t.shape, dtype=np.int64))
    if isinstance(t, QTensor) and t.qtype in NATIVE_TYPES:
        return t.qtype, t.nbytes
    if isinstance(t, AffineTensor) and t.bits <= 4 and t.group_size % 32 == 0:
        return "Q4_1", n // 32 * 20
    if len(t.shape) == 1:
        return "F32", 4 * n
    if isinstance(t, QTensor):  # a GGUF block type without a kernel
        return ("Q4_1", n // 32 * 20) if t.qtype == "Q4_K" else ("Q8_0", n // 32 * 34)
    return "F16", 2 * n


def to_native(t: Tensor, name: str, path: Path | str | None = None) -> QTensor:
    """``t`` as a QTensor of a native type (itself, zero-copy, if it already is one)."""
    if isinstance(t, QTensor) and t.qtype in NATIVE_TYPES:
        return t
    kind, _ = native_form(t)
    if isinstance(t, AffineTensor):
        if kind == "Q4_1":
            from mlxtral.quant.gguf_affine import affine_to_q4_1

            return QTensor("Q4_1", t.shape, affine_to_q4_1(t.data, t.scales, t.biases, t.group_size,
                                                             t.scale_dtype, t.bits))
        return QTensor(kind, t.shape, t.dequantize(np.float32 if kind == "F32" else np.float16))
    from mlxtral.quant import gguf_affine

    try:
        if kind == "Q4_1":
            blocks = gguf_affine.q4_k_to_q4_1(t.data, t.shape)
            if blocks is not None:
                return QTensor("Q4_1", t.shape, blocks)
            kind = "Q8_0"  # a scale beyond float16's range: keep 8 bits instead
        if kind == "Q8_0":
            return QTensor("Q8_0", t.shape, gguf_affine.to_q8_0(t.data, t.qtype, t.shape))
        return QTensor(kind, t.shape, t.dequantize())  # a vector: F32
    except (NotImplementedError, ValueError) as e:
        raise FormatError(f"tensor {plain(name)}: cannot dequantize type {t.qtype} "
                          f"({plain(str(e))})", path) from None


def native_tensors(tensors: dict[str, Tensor], path: Path | str | None = None) -> dict[str, QTensor]:
    return {n: to_native(t, n, path) for n, t in tensors.items()}
