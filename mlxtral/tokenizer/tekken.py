"""Mistral's ``tekken.json`` tokenizers (Mistral NeMo, Pixtral, Mistral Small 3...): tiktoken-style
byte-level BPE, encoded as ``mistral_common``'s ``Tekkenizer`` does.

The file::

    {"config": {"pattern": ..., "default_vocab_size": 131072, "default_num_special_tokens": 1000,
                "version": "v3"},
     "vocab": [{"rank": 0, "token_bytes": "AA==", "token_str": ...}, ...],
     "special_tokens": [{"rank": 0, "token_str": "<unk>", "is_control": true}, ...]}   (optional)

Ids: the special tokens come first (0 to S-1, ``<SPECIAL_i>`` fillers after the listed ones, the
historical list when the file has none); the normal token of rank r is S + r; the vocabulary is
cut at ``default_vocab_size``. Encoding: the file's pattern splits the text (checked and run under
a deadline, :mod:`mlxtral.tokenizer.pretok`), a piece that is a token is that token, else byte
pairs merge by the rank of the token they make. Special tokens written in text stay text unless
asked for (``special=True``), as in ``mistral_common``.

Every value is checked for type and range against the file's own size: one TokenizerError line
naming the file otherwise.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from mlxtral.display import show
from mlxtral.errors import TokenizerError
from mlxtral.formats.files import read_side_json
from mlxtral.tokenizer.base import CONTROL, NORMAL
from mlxtral.tokenizer.bpe import BYTE_TO_UNICODE, ByteLevelBPETokenizer
from mlxtral.tokenizer.pretok import PreTokenizer, compile_file_pattern

# what mistral_common uses for files without a "special_tokens" list (all control tokens)
DEPRECATED_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)
_TRANSLATE = {b: c for b, c in BYTE_TO_UNICODE.items()}


def _int(v: Any, what: str, path: Path, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise TokenizerError(f"{what} must be an integer from {lo} to {hi}, not {show(v, 30)}", path)
    return v


class TekkenTokenizer(ByteLevelBPETokenizer):
    kind = "tekken"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        data = read_side_json(path, TokenizerError)
        if not isinstance(data, dict):
            raise TokenizerError("expected a JSON object", path)
        config, vocab = data.get("config"), data.get("vocab")
        if not isinstance(config, dict):
            raise TokenizerError("'config' must be an object", path)
        if not isinstance(vocab, list):
            raise TokenizerError("'vocab' must be a list", path)
        version = config.get("version")
        if not isinstance(version, str) or not version.startswith("v") or not version[1:].isdigit():
            raise TokenizerError(f"config.version must be a version such as 'v3', not {show(version, 30)}",
                                 path)
        n_special = _int(config.get("default_num_special_tokens"), "config.default_num_special_tokens", path,
                         3, max(1024, len(vocab)))
        size = _int(config.get("default_vocab_size"), "config.default_vocab_size", path, n_special + 256,
                    n_special + len(vocab))
        pattern = compile_file_pattern(config.get("pattern"), 0, path)

        listed = data.get("special_tokens")
        if listed is None:
            specials = list(DEPRECATED_SPECIAL_TOKENS)
        else:
            if not isinstance(listed, list) or len(listed) > n_special:
                raise TokenizerError(f"'special_tokens' must be a list of at most {n_special} tokens", path)
            specials = []
            for k, t in enumerate(listed):
                ok = isinstance(t, dict) and t.get("rank") == k and isinstance(t.get("token_str"), str)
                if not ok or not t["token_str"]:
                    raise TokenizerError(f"special_tokens[{k}] must be {{'rank': {k}, 'token_str': ...}}, "
                                         f"not {show(t, 60)}", path)
                specials.append(t["token_str"])
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), n_special)]
        if len(set(specials)) != n_special:
            raise TokenizerError("the special tokens are not all different", path)

        tokens = list(specials)
        ranks: dict[str, int] = {}
        for r in range(size - n_special):
            t = vocab[r]
            if not isinstance(t, dict) or t.get("rank") != r or not isinstance(t.get("token_bytes"), str):
                raise TokenizerError(f"vocab[{r}] must be {{'rank': {r}, 'token_bytes': base64}}, not "
                                     f"{show(t, 60)}", path)
            try:
                raw = base64.b64decode(t["token_bytes"], validate=True)
            except (binascii.Error, ValueError):
                raise TokenizerError(f"vocab[{r}].token_bytes is not base64", path) from None
            if not raw or (r < 256 and raw != bytes([r])):
                raise TokenizerError(f"vocab[{r}] must be the byte {r:#04x}" if r < 256 else
                                     f"vocab[{r}] is empty", path)
            text = raw.decode("latin-1").translate(_TRANSLATE)
            tokens.append(text)
            ranks[text] = r
        types = [CONTROL] * n_special + [NORMAL] * (size - n_special)
        super().__init__(tokens, [], PreTokenizer([pattern], str(path)), token_types=types,
                         bos_id=specials.index("<s>") if "<s>" in specials else None,
                         eos_id=specials.index("</s>") if "</s>" in specials else None, add_bos=True,
                         ignore_merges=True, vocab_ranks=ranks)
        self._ids.update({t: i for i, t in enumerate(specials)})  # "<s>" the control token, not the text
        self.eos_ids = self._eot_ids()
        self.instruct_version = version
        self.source = str(path)
        self.path = path
