"""Dequantize GGUF blocks to float32, in NumPy, chunked.

Q4_0 / Q4_1 / Q8_0 and the float types are :mod:`mlxtral.quant.ggml`'s. The 5-bit types, the
K-quants and the IQ4 types are here, as llama.cpp's reference ``dequantize_row_*`` computes them
(the same float32 products in the same order: ``(d * sc) * q - (dmin * m)`` for the K-quants with a
minimum, ``(d * sc) * q`` without), so the values equal ``gguf.quants.dequantize`` bit for bit (the
tests check it). Anything else (the IQ1/IQ2/IQ3 and ternary types) goes to ``gguf.quants``, which
is imported only then: importing ``gguf`` pulls in mistral-common and pydantic, ~45 MB of a
process's peak RSS that a K-quant model's embedding lookup does not need.

Layouts (``QK_K`` = 256 weights a super-block, 16 or 8 sub-blocks):

- ``Q5_0``: f16 ``d``, u32 ``qh`` (bit 4 of each code), 16 bytes of nibbles; ``w = d * (q - 16)``.
- ``Q5_1``: f16 ``d``, f16 ``m``, ``qh``, nibbles; ``w = d * q + m``.
- ``Q2_K``: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit codes, f16 ``d``,
  f16 ``dmin``.
- ``Q3_K``: 32 bytes ``hmask`` (bit 2 of each code, set means no -4), 64 bytes of 2-bit codes,
  12 bytes of 6-bit scales (offset 32), f16 ``d``.
- ``Q4_K`` / ``Q5_K``: f16 ``d``, f16 ``dmin``, 12 bytes of 6-bit scales and mins (8 each), then for
  Q5_K 32 bytes ``qh``, then the nibbles.
- ``Q6_K``: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 ``d``; ``q - 32``.
- ``IQ4_NL``: f16 ``d``, 16 bytes of nibbles indexing :data:`IQ4_VALUES`.
- ``IQ4_XS``: f16 ``d``, u16 high scale bits, 4 bytes low scale nibbles, 128 bytes of nibbles.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mlxtral.qtensor import BLOCK_TYPES
from mlxtral.quant import ggml

QK_K = 256
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)
_CHUNK_WEIGHTS = 1 << 18  # weights a working chunk (1 MB of float32 out; temporaries a few times that)
_F32 = np.float32
_U8 = np.uint8


# Block-field decoders also used by mlxtral.quant.gguf_affine: f16_column, nibbles, bits_le, k4_scale_min.
def f16_column(b: np.ndarray) -> np.ndarray:
    """Two bytes a row (uint8 [n, 2]) -> float32 [n, 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(_F32)


def _bits(b: np.ndarray, shifts: list[int], mask: int) -> np.ndarray:
    """bytes [n, m] -> [n, len(shifts), m]: ``(b >> s) & mask`` for each shift."""
    return (b[:, None, :] >> np.array(shifts, _U8)[None, :, None]) & _U8(mask)


def nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """Nibble bytes [n, m] in runs of ``run`` bytes: each run's low nibbles, then its high ones
    -> uint8 [n, 2 * m]."""
    n = qs.shape[0]
    return _bits(qs.reshape(n * (qs.shape[1] // run), run), [0, 4], 0x0F).reshape(n, -1)


def bits_le(word_bytes: np.ndarray, n: int) -> np.ndarray:
    """Little-endian bit ``k`` of ``word_bytes`` [b, nbytes] for k < n -> uint8 [b, n] (Q5_0/Q5_1's
    ``qh``: a u32's 32 bits)."""
    return np.unpackbits(word_bytes, axis=-1, bitorder="little")[:, :n]


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = nibbles(b[:, 6:], 16) | (bits_le(b[:, 2:6], 32) << _U8(4))  # [n, 32] 0..31
    return f16_column(b[:, 0:2]) * (q.astype(np.int8) - np.int8(16)).astype(_F32)


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = nibbles(b[:, 8:], 16) | (bits_le(b[:, 4:8], 32) << _U8(4))  # [n, 32]
    return f16_column(b[:, 0:2]) * q.astype(_F32) + f16_column(b[:, 2:4])


def k4_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 packed bytes [n, 12] -> 6-bit scales and mins, uint8 [n, 8] each."""
    lo, mn, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & _U8(0x3F), (hi & _U8(0x0F)) | ((lo >> _U8(2)) & _U8(0x30))], axis=1)
    m = np.concatenate([mn & _U8(0x3F), (hi >> _U8(4)) | ((mn >> _U8(2)) & _U8(0x30))], axis=1)
    return sc, m


def _minus_min(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``(d * sc) * q - dmin * m`` per sub-block: sc, m [n, S]; q [n, S, 256 / S] -> [n, 256]."""
    n = q.shape[0]
    dl = (d * sc.astype(_F32))[:, :, None]
    ml = (dmin * m.astype(_F32))[:, :, None]
    return (dl * q.astype(_F32) - ml).reshape(n, QK_K)


def _q2_k(b: np.ndarray) -> np.ndarray:
    n, s = b.shape[0], b[:, 0:16]
    q = _bits(b[:, 16:80].reshape(2 * n, 32), [0, 2, 4, 6], 0x03)  # [2n, 4, 32]: 8 runs of 32
    d, dmin = f16_column(b[:, 80:82]), f16_column(b[:, 82:84])
    return _minus_min(d, dmin, s & _U8(0x0F), s >> _U8(4), q.reshape(n, 16, 16))


def _q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    s = b[:, 96:108]
    lo = _bits(s[:, 0:8], [0, 4], 0x0F).reshape(n, 16)
    hi = _bits(s[:, 8:12], [0, 2, 4, 6], 0x03).reshape(n, 16)
    sc = ((lo | (hi << _U8(4))).astype(np.int8) - np.int8(32)).astype(_F32)  # [n, 16]
    low = _bits(b[:, 32:96].reshape(2 * n, 32), [0, 2, 4, 6], 0x03).reshape(n, 16, 16)
    high = _bits(b[:, 0:32], list(range(8)), 0x01).reshape(n, 16, 16) ^ _U8(1)  # set: no -4
    q = (low.astype(np.int8) - (high << _U8(2)).astype(np.int8)).astype(_F32)
    return ((f16_column(b[:, 108:110]) * sc)[:, :, None] * q).reshape(n, QK_K)


def _q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc, m = k4_scale_min(b[:, 4:16])
    q = nibbles(b[:, 16:144], 32).reshape(n, 8, 32)
    return _minus_min(f16_column(b[:, 0:2]), f16_column(b[:, 2:4]), sc, m, q)


def _q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc, m = k4_scale_min(b[:, 4:16])
    low = nibbles(b[:, 48:176], 32).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], list(range(8)), 0x01)  # [n, 8, 32]: bit j of byte l is code 32 j + l's
    return _minus_min(f16_column(b[:, 0:2]), f16_column(b[:, 2:4]), sc, m, low | (high << _U8(4)))


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    low = nibbles(b[:, 0:128], 64).reshape(n, 8, 32)
    high = _bits(b[:, 128:192].reshape(2 * n, 32), [0, 2, 4, 6], 0x03).reshape(n, 8, 32)
    q = ((low | (high << _U8(4))).astype(np.int8) - np.int8(32)).astype(_F32).reshape(n, 16, 16)
    dl = f16_column(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(_F32)  # [n, 16]
    return (dl[:, :, None] * q).reshape(n, QK_K)


def _iq4_nl(b: np.ndarray) -> np.ndarray:
    return f16_column(b[:, 0:2]) * IQ4_VALUES[nibbles(b[:, 2:18], 16)].astype(_F32)


def _iq4_xs(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    hi = np.ascontiguousarray(b[:, 2:4]).view(np.uint16)  # [n, 1]
    hi = ((hi >> np.arange(0, 16, 2, dtype=np.uint16)[None, :]) & np.uint16(3)).astype(_U8)  # [n, 8]
    lo = _bits(b[:, 4:8], [0, 4], 0x0F).transpose(0, 2, 1).reshape(n, 8)  # byte j: sub-blocks 2j, 2j+1
    sc = ((lo | (hi << _U8(4))).astype(np.int8) - np.int8(32)).astype(_F32)
    v = IQ4_VALUES[nibbles(b[:, 8:136], 16)].astype(_F32).reshape(n, 8, 32)
    return ((f16_column(b[:, 0:2]) * sc)[:, :, None] * v).reshape(n, QK_K)


_NATIVE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k,
    "Q6_K": _q6_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
}


def dequantize_blocks(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF blocks (uint8 ``[..., nbytes_per_row]``) -> float32 of ``shape``."""
    if qtype in ("Q4_0", "Q4_1", "Q8_0", "F32", "F16", "BF16"):
        return ggml.dequantize(data, qtype, tuple(shape))
    if qtype in _NATIVE:
        bs, ts = BLOCK_TYPES[qtype]
        blocks = np.asarray(data).reshape(-1, ts)
        out = np.empty((blocks.shape[0], bs), _F32)
        step = max(1, _CHUNK_WEIGHTS // bs)
        for s in range(0, blocks.shape[0], step):
            out[s : s + step] = _NATIVE[qtype](np.ascontiguousarray(blocks[s : s + step]).view(_U8))
        return out.reshape(shape)
    return _gguf_dequantize(data, qtype, shape)


def _gguf_dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The rarer types through ``gguf.quants`` (imported only here)."""
    import gguf

    try:
        gtype = gguf.GGMLQuantizationType[qtype]
    except KeyError:
        raise ValueError(f"unknown GGUF type {qtype}") from None
    bs, ts = gguf.GGML_QUANT_SIZES[gtype]
    blocks = np.asarray(data).reshape(-1, ts)
    out = np.empty(blocks.shape[0] * bs, np.float32)
    # gguf.quants works row by row: hand it ~1M weights as one row at a time (fewer, larger calls;
    # bounded temporaries), not the tensor's own short rows
    step = max(1, _CHUNK_WEIGHTS * 4 // bs)
    for s in range(0, blocks.shape[0], step):
        part = np.ascontiguousarray(blocks[s : s + step]).reshape(1, -1)
        out[s * bs : s * bs + part.size // ts * bs] = gguf.quants.dequantize(part, gtype).reshape(-1)
    return out.reshape(shape)
