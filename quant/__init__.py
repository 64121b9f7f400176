"""Quantizers and dequantizers for GGUF block types and MLX affine quantization."""
from __future__ import annotations


from mlxtral.quant.dequant import dequantize_blocks

__all__ = ["dequantize_blocks"]
