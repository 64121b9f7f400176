"""SentencePiece ``tokenizer.model`` files (a ``ModelProto`` protobuf), read and written by hand.

The protobuf wire format is small enough to code directly, which spares a ``protobuf``
dependency (``sentencepiece_model_pb2`` needs it). Field numbers follow sentencepiece's
``sentencepiece_model.proto``:

- ``ModelProto``: pieces = 1 (repeated ``SentencePiece``), trainer_spec = 2, normalizer_spec = 3,
  denormalizer_spec = 5.
- ``SentencePiece``: piece = 1 (string), score = 2 (float), type = 3 (enum: NORMAL 1, UNKNOWN 2,
  CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6: the numbers llama.cpp stores in
  ``tokenizer.ggml.token_type``).
- ``TrainerSpec``: model_type = 3 (UNIGRAM 1, BPE 2), vocab_size = 4, byte_fallback = 35,
  unk_id = 40, bos_id = 41, eos_id = 42, pad_id = 43, unk/bos/eos/pad_piece = 45/46/47/48.
- ``NormalizerSpec``: name = 1, precompiled_charsmap = 2, add_dummy_prefix = 3,
  remove_extra_whitespaces = 4, escape_whitespaces = 5.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from mlxtral.display import term_safe
from mlxtral.errors import TokenizerError

__all__ = ["SpmModel", "parse_model", "build_model", "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED",
           "UNUSED", "BYTE"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


# ---- wire format ----------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 are sent as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(fno: int, wt: int) -> bytes:
    return _varint(fno << 3 | wt)


def _len_field(fno: int, payload: bytes) -> bytes:
    return _key(fno, _LEN) + _varint(len(payload)) + payload


def _int_field(fno: int, v: int) -> bytes:
    return _key(fno, _VARINT) + _varint(int(v))


def _float_field(fno: int, v: float) -> bytes:
    return _key(fno, _I32) + struct.pack("<f", v)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one message; length-delimited values as bytes."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    end = len(buf)
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos)
        fno, wt = key >> 3, key & 7
        if wt == _LEN and pos + 1 < end and buf[pos] < 0x80:  # short message/string: fast path
            n = buf[pos]
            if pos + 1 + n > end:
                raise ValueError("truncated field")
            out.append((fno, wt, buf[pos + 1 : pos + 1 + n]))
            pos += 1 + n
            continue
        val: int | bytes
        if wt == _VARINT:
            val, pos = _read_varint(buf, pos)
        elif wt == _I64:
            val, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wt == _LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            val, pos = bytes(buf[pos : pos + n]), pos + n
        elif wt == _I32:
            val, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"wire type {wt}")
        out.append((fno, wt, val))
    if pos != len(buf):
        raise ValueError("truncated message")
    return out


def _parse_piece(b: bytes) -> tuple[bytes, float, int]:
    """One ``SentencePiece`` message; the usual layout (piece, score, type) on a fast path."""
    if len(b) > 1 and b[0] == 0x0A and b[1] < 0x80:
        end = 2 + b[1]
        if len(b) >= end + 5 and b[end] == 0x15:
            score = struct.unpack_from("<f", b, end + 1)[0]
            rest = end + 5
            if rest == len(b):
                return b[2:end], score, NORMAL
            if len(b) == rest + 2 and b[rest] == 0x18 and b[rest + 1] < 0x80:
                return b[2:end], score, b[rest + 1]
    piece, score, typ = b"", 0.0, NORMAL
    for fno, wt, v in _fields(b):
        if fno == 1 and wt == _LEN:
            piece = bytes(v)  # type: ignore[arg-type]
        elif fno == 2 and wt == _I32:
            score = struct.unpack("<f", int(v).to_bytes(4, "little"))[0]  # type: ignore[arg-type]
        elif fno == 3 and wt == _VARINT:
            typ = int(v)  # type: ignore[arg-type]
    return piece, score, typ


def _int32(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


# ---- model ----------------------------------------------------------------------------------

@dataclass
class SpmModel:
    """The parts of a ``ModelProto`` a GGUF vocabulary carries (and the flags it needs)."""

    pieces: list[bytes]
    scores: list[float]
    types: list[int]
    model_type: int = BPE
    byte_fallback: bool = True
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = False
    escape_whitespaces: bool = True
    normalizer_name: str = "identity"
    precompiled_charsmap: bytes = b""
    extra: dict[str, object] = field(default_factory=dict)


def parse_model(data: bytes, where: object = None) -> SpmModel:
    """Decode a ``tokenizer.model`` (pieces, ids, normalizer flags); raises TokenizerError."""
    try:
        top = _fields(data)
        # proto2 defaults apply to absent fields (a trainer's file often leaves them out)
        m = SpmModel([], [], [], model_type=UNIGRAM, byte_fallback=False, remove_extra_whitespaces=True)
        seen_pieces = False
        for fno, wt, val in top:
            if fno == 1 and wt == _LEN:
                assert isinstance(val, bytes)
                piece, score, typ = _parse_piece(val)
                m.pieces.append(piece)
                m.scores.append(score)
                m.types.append(typ)
                seen_pieces = True
            elif fno == 2 and wt == _LEN:
                for f2, _w2, v2 in _fields(val):  # type: ignore[arg-type]
                    if f2 == 3:
                        m.model_type = int(v2)  # type: ignore[arg-type]
                    elif f2 == 35:
                        m.byte_fallback = bool(v2)
                    elif f2 in (40, 41, 42, 43):
                        setattr(m, {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}[f2],
                                _int32(int(v2)))  # type: ignore[arg-type]
            elif fno == 3 and wt == _LEN:
                for f2, _w2, v2 in _fields(val):  # type: ignore[arg-type]
                    if f2 == 1:
                        m.normalizer_name = bytes(v2).decode("utf-8")  # type: ignore[arg-type]
                    elif f2 == 2:
                        m.precompiled_charsmap = bytes(v2)  # type: ignore[arg-type]
                    elif f2 == 3:
                        m.add_dummy_prefix = bool(v2)
                    elif f2 == 4:
                        m.remove_extra_whitespaces = bool(v2)
                    elif f2 == 5:
                        m.escape_whitespaces = bool(v2)
    except (ValueError, TypeError, struct.error, UnicodeDecodeError, AssertionError) as e:
        raise TokenizerError(f"not a SentencePiece model ({term_safe(str(e), 100)})", where) from None
    if not seen_pieces:
        raise TokenizerError("not a SentencePiece model (no pieces)", where)
    return m


def build_model(m: SpmModel) -> bytes:
    """Encode ``m`` as a ``tokenizer.model`` that ``sentencepiece`` loads."""
    out = bytearray()
    for piece, score, typ in zip(m.pieces, m.scores, m.types, strict=True):
        body = _len_field(1, piece) + _float_field(2, float(score))
        if typ != NORMAL:
            body += _int_field(3, typ)
        out += _len_field(1, body)

    def piece_of(i: int) -> bytes:
        return m.pieces[i] if 0 <= i < len(m.pieces) else b""

    trainer = (_int_field(3, m.model_type) + _int_field(4, len(m.pieces))
               + _int_field(35, int(m.byte_fallback))
               + _int_field(40, m.unk_id) + _int_field(41, m.bos_id) + _int_field(42, m.eos_id)
               + _int_field(43, m.pad_id))
    for fno, i in ((45, m.unk_id), (46, m.bos_id), (47, m.eos_id), (48, m.pad_id)):
        if piece_of(i):
            trainer += _len_field(fno, piece_of(i))
    out += _len_field(2, trainer)
    norm = (_len_field(1, m.normalizer_name.encode("utf-8"))
            + (_len_field(2, m.precompiled_charsmap) if m.precompiled_charsmap else b"")
            + _int_field(3, int(m.add_dummy_prefix)) + _int_field(4, int(m.remove_extra_whitespaces))
            + _int_field(5, int(m.escape_whitespaces)))
    out += _len_field(3, norm)
    return bytes(out)
