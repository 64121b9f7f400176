"""QTensor: one weight as it sits in the checkpoint, raw blocks, usually memory-mapped.

Every loader hands the model QTensors; nothing is dequantized at load time. Kernels
(``mlxtral.backends.kernels``) compute directly on ``data``; ``dequantize()`` is the slow,
obviously-correct reference.

Layout of ``data`` per ``qtype`` (``shape`` is the logical NumPy shape, innermost dim last):
- ``F32``: float32 array of ``shape``
- ``F16``: float16 array of ``shape``
- ``BF16``: uint16 array of ``shape`` (the bfloat16 bits; NumPy has no bfloat16)
- block types (``Q8_0``, ``Q4_0``, ``Q4_1``, ...): uint8 array of shape
  ``shape[:-1] + (shape[-1] // block_size * type_size,)`` exactly as GGUF stores it.

A 3-D QTensor ``[E, out, in]`` holds stacked experts; ``expert(e)`` is a zero-copy 2-D view.

:class:`AffineTensor` is the same idea for a weight that an MLX (mlx-lm) folder stores
affine-quantized: packed codes, scales and biases, as in the file. Loaders hand out the tensors as
they are stored; :func:`mlxtral.formats.native.to_native` turns the types the NumPy kernels do not
compute on into ones they do, and the MLX backend reads them directly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: Tensors every loader keeps as float32 whatever the file stores (norms and the MoE router):
#: they are small, and llama.cpp and mlx-lm hold them in float32 too.
F32_NAMES = re.compile(r"(_norm\.weight|ffn_gate_inp\.weight)$")

# name -> (block size in weights, bytes per block)
BLOCK_TYPES: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "Q8_K": (256, 292),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
}
FLOAT_TYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
}
# Types our kernels compute on directly (the K-quants and IQ4_XS with llama.cpp's q8_K activations,
# Q5_0 / IQ4_NL with q8_0 ones, Q5_1 with q8_1); others are converted at load (mlxtral.formats.native).
NATIVE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K",
                "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (as torch and gguf do)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return out


@dataclass(frozen=True)
class TensorInfo:
    """What is left of a :class:`QTensor` once a backend holds its own copy: type, shape, size
    (for ``info``/``bench``), no data."""

    qtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True, eq=False)
class QTensor:
    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray
    stored: str = ""  # the file's type when the loader changed it (a BF16 norm held as F32)

    def __post_init__(self) -> None:
        if self.qtype in FLOAT_TYPES:
            want = FLOAT_TYPES[self.qtype]
            if self.data.dtype != want or tuple(self.data.shape) != tuple(self.shape):
                raise ValueError(f"{self.qtype} data must be {want} of shape {self.shape}, got "
                                 f"{self.data.dtype} {self.data.shape}")
        elif self.qtype in BLOCK_TYPES:
            bs, ts = BLOCK_TYPES[self.qtype]
            if self.shape[-1] % bs:
                raise ValueError(f"{self.qtype} rows must be a multiple of {bs}, got {self.shape}")
            want_shape = tuple(self.shape[:-1]) + (self.shape[-1] // bs * ts,)
            if self.data.dtype != np.uint8 or tuple(self.data.shape) != want_shape:
                raise ValueError(f"{self.qtype} data must be uint8 of shape {want_shape}, got "
                                 f"{self.data.dtype} {self.data.shape}")
        else:
            raise ValueError(f"unknown qtype {self.qtype}")

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_float(cls, x: np.ndarray) -> QTensor:
        """Wrap a float array (f32/f16) without copying; other float dtypes become f32."""
        if x.dtype == np.float16:
            return cls("F16", tuple(x.shape), x)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        return cls("F32", tuple(x.shape), x)

    # ---- properties ----------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def is_quantized(self) -> bool:
        return self.qtype in BLOCK_TYPES

    def info(self) -> TensorInfo:
        return TensorInfo(self.qtype, tuple(self.shape), self.nbytes)

    def expert(self, e: int) -> QTensor:
        """Expert ``e`` of a stacked ``[E, out, in]`` tensor, as a zero-copy 2-D view."""
        if self.ndim != 3:
            raise ValueError("expert() needs a 3-D [E, out, in] tensor")
        return QTensor(self.qtype, tuple(self.shape[1:]), self.data[e])

    def row_range(self, r0: int, r1: int) -> QTensor:
        """Rows ``[r0, r1)`` of a 2-D tensor, as a zero-copy view (a row's blocks are its own)."""
        return QTensor(self.qtype, (r1 - r0, *self.shape[1:]), self.data[r0:r1])

    def col_range(self, c0: int, c1: int) -> QTensor:
        """Columns ``[c0, c1)`` of a 2-D tensor, as a zero-copy view whose rows keep the whole
        tensor's stride (the kernels address a row by it). Block types cut on block boundaries."""
        if self.ndim != 2 or not 0 <= c0 <= c1 <= self.shape[1]:
            raise ValueError(f"columns [{c0}, {c1}) of a {self.shape} tensor")
        b0, b1 = c0, c1
        if self.qtype in BLOCK_TYPES:
            bs, ts = BLOCK_TYPES[self.qtype]
            if c0 % bs or c1 % bs:
                raise ValueError(f"{self.qtype} columns [{c0}, {c1}) do not fall on {bs}-blocks")
            b0, b1 = c0 // bs * ts, c1 // bs * ts
        return QTensor(self.qtype, (self.shape[0], c1 - c0), self.data[:, b0:b1])

    # ---- reference math ------------------------------------------------------------------
    def dequantize(self) -> np.ndarray:
        """The whole tensor as float32 (slow reference; allocates shape x 4 bytes)."""
        if self.qtype == "F32":
            return np.asarray(self.data, dtype=np.float32)
        if self.qtype == "F16":
            return self.data.astype(np.float32)
        if self.qtype == "BF16":
            return bf16_to_f32(self.data)
        from mlxtral.quant import dequantize_blocks

        return dequantize_blocks(np.ascontiguousarray(self.data), self.qtype, self.shape)

    def rows(self, idx: np.ndarray | list[int]) -> np.ndarray:
        """Rows ``idx`` of a 2-D tensor as float32 ``[len(idx), in]`` (embedding lookup)."""
        idx = np.asarray(idx, dtype=np.int64)
        sub = QTensor(self.qtype, (len(idx), self.shape[-1]), self.data[idx])
        return sub.dequantize()


AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
SCALE_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}  # safetensors -> storage


@dataclass(frozen=True, eq=False)
class AffineTensor:
    """An MLX affine-quantized weight ``shape`` ``[..., out, in]``: per group of ``group_size``
    weights along a row, ``w = q * scale + bias``.

    - ``data``: uint32 ``[..., out, in * bits / 32]``, the codes as a little-endian bit stream
    - ``scales``, ``biases``: ``[..., out, in / group_size]``, stored as ``scale_dtype``
      ("float16", "float32", or "bfloat16" as uint16 bits)
    """

    shape: tuple[int, ...]
    data: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int
    scale_dtype: str

    def __post_init__(self) -> None:
        if self.bits not in AFFINE_BITS or self.group_size not in AFFINE_GROUPS:
            raise ValueError(f"unsupported MLX quantization: {self.bits} bits, groups of {self.group_size}")
        n = self.shape[-1] if self.shape else 0
        sdt = np.dtype(np.uint16) if self.scale_dtype == "bfloat16" else np.dtype(self.scale_dtype)
        lead = tuple(self.shape[:-1])
        want = (lead + (n * self.bits // 32,), lead + (n // self.group_size,))
        if (not self.shape or n % self.group_size or n % 32 or self.data.dtype != np.uint32
                or tuple(self.data.shape) != want[0] or self.scales.dtype != sdt or self.biases.dtype != sdt
                or tuple(self.scales.shape) != want[1] or tuple(self.biases.shape) != want[1]):
            raise ValueError(f"{self.bits}-bit groups of {self.group_size} of shape {self.shape} need "
                             f"uint32 {want[0]} and {self.scale_dtype} {want[1]}, got {self.data.dtype} "
                             f"{self.data.shape}, {self.scales.dtype} {self.scales.shape}, "
                             f"{self.biases.dtype} {self.biases.shape}")

    @property
    def qtype(self) -> str:
        return f"affine{self.bits}/g{self.group_size}"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.scales.nbytes + self.biases.nbytes)

    @property
    def is_quantized(self) -> bool:
        return True

    def info(self) -> TensorInfo:
        return TensorInfo(self.qtype, tuple(self.shape), self.nbytes)

    def _with(self, shape: tuple[int, ...], data: np.ndarray, scales: np.ndarray,
              biases: np.ndarray) -> AffineTensor:
        return AffineTensor(shape, data, scales, biases, self.bits, self.group_size, self.scale_dtype)

    def expert(self, e: int) -> AffineTensor:
        """Expert ``e`` of a stacked ``[E, out, in]`` tensor, as a zero-copy 2-D view."""
        if self.ndim != 3:
            raise ValueError("expert() needs a 3-D [E, out, in] tensor")
        return self._with(tuple(self.shape[1:]), self.data[e], self.scales[e], self.biases[e])

    def row_range(self, r0: int, r1: int) -> AffineTensor:
        """Rows ``[r0, r1)`` of a 2-D tensor, as a zero-copy view."""
        rows = slice(r0, r1)
        return self._with((r1 - r0, *self.shape[1:]), self.data[rows], self.scales[rows], self.biases[rows])

    def take_rows(self, idx: np.ndarray) -> AffineTensor:
        """Rows ``idx`` of a 2-D tensor (a copy): quantization is per row, so codes, scales and
        biases move together."""
        return self._with((len(idx), self.shape[-1]), self.data[idx], self.scales[idx], self.biases[idx])

    def dequantize(self, out_dtype: type = np.float32) -> np.ndarray:
        """The whole tensor as float32 (or ``out_dtype``), in row chunks."""
        from mlxtral.quant.affine import affine_dequantize

        return affine_dequantize(self.data, self.scales, self.biases, self.bits, self.group_size,
                                 self.scale_dtype, out_dtype)

    def rows(self, idx: np.ndarray | list[int]) -> np.ndarray:
        """Rows ``idx`` of a 2-D tensor as float32 ``[len(idx), in]``."""
        return self.take_rows(np.asarray(idx, dtype=np.int64)).dequantize()


Tensor = QTensor | AffineTensor


def as_f32(t: Tensor) -> QTensor:
    """``t`` dequantized to an F32 QTensor that remembers the type it was stored as."""
    if isinstance(t, QTensor) and t.qtype == "F32":
        return t
    return QTensor("F32", tuple(t.shape), t.dequantize(), stored=t.qtype)


def stored_qtype(t: Tensor) -> str:
    """The type the file stores ``t`` as (a BF16 norm held as F32 says BF16)."""
    return getattr(t, "stored", "") or t.qtype
