"""QTensors -> MLX arrays, staying quantized where MLX can compute on the blocks exactly.

GGUF's 32-weight blocks are MLX affine groups of 32 (``w = q * scale + bias``):

- ``Q4_0``: 4 bits, scale ``d``, bias ``-8 d`` (GGUF: ``w = (q - 8) d``)
- ``Q4_1``: 4 bits, scale ``d``, bias ``m``     (GGUF: ``w = q d + m``)
- ``Q8_0``: 8 bits, scale ``d``, bias ``-128 d`` (GGUF stores signed ``q``; MLX's are unsigned,
  so ``q + 128``)

GGUF packs a Q4 block as 16 bytes whose low nibbles are elements 0-15 and high nibbles 16-31; MLX
packs element ``k`` of a uint32 word at bit ``4k`` (little-endian), i.e. byte ``b`` holds elements
``2b`` (low) and ``2b + 1`` (high). The repack below is pure NumPy on the raw block bytes, in row
chunks, so the temporaries stay a few MB; the only lasting copy is the MLX array.
``d`` and ``m`` are float16 in the file, so scales/biases are exact in float16 and float32 (and
rounded in bfloat16).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxtral.qtensor import BLOCK_TYPES, QTensor

GROUP_SIZE = 32
AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGUF types MLX computes on directly
_CHUNK_BLOCKS = 1 << 16  # blocks repacked at a time (~2 MB of raw bytes)


def _nibble_lut() -> np.ndarray:
    """GGUF byte pair (a = byte 2i, c = byte 2i+1, as one little-endian uint16) -> the MLX bytes
    i (elements 2i, 2i+1: low nibbles of a, c) and 8+i (elements 16+2i, 17+2i: high nibbles)."""
    v = np.arange(1 << 16, dtype=np.uint32)
    a, c = v & 0xFF, v >> 8
    lo = (a & 0x0F) | ((c & 0x0F) << 4)
    hi = (a >> 4) | (c & 0xF0)
    return (lo | (hi << 8)).astype(np.uint16)


_LUT4 = _nibble_lut()


def _repack_into(blocks: np.ndarray, qtype: str, words: np.ndarray, scales: np.ndarray,
                 biases: np.ndarray) -> None:
    """Raw GGUF blocks uint8 [n, type_size] -> MLX codes ``words`` (uint8 view [n, 32*bits/8]),
    ``scales`` and ``biases`` [n]."""
    halves = blocks.view(np.float16)  # [n, type_size/2]: d (and m) are the first halves
    d = halves[:, 0].astype(np.float32)
    scales[:] = d
    if qtype == "Q8_0":
        np.bitwise_xor(blocks[:, 2:34], np.uint8(0x80), out=words)  # int8 q -> unsigned q + 128
        biases[:] = d * np.float32(-128)
        return
    if qtype == "Q4_0":
        qs = blocks[:, 2:18]
        biases[:] = d * np.float32(-8)
    else:  # Q4_1
        qs = blocks[:, 4:20]
        biases[:] = halves[:, 1]
    r = _LUT4[qs.view(np.uint16)]  # [n, 8]: low byte -> MLX byte i, high byte -> MLX byte 8+i
    out = words.reshape(-1, 2, 8)
    out[:, 0, :] = r & 0xFF
    out[:, 1, :] = r >> 8


def gguf_to_affine(q: QTensor, out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                   scale_dtype: np.dtype | type = np.float32
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0/Q4_1/Q8_0 QTensor [..., n] -> MLX affine (words uint32 [..., n*bits/32],
    scales [..., n/32], biases [..., n/32]) as NumPy arrays, optionally written into ``out``
    (contiguous arrays of those shapes)."""
    if q.qtype not in AFFINE_BITS:
        raise ValueError(f"{q.qtype} has no exact MLX affine form")
    bits = AFFINE_BITS[q.qtype]
    _, ts = BLOCK_TYPES[q.qtype]
    lead, n = tuple(q.shape[:-1]), q.shape[-1]
    if out is None:
        out = (np.empty(lead + (n * bits // 32,), np.uint32),
               np.empty(lead + (n // GROUP_SIZE,), scale_dtype),
               np.empty(lead + (n // GROUP_SIZE,), scale_dtype))
    if not all(a.flags.c_contiguous for a in out):
        raise ValueError("output arrays must be C-contiguous")
    blocks = q.data.reshape(-1, ts)  # [n_blocks, ts], row-major over the whole tensor
    nb = blocks.shape[0]
    wq = out[0].reshape(nb, -1).view(np.uint8)  # [n_blocks, 16 or 32] bytes
    sc, bi = out[1].reshape(nb), out[2].reshape(nb)
    for s in range(0, nb, _CHUNK_BLOCKS):
        e = min(s + _CHUNK_BLOCKS, nb)
        _repack_into(np.ascontiguousarray(blocks[s:e]), q.qtype, wq[s:e], sc[s:e], bi[s:e])
    return out


def float_array(q: QTensor, dtype: mx.Dtype) -> mx.array:
    """Any QTensor as a float MLX array of ``dtype`` (block types dequantized through NumPy)."""
    if q.qtype == "BF16":
        a = mx.array(np.ascontiguousarray(q.data)).view(mx.bfloat16)
    elif q.qtype in ("F32", "F16"):
        a = mx.array(np.ascontiguousarray(q.data))
    else:
        a = mx.array(q.dequantize())
    return a.astype(dtype) if a.dtype != dtype else a


@dataclass
class Weight:
    """One weight ``[out, in]`` or a stack of experts ``[E, out, in]``: quantized (``bits`` set:
    packed ``w``, ``scales``, ``biases``) or float (``w`` only)."""

    w: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int | None = None
    group_size: int = GROUP_SIZE

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.scales, self.biases) if a is not None)

    def __call__(self, x: mx.array) -> mx.array:
        """x [..., in] -> [..., out]."""
        if self.bits is None:
            return x @ self.w.T
        return mx.quantized_matmul(x, self.w, self.scales, self.biases, transpose=True,
                                   group_size=self.group_size, bits=self.bits)

    def rows(self, ids: mx.array) -> mx.array:
        """Embedding lookup: rows ``ids`` [T] -> [T, in]."""
        if self.bits is None:
            return self.w[ids]
        return mx.dequantize(self.w[ids], self.scales[ids], self.biases[ids],
                             group_size=self.group_size, bits=self.bits)

    def gather(self, x: mx.array, idx: mx.array, sorted_indices: bool = False) -> mx.array:
        """Stacked experts: x [..., 1, in] times expert ``idx`` [...] -> [..., 1, out]."""
        if self.bits is None:
            xf = x.astype(self.w.dtype)  # CPU gather_mm is float32-only: see to_weight_stack
            y = mx.gather_mm(xf, self.w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)
            return y.astype(x.dtype)
        return mx.gather_qmm(x, self.w, self.scales, self.biases, rhs_indices=idx, transpose=True,
                             group_size=self.group_size, bits=self.bits, sorted_indices=sorted_indices)

    def dequantize(self) -> mx.array:
        if self.bits is None:
            return self.w
        return mx.dequantize(self.w, self.scales, self.biases, group_size=self.group_size, bits=self.bits)


def _np_dtype(dtype: mx.Dtype) -> np.dtype | None:
    return {mx.float32: np.dtype(np.float32), mx.float16: np.dtype(np.float16)}.get(dtype)


def _affine_mx(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], bits: int, dtype: mx.Dtype) -> Weight:
    wq, sc, bi = arrays
    s, b = mx.array(sc), mx.array(bi)
    if s.dtype != dtype:
        s, b = s.astype(dtype), b.astype(dtype)
    w = Weight(mx.array(wq), s, b, bits)
    mx.eval(w.w, w.scales, w.biases)  # materialize now: NumPy temporaries can go
    return w


def to_weight(q: QTensor, dtype: mx.Dtype) -> Weight:
    """One 2-D (or stacked 3-D) QTensor as a Weight; Q4_0/Q4_1/Q8_0 stay quantized."""
    if q.qtype in AFFINE_BITS:
        sdt = _np_dtype(dtype) or np.float32
        return _affine_mx(gguf_to_affine(q, scale_dtype=sdt), AFFINE_BITS[q.qtype], dtype)
    w = Weight(float_array(q, dtype))
    mx.eval(w.w)
    return w


def to_weight_stack(qs: Sequence[QTensor], dtype: mx.Dtype, float_dtype: mx.Dtype | None = None) -> Weight:
    """Experts E x [out, in] -> one stacked Weight [E, out, in], filled expert by expert.

    Quantized when every expert maps to the same MLX bit width; otherwise float, in
    ``float_dtype`` (default ``dtype``; MLX's CPU ``gather_mm`` needs float32).
    """
    bits = {AFFINE_BITS.get(q.qtype) for q in qs}
    shape = tuple(qs[0].shape)
    if any(tuple(q.shape) != shape for q in qs):
        raise ValueError(f"experts have different shapes: {sorted({tuple(q.shape) for q in qs})}")
    E, (out_dim, in_dim) = len(qs), shape
    if len(bits) == 1 and None not in bits:
        b = bits.pop()
        sdt = _np_dtype(dtype) or np.float32
        arrays = (np.empty((E, out_dim, in_dim * b // 32), np.uint32),
                  np.empty((E, out_dim, in_dim // GROUP_SIZE), sdt),
                  np.empty((E, out_dim, in_dim // GROUP_SIZE), sdt))
        for e, q in enumerate(qs):
            gguf_to_affine(q, out=(arrays[0][e], arrays[1][e], arrays[2][e]))
        w = _affine_mx(arrays, b, dtype)
        del arrays
        return w
    fdt = float_dtype or dtype
    w = Weight(mx.stack([float_array(q, fdt) for q in qs]))
    mx.eval(w.w)  # materialize now, so the per-expert inputs are freed before the next stack
    return w
