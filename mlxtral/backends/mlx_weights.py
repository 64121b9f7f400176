"""Checkpoint tensors -> MLX arrays, staying quantized where the file is.

- GGUF types become MLX affine groups of 32 (:mod:`mlxtral.quant.gguf_affine`): Q4_0, Q4_1, Q8_0,
  Q5_0, Q5_1, Q4_K, Q5_K, IQ4_NL and IQ4_XS exactly (4, 5 or 8 bits); Q2_K, Q3_K and Q6_K, which
  scale every 16 weights (MLX's groups are 32 or more), requantized to 8 bits.
- MLX folders' :class:`~mlxtral.qtensor.AffineTensor` weights are used as stored (their bits and
  group size; scales and biases in the compute dtype).
- Float weights (F32/F16/BF16) become float arrays of the compute dtype; a GGUF type with no
  affine form (IQ2/IQ3...) is dequantized.

The conversions are NumPy on the raw bytes, in chunks, into one preallocated array set per weight
(for experts, per stacked ``[E, out, in]`` weight); the only lasting copy is the MLX array.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxtral.errors import FormatError
from mlxtral.qtensor import AffineTensor, QTensor, Tensor
from mlxtral.quant import gguf_affine
from mlxtral.quant.affine import load_dtype
from mlxtral.quant.gguf_affine import mlx_form

GROUP_SIZE = gguf_affine.GROUP


def gguf_to_affine(q: QTensor, out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                   scale_dtype: np.dtype | type = np.float32
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GGUF QTensor [..., n] with an MLX form -> (words uint32 [..., n*bits/32], scales,
    biases [..., n/32]) as NumPy arrays, optionally written into ``out``."""
    return gguf_affine.gguf_to_affine(q.data, q.qtype, tuple(q.shape), out, scale_dtype)


def float_array(q: Tensor, dtype: mx.Dtype) -> mx.array:
    """Any tensor as a float MLX array of ``dtype`` (quantized ones dequantized through NumPy)."""
    if q.qtype == "BF16":
        a = mx.array(np.ascontiguousarray(q.data)).view(mx.bfloat16)
    elif q.qtype in ("F32", "F16"):
        a = mx.array(np.ascontiguousarray(q.data))
    else:
        try:
            a = mx.array(q.dequantize())
        except (NotImplementedError, ValueError) as e:
            raise FormatError(f"cannot dequantize a {q.qtype} tensor ({e})") from None
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


def _affine_mx(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], bits: int, group_size: int,
               dtype: mx.Dtype) -> Weight:
    wq, sc, bi = arrays
    s, b = mx.array(sc), mx.array(bi)
    if s.dtype != dtype:
        s, b = s.astype(dtype), b.astype(dtype)
    w = Weight(mx.array(wq), s, b, bits, group_size)
    mx.eval(w.w, w.scales, w.biases)  # materialize now: NumPy temporaries can go
    return w


def _fill(t: Tensor, out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Write ``t``'s MLX affine form into ``out`` (words, scales, biases)."""
    if isinstance(t, AffineTensor):
        out[0][...] = t.data
        out[1][...] = load_dtype(t.scales, t.scale_dtype)
        out[2][...] = load_dtype(t.biases, t.scale_dtype)
    else:
        gguf_to_affine(t, out=out)


def _empty(shape: tuple[int, ...], bits: int, group_size: int, sdt: np.dtype
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lead, n = shape[:-1], shape[-1]
    return (np.empty(lead + (n * bits // 32,), np.uint32), np.empty(lead + (n // group_size,), sdt),
            np.empty(lead + (n // group_size,), sdt))


def to_weight(q: Tensor, dtype: mx.Dtype) -> Weight:
    """One 2-D (or stacked 3-D) tensor as a Weight, quantized where :func:`mlx_form` says so."""
    form = mlx_form(q)
    if form is not None:
        arrays = _empty(tuple(q.shape), *form, _np_dtype(dtype) or np.dtype(np.float32))
        _fill(q, arrays)
        return _affine_mx(arrays, *form, dtype)
    w = Weight(float_array(q, dtype))
    mx.eval(w.w)
    return w


def to_weight_stack(qs: Sequence[Tensor], dtype: mx.Dtype, float_dtype: mx.Dtype | None = None) -> Weight:
    """Experts E x [out, in] -> one stacked Weight [E, out, in], filled expert by expert.

    Quantized when every expert has the same MLX form (bits and group size); otherwise float, in
    ``float_dtype`` (default ``dtype``; MLX's CPU ``gather_mm`` needs float32).
    """
    forms = {mlx_form(q) for q in qs}
    shape = tuple(qs[0].shape)
    if any(tuple(q.shape) != shape for q in qs):
        raise ValueError(f"experts have different shapes: {sorted({tuple(q.shape) for q in qs})}")
    if len(forms) == 1 and None not in forms:
        form = forms.pop()
        assert form is not None
        arrays = _empty((len(qs), *shape), *form, _np_dtype(dtype) or np.dtype(np.float32))
        for e, q in enumerate(qs):
            _fill(q, (arrays[0][e], arrays[1][e], arrays[2][e]))
        w = _affine_mx(arrays, *form, dtype)
        del arrays
        return w
    fdt = float_dtype or dtype
    w = Weight(mx.stack([float_array(q, fdt) for q in qs]))
    mx.eval(w.w)  # materialize now, so the per-expert inputs are freed before the next stack
    return w
