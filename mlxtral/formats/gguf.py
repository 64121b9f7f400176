"""GGUF loader: parsed by :mod:`mlxtral.formats.gguf_parse` (memory-mapped, validated), mapped once
into the internal layout.

Tensors stay as they are in the file: raw blocks of any type, zero-copy views of the memory map
(norms and routers become float32). Types the NumPy kernels do not compute on (none of the block
types a model file uses today) are converted by whoever needs them
(:mod:`mlxtral.formats.native`); the MLX backend keeps
most of them quantized (:mod:`mlxtral.quant.gguf_affine`).

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
from mlxtral.display import plain
from mlxtral.errors import FormatError
from mlxtral.formats import Checkpoint, TokenizerSource
from mlxtral.formats.gguf_parse import GGUFTensor, parse_gguf
from mlxtral.qtensor import BLOCK_TYPES, F32_NAMES, FLOAT_TYPES, QTensor, as_f32

_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_DENSE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")
_LEGACY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
# Norms and the router are computed in float32 whatever the file stores.


def field_value(field: Any) -> Any:
    """A ``gguf.ReaderField`` as a plain Python value (str, int, float, bool, list)."""
    return field.contents()


def open_reader(path: Path) -> Any:
    """Open a GGUF with ``gguf.GGUFReader`` (for writers that copy fields), after our own checks.

    The file is validated by :func:`parse_gguf` first, so ``GGUFReader`` never sees a lying header.
    """
    import gguf

    parse_gguf(path)
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise FormatError(f"corrupt or unsupported GGUF ({plain(str(e))})", path) from None


def tensor_to_qtensor(t: GGUFTensor, path: Path) -> QTensor:
    """A parsed GGUF tensor as a QTensor of its own type, zero-copy (integer and F64 tensors become
    F32)."""
    qtype, shape, data = t.qtype, t.shape, t.data
    if 0 in shape:
        raise FormatError(f"tensor {plain(t.name)} has an empty dimension {list(shape)}", path)
    if qtype in ("F64", "I8", "I16", "I32", "I64"):
        return QTensor("F32", shape, data.astype(np.float32))
    if qtype not in FLOAT_TYPES and qtype not in BLOCK_TYPES:
        raise FormatError(f"tensor {plain(t.name)}: unsupported type {qtype}", path)
    return QTensor(qtype, shape, data)


def _as_f32(q: QTensor, name: str, path: Path) -> QTensor:
    if q.qtype == "F32":
        return q
    try:
        return as_f32(q)
    except (NotImplementedError, ValueError) as e:
        raise FormatError(f"tensor {plain(name)}: cannot dequantize type {q.qtype} "
                          f"({plain(str(e))})", path) from None


def sanitize(raw: dict[str, QTensor], path: Path, n_experts: int | None = None) -> dict[str, QTensor]:
    """GGUF names -> internal names (split merged experts, rename dense FFNs to expert 0).

    ``n_experts``: the count the metadata gives; merged expert tensors must agree with it."""
    out: dict[str, QTensor] = {}

    def put(name: str, q: QTensor, src: str) -> None:
        if name in out:
            raise FormatError(f"tensor {plain(src)} duplicates {plain(name)} (both merged and per-expert "
                              "experts?)", path)
        out[name] = q

    for name, q in raw.items():
        if m := _EXPS.match(name):
            if q.ndim != 3:
                raise FormatError(f"tensor {plain(name)}: expected 3 dims [E, out, in], got {q.shape}", path)
            if n_experts is not None and q.shape[0] != n_experts:
                raise FormatError(f"tensor {plain(name)} holds {q.shape[0]} experts, the metadata says "
                                  f"{n_experts}", path)
            for e in range(q.shape[0]):
                put(f"blk.{m[1]}.ffn_{m[2]}.{e}.weight", q.expert(e), name)
        elif m := _DENSE.match(name):
            put(f"blk.{m[1]}.ffn_{m[2]}.0.weight", q, name)
        elif F32_NAMES.search(name):
            put(name, _as_f32(q, name, path), name)
        else:
            put(name, q, name)
    return out


def load_gguf(path: str | Path) -> Checkpoint:
    path = Path(path)
    gf = parse_gguf(path)  # every count, offset and type checked; duplicates refused
    md = gf.metadata
    args = ModelArgs.from_gguf_metadata(md, path)
    raw = {t.name: tensor_to_qtensor(t, path) for t in gf.tensors}
    if "output.weight" not in raw:
        args.tie_word_embeddings = True
    _check_count(args, raw, path)
    tensors = sanitize(raw, path, args.n_experts)
    tok_keys = {k: v for k, v in md.items() if k.startswith("tokenizer.")}
    tokenizer = TokenizerSource("gguf", path, tok_keys) if "tokenizer.ggml.model" in md else None
    ckpt = Checkpoint("gguf", path, args, tensors, tokenizer, metadata=md, keepalive=[gf])
    _validate(ckpt)
    return ckpt


def _check_count(args: ModelArgs, raw: dict[str, QTensor], path: Path) -> None:
    """The metadata's block_count/expert_count must be possible with the tensors in the file
    (checked arithmetically, before a name list of that size is built)."""
    want = 2 + (0 if args.tie_word_embeddings else 1) + args.n_layers * (6 + args.is_moe + 3 * args.n_ffn)
    have = sum(q.shape[0] if _EXPS.match(n) and q.ndim == 3 else 1 for n, q in raw.items())
    if want > have:
        raise FormatError(f"the metadata implies {want} tensors ({args.n_layers} layers, "
                          f"{args.n_ffn} experts) but the file holds {have}", path)


def _validate(ckpt: Checkpoint) -> None:
    try:
        from mlxtral.formats.detect import validate_tensors
    except ImportError:  # pragma: no cover - during bring-up
        return
    validate_tensors(ckpt)
