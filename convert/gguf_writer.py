"""Streaming GGUF writer for the internal layout (llama.cpp's Mixtral layout, arch ``llama``).

The header (metadata and tensor infos) is written first from shapes and types alone; then the
tensors are converted and written one at a time, merged experts ``ffn_*_exps`` [E, out, in] one
expert after another, so memory holds one source tensor (as float32) and its output, never the
whole model or a whole stacked expert tensor.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlxtral.config import ModelArgs
from mlxtral.display import show
from mlxtral.errors import FormatError, TokenizerError
from mlxtral.formats import Checkpoint, TokenizerSource
from mlxtral.quant.ggml import quantized_shape

from .policy import gguf_file_type, gguf_tensor_type
from .tensors import (
    OutTensor,
    TensorReport,
    check_tensors,
    encode_gguf,
    layer_order,
    release_pages,
    worker_pool,
)

ALIGNMENT = 32
QUANTIZATION_VERSION = 2
# SentencePiece token types as llama.cpp stores them (tokenizer.ggml.token_type)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

Progress = Callable[[int], None]


def plan_gguf(ckpt: Checkpoint, qtype: str) -> list[OutTensor]:
    """Every output tensor with its GGUF name, parts, shape and type, in file order."""
    args = ckpt.args
    plan = []
    for name, parts in layer_order(args):
        src = ckpt.tensors[parts[0]]
        first = tuple(src.shape)
        shape = (len(parts),) + first if name.endswith("_exps.weight") else first
        plan.append(OutTensor(name, parts, shape, gguf_tensor_type(name, first, qtype, src.qtype, args)))
    return plan


def tensor_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}.get(qtype, 1)
    return int(np.prod(quantized_shape(shape, qtype), dtype=np.int64)) * itemsize


# ---- metadata -----------------------------------------------------------------------------

def add_model_metadata(w: Any, args: ModelArgs, qtype: str, name: str) -> None:
    """``general.*`` and ``llama.*`` keys as current llama.cpp writes them for Mixtral."""
    w.add_type("model")
    w.add_name(name)
    w.add_custom_alignment(ALIGNMENT)
    w.add_vocab_size(args.vocab_size)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    if args.head_dim != args.dim // args.n_heads:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_rope_freq_base(float(args.rope_theta))
    w.add_rope_dimension_count(int(args.rope_dim or args.head_dim))
    w.add_layer_norm_rms_eps(float(args.norm_eps))
    if args.is_moe:
        w.add_expert_count(args.n_experts)
        w.add_expert_used_count(args.n_experts_per_tok)
    w.add_file_type(gguf_file_type(qtype))
    w.add_quantization_version(QUANTIZATION_VERSION)


# keys the writer sets itself (add_model_metadata, the writer's alignment)
_WRITTEN_KEYS = ("general.architecture", "general.name", "general.alignment", "general.type",
                 "general.file_type", "general.quantization_version")


def copy_gguf_keys(w: Any, gf: Any, keys: Any, src: Path) -> None:
    """Copy metadata ``keys`` of the parsed GGUF ``gf`` (:class:`~mlxtral.formats.gguf_parse.GGUFFile`)
    into writer ``w`` with their own value types, as llama-quantize copies a source's keys."""
    import gguf

    array = gguf.GGUFValueType.ARRAY
    for key in keys:
        val = gf.metadata[key]
        vtype = gguf.GGUFValueType(gf.value_types[key])
        if vtype == array:
            if not val:  # the writer refuses empty arrays; llama.cpp treats them as absent
                continue
            sub = gguf.GGUFValueType(gf.array_types[key])
            if sub == array:
                raise FormatError(f"metadata key {show(key)}: nested arrays cannot be copied", src)
            w.add_key_value(key, val, vtype, sub)
        else:
            w.add_key_value(key, val, vtype)


def copy_general_keys(w: Any, ckpt: Checkpoint) -> None:
    """A GGUF source's ``general.*`` keys (license, author, base models, tags...) that the writer does
    not set itself, as llama-quantize keeps them; other sources have none to copy."""
    from mlxtral.formats.gguf_parse import ARRAY, GGUFFile

    gf = next((k for k in ckpt.keepalive if isinstance(k, GGUFFile)), None) if ckpt.format == "gguf" else None
    if gf is None:
        return
    keys = [k for k in gf.metadata if k.startswith("general.") and k not in _WRITTEN_KEYS
            and not (gf.value_types[k] == ARRAY and gf.array_types.get(k) == ARRAY)]  # nested: dropped
    copy_gguf_keys(w, gf, keys, ckpt.path)


def read_sentencepiece(path: Path) -> Any:
    """A ``tokenizer.model`` parsed (:class:`spm_proto.SpmModel`); TokenizerError if it is not one."""
    from mlxtral.formats.files import read_side_file  # regular file, size cap, one-line errors

    from .spm_proto import parse_model

    return parse_model(read_side_file(path, TokenizerError), path)


def sentencepiece_vocab(path: Path, vocab_size: int, model: Any = None
                        ) -> tuple[list[bytes], list[float], list[int], dict[str, int]]:
    """tokens, scores, token types and special ids from a SentencePiece ``tokenizer.model``,
    padded with ``[PADi]`` up to ``vocab_size`` (as llama.cpp's converter does)."""
    m = model if model is not None else read_sentencepiece(path)
    n = len(m.pieces)
    if n > vocab_size:
        raise TokenizerError(f"tokenizer has {n} pieces but the model's vocabulary is {vocab_size}", path)
    tokens = m.pieces + [f"[PAD{i}]".encode() for i in range(n, vocab_size)]
    scores = m.scores + [-10000.0] * (vocab_size - n)
    types = m.types + [TT_UNUSED] * (vocab_size - n)
    ids = {"bos": m.bos_id, "eos": m.eos_id, "unk": m.unk_id, "pad": m.pad_id}
    return tokens, scores, types, ids


def _chat_template_from_folder(folder: Path) -> str | None:
    from mlxtral.formats.files import read_side_json  # regular file, size cap, one-line errors

    cfg = folder / "tokenizer_config.json"
    if not cfg.exists():
        return None
    data = read_side_json(cfg, TokenizerError)
    tpl = data.get("chat_template") if isinstance(data, dict) else None
    return tpl if isinstance(tpl, str) else None


VocabWriter = Callable[[Any], None]  # adds the prepared tokenizer keys to a gguf.GGUFWriter


def add_tokenizer(w: Any, tok: TokenizerSource | None, args: ModelArgs) -> None:
    """Embed the tokenizer (see :func:`prepare_tokenizer`)."""
    prepare_tokenizer(tok, args)(w)


def prepare_tokenizer(tok: TokenizerSource | None, args: ModelArgs,
                      source: Path | None = None) -> VocabWriter:
    """Read and check the tokenizer a GGUF output embeds, before any tensor is written: a source
    GGUF's keys (copied), a SentencePiece ``tokenizer.model`` (``llama``) or a byte-level BPE
    ``tokenizer.json`` (``gpt2``). Returns what adds its keys to the writer."""
    if tok is None:
        raise TokenizerError("the source has no tokenizer (need tokenizer.model, tokenizer.json or a GGUF "
                             "vocabulary)", source)
    if tok.kind == "gguf":
        md = tok.metadata
        if not md.get("tokenizer.ggml.tokens"):
            raise TokenizerError("the source GGUF has no tokenizer.ggml.tokens", tok.path)
        return lambda w: copy_gguf_tokenizer(w, md)
    path = tok.path
    if path is not None and path.is_dir():
        folder = path
        path = path / "tokenizer.model"
    else:
        folder = path.parent if path is not None else None
    if (path is None or not path.is_file()) and folder is not None and (folder / "tokenizer.json").is_file():
        from .tokenizer_files import gguf_vocab_from_folder

        bpe = gguf_vocab_from_folder(folder, args.vocab_size)
        return lambda w: copy_gguf_tokenizer(w, bpe)
    if path is None or not path.is_file():
        raise TokenizerError("GGUF output needs a tokenizer beside the weights: a SentencePiece "
                             "tokenizer.model or a byte-level BPE tokenizer.json", tok.path)
    spm = read_sentencepiece(path)
    tokens, scores, types, ids = sentencepiece_vocab(path, args.vocab_size, spm)
    template = tok.metadata.get("tokenizer.chat_template") or (
        _chat_template_from_folder(folder) if folder else None)

    def write(w: Any) -> None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        # the normalizer flags, as llama.cpp's converter writes them (so a tokenizer.model can be
        # rebuilt from the GGUF); llama.cpp's own SPM tokenizer reads add_space_prefix
        w.add_add_space_prefix(bool(spm.add_dummy_prefix))
        w.add_remove_extra_whitespaces(bool(spm.remove_extra_whitespaces))
        if spm.precompiled_charsmap:
            w.add_precompiled_charsmap(spm.precompiled_charsmap)
        w.add_bos_token_id(ids["bos"])
        w.add_eos_token_id(ids["eos"])
        w.add_unk_token_id(ids["unk"])
        if ids["pad"] >= 0:
            w.add_pad_token_id(ids["pad"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        if isinstance(template, str):
            w.add_chat_template(template)

    return write


_TOKENIZER_TYPES = {
    "tokenizer.ggml.scores": "float32",
    "tokenizer.ggml.token_type": "int32",
    "tokenizer.ggml.precompiled_charsmap": "uint8",
}


def copy_gguf_tokenizer(w: Any, md: dict[str, Any]) -> None:
    """Copy ``tokenizer.*`` keys (decoded Python values) with llama.cpp's value types."""
    import gguf

    V = gguf.GGUFValueType
    keys = [k for k in md if k.startswith("tokenizer.")]
    if "tokenizer.ggml.tokens" not in keys:
        raise TokenizerError("the source GGUF has no tokenizer.ggml.tokens")
    for k in keys:
        v = md[k]
        if isinstance(v, list):
            if not v:
                continue
            if k in _TOKENIZER_TYPES:
                sub = {"float32": V.FLOAT32, "int32": V.INT32, "uint8": V.UINT8}[_TOKENIZER_TYPES[k]]
            elif isinstance(v[0], (str, bytes)):
                sub = V.STRING
            elif isinstance(v[0], float):
                sub = V.FLOAT32
            else:
                sub = V.INT32
            w.add_key_value(k, v, V.ARRAY, sub_type=sub)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, (str, bytes)):
            w.add_string(k, v if isinstance(v, str) else v.decode("utf-8"))


# ---- writing ------------------------------------------------------------------------------

def _fast_array(val: Any, sub: Any) -> bytes | None:
    """GGUF array payload (element type, count, items) packed in one go, or None: not handled."""
    import struct

    import gguf

    V = gguf.GGUFValueType
    if sub is None or not isinstance(val, (list, tuple)) or not val:
        return None
    head = struct.pack("<IQ", int(sub), len(val))
    if sub == V.STRING:
        if not all(isinstance(x, (str, bytes)) for x in val):
            return None
        enc = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in val]
        out = bytearray(head)
        for b in enc:
            out += struct.pack("<Q", len(b))
            out += b
        return bytes(out)
    np_type = {V.FLOAT32: "<f4", V.INT32: "<i4", V.UINT32: "<u4", V.UINT8: "u1"}.get(sub)
    if np_type is not None:
        return head + np.asarray(val, dtype=np_type).tobytes()
    return None


def _infer_type(val: Any) -> Any:
    """The element type gguf.GGUFWriter infers for a list (all str/bytes, all float, all int)."""
    import gguf

    V = gguf.GGUFValueType
    if not isinstance(val, (list, tuple)) or not val:
        return None
    for kind, vt in (((str, bytes, bytearray), V.STRING), (float, V.FLOAT32)):
        if all(isinstance(x, kind) for x in val):
            return vt
    if all(isinstance(x, int) and not isinstance(x, bool) for x in val):
        return V.INT32
    return None


@functools.cache
def writer_class() -> type:
    """gguf.GGUFWriter that packs big metadata arrays (a 32000-token vocabulary) in one go
    instead of one ``struct.pack`` call and type check per item (seconds per file); same bytes."""
    import gguf

    class FastArrayWriter(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE:
                if isinstance(val, (bytes, bytearray)) and sub_type in (None, gguf.GGUFValueType.UINT8):
                    val, sub_type = list(val), gguf.GGUFValueType.UINT8  # as gguf packs bytes
                fast = _fast_array(val, sub_type if sub_type is not None else _infer_type(val))
                if fast is not None:
                    return (self._pack("I", vtype) if add_vtype else b"") + fast
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return FastArrayWriter


def model_name(ckpt: Checkpoint) -> str:
    n = ckpt.metadata.get("general.name") if isinstance(ckpt.metadata, dict) else None
    return n if isinstance(n, str) and n else Path(ckpt.path).name.removesuffix(".gguf")


def write_gguf(ckpt: Checkpoint, out: Path, qtype: str, *, name: str | None = None,
               progress: Progress | None = None, vocab: VocabWriter | None = None) -> list[TensorReport]:
    """Write ``ckpt`` to the GGUF file ``out`` (the path is written directly: the caller makes
    it atomic). Returns one report per output tensor. ``vocab``: the tokenizer already prepared
    (:func:`prepare_tokenizer`). On an exception (KeyboardInterrupt, Terminated, OSError...) the
    file is closed without raising, the worker threads are stopped, and the same exception goes on."""
    import gguf

    check_tensors(ckpt.args, ckpt.tensors, str(ckpt.path))
    vocab = vocab or prepare_tokenizer(ckpt.tokenizer, ckpt.args, ckpt.path)
    plan = plan_gguf(ckpt, qtype)
    w = writer_class()(path=None, arch="llama")
    add_model_metadata(w, ckpt.args, qtype, name or model_name(ckpt))
    copy_general_keys(w, ckpt)
    vocab(w)
    for t in plan:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), tensor_nbytes(t.shape, t.qtype),
                          raw_dtype=gguf.GGMLQuantizationType[t.qtype])
    reports: list[TensorReport] = []
    try:
        with worker_pool():
            _write_data(w, ckpt, plan, Path(out), reports, progress)
    except BaseException:
        abort_writer(w)  # close without raising: the exception being handled is the one to report
        raise
    w.close()
    return reports


def abort_writer(w: Any) -> None:
    """Close a gguf.GGUFWriter's files after an error, ignoring errors of their own (flushing the
    buffer onto a full disk again); the caller deletes the file."""
    files, w.fout = w.fout, None
    for f in files or ():
        with contextlib.suppress(OSError):
            f.close()


def _write_data(w: Any, ckpt: Checkpoint, plan: list[OutTensor], out: Path, reports: list[TensorReport],
                progress: Progress | None) -> None:
    w.write_header_to_file(path=Path(out))
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    f = w.fout[0]
    for t in plan:
        f.write(b"\0" * (-f.tell() % ALIGNMENT))
        rep = TensorReport(t.name, t.qtype, t.shape)
        part_bytes = tensor_nbytes(tuple(ckpt.tensors[t.parts[0]].shape), t.qtype)
        for part in t.parts:
            src = ckpt.tensors[part]
            data = encode_gguf(src, t.qtype, rep)
            if data.nbytes != part_bytes:
                raise FormatError(f"{part}: {data.nbytes} bytes encoded, expected {part_bytes}")
            f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            rep.nbytes += data.nbytes
            if progress is not None:
                progress(src.nbytes)
            del data
            release_pages(src.data)
        reports.append(rep)
    f.write(b"\0" * (-f.tell() % ALIGNMENT))
    f.flush()
