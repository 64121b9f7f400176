"""MLX (mlx-lm) folder loader: ``config.json`` (+ ``quantization``) and ``model*.safetensors``.

mlx-lm keeps HF names (and HF's permuted q/k rows: undone here), but stacks each layer's experts
as ``model.layers.N.block_sparse_moe.switch_mlp.{gate,up,down}_proj.weight`` ``[E, out, in]``
(split here into zero-copy per-expert views) and quantizes with MLX's affine scheme: per group of
``group_size`` weights along a row, ``w = q * scale + bias``; ``q`` packed into uint32 words,
element ``i`` of a word at bits ``bits * i`` (a little-endian bit stream); ``.scales`` and
``.biases`` hold one value per group. ``config.json``'s ``quantization`` gives the default
``{"group_size", "bits"}`` and may override it per module path (or disable it with ``false``).

Quantized modules become :class:`~mlxtral.qtensor.AffineTensor` (zero-copy views of the file),
which the MLX backend uses as they are and :mod:`mlxtral.formats.native` converts for the NumPy
kernels; unquantized weights stay zero-copy views (bf16 as ``BF16``). Norms and routers become
float32 (:func:`~mlxtral.formats.hf.finish`), and q/k rows are un-permuted (rows move with their
scales and biases, since groups run along rows).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mlxtral.config import ModelArgs, read_json
from mlxtral.display import plain, show
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
from mlxtral.qtensor import AFFINE_BITS, AFFINE_GROUPS, SCALE_DTYPES, AffineTensor, Tensor

_SWITCH = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.switch_mlp\.(gate|up|down)_proj$")
# (module, its parts, internal name, switch_mlp match, (bits, group) if quantized, logical shape)
_Plan = tuple[str, "dict[str, SafeTensor]", str, "re.Match[str] | None", "tuple[int, int] | None",
              "tuple[int, ...]"]  # weights unpacked per step of a repack


# ---- loader ------------------------------------------------------------------------------------
def _quant_params(module: str, quant: dict[str, Any], path: Path) -> tuple[int, int] | None:
    spec: Any = quant.get(module, quant)
    if spec is False:
        return None
    if not isinstance(spec, dict):
        raise FormatError(f"bad quantization entry for {plain(module)}: {show(spec)}", path)
    mode = spec.get("mode", quant.get("mode", "affine"))
    if mode != "affine":
        raise FormatError(f"{plain(module)}: MLX quantization mode {show(mode)} is not supported "
                          "(affine only)", path)
    # mlx-lm's mixed-precision configs (--quant-predicate) give a module's group size as null: MLX's
    # default for the mode, which mlx-lm also writes at the top level
    bits = spec.get("bits") if spec.get("bits") is not None else quant.get("bits", 4)
    gs = spec.get("group_size") if spec.get("group_size") is not None else quant.get("group_size", 64)
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, gs))
    if not ints or bits not in AFFINE_BITS or gs not in AFFINE_GROUPS:
        raise FormatError(f"{plain(module)}: unsupported quantization bits={show(bits)} "
                          f"group_size={show(gs)}", path)
    return bits, gs


def _quant_layout(module: str, parts: dict[str, SafeTensor], quant: dict[str, Any] | None,
                  path: Path) -> tuple[int, int, tuple[int, ...]]:
    """Check a quantized module's parts: (bits, group size, logical shape ``[..., out, in]``)."""
    if quant is None:
        raise FormatError(f"{plain(module)} is quantized but config.json has no 'quantization'", path)
    qp = _quant_params(module, quant, path)  # an unsupported mode (mxfp4: no biases) is named first
    if qp is None:
        raise FormatError(f"{plain(module)} has scales but config.json says it is not quantized", path)
    w, s, b = parts.get("weight"), parts.get("scales"), parts.get("biases")
    if w is None or s is None or b is None:
        raise FormatError(f"{plain(module)}: quantized module needs weight, scales and biases", path)
    bits, gs = qp
    if w.dtype != "U32" or s.dtype not in SCALE_DTYPES or b.dtype != s.dtype:
        raise FormatError(f"{plain(module)}: expected uint32 weight and float scales/biases, got {w.dtype}, "
                          f"{s.dtype}, {b.dtype}", path)
    n = w.shape[-1] * 32 // bits if w.shape else 0
    if (not w.shape or (w.shape[-1] * 32) % bits or n % gs or n % 32 or s.shape != b.shape
            or s.shape != (*w.shape[:-1], n // gs)):
        raise FormatError(f"{plain(module)}: weight {w.shape}, scales {s.shape}, biases {b.shape} do not fit "
                          f"{bits}-bit groups of {gs}", path)
    return bits, gs, (*w.shape[:-1], n)


def _affine(parts: dict[str, SafeTensor], bits: int, gs: int, shape: tuple[int, ...]) -> AffineTensor:
    s, b = parts["scales"], parts["biases"]
    return AffineTensor(shape, parts["weight"].data, s.data, b.data, bits, gs, SCALE_DTYPES[s.dtype])


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
                raise FormatError(f"{plain(mod)}: expected stacked experts [E, out, in], got {shape}", folder)
            for e in range(shape[0]):
                shapes[f"blk.{sw[1]}.ffn_{sw[2]}.{e}.weight"] = shape[1:]
        else:
            shapes[target] = shape
    if "output.weight" in shapes:
        args.tie_word_embeddings = False
    validate_shapes(shapes, args, folder)

    # pass 2: zero-copy views (quantized modules as AffineTensor)
    tensors: dict[str, Tensor] = {}
    for mod, parts, target, sw, qp, shape in plan:
        q: Tensor
        if qp is not None:
            q = _affine(parts, qp[0], qp[1], shape)
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
