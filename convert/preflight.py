"""What a conversion checks before its long work starts (and before its progress bar): the output's
tensors are all there with their shapes; every source tensor's type is one we can read; no tensor is
requantized unless asked for; the tokenizer can be written in the output format. Each problem is
one line naming the file, found in seconds instead of after the work it would have wasted.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlxtral.errors import FormatError, TokenizerError, UsageError
from mlxtral.formats import Checkpoint
from mlxtral.qtensor import AffineTensor, QTensor, Tensor

from .policy import Precision, gguf_tensor_type, is_f32_tensor, mlx_quantizes, requantized
from .tensors import check_tensors, layer_order

__all__ = ["Preflight", "preflight", "check_readable", "check_requantize", "output_types"]

_EXAMPLES = 3  # tensors named in a message


@dataclass
class Preflight:
    """What the checks prepared for the writers."""

    vocab: Callable[[Any], None] | None = None  # GGUF output: adds the tokenizer keys, read and checked


def _readable(qtype: str, sample: np.ndarray) -> bool:
    """Whether ``qtype`` blocks can be dequantized: one block of the tensor is tried."""
    import gguf

    from mlxtral.quant import dequantize_blocks

    try:
        bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        dequantize_blocks(np.ascontiguousarray(sample.reshape(-1)[:ts]), qtype, (bs,))
    except (NotImplementedError, KeyError, ValueError, TypeError, IndexError, AttributeError):
        return False
    return True


def check_readable(ckpt: Checkpoint) -> None:
    """Every tensor a conversion reads is of a type we can dequantize (Q8_K, the IQ and TQ types
    ... are not): :class:`FormatError` naming the tensor and its type otherwise."""
    known: dict[str, bool] = {}
    for out_name, parts in layer_order(ckpt.args):
        for part in parts:
            t = ckpt.tensors.get(part)
            if not isinstance(t, QTensor) or not t.is_quantized:
                continue  # float tensors and MLX affine codes: always readable
            ok = known.get(t.qtype)
            if ok is None:
                ok = known[t.qtype] = _readable(t.qtype, np.asarray(t.data))
            if not ok:
                which = out_name if len(parts) == 1 else f"{out_name} ({part})"
                raise FormatError(f"tensor {which} is of type {t.qtype}, which mlxtral cannot dequantize; "
                                  "convert from a file of another type (F16, BF16, F32, Q8_0, Q4_K...)",
                                  ckpt.path)


def _mlx_type(name: str, shape: tuple[int, ...], prec: Precision, group_size: int) -> str:
    if prec.bits is not None and mlx_quantizes(name, shape, group_size):
        return f"affine{prec.bits}/g{group_size}"
    return "float32" if is_f32_tensor(name, len(shape)) else prec.float_dtype


def output_types(ckpt: Checkpoint, fmt: str, prec: Precision, group_size: int
                 ) -> Iterator[tuple[str, str, Tensor, str]]:
    """(output name, internal part, source tensor, output type) for every tensor written."""
    for name, parts in layer_order(ckpt.args):
        first = ckpt.tensors[parts[0]]
        shape = tuple(first.shape)
        if fmt == "gguf":
            out = gguf_tensor_type(name, shape, prec.qtype, first.qtype, ckpt.args)
        else:
            out = _mlx_type(name, shape, prec, group_size)
        for part in parts:
            yield name, part, ckpt.tensors[part], out


def _requantized(ckpt: Checkpoint, fmt: str, prec: Precision, group_size: int
                 ) -> tuple[int, dict[tuple[str, str], list[str]]]:
    """(tensors requantized, {(source type, output type): a few output names})."""
    hits: dict[tuple[str, str], list[str]] = {}
    count = 0
    for name, _part, src, out in output_types(ckpt, fmt, prec, group_size):
        if requantized(src.qtype, out):
            count += 1
            names = hits.setdefault((src.qtype, out), [])
            if len(names) < _EXAMPLES and name not in names:
                names.append(name)
    return count, hits


def _lossless_choices(ckpt: Checkpoint, fmt: str, group_size: int) -> list[str]:
    """The quantized precisions (flags) that would copy every quantized tensor as it is."""
    from .policy import parse_precision

    out = []
    groups = (group_size,) if fmt == "gguf" else tuple(dict.fromkeys((group_size, 32, 64, 128)))
    for key in ("q4", "q4_1", "q5_0", "q5_1", "q8"):
        if fmt == "mlx" and key in ("q4_1", "q5_0", "q5_1"):
            continue
        for gs in groups:
            if _requantized(ckpt, fmt, parse_precision(key, fmt), gs)[0] == 0:
                out.append(f"--{key}" + (f" --group-size {gs}" if fmt == "mlx" and gs != group_size else ""))
                break
    return out


def check_requantize(ckpt: Checkpoint, fmt: str, prec: Precision, group_size: int, allow: bool) -> None:
    """Refuse, unless ``allow``, to quantize a tensor that is already quantized into another type
    (llama-quantize's ``--allow-requantize``): one line with the file, the types and the ways out."""
    if allow:
        return
    count, hits = _requantized(ckpt, fmt, prec, group_size)
    if not count:
        return
    pairs = sorted(hits)
    kinds = ", ".join(f"{a} -> {b}" for a, b in pairs[:_EXAMPLES])
    kinds += ", ..." if len(pairs) > _EXAMPLES else ""
    ways = ["--allow-requantize to accept that"]
    keep = _lossless_choices(ckpt, fmt, group_size)
    if keep:
        ways.append(f"{' or '.join(keep)} to copy the quantized blocks as they are")
    ways.append("--f16/--f32 to dequantize")
    what = "tensors are" if count != 1 else "tensor is"
    ways_text = f"{', '.join(ways[:-1])}, or {ways[-1]}"
    raise UsageError(f"{count} {what} already quantized and would be quantized again ({kinds}; e.g. "
                     f"{hits[pairs[0]][0]}), adding error to error; pass {ways_text}", ckpt.path)


def check_mlx_tokenizer(ckpt: Checkpoint) -> None:
    """The tokenizer files an MLX output needs can be written (what ``copy_tokenizer`` would refuse)."""
    tok = ckpt.tokenizer
    if tok is not None and tok.kind == "gguf":
        from .tokenizer_files import check_piece_lengths, spm_model_from_gguf, tokenizer_json_from_gguf

        model = tok.metadata.get("tokenizer.ggml.model")
        kind = model.decode("utf-8", "replace") if isinstance(model, bytes) else model
        try:
            if kind == "llama":
                check_piece_lengths(spm_model_from_gguf(tok.metadata))
            elif kind == "gpt2":
                tokenizer_json_from_gguf(tok.metadata)
            else:
                raise TokenizerError(f"cannot write tokenizer files for a {str(kind)[:40]!r} GGUF vocabulary "
                                     "(only llama/SentencePiece and gpt2/byte-level BPE)")
        except TokenizerError as e:
            raise TokenizerError(e.message, e.path or ckpt.path) from None
        return
    if tok is None or tok.path is None:
        raise TokenizerError("MLX output needs the tokenizer files (tokenizer.model / tokenizer.json) "
                             "beside the weights", ckpt.path)
    folder = tok.path if tok.path.is_dir() else tok.path.parent
    names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    if not tok.path.is_file() and not any((folder / n).is_file() for n in names):
        raise TokenizerError("no tokenizer files found", folder)
    model = folder / "tokenizer.model"
    if model.is_file() and not (folder / "tokenizer.json").is_file():  # one is written from it
        from mlxtral.formats.files import read_side_file

        from .spm_proto import parse_model
        from .tokenizer_files import check_piece_lengths

        try:
            check_piece_lengths(parse_model(read_side_file(model, TokenizerError), model))
        except TokenizerError as e:
            raise TokenizerError(e.message, e.path or model) from None


def check_address_space(ckpt: Checkpoint) -> None:
    """Under ``ulimit -v`` (the source is mapped already): room for the largest tensor as float32
    three times over (source rows, output, error terms) and the worker threads' stacks."""
    from mlxtral import address_space

    from .tensors import convert_threads

    biggest = max((int(np.prod(t.shape, dtype=np.int64)) for t in ckpt.tensors.values()), default=0)
    need = 3 * 4 * biggest + convert_threads() * 8 * address_space.MB + address_space.WORKING
    try:
        address_space.check_room(need)
    except address_space.AddressSpaceError as e:
        raise address_space.AddressSpaceError(e.message, ckpt.path) from None


def preflight(ckpt: Checkpoint, fmt: str, prec: Precision, group_size: int,
              allow_requantize: bool = False) -> Preflight:
    """Every check a conversion of ``ckpt`` to ``fmt`` can make before it writes a tensor."""
    check_tensors(ckpt.args, ckpt.tensors, str(ckpt.path))
    check_readable(ckpt)
    check_requantize(ckpt, fmt, prec, group_size, allow_requantize)
    check_address_space(ckpt)
    if fmt == "gguf":
        from .gguf_writer import prepare_tokenizer

        return Preflight(vocab=prepare_tokenizer(ckpt.tokenizer, ckpt.args, ckpt.path))
    check_mlx_tokenizer(ckpt)
    return Preflight()


def same_affine(t: Tensor, bits: int | None, group_size: int) -> bool:
    """An MLX affine source tensor already in the output's quantization (its codes, scales and
    biases are copied, not requantized)."""
    return isinstance(t, AffineTensor) and t.bits == bits and t.group_size == group_size
