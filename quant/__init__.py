"""Quantizers and dequantizers for GGUF block types and MLX affine quantization.

- :mod:`mlxtral.quant.ggml`: GGUF ``Q8_0``/``Q4_0``/``Q4_1``/``F16``/``BF16`` in vectorized NumPy,
  byte-identical to ``gguf.quants.quantize``.
- :mod:`mlxtral.quant.affine`: MLX affine 4/8-bit quantization, identical to ``mx.quantize``.
- :func:`dequantize_blocks`: any GGUF type to float32 (:mod:`mlxtral.quant.dequant`: NumPy for
  the 5-bit, K-quant and IQ4 types, equal to ``gguf.quants`` bit for bit; ``gguf.quants`` for the rest).
"""
from __future__ import annotations

from mlxtral.quant.affine import affine_dequantize, affine_quantize, affine_shapes
from mlxtral.quant.dequant import dequantize_blocks
from mlxtral.quant.ggml import dequantize, quantize, quantized_shape, relative_rmse

__all__ = [
    "affine_dequantize",
    "affine_quantize",
    "affine_shapes",
    "dequantize",
    "dequantize_blocks",
    "quantize",
    "quantized_shape",
    "relative_rmse",
]
