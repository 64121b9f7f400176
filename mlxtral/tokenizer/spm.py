"""SentencePiece ``tokenizer.model`` files through the ``sentencepiece`` package."""
from __future__ import annotations

from pathlib import Path

from mlxtral.display import show, term_safe
from mlxtral.errors import TokenizerError
from mlxtral.tokenizer.base import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer, byte_value
from mlxtral.tokenizer.special import SpecialSplitter


def _user_defined_ids(data: bytes, path: Path) -> set[int]:
    """Ids of the USER_DEFINED pieces (``sentencepiece`` does not tell them from normal ones)."""
    from mlxtral.convert.spm_proto import USER_DEFINED as UD
    from mlxtral.convert.spm_proto import parse_model

    m = parse_model(data, path)
    return {i for i, t in enumerate(m.types) if t == UD}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Mistral / Mixtral / Llama 2: BPE with byte fallback)."""

    kind = "sentencepiece"
    strip_leading_space = True

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
        import sentencepiece as spm

        from mlxtral.formats.files import read_side_file

        self.path = Path(path)
        self.source = str(self.path)
        data = read_side_file(self.path, TokenizerError)  # a regular file, at most 64 MB
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise TokenizerError(f"not a SentencePiece model ({term_safe(first, 100)})", self.path) from None
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        if not self.vocab_size:
            raise TokenizerError("empty vocabulary", self.path)
        user_defined = _user_defined_ids(data, self.path)
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None
        self.chat_template = chat_template
        self._pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._ids = {p: i for i, p in enumerate(self._pieces)}
        self._types: list[int] = []
        self._bytes: list[bytes] = []
        for i, p in enumerate(self._pieces):
            if sp.is_unknown(i):
                t, b = UNKNOWN, sp.decode([i]).encode("utf-8")  # " ⁇ ", as sentencepiece renders it
            elif sp.is_control(i):
                t, b = CONTROL, p.encode("utf-8")
            elif sp.is_byte(i):
                v = byte_value(p)
                if v is None:
                    raise TokenizerError(f"piece {i} is a byte piece but its text {show(p, 40)} is not "
                                         "<0xHH>", self.path)
                t, b = BYTE, bytes([v])
            elif sp.is_unused(i):
                t, b = UNUSED, b""
            else:
                t = USER_DEFINED if i in user_defined else NORMAL
                b = p.replace("\u2581", " ").encode("utf-8")
            self._types.append(t)
            self._bytes.append(b)
        self._user_defined = user_defined
        self._byte_ids = [self._ids.get(f"<0x{v:02X}>") for v in range(256)]
        self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        specials = [(p, i) for i, p in enumerate(self._pieces) if self._types[i] in (CONTROL, UNKNOWN)]
        self._splitter = SpecialSplitter([], specials)  # sentencepiece matches user-defined pieces itself
        self.eos_ids = self._eot_ids()

    def _encode_fragment(self, text: str, out: list[int], plain: bool) -> None:
        ids = self.sp.encode(text)
        if not plain or not self._user_defined:
            out.extend(ids)
            return
        # sentencepiece always matches user-defined pieces in text: as plain text, such a piece
        # becomes the byte tokens of its text (<unk> for a byte without one)
        for i in ids:
            if i not in self._user_defined:
                out.append(i)
                continue
            for v in self._bytes[i]:
                j = self._byte_ids[v]
                if j is None:
                    j = self.unk_id
                if j is not None:
                    out.append(j)

    def id_to_piece(self, i: int) -> str:
        self._check_id(i)
        return self._pieces[i]

    def token_to_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def token_type(self, i: int) -> int:
        return self._types[i]

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]
