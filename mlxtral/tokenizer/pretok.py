"""Pre-tokenizer regexes of byte-level BPE vocabularies, chosen by GGUF ``tokenizer.ggml.pre``.

The expressions are llama.cpp's (``llm_tokenizer_bpe`` in llama-vocab.cpp), applied the same
way: each expression in turn splits every current piece into its matches and the gaps between
them. They need Unicode property classes (``\\p{L}``, ``\\p{N}``): the ``regex`` package
(a runtime dependency) provides them.
"""
from __future__ import annotations

import regex

from mlxtral.errors import TokenizerError

_CONTRACTIONS_CI = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
_UPPERISH = r"((?=[\p{L}])([^a-z]))"
_LOWERISH = r"((?=[\p{L}])([^A-Z]))"
TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+{_CONTRACTIONS_CI}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*{_CONTRACTIONS_CI}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BY_KIND: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [GPT2],
    "llama3": [LLAMA3],
    "qwen2": [QWEN2],
    "smollm": [r"\p{N}", GPT2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
    "poro": [_PORO],
    "viking": [_PORO, r"\p{N}"],
    "tekken": [TEKKEN],
    "gpt4o": [GPT4O],
}

# tokenizer.ggml.pre -> (regex kind, ignore_merges) as in llama.cpp's llama_vocab::load.
_PRE: dict[str, tuple[str, bool]] = {"default": ("default", False)}
for _n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"):
    _PRE[_n] = ("llama3", True)
for _n in ("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"):
    _PRE[_n] = ("llama3", False)
for _n in ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
           "a.x-4.0", "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt",
           "olmo", "jais", "exaone4", "trillion", "granite-docling"):
    _PRE[_n] = ("gpt2", False)
for _n in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"):
    _PRE[_n] = ("smollm", False)
for _n in ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo"):
    _PRE[_n] = ("qwen2", False)
_PRE["falcon"] = ("falcon", False)
for _n in ("poro-chat", "bloom", "gpt3-finnish"):
    _PRE[_n] = ("poro", False)
_PRE["viking"] = ("viking", False)
_PRE["tekken"] = ("tekken", True)
for _n in ("gpt-4o", "llama4", "minimax-m2"):
    _PRE[_n] = ("gpt4o", False)


def known_pre() -> list[str]:
    return sorted(_PRE)


class PreTokenizer:
    """Splits text into the words BPE runs on (before the byte-level mapping)."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = [regex.compile(p) for p in patterns]

    @classmethod
    def for_pre(cls, pre: str | None) -> tuple[PreTokenizer, bool]:
        """The pre-tokenizer and the ``ignore_merges`` flag for a ``tokenizer.ggml.pre`` value."""
        key = (pre or "default").strip().lower()
        if key not in _PRE:
            raise TokenizerError(
                f"unsupported tokenizer.ggml.pre {pre!r} (known: {', '.join(known_pre())})"
            )
        kind, ignore_merges = _PRE[key]
        return cls(_BY_KIND[kind]), ignore_merges

    def split(self, text: str) -> list[str]:
        pieces = [text]
        for pat in self.patterns:
            out: list[str] = []
            for p in pieces:
                pos = 0
                for m in pat.finditer(p):
                    s, e = m.span()
                    if s == e:
                        continue
                    if s > pos:
                        out.append(p[pos:s])
                    out.append(p[s:e])
                    pos = e
                if pos < len(p):
                    out.append(p[pos:])
            pieces = out
        return pieces
