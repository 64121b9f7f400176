"""GGUF loader: memory-mapped through ``gguf.GGUFReader``, mapped once into the internal layout.

Tensors stay as they are in the file (raw blocks, zero-copy views of the memory map) for the
types our kernels compute on (F32, F16, BF16, Q8_0, Q4_0, Q4_1). Other types (Q5_x, K-quants,
IQ4) are dequantized with ``gguf.quants`` once at load, to F16 for the big matrices.

Both expert layouts are read: merged ``blk.N.ffn_{gate,up,down}_exps.weight`` (``[E, out, in]``,
split into zero-copy per-expert views) and the legacy per-expert ``blk.N.ffn_gate.E.weight``
that current llama.cpp refuses. A dense model's ``blk.N.ffn_gate.weight`` becomes expert 0.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.config import ModelArgs
from mlxtral.errors import FormatError
from mlxtral.formats import Checkpoint, TokenizerSource
from mlxtral.qtensor import BLOCK_TYPES, FLOAT_TYPES, NATIVE_TYPES, QTensor

GGUF_MAGIC = b"GGUF"
_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_DENSE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")
_LEGACY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
# Norms and the router are computed in float32 whatever the file stores.
_F32_NAMES = re.compile(r"(_norm\.weight|ffn_gate_inp\.weight)$")


def field_value(field: Any) -> Any:
    """A ``gguf.ReaderField`` as a plain Python value (str, int, float, bool, list)."""
    return field.contents()


def read_metadata(reader: Any, path: Path) -> dict[str, Any]:
    md: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            md[key] = field_value(field)
        except Exception as e:  # malformed field data
            raise FormatError(f"metadata key {key!r} cannot be read ({e})", path) from None
    return md


def open_reader(path: Path) -> Any:
    """Open a GGUF with ``gguf.GGUFReader``, turning its failures into one clear error."""
    import gguf

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror})", path) from None
    if magic != GGUF_MAGIC:
        raise FormatError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')", path)
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise FormatError(f"corrupt or unsupported GGUF ({e})", path) from None


def tensor_to_qtensor(t: Any, path: Path) -> QTensor:
    """A ``gguf.ReaderTensor`` as a QTensor: zero-copy for native types."""
    import gguf

    qtype = t.tensor_type.name
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dims innermost-first
    data = t.data
    if qtype in FLOAT_TYPES:
        if data.dtype != FLOAT_TYPES[qtype]:
            data = data.view(FLOAT_TYPES[qtype])
        data = data.reshape(shape)
    elif qtype in BLOCK_TYPES:
        bs, ts = BLOCK_TYPES[qtype]
        data = data.reshape(shape[:-1] + (shape[-1] // bs * ts,))
    elif qtype in ("F64", "I8", "I16", "I32", "I64"):
        data = np.asarray(data).astype(np.float32).reshape(shape)
        return QTensor("F32", shape, data)
    else:
        raise FormatError(f"tensor {t.name}: unsupported type {qtype}", path)
    if qtype not in NATIVE_TYPES:
        # No kernel for this type: dequantize once (F16 for matrices, F32 for vectors).
        full = gguf.quants.dequantize(np.ascontiguousarray(data), t.tensor_type).reshape(shape)
        if len(shape) == 1:
            return QTensor("F32", shape, full.astype(np.float32))
        return QTensor("F16", shape, full.astype(np.float16))
    return QTensor(qtype, shape, data)


def _as_f32(q: QTensor) -> QTensor:
    if q.qtype == "F32":
        return q
    return QTensor("F32", q.shape, q.dequantize())


def sanitize(raw: dict[str, QTensor], path: Path) -> dict[str, QTensor]:
    """GGUF names -> internal names (split merged experts, rename dense FFNs to expert 0)."""
    out: dict[str, QTensor] = {}
    for name, q in raw.items():
        if m := _EXPS.match(name):
            if q.ndim != 3:
                raise FormatError(f"tensor {name}: expected 3 dims [E, out, in], got {q.shape}", path)
            for e in range(q.shape[0]):
                out[f"blk.{m[1]}.ffn_{m[2]}.{e}.weight"] = q.expert(e)
        elif m := _DENSE.match(name):
            out[f"blk.{m[1]}.ffn_{m[2]}.0.weight"] = q
        elif _LEGACY.match(name):
            out[name] = q
        elif _F32_NAMES.search(name):
            out[name] = _as_f32(q)
        else:
            out[name] = q
    return out


def load_gguf(path: str | Path) -> Checkpoint:
    path = Path(path)
    reader = open_reader(path)
    md = read_metadata(reader, path)
    args = ModelArgs.from_gguf_metadata(md, path)
    raw: dict[str, QTensor] = {}
    for t in reader.tensors:
        if t.name in raw:
            raise FormatError(f"duplicate tensor name {t.name!r}", path)
        raw[t.name] = tensor_to_qtensor(t, path)
    if "output.weight" not in raw:
        args.tie_word_embeddings = True
    tensors = sanitize(raw, path)
    tok_keys = {k: v for k, v in md.items() if k.startswith("tokenizer.")}
    tokenizer = TokenizerSource("gguf", path, tok_keys) if "tokenizer.ggml.model" in md else None
    ckpt = Checkpoint("gguf", path, args, tensors, tokenizer, metadata=md, keepalive=[reader])
    _validate(ckpt)
    return ckpt


def _validate(ckpt: Checkpoint) -> None:
    try:
        from mlxtral.formats.detect import validate_tensors
    except ImportError:  # pragma: no cover - during bring-up
        return
    validate_tensors(ckpt)
