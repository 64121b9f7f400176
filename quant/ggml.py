"""GGUF (ggml) block quantizers and dequantizers in vectorized NumPy.

Bytes are identical to ``gguf.quants.quantize`` (the tests check it over random and adversarial
data): the same float32 operations in the same order, with cheaper reductions (max/min instead of
``argmax(abs)`` + gather, ties resolved exactly like ``argmax``) and work done in row chunks
of about :data:`CHUNK_ELEMS` weights so temporaries stay small whatever the tensor size.

Block layouts (32 weights a block, along the last axis):

- ``Q8_0``: f16 ``d`` + 32 x int8 ``q``; ``w = q * d``; ``d = max|w| / 127``, ``q`` rounded half away
  from zero.
- ``Q4_0``: f16 ``d`` + 16 bytes; ``w = (q - 8) * d``; ``d = w[argmax|w|] / -8``; low nibbles hold
  elements 0-15, high nibbles 16-31.
- ``Q4_1``: f16 ``d``, f16 ``m`` + 16 bytes; ``w = q * d + m``; ``d = (max - min) / 15``, ``m = min``.

K-quants (``Q2_K`` ... ``Q6_K``, 256-weight super-blocks, llama.cpp's reference quantizers) are in
:mod:`mlxtral.quant.kquants` (numba); :func:`quantize` dispatches to them.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mlxtral.qtensor import BLOCK_TYPES

QK = 32
CHUNK_ELEMS = 1 << 16  # weights per working chunk (256 KB of float32: temporaries stay in cache)
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # 256-weight super-blocks: mlxtral.quant.kquants
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1") + KQUANTS
# block types quantized and dequantized by gguf.quants itself (byte-identical to llama.cpp's reference
# rows): llama.cpp's fallbacks for K-quant mixes whose rows are not a multiple of 256
GGUF_PY_TYPES = ("Q5_0", "Q5_1")
_F32 = np.float32


def _as_rows(x: np.ndarray) -> np.ndarray:
    """Any float array -> 2-D ``[rows, n]`` view (or copy for non-contiguous input)."""
    x = np.asarray(x)
    if x.ndim == 0:
        x = x.reshape(1)
    return x.reshape(-1, x.shape[-1])


def _row_chunks(n_rows: int, row_len: int) -> tuple[range, int]:
    """Row starts and rows per chunk so that a chunk holds about CHUNK_ELEMS weights."""
    step = max(1, CHUNK_ELEMS // max(row_len, 1))
    return range(0, n_rows, step), step


# ---- per-block kernels (blocks: float32 [n, 32]) -----------------------------------------

def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """``blocks[i, argmax(|blocks[i]|)]`` as float32 ``[n, 1]``, bit-for-bit as argmax picks it."""
    amax = blocks.max(axis=1, keepdims=True)
    amin = blocks.min(axis=1, keepdims=True)
    out = np.where(-amin > amax, amin, amax)
    # |amin| == |amax| (both signs, or zeros of either sign): argmax takes the first occurrence.
    tie = (-amin == amax)[:, 0]
    if tie.any():
        sub = blocks[tie]
        idx = np.abs(sub).argmax(axis=1)[:, None]
        out[tie] = np.take_along_axis(sub, idx, axis=1)
    return out


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d == 0, _F32(0), _F32(1) / d)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 ``[n, 32]`` values 0-15 -> ``[n, 16]``: low nibble element j, high nibble j + 16."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _q8_0_blocks(blocks: np.ndarray, out: np.ndarray) -> None:
    amax = blocks.max(axis=1, keepdims=True)
    amin = blocks.min(axis=1, keepdims=True)
    d = np.abs(np.maximum(amax, -amin)) / _F32(127)  # [n, 1]
    x = blocks * _inverse(d)  # [n, 32]
    q = np.rint(x)
    # round half away from zero (ggml's roundf), not half to even: fix the exact ties
    tie = np.abs(x - q) == _F32(0.5)
    if tie.any():
        q[tie] = x[tie] + np.copysign(_F32(0.5), x[tie])
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)


def _q4_0_blocks(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _signed_absmax(blocks) / _F32(-8)  # [n, 1]
    x = blocks * _inverse(d)
    x += _F32(8.5)
    np.trunc(x, out=x)
    with np.errstate(invalid="ignore"):
        q = np.minimum(x.astype(np.uint8), np.uint8(15))
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = _pack_nibbles(q)


def _q4_1_blocks(blocks: np.ndarray, out: np.ndarray) -> None:
    vmax = blocks.max(axis=1, keepdims=True)
    vmin = blocks.min(axis=1, keepdims=True)
    d = (vmax - vmin) / _F32(15)
    x = blocks - vmin
    x *= _inverse(d)
    x += _F32(0.5)
    np.trunc(x, out=x)
    with np.errstate(invalid="ignore"):
        q = np.minimum(x.astype(np.uint8), np.uint8(15))
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:4] = vmin.astype(np.float16).view(np.uint8)
    out[:, 4:] = _pack_nibbles(q)


_BLOCK_QUANTIZERS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "Q8_0": _q8_0_blocks,
    "Q4_0": _q4_0_blocks,
    "Q4_1": _q4_1_blocks,
}


def _q_dequant_blocks(qtype: str, b: np.ndarray) -> np.ndarray:
    """uint8 blocks ``[n, type_size]`` -> float32 ``[n, 32]``."""
    d = b[:, :2].copy().view(np.float16).astype(_F32)  # [n, 1]
    if qtype == "Q8_0":
        return b[:, 2:].view(np.int8).astype(_F32) * d
    qs = b[:, 4:] if qtype == "Q4_1" else b[:, 2:]
    q = np.empty((b.shape[0], QK), dtype=np.uint8)
    np.bitwise_and(qs, np.uint8(0x0F), out=q[:, :16])
    np.right_shift(qs, np.uint8(4), out=q[:, 16:])
    if qtype == "Q4_0":
        return d * (q.view(np.int8) - np.int8(8)).astype(_F32)
    m = b[:, 2:4].copy().view(np.float16).astype(_F32)
    return d * q.astype(_F32) + m


# ---- float types --------------------------------------------------------------------------

def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even, NaN kept quiet (as ggml)."""
    u = np.ascontiguousarray(x, dtype=_F32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    if nan.any():
        r[nan] = (u[nan] >> np.uint32(16)) | np.uint32(64)
    return r.astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(_F32)


# ---- public API ---------------------------------------------------------------------------

def quantized_shape(shape: tuple[int, ...], qtype: str) -> tuple[int, ...]:
    """Shape of the stored data for a logical ``shape`` (see :mod:`mlxtral.qtensor`)."""
    if qtype in BLOCK_TYPES:
        bs, ts = BLOCK_TYPES[qtype]
        if shape[-1] % bs:
            raise ValueError(f"{qtype} needs rows that are a multiple of {bs}, got shape {shape}")
        return tuple(shape[:-1]) + (shape[-1] // bs * ts,)
    return tuple(shape)


def quantize(x: np.ndarray, qtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Float array (any float dtype) -> stored data of ``qtype`` (QTensor layout), chunked.

    ``F32``/``F16`` -> float arrays, ``BF16`` -> uint16 bits, block types -> uint8 blocks.
    ``out`` (optional) receives the result (e.g. a memory map), so nothing of the tensor's size
    is allocated besides it.
    """
    if qtype not in QUANTIZABLE:
        raise ValueError(f"cannot quantize to {qtype}; supported: {', '.join(QUANTIZABLE)}")
    x = np.asarray(x)
    shape = tuple(x.shape)
    oshape = quantized_shape(shape, qtype)
    odtype = {"F32": _F32, "F16": np.float16, "BF16": np.uint16}.get(qtype, np.uint8)
    if out is None:
        out = np.empty(oshape, dtype=odtype)
    elif out.shape != oshape or out.dtype != odtype:
        raise ValueError(f"out must be {np.dtype(odtype)} {oshape}, got {out.dtype} {out.shape}")
    if x.size == 0:
        return out
    if not out.flags.c_contiguous:  # a strided view: reshaping it into blocks would copy and lose writes
        out[...] = quantize(x, qtype)
        return out
    rows = _as_rows(x)
    orows = out.reshape(rows.shape[0], -1)
    starts, step = _row_chunks(rows.shape[0], rows.shape[1])
    for s in starts:
        chunk = rows[s : s + step].astype(_F32, copy=False)
        o = orows[s : s + step]
        if qtype == "F32":
            o[...] = chunk
        elif qtype == "F16":
            with np.errstate(over="ignore"):
                o[...] = chunk.astype(np.float16)
        elif qtype == "BF16":
            o[...] = f32_to_bf16_bits(chunk)
        elif qtype in GGUF_PY_TYPES:
            o[...] = _gguf_py(qtype, chunk)
        elif qtype in KQUANTS:
            from mlxtral.quant.kquants import QK_K, quantize_blocks  # numba: imported on first use

            _, ts = BLOCK_TYPES[qtype]
            quantize_blocks(chunk.reshape(-1, QK_K), qtype, o.reshape(-1, ts))
        else:
            _, ts = BLOCK_TYPES[qtype]
            _BLOCK_QUANTIZERS[qtype](chunk.reshape(-1, QK), o.reshape(-1, ts))
    return out


def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...] | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """Stored data of ``qtype`` -> float32 (``shape`` defaults to the logical shape), chunked."""
    data = np.asarray(data)
    if qtype in BLOCK_TYPES:
        bs, ts = BLOCK_TYPES[qtype]
        lshape = tuple(data.shape[:-1]) + (data.shape[-1] // ts * bs,)
    else:
        lshape = tuple(data.shape)
    shape = tuple(shape) if shape is not None else lshape
    if out is None:
        out = np.empty(shape, dtype=_F32)
    if qtype == "F32":
        out[...] = np.asarray(data, dtype=_F32).reshape(shape)
        return out
    if qtype == "F16":
        out[...] = data.reshape(shape)
        return out
    if qtype == "BF16":
        out[...] = bf16_bits_to_f32(data).reshape(shape)
        return out
    if qtype not in _BLOCK_QUANTIZERS:  # Q5_0/Q5_1, K-quants, IQ4: mlxtral.quant.dequant, chunked
        from mlxtral.quant.dequant import dequantize_blocks

        out[...] = dequantize_blocks(data, qtype, shape)
        return out
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, ts)
    flat = out.reshape(-1, bs)
    step = max(1, CHUNK_ELEMS // bs)
    for s in range(0, blocks.shape[0], step):
        flat[s : s + step] = _q_dequant_blocks(qtype, blocks[s : s + step])
    return out


def _gguf_py(qtype: str, rows: np.ndarray) -> np.ndarray:
    """gguf.quants' quantizer on 2-D rows: float32 ``[r, n]`` -> blocks ``[r, n/32*ts]``."""
    import gguf  # only here: importing gguf pulls in ~30 MB of optional packages

    return gguf.quants.quantize(rows, gguf.GGMLQuantizationType[qtype])


def relative_rmse(ref: np.ndarray, approx: np.ndarray) -> float:
    """``||approx - ref|| / ||ref||`` over the whole tensor (0 when both are zero), chunked."""
    num, den = squared_error_terms(ref, approx)
    return rmse_from_terms(num, den)


def rmse_from_terms(num: float, den: float) -> float:
    """Relative RMSE from accumulated ``(sum (approx-ref)^2, sum ref^2)``."""
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def squared_error_terms(ref: np.ndarray, approx: np.ndarray) -> tuple[float, float]:
    """``(sum (approx-ref)^2, sum ref^2)`` in float64, chunked; add them up over pieces."""
    a = _as_rows(ref)
    b = _as_rows(approx)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {approx.shape}")
    num = 0.0
    den = 0.0
    starts, step = _row_chunks(a.shape[0], a.shape[1])
    for s in starts:
        x = a[s : s + step].astype(np.float64)
        y = b[s : s + step].astype(np.float64)
        num += float(np.square(y - x).sum())
        den += float(np.square(x).sum())
    return num, den
