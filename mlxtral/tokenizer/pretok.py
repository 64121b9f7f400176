"""Pre-tokenizer regexes of byte-level BPE vocabularies, chosen by GGUF ``tokenizer.ggml.pre``.

The expressions are llama.cpp's (``llm_tokenizer_bpe`` in llama-vocab.cpp), applied the same
way: each expression in turn splits every current piece into its matches and the gaps between
them. They need Unicode property classes (``\\p{L}``, ``\\p{N}``): the ``regex`` package
(a runtime dependency) provides them.

A ``tokenizer.json`` brings its own expressions, so a file decides what the regex engine runs:

- before compiling, :func:`check_pattern` refuses what could make compiling itself explode
  (nested counted repeats such as ``((a{1000}){1000}){1000}`` expand to gigabytes), fuzzy
  matching, and patterns longer or deeper than any real pre-tokenizer's;
- every split of a text (built-in expressions included) runs under one deadline proportionate to
  the text's length (:data:`REGEX_SECONDS` + :data:`REGEX_SECONDS_PER_CHAR` per character): a
  pattern that backtracks catastrophically (``(a|a)+$``) stops with one :class:`TokenizerError`
  line instead of running for years.
"""
from __future__ import annotations

import time

import regex

from mlxtral.errors import TokenizerError

REGEX_SECONDS = 2.0  # fixed part of a split's time budget
REGEX_SECONDS_PER_CHAR = 2e-5  # 50,000 characters a second at least: real expressions do 100x more
MAX_PATTERNS = 16  # expressions applied in turn (real pre-tokenizers have 1 to 4)
MAX_PATTERN_LEN = 4096  # characters of one expression (real ones are under 300)
MAX_GROUP_DEPTH = 16  # nesting of groups
MAX_REPEAT_PRODUCT = 10_000  # product of every counted repeat's bound ({1,3} counts 3)

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


def _show(pattern: str) -> str:
    from mlxtral.display import show

    return show(pattern, 60)


_CALL = regex.compile(r"\(\?(?:R|[+-]?\d|&|P>)")  # a group called as a subroutine (recursion)


def check_pattern(pattern: str) -> str | None:
    """Why ``pattern`` (from a file) is not compiled, or None if it may be.

    A linear scan: length, group depth, the product of counted repeats (``{m,n}``; an
    over-estimate for repeats side by side, exact for nested ones), and ``{...}`` forms that are
    not counts (``regex``'s fuzzy matching ``{e<=3}``) outside character classes."""
    if len(pattern) > MAX_PATTERN_LEN:
        return f"it is {len(pattern)} characters long (at most {MAX_PATTERN_LEN})"
    depth = 0
    product = 1
    in_class = 0
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 2 < n and pattern[i + 1] in "pPNxgku" and pattern[i + 2] == "{":
                end = pattern.find("}", i + 3)  # \p{L}, \N{name}, \x{263a}: a name, not a count
                i = end + 1 if end > 0 else n
            else:
                i += 2
            continue
        if in_class:
            if c == "[":
                in_class += 1  # nested sets (regex's V1 set operations)
            elif c == "]":
                in_class -= 1
            i += 1
            continue
        if c == "[":
            in_class = 1
            i += 1
            if i < n and pattern[i] == "^":
                i += 1
            if i < n and pattern[i] == "]":
                i += 1  # a leading ] is a literal
            continue
        if c == "(":
            depth += 1
            if depth > MAX_GROUP_DEPTH:
                return f"its groups nest deeper than {MAX_GROUP_DEPTH}"
            if _CALL.match(pattern, i):  # (?R), (?1), (?-1), (?&name), (?P>name): recursion
                return f"it calls a group as a subroutine (at character {i}): no tokenizer needs that"
        elif c == ")":
            depth = max(depth - 1, 0)
        elif c == "{":
            end = pattern.find("}", i)
            body = pattern[i + 1 : end] if end > 0 else ""
            lo, comma, hi = body.partition(",")
            if end < 0 or not (lo.isdigit() or (comma and not lo)) or (hi and not hi.isdigit()):
                return f"it has a {{...}} that is not a repeat count (at character {i})"
            bound = int(hi) if hi else (int(lo) if lo else 0)
            if comma and not hi:
                bound = max(bound, 1)  # {m,}: the open end adds nothing to what compiling builds
            if len(str(bound)) > 6:
                return f"it repeats {{{body[:20]}}} times"
            product *= max(bound, 1)
            if product > MAX_REPEAT_PRODUCT:
                return f"its counted repeats multiply to more than {MAX_REPEAT_PRODUCT}"
            i = end + 1
            continue
        i += 1
    return None


def compile_file_pattern(pattern: str, k: int, path: object = None) -> regex.Pattern[str]:
    """A pre-tokenizer expression read from a file, checked then compiled; TokenizerError naming
    the file (``path``) and the expression (number ``k``) otherwise."""
    if not isinstance(pattern, str):
        raise TokenizerError(f"pre-tokenizer expression {k} is not a string", path)
    why = check_pattern(pattern)
    if why is None:
        try:
            return regex.compile(pattern)
        except (regex.error, OverflowError, RecursionError, ValueError) as e:
            why = f"it does not compile ({' '.join(str(e).split())[:100]})"
    raise TokenizerError(f"pre-tokenizer expression {k} {_show(pattern)} is refused: {why}", path)


class PreTokenizer:
    """Splits text into the words BPE runs on (before the byte-level mapping).

    ``patterns``: expressions (strings are compiled as they are: built-in ones) or compiled
    patterns (from :func:`compile_file_pattern`); ``source``: the file they come from, for errors."""

    def __init__(self, patterns: list[str] | list[regex.Pattern[str]], source: object = None) -> None:
        if len(patterns) > MAX_PATTERNS:
            raise TokenizerError(f"{len(patterns)} pre-tokenizer expressions (at most {MAX_PATTERNS})",
                                 source)
        self.patterns = [regex.compile(p) if isinstance(p, str) else p for p in patterns]
        self.source = source

    @classmethod
    def for_pre(cls, pre: str | None) -> tuple[PreTokenizer, bool]:
        """The pre-tokenizer and the ``ignore_merges`` flag for a ``tokenizer.ggml.pre`` value."""
        key = (pre or "default").strip().lower()
        if key not in _PRE:
            raise TokenizerError(
                f"unsupported tokenizer.ggml.pre {_show(pre)} (known: {', '.join(known_pre())})"
            )
        kind, ignore_merges = _PRE[key]
        return cls(_BY_KIND[kind]), ignore_merges

    def split(self, text: str) -> list[str]:
        budget = REGEX_SECONDS + REGEX_SECONDS_PER_CHAR * len(text)
        deadline = time.monotonic() + budget
        pieces = [text]
        for k, pat in enumerate(self.patterns):
            out: list[str] = []
            try:
                for p in pieces:
                    pos = 0
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    for m in pat.finditer(p, timeout=left):
                        s, e = m.span()
                        if s == e:
                            continue
                        if s > pos:
                            out.append(p[pos:s])
                        out.append(p[s:e])
                        pos = e
                    if pos < len(p):
                        out.append(p[pos:])
            except TimeoutError:
                raise TokenizerError(
                    f"pre-tokenizer expression {k} {_show(pat.pattern)} took more than {budget:.1f} s on a "
                    f"{len(text)}-character text (catastrophic backtracking): refusing it", self.source
                ) from None
            pieces = out
        return pieces
