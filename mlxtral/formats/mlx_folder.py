"""MLX (mlx-lm) folder loader: ``config.json`` (+ ``quantization``) and ``model*.safetensors``.

mlx-lm keeps HF names (and HF's permuted q/k rows: undone here), but stacks each layer's experts
as ``model.layers.N.block_sparse_moe.switch_mlp.{gate,up,down}_proj.weight`` ``[E, out, in]``
(split here into zero-copy per-expert views) and quantizes with MLX's affine scheme: per group of
``group_size`` weights along a row, ``w = q * scale + bias``; ``q`` packed into uint32 words,
element ``i`` of a word at bits ``bits * i`` (a little-endian bit stream); ``.scales`` and
``.biases`` hold one value per group. ``config.json``'s ``quantization`` gives the default
``{"group_size", "bits"}`` and may override it per module path (or disable it with ``false``).

Mapping to our kernels' types (the NumPy backend computes on GGUF blocks):

- 4 bits, group size a multiple of 32 -> ``Q4_1`` blocks, exactly: ``Q4_1`` is ``w = q * d + m``
  per 32 weights, so each MLX group becomes ``group_size / 32`` blocks sharing its scale and bias,
  with the nibbles repacked (MLX: element ``i`` at bits ``4i``; Q4_1: elements 0-15 in the low
  nibbles of bytes 0-15, 16-31 in the high ones). Scales/biases are stored as f16: exact for f16
  files; bf16 values convert exactly unless below f16's normal range (|x| < 6.1e-5, where f16 keeps
  fewer mantissa bits) or above 65504; f32 scales are rounded to f16.
- any other bit width or group size (8-bit, 3-bit, group 16...) -> dequantized once to ``F16``
  (float32 for norms and routers). Correct, but it costs 2 bytes a weight in RAM.
- unquantized weights stay zero-copy views (bf16 as ``BF16``).

The repack is a copy (the layouts differ), done in row chunks so no large float temporaries appear.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.config import ModelArgs, read_json
from mlxtral.errors import FormatError
from mlxtral.formats import Checkpoint
from mlxtral.formats.detect import validate_shapes, validate_tensors
from mlxtral.formats.hf import (
    HF_RULES,
    find_weight_files,
    finish,
    hf_tokenizer,
    load_shards,
    rename,
    to_qtensor,
)
from mlxtral.formats.safetensors import SafeTensor
from mlxtral.qtensor import QTensor, bf16_to_f32

_SWITCH = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.switch_mlp\.(gate|up|down)_proj$")
_F32_TARGET = re.compile(r"(_norm\.weight|ffn_gate_inp\.weight)$")
_CHUNK_ELEMS = 1 << 24
# (module, its parts, internal name, switch_mlp match, (bits, group) if quantized, logical shape)
_Plan = tuple[str, "dict[str, SafeTensor]", str, "re.Match[str] | None", "tuple[int, int] | None",
              "tuple[int, ...]"]  # weights unpacked per step of a repack


# ---- MLX affine quantization -------------------------------------------------------------------
def unpack_mlx(w: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words ``[..., n * bits / 32]`` -> quantized values uint8 ``[..., n]``."""
    if 32 % bits == 0:
        per = 32 // bits
        shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
        q = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # [..., words, per]
        return q.astype(np.uint8).reshape(*w.shape[:-1], w.shape[-1] * per)
    # 3, 5, 6 bits: a little-endian bit stream across words
    stream = np.unpackbits(np.ascontiguousarray(w).view(np.uint8), axis=-1, bitorder="little")
    n = stream.shape[-1] // bits
    vals = stream[..., : n * bits].reshape(*w.shape[:-1], n, bits).astype(np.uint8)
    return (vals << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def _scale_f32(t: np.ndarray) -> np.ndarray:
    if t.dtype == np.uint16:  # bf16 bits
        return bf16_to_f32(t)
    return t.astype(np.float32)


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


def dequantize_mlx(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int,
                   out_dtype: Any = np.float16) -> np.ndarray:
    """MLX affine-quantized weight -> ``out_dtype`` ``[..., out, in]`` (row chunks; exact in f32)."""
    n = w.shape[-1] * 32 // bits
    out = np.empty((*w.shape[:-1], n), dtype=out_dtype)
    ow, w2, s2, b2 = _rows(out), _rows(w), _rows(scales), _rows(biases)
    step = max(1, _CHUNK_ELEMS // n)
    for r in range(0, w2.shape[0], step):
        q = unpack_mlx(w2[r:r + step], bits).reshape(-1, n // group_size, group_size).astype(np.float32)
        s = _scale_f32(s2[r:r + step])[..., None]
        b = _scale_f32(b2[r:r + step])[..., None]
        ow[r:r + step] = (q * s + b).reshape(-1, n)
    return out


def _as_f16(t: np.ndarray) -> np.ndarray:
    return _scale_f32(t).astype(np.float16)


def mlx4_to_q4_1(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """4-bit MLX affine (group a multiple of 32) -> GGUF ``Q4_1`` blocks uint8 ``[..., out, in/32*20]``."""
    n = w.shape[-1] * 8
    nb = n // 32
    rep = group_size // 32
    out = np.empty((*w.shape[:-1], nb * 20), dtype=np.uint8)
    ow, w2, s2, b2 = _rows(out), _rows(w), _rows(scales), _rows(biases)
    step = max(1, _CHUNK_ELEMS // n)
    for r in range(0, w2.shape[0], step):
        q = unpack_mlx(w2[r:r + step], 4).reshape(-1, nb, 32)  # [rows, nb, 32]
        blk = ow[r:r + step].reshape(-1, nb, 20)
        d = np.repeat(_as_f16(s2[r:r + step]), rep, axis=-1)  # [rows, nb]
        m = np.repeat(_as_f16(b2[r:r + step]), rep, axis=-1)
        blk[..., 0:2] = d[..., None].view(np.uint8)
        blk[..., 2:4] = m[..., None].view(np.uint8)
        blk[..., 4:20] = q[..., :16] | (q[..., 16:] << 4)
    return out


# ---- loader ------------------------------------------------------------------------------------
def _quant_params(module: str, quant: dict[str, Any], path: Path) -> tuple[int, int] | None:
    spec: Any = quant.get(module, quant)
    if spec is False:
        return None
    if not isinstance(spec, dict):
        raise FormatError(f"bad quantization entry for {module}: {spec!r}", path)
    mode = spec.get("mode", quant.get("mode", "affine"))
    if mode != "affine":
        raise FormatError(f"{module}: MLX quantization mode {mode!r} is not supported (affine only)", path)
    bits, gs = spec.get("bits"), spec.get("group_size")
    if not isinstance(bits, int) or not isinstance(gs, int) or bits not in (2, 3, 4, 5, 6, 8) or gs <= 0:
        raise FormatError(f"{module}: unsupported quantization bits={bits!r} group_size={gs!r}", path)
    return bits, gs


def _quant_layout(module: str, parts: dict[str, SafeTensor], quant: dict[str, Any] | None,
                  path: Path) -> tuple[int, int, tuple[int, ...]]:
    """Check a quantized module's parts: (bits, group size, logical shape ``[..., out, in]``)."""
    w, s, b = parts.get("weight"), parts.get("scales"), parts.get("biases")
    if w is None or s is None or b is None:
        raise FormatError(f"{module}: quantized module needs weight, scales and biases", path)
    if quant is None:
        raise FormatError(f"{module} is quantized but config.json has no 'quantization'", path)
    qp = _quant_params(module, quant, path)
    if qp is None:
        raise FormatError(f"{module} has scales but config.json says it is not quantized", path)
    bits, gs = qp
    if w.dtype != "U32" or s.dtype not in ("F16", "BF16", "F32") or b.dtype != s.dtype:
        raise FormatError(f"{module}: expected uint32 weight and float scales/biases, got {w.dtype}, "
                          f"{s.dtype}, {b.dtype}", path)
    n = w.shape[-1] * 32 // bits if w.shape else 0
    if (not w.shape or (w.shape[-1] * 32) % bits or n % gs or s.shape != b.shape
            or s.shape != (*w.shape[:-1], n // gs)):
        raise FormatError(f"{module}: weight {w.shape}, scales {s.shape}, biases {b.shape} do not fit "
                          f"{bits}-bit groups of {gs}", path)
    return bits, gs, (*w.shape[:-1], n)


def _convert(parts: dict[str, SafeTensor], bits: int, gs: int, shape: tuple[int, ...],
             target: str) -> QTensor:
    w, s, b = parts["weight"].data, parts["scales"].data, parts["biases"].data
    if _F32_TARGET.search(target):
        return QTensor("F32", shape, dequantize_mlx(w, s, b, bits, gs, np.float32))
    if bits == 4 and gs % 32 == 0:
        return QTensor("Q4_1", shape, mlx4_to_q4_1(w, s, b, gs))
    return QTensor("F16", shape, dequantize_mlx(w, s, b, bits, gs, np.float16))


def load_mlx_folder(path: str | Path) -> Checkpoint:
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError("not a folder (an MLX checkpoint is a folder with config.json)", folder)
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    quant = cfg.get("quantization")
    if quant is not None and not isinstance(quant, dict):
        raise FormatError("'quantization' must be an object", cfg_path)
    args = ModelArgs.from_hf_config(cfg, cfg_path)
    files, index, index_path = find_weight_files(folder, stems=("model",))
    raw, keep = load_shards(folder, files, index, index_path)

    modules: dict[str, dict[str, SafeTensor]] = {}
    for name, t in raw.items():
        mod, _, part = name.rpartition(".")
        if part in ("weight", "scales", "biases") and mod:
            modules.setdefault(mod, {})[part] = t
        else:
            modules.setdefault(name, {})["raw"] = t

    # pass 1: names, layouts and shapes only, so a mismatch is reported before any conversion
    plan: list[_Plan] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for mod, parts in modules.items():
        if "raw" in parts:  # no .weight suffix: keep the name so validation reports it
            plan.append((mod, parts, mod, None, None, parts["raw"].shape))
            shapes[mod] = parts["raw"].shape
            continue
        sw = _SWITCH.match(mod)
        target = f"blk.{sw[1]}.ffn_{sw[2]}.0.weight" if sw else rename(mod + ".weight", HF_RULES)
        if target is None or "weight" not in parts:
            continue
        qp: tuple[int, int] | None = None
        if "scales" in parts or "biases" in parts:
            bits, gs, shape = _quant_layout(mod, parts, quant, folder)
            qp = (bits, gs)
        else:
            shape = parts["weight"].shape
        plan.append((mod, parts, target, sw, qp, shape))
        if sw:
            if len(shape) != 3:
                raise FormatError(f"{mod}: expected stacked experts [E, out, in], got {shape}", folder)
            for e in range(shape[0]):
                shapes[f"blk.{sw[1]}.ffn_{sw[2]}.{e}.weight"] = shape[1:]
        else:
            shapes[target] = shape
    if "output.weight" in shapes:
        args.tie_word_embeddings = False
    validate_shapes(shapes, args, folder)

    # pass 2: convert (zero-copy views, Q4_1 repack or dequantization)
    tensors: dict[str, QTensor] = {}
    for mod, parts, target, sw, qp, shape in plan:
        if qp is not None:
            q = _convert(parts, qp[0], qp[1], shape, target)
        else:
            key = "raw" if "raw" in parts else "weight"
            q = to_qtensor(parts[key], mod if key == "raw" else mod + ".weight", folder)
        if sw:
            for e in range(q.shape[0]):
                tensors[f"blk.{sw[1]}.ffn_{sw[2]}.{e}.weight"] = q.expert(e)
        else:
            tensors[target] = q
    tensors = finish(tensors, args, hf_qk=True)
    ckpt = Checkpoint("mlx", folder, args, tensors, hf_tokenizer(folder),
                      metadata={"config": cfg, "quantization": quant}, keepalive=keep)
    validate_tensors(ckpt)
    return ckpt
