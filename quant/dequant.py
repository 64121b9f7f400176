"""Dequantize GGUF blocks to float32: our NumPy code for Q4_0/Q4_1/Q8_0, gguf.quants otherwise."""
from __future__ import annotations

import numpy as np

from mlxtral.quant import ggml


def dequantize_blocks(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF blocks (uint8 ``[..., nbytes_per_row]``) -> float32 of ``shape``."""
    if qtype in ("Q4_0", "Q4_1", "Q8_0", "F32", "F16", "BF16"):
        return ggml.dequantize(data, qtype, tuple(shape))
    import gguf  # only here: importing gguf pulls in ~30 MB of optional packages

    try:
        gtype = gguf.GGMLQuantizationType[qtype]
    except KeyError:
        raise ValueError(f"unknown GGUF type {qtype}") from None
    out = gguf.quants.dequantize(np.ascontiguousarray(data), gtype)
    return out.reshape(shape).astype(np.float32, copy=False)
