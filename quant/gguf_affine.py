"""GGUF blocks <-> MLX affine quantization (``w = q * scale + bias`` per group of 32), in NumPy.

Most GGUF types are affine per 32 weights, so they become MLX groups of 32 with no loss:

=========  ====  =====================================================================
GGUF       bits  per 32 weights (``d``, ``dmin``, ``m`` are float16 in the file)
=========  ====  =====================================================================
Q4_0       4     scale ``d``, bias ``-8 d``
Q4_1       4     scale ``d``, bias ``m``
Q5_0       5     scale ``d``, bias ``-16 d``
Q5_1       5     scale ``d``, bias ``m``
Q8_0       8     scale ``d``, bias ``-128 d`` (signed ``q`` stored as ``q + 128``)
Q4_K       4     scale ``d * sc_j``, bias ``-dmin * m_j`` (6-bit ``sc_j``, ``m_j`` per sub-block)
Q5_K       5     as Q4_K with a fifth bit from ``qh``
IQ4_NL     8     scale ``d``, bias ``-128 d``, ``q = kvalues[nibble] + 128`` (a 16-entry int8 table)
IQ4_XS     8     scale ``d * (ls_j - 32)``, bias ``-128`` times it, codes as IQ4_NL
=========  ====  =====================================================================

Scales and biases are exact in float32 (``d`` has 11 significant bits, ``sc_j`` 6); in float16 and
bfloat16 the products ``d * sc_j`` may round.

``Q2_K``, ``Q3_K`` and ``Q6_K`` scale every 16 weights, and MLX's smallest group is 32: they are
requantized to 8 bits per group of 32 (:func:`~mlxtral.quant.affine.affine_quantize`), which adds
about a quarter of Q6_K's own rounding error (the tests measure it).

All conversions work in chunks of blocks, on up to 8 threads, so temporaries stay a few MB per
thread whatever the tensor size.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mlxtral.qtensor import BLOCK_TYPES, AffineTensor, Tensor
from mlxtral.quant.affine import affine_quantize, load_dtype, pack_codes, unpack_codes
from mlxtral.quant.dequant import IQ4_VALUES, bits_le, dequantize_blocks, f16_column, k4_scale_min, nibbles

GROUP = 32
# GGUF type -> (MLX bits, exact): the form the MLX backend keeps each type in
MLX_FORM: dict[str, tuple[int, bool]] = {
    "Q4_0": (4, True), "Q4_1": (4, True), "Q8_0": (8, True),
    "Q5_0": (5, True), "Q5_1": (5, True), "Q4_K": (4, True), "Q5_K": (5, True),
    "IQ4_NL": (8, True), "IQ4_XS": (8, True),
    "Q2_K": (8, False), "Q3_K": (8, False), "Q6_K": (8, False),
}
_CHUNK = 1 << 12  # blocks decoded at a time (up to 1 M weights)
_MAX_THREADS = 8
_F32 = np.float32


def _nibble_lut() -> np.ndarray:
    """GGUF byte pair (bytes 2i and 2i+1 of a 16-byte nibble run, as one little-endian uint16) ->
    the two MLX bytes they become (byte i: elements 2i, 2i+1 = low nibbles; byte 8+i: elements
    16+2i, 17+2i = high nibbles), as one uint16 (low byte first)."""
    v = np.arange(1 << 16, dtype=np.uint32)
    a, c = v & 0xFF, v >> 8
    lo = (a & 0x0F) | ((c & 0x0F) << 4)
    hi = (a >> 4) | (c & 0xF0)
    return (lo | (hi << 8)).astype(np.uint16)


_LUT4 = _nibble_lut()


def _repack_nibbles(qs: np.ndarray, words: np.ndarray) -> None:
    """16-byte GGUF nibble runs ``[n, 16]`` -> MLX 4-bit words ``[n, 4]``, without unpacking: one
    table lookup per byte pair (Q4_0/Q4_1 load several times faster this way)."""
    r = _LUT4[np.ascontiguousarray(qs).view(np.uint16)]  # [n, 8]
    out = words.view(np.uint8).reshape(-1, 2, 8)
    out[:, 0, :] = r & 0xFF
    out[:, 1, :] = r >> 8


_Q4_CODES = {"Q4_0": slice(2, 18), "Q4_1": slice(4, 20)}  # where each block's 16 nibble bytes sit


def _q4_scale_bias(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 (scale ``d``, bias ``-8 d``) or Q4_1 (scale ``d``, bias ``m``): float32 ``[n, 1]`` each."""
    d = f16_column(blocks[:, 0:2])
    return d, (d * _F32(-8) if qtype == "Q4_0" else f16_column(blocks[:, 2:4]))


def decode(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw blocks uint8 ``[n, type_size]`` of an exact type -> (codes uint8 ``[n, block_size]``,
    scales, biases float32 ``[n, block_size / 32]``)."""
    n = blocks.shape[0]
    if qtype in _Q4_CODES:
        return nibbles(blocks[:, _Q4_CODES[qtype]], 16), *_q4_scale_bias(blocks, qtype)
    if qtype == "Q8_0":
        d = f16_column(blocks[:, 0:2])
        return blocks[:, 2:34] ^ np.uint8(0x80), d, d * _F32(-128)
    if qtype in ("Q5_0", "Q5_1"):
        o = 2 if qtype == "Q5_0" else 4
        d = f16_column(blocks[:, 0:2])
        q = nibbles(blocks[:, o + 4 : o + 20], 16) | (bits_le(blocks[:, o : o + 4], 32) << np.uint8(4))
        return q, d, (d * _F32(-16) if qtype == "Q5_0" else f16_column(blocks[:, 2:4]))
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = f16_column(blocks[:, 0:2]), f16_column(blocks[:, 2:4])
        sc, mn = (v.astype(_F32) for v in k4_scale_min(blocks[:, 4:16]))
        if qtype == "Q4_K":
            q = nibbles(blocks[:, 16:144], 32)
        else:  # bit 4 of element k of sub-block j: bit j of qh byte k
            hi = np.unpackbits(blocks[:, 16:48, None], axis=-1, bitorder="little")  # [n, 32, 8]
            q = nibbles(blocks[:, 48:176], 32) | (hi.transpose(0, 2, 1).reshape(n, 256) << np.uint8(4))
        return q, d * sc, -(dmin * mn)
    if qtype == "IQ4_NL":
        d = f16_column(blocks[:, 0:2])
        return (IQ4_VALUES[nibbles(blocks[:, 2:18], 16)] + 128).astype(np.uint8), d, d * _F32(-128)
    if qtype == "IQ4_XS":
        d = f16_column(blocks[:, 0:2])
        sh = np.ascontiguousarray(blocks[:, 2:4]).view(np.uint16)  # [n, 1]
        sl = blocks[:, 4:8]
        low = (sl[:, :, None] >> np.array([0, 4], np.uint8)) & np.uint8(0x0F)  # [n, 4, 2]
        high = (sh >> (2 * np.arange(8, dtype=np.uint16))) & np.uint16(3)  # [n, 8]
        ls = low.reshape(n, 8).astype(_F32) + high.astype(_F32) * 16 - 32
        scale = d * ls
        q = nibbles(blocks[:, 8:136], 16)
        return (IQ4_VALUES[q] + 128).astype(np.uint8), scale, scale * _F32(-128)
    raise ValueError(f"{qtype} has no exact MLX affine form")


def _for_each(fn: Callable[[int], None], starts: range) -> None:
    """``fn(s)`` for every chunk start, on worker threads when there are several chunks (NumPy
    releases the GIL; chunks write disjoint slices). On an error or Ctrl-C, queued chunks are
    cancelled and the exception goes on."""
    threads = min(os.cpu_count() or 1, _MAX_THREADS, len(starts))
    if threads <= 1:
        for s in starts:
            fn(s)
        return
    ex = ThreadPoolExecutor(threads, thread_name_prefix="mlxtral-affine")
    try:
        for f in [ex.submit(fn, s) for s in starts]:
            f.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def mlx_form(t: Tensor) -> tuple[int, int] | None:
    """(bits, group size) the MLX backend keeps ``t`` in, or None for a float array."""
    if isinstance(t, AffineTensor):
        return t.bits, t.group_size
    if t.qtype in MLX_FORM:
        return MLX_FORM[t.qtype][0], GROUP
    return None


def affine_shapes(shape: tuple[int, ...], qtype: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(packed words shape, scales/biases shape) of a ``[..., n]`` tensor of GGUF ``qtype``."""
    bits = MLX_FORM[qtype][0]
    n = shape[-1]
    return (*shape[:-1], n * bits // 32), (*shape[:-1], n // GROUP)


def gguf_to_affine(data: np.ndarray, qtype: str, shape: tuple[int, ...],
                   out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                   scale_dtype: type | np.dtype = _F32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GGUF tensor (raw blocks ``data`` of ``qtype``, logical ``shape`` ``[..., n]``) -> MLX
    affine (words uint32, scales, biases ``scale_dtype``), shapes from :func:`affine_shapes`;
    written into ``out`` (C-contiguous arrays of those shapes) if given."""
    if qtype not in MLX_FORM:
        raise ValueError(f"{qtype} has no MLX affine form")
    bits, exact = MLX_FORM[qtype]
    bs, ts = BLOCK_TYPES[qtype]
    if shape[-1] % bs:
        raise ValueError(f"{qtype} rows must be a multiple of {bs}, got {shape}")
    if out is None:
        ws, ss = affine_shapes(tuple(shape), qtype)
        out = (np.empty(ws, np.uint32), np.empty(ss, scale_dtype), np.empty(ss, scale_dtype))
    if not all(a.flags.c_contiguous for a in out):
        raise ValueError("output arrays must be C-contiguous")
    blocks = np.asarray(data).reshape(-1, ts)  # [n_blocks, ts], row-major over the tensor
    nb = blocks.shape[0]
    words = out[0].reshape(nb, bs * bits // 32)
    scales, biases = out[1].reshape(nb, bs // GROUP), out[2].reshape(nb, bs // GROUP)

    def work(s: int) -> None:
        chunk = np.ascontiguousarray(blocks[s : s + _CHUNK])
        e = s + chunk.shape[0]
        if qtype in _Q4_CODES:  # the nibbles go through the byte-pair table, not unpacked
            _repack_nibbles(chunk[:, _Q4_CODES[qtype]], words[s:e])
            scales[s:e], biases[s:e] = _q4_scale_bias(chunk, qtype)
        elif exact:
            q, sc, bi = decode(chunk, qtype)
            words[s:e] = pack_codes(q, bits)
            scales[s:e] = np.broadcast_to(sc, scales[s:e].shape)
            biases[s:e] = np.broadcast_to(bi, biases[s:e].shape)
        else:
            x = dequantize_blocks(chunk, qtype, (chunk.shape[0], bs))
            w, sc, bi = affine_quantize(x, bits, GROUP, "float32")
            words[s:e], scales[s:e], biases[s:e] = w, sc, bi

    _for_each(work, range(0, nb, _CHUNK))
    return out


def affine_to_q4_1(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int,
                   scale_dtype: str, bits: int = 4) -> np.ndarray:
    """2/3/4-bit MLX affine (group size a multiple of 32) -> GGUF ``Q4_1`` blocks uint8
    ``[..., out, in/32*20]``: codes fit in a nibble, and each group becomes ``group_size / 32``
    blocks sharing its scale and bias, rounded to float16 (exact for float16 scales)."""
    if bits > 4:
        raise ValueError(f"{bits}-bit codes do not fit Q4_1's nibbles")
    n = w.shape[-1] * 32 // bits
    nb = n // 32
    rep = group_size // 32
    out = np.empty((*w.shape[:-1], nb * 20), dtype=np.uint8)
    ow, w2 = out.reshape(-1, nb * 20), w.reshape(-1, w.shape[-1])
    s2, b2 = scales.reshape(w2.shape[0], -1), biases.reshape(w2.shape[0], -1)
    step = max(1, (1 << 20) // n)
    for r in range(0, w2.shape[0], step):
        q = unpack_codes(w2[r : r + step], bits).reshape(-1, nb, 32)  # [rows, nb, 32]
        blk = ow[r : r + step].reshape(-1, nb, 20)
        d = np.repeat(load_dtype(s2[r : r + step], scale_dtype).astype(np.float16), rep, axis=-1)
        m = np.repeat(load_dtype(b2[r : r + step], scale_dtype).astype(np.float16), rep, axis=-1)
        blk[..., 0:2] = d[..., None].view(np.uint8)
        blk[..., 2:4] = m[..., None].view(np.uint8)
        blk[..., 4:20] = q[..., :16] | (q[..., 16:] << 4)
    return out


def q4_k_to_q4_1(data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """Q4_K blocks (``[..., n/256*144]``) -> ``Q4_1`` blocks (``[..., n/32*20]``): each 32-weight
    sub-block keeps its codes, with scale ``d*sc`` and min ``-dmin*m`` rounded to float16 (a
    relative 2**-12 of a quantization step at most). None if a product overflows float16."""
    blocks = np.asarray(data).reshape(-1, 144)
    nb = blocks.shape[0]
    out = np.empty((nb * 8, 20), np.uint8)
    ok = [True]

    def work(s: int) -> None:
        chunk = np.ascontiguousarray(blocks[s : s + _CHUNK])
        q, sc, bi = decode(chunk, "Q4_K")  # [k, 256], [k, 8], [k, 8]
        q = q.reshape(-1, 32)
        o = out[s * 8 : s * 8 + q.shape[0]]
        d16, m16 = sc.reshape(-1).astype(np.float16), bi.reshape(-1).astype(np.float16)
        if not (np.isfinite(d16).all() and np.isfinite(m16).all()):
            ok[0] = False
        o[:, 0:2] = d16.view(np.uint8).reshape(-1, 2)
        o[:, 2:4] = m16.view(np.uint8).reshape(-1, 2)
        o[:, 4:20] = q[:, :16] | (q[:, 16:] << np.uint8(4))

    _for_each(work, range(0, nb, _CHUNK))
    return out.reshape(*shape[:-1], shape[-1] // 32 * 20) if ok[0] else None


def to_q8_0(data: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Any dequantizable GGUF block tensor -> ``Q8_0`` blocks (``[..., n/32*34]``), requantized
    from float32 a chunk at a time (on up to 8 threads) with the byte-exact ``Q8_0`` quantizer."""
    from mlxtral.quant.ggml import quantize

    bs, ts = BLOCK_TYPES[qtype]
    blocks = np.asarray(data).reshape(-1, ts)
    nb = blocks.shape[0]
    out = np.empty((nb * bs // 32, 34), np.uint8)
    per = bs // 32

    def work(s: int) -> None:
        chunk = np.ascontiguousarray(blocks[s : s + _CHUNK])
        x = dequantize_blocks(chunk, qtype, (chunk.shape[0] * per, 32))
        quantize(x, "Q8_0", out=out[s * per : s * per + x.shape[0]])

    _for_each(work, range(0, nb, _CHUNK))
    return out.reshape(*shape[:-1], shape[-1] // 32 * 34)

