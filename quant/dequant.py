"""Dequantize GGUF blocks to float32."""
from __future__ import annotations

import gguf
import numpy as np


def dequantize_blocks(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF blocks (uint8 ``[..., nbytes_per_row]``) -> float32 of ``shape``."""
    out = gguf.quants.dequantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType[qtype])
    return out.reshape(shape).astype(np.float32, copy=False)
