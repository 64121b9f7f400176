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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
# Types our kernels compute on directly; others are dequantized (to F16/F32) at load.
NATIVE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


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

        return dequantize_blocks(self.data, self.qtype, self.shape)

    def rows(self, idx: np.ndarray | list[int]) -> np.ndarray:
        """Rows ``idx`` of a 2-D tensor as float32 ``[len(idx), in]`` (embedding lookup)."""
        idx = np.asarray(idx, dtype=np.int64)
        sub = QTensor(self.qtype, (len(idx), self.shape[-1]), self.data[idx])
        return sub.dequantize()
