"""MLX affine quantization (``mx.quantize(w, group_size, bits)``, mode ``affine``) in NumPy.

Per group of ``group_size`` weights along the last axis, in float32 exactly as MLX's CPU kernel:

    scale = max((max - min) / (2**bits - 1), 1e-7), negated unless |min| > |max|
    edge  = min if |min| > |max| else max;  q0 = rint(edge / scale)
    if q0 != 0: scale = edge / q0; bias = edge      else: bias = 0
    q = clip(rint((w - bias) / scale), 0, 2**bits - 1)

so ``w ~ q * scale + bias``. ``q`` is packed little-endian into uint32 (element ``k`` of a word at
bit ``k * bits``); scales and biases are stored in the weights' dtype (bfloat16 / float16 /
float32). Results are identical to ``mx.quantize`` (tests check it).
"""
from __future__ import annotations

import numpy as np

from mlxtral.quant.ggml import CHUNK_ELEMS, bf16_bits_to_f32, f32_to_bf16_bits

GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)
SCALE_DTYPES = ("bfloat16", "float16", "float32")
_F32 = np.float32


def _check(shape: tuple[int, ...], bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"MLX affine bits must be one of {BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"MLX group size must be one of {GROUP_SIZES}, got {group_size}")
    if not shape or shape[-1] % group_size:
        raise ValueError(f"last dimension of {shape} is not a multiple of the group size {group_size}")


def store_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the storage of ``dtype`` (bfloat16 as uint16 bits)."""
    if dtype == "bfloat16":
        return f32_to_bf16_bits(x)
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "float32":
        return x.astype(_F32, copy=False)
    raise ValueError(f"unsupported scale dtype {dtype!r}; use one of {SCALE_DTYPES}")


def load_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Storage of ``dtype`` -> float32."""
    if dtype == "bfloat16":
        return bf16_bits_to_f32(x)
    return np.asarray(x).astype(_F32)


def affine_shapes(shape: tuple[int, ...], bits: int, group_size: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(packed weight shape, scales/biases shape) for a logical ``[..., n]`` weight."""
    _check(shape, bits, group_size)
    return tuple(shape[:-1]) + (shape[-1] * bits // 32,), tuple(shape[:-1]) + (shape[-1] // group_size,)


def _groups(g: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 groups ``[n, G]`` -> (q uint32 ``[n, G]``, scale f32 ``[n, 1]``, bias f32 ``[n, 1]``)."""
    n_bins = _F32((1 << bits) - 1)
    w_max = g.max(axis=1, keepdims=True)
    w_min = g.min(axis=1, keepdims=True)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, _F32(1e-7))
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scale)
    nz = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(nz, edge / q0, scale)
    bias = np.where(nz, edge, _F32(0))
    x = g - bias
    x /= scale
    np.rint(x, out=x)
    np.clip(x, 0, n_bins, out=x)
    return x.astype(np.uint32), scale, bias


def affine_quantize(w: np.ndarray, bits: int = 4, group_size: int = 64, dtype: str = "bfloat16"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float weights ``[..., n]`` -> (uint32 ``[..., n*bits/32]``, scales, biases ``[..., n/G]``).

    ``w`` is read in float32 (exact for bf16/f16 sources); scales and biases come back in the
    storage of ``dtype`` (uint16 bits for bfloat16), as ``mx.quantize`` returns them for a
    weight of that dtype. Works in row chunks, so memory is the outputs plus a few MB.
    """
    w = np.asarray(w)
    shape = tuple(w.shape)
    wshape, sshape = affine_shapes(shape, bits, group_size)
    per_word = 32 // bits
    rows = w.reshape(-1, shape[-1])
    wq = np.empty(wshape, dtype=np.uint32)
    sdt = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    scales = np.empty(sshape, dtype=sdt)
    biases = np.empty(sshape, dtype=sdt)
    n_rows = rows.shape[0]
    wq_r, s_r, b_r = wq.reshape(n_rows, -1), scales.reshape(n_rows, -1), biases.reshape(n_rows, -1)
    step = max(1, CHUNK_ELEMS // shape[-1])
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))[None, :]
    for s in range(0, rows.shape[0], step):
        chunk = rows[s : s + step].astype(_F32, copy=False)
        n = chunk.shape[0]
        q, sc, bi = _groups(chunk.reshape(-1, group_size), bits)
        words = np.bitwise_or.reduce(q.reshape(-1, per_word) << shifts, axis=1)
        wq_r[s : s + n] = words.reshape(n, -1)
        s_r[s : s + n] = store_dtype(sc, dtype).reshape(n, -1)
        b_r[s : s + n] = store_dtype(bi, dtype).reshape(n, -1)
    return wq, scales, biases


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes uint8 ``[..., n]`` (each < 2**bits) -> MLX's uint32 words ``[..., n*bits/32]``: a
    little-endian bit stream, element ``k`` at bits ``k*bits`` (for 2, 4 and 8 bits that is
    element ``k`` of a word at ``(k % per_word) * bits``)."""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    n = q.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    lead = q.shape[:-1]
    if bits == 8:
        return q.view(np.uint32)
    if bits == 4:
        return (q[..., 0::2] | (q[..., 1::2] << np.uint8(4))).view(np.uint32)
    # 2, 3, 5, 6 bits: every 8 codes fill ``bits`` bytes; build them in a uint64, keep its low bytes
    eight = q.reshape(-1, 8).astype(np.uint64) << (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    packed = np.bitwise_or.reduce(eight, axis=1).view(np.uint8).reshape(-1, 8)[:, :bits]
    return np.ascontiguousarray(packed).reshape(*lead, n * bits // 8).view(np.uint32)


def unpack_codes(w: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint32 words ``[..., m]`` -> codes uint8 ``[..., m*32/bits]``."""
    w = np.ascontiguousarray(w, dtype=np.uint32)
    if 32 % bits == 0:
        per = 32 // bits
        shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
        q = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # [..., words, per]
        return q.astype(np.uint8).reshape(*w.shape[:-1], w.shape[-1] * per)
    # 3, 5, 6 bits: every ``bits`` bytes hold 8 codes; widen them to a uint64 and shift
    lead, nbytes = w.shape[:-1], w.shape[-1] * 4
    wide = np.zeros((w.size * 4 // bits, 8), np.uint8)
    wide[:, :bits] = w.view(np.uint8).reshape(-1, bits)
    v = wide.view(np.uint64)  # [groups, 1]
    q = (v >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64((1 << bits) - 1)
    return q.astype(np.uint8).reshape(*lead, nbytes * 8 // bits)


def affine_dequantize(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int = 4,
                      group_size: int = 64, dtype: str = "bfloat16", out_dtype: type = _F32) -> np.ndarray:
    """Inverse of :func:`affine_quantize`, any of MLX's bit widths (2, 3, 4, 5, 6, 8): ``[..., n]``
    with ``w = q * scale + bias`` computed in float32 and stored as ``out_dtype``. ``dtype`` names
    the storage of ``scales``/``biases`` (bfloat16 = uint16 bits). Works in row chunks."""
    wq = np.asarray(wq, dtype=np.uint32)
    n = wq.shape[-1] * 32 // bits
    out = np.empty(tuple(wq.shape[:-1]) + (n,), dtype=out_dtype)
    rows_q = wq.reshape(-1, wq.shape[-1])
    rows_s = np.asarray(scales).reshape(rows_q.shape[0], -1)
    rows_b = np.asarray(biases).reshape(rows_q.shape[0], -1)
    rows_o = out.reshape(rows_q.shape[0], n)
    step = max(1, CHUNK_ELEMS // n)
    for s in range(0, rows_q.shape[0], step):
        q = unpack_codes(rows_q[s : s + step], bits).astype(_F32)
        k = q.shape[0]
        sc = load_dtype(rows_s[s : s + step], dtype)[:, :, None]
        bi = load_dtype(rows_b[s : s + step], dtype)[:, :, None]
        rows_o[s : s + k] = (q.reshape(k, -1, group_size) * sc + bi).reshape(k, n)
    return out
