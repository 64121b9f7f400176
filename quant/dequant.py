"""Dequantize GGUF blocks to float32: our NumPy code for Q4_0/Q4_1/Q8_0, gguf.quants otherwise."""
from __future__ import annotations

import numpy as np

from mlxtral.quant import ggml

_CHUNK_WEIGHTS = 1 << 20


def dequantize_blocks(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF blocks (uint8 ``[..., nbytes_per_row]``) -> float32 of ``shape``."""
    if qtype in ("Q4_0", "Q4_1", "Q8_0", "F32", "F16", "BF16"):
        return ggml.dequantize(data, qtype, tuple(shape))
    import gguf  # only here: importing gguf pulls in ~30 MB of optional packages

    try:
        gtype = gguf.GGMLQuantizationType[qtype]
    except KeyError:
        raise ValueError(f"unknown GGUF type {qtype}") from None
    bs, ts = gguf.GGML_QUANT_SIZES[gtype]
    blocks = np.asarray(data).reshape(-1, ts)
    out = np.empty(blocks.shape[0] * bs, np.float32)
    # gguf.quants works row by row: hand it ~1M weights as one row at a time (fewer, larger calls;
    # bounded temporaries), not the tensor's own short rows
    step = max(1, _CHUNK_WEIGHTS // bs)
    for s in range(0, blocks.shape[0], step):
        part = np.ascontiguousarray(blocks[s : s + step]).reshape(1, -1)
        out[s * bs : s * bs + part.size // ts * bs] = gguf.quants.dequantize(part, gtype).reshape(-1)
    return out.reshape(shape)
