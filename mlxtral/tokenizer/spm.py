"""SentencePiece ``tokenizer.model`` files through the ``sentencepiece`` package."""
from __future__ import annotations

from pathlib import Path

from mlxtral.errors import TokenizerError
from mlxtral.tokenizer.base import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, Tokenizer, clean_text
from mlxtral.tokenizer.special import SpecialSplitter


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Mistral / Mixtral / Llama 2: BPE with byte fallback)."""

    kind = "sentencepiece"
    strip_leading_space = True

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError("tokenizer file not found", self.path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"not a SentencePiece model ({str(e).splitlines()[0]})", self.path) from e
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
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
                t, b = BYTE, bytes([int(p[3:5], 16)])
            elif sp.is_unused(i):
                t, b = UNUSED, b""
            else:
                t, b = NORMAL, p.replace("\u2581", " ").encode("utf-8")
            self._types.append(t)
            self._bytes.append(b)
        specials = [(p, i) for i, p in enumerate(self._pieces) if self._types[i] in (CONTROL, UNKNOWN)]
        self._splitter = SpecialSplitter([], specials)
        self.eos_ids = self._eot_ids()

    def encode(self, text: str, bos: bool = False, special: bool = False) -> list[int]:
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        for frag in self._splitter.split(clean_text(text), special):
            if isinstance(frag, int):
                ids.append(frag)
            else:
                ids.extend(self.sp.encode(frag))
        return ids

    def id_to_piece(self, i: int) -> str:
        self._check_id(i)
        return self._pieces[i]

    def token_to_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def token_type(self, i: int) -> int:
        return self._types[i]

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]
