"""Tokenizers of Hugging Face folders: ``tokenizer.model`` (SentencePiece) or a byte-level BPE
``tokenizer.json``, plus ``tokenizer_config.json`` (special tokens, chat template)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlxtral.errors import TokenizerError
from mlxtral.tokenizer.base import CONTROL, NORMAL, UNUSED, USER_DEFINED, Tokenizer


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read JSON ({e})", path) from e


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


def load_hf_tokenizer(folder: str | Path) -> Tokenizer:
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError("not a folder", folder)
    cfg_path = folder / "tokenizer_config.json"
    config: dict[str, Any] = _read_json(cfg_path) if cfg_path.is_file() else {}
    template = _chat_template(folder, config)
    if (folder / "tokenizer.model").is_file():
        from mlxtral.tokenizer.spm import SentencePieceTokenizer

        tok = SentencePieceTokenizer(folder / "tokenizer.model", chat_template=template)
        if isinstance(config.get("add_bos_token"), bool):
            tok.add_bos = config["add_bos_token"] and tok.bos_id is not None
        return tok
    if (folder / "tokenizer.json").is_file():
        return _bpe_from_tokenizer_json(folder / "tokenizer.json", config, template)
    raise TokenizerError("no tokenizer.model or tokenizer.json in this folder", folder)


def _pre_patterns(node: Any, path: Path) -> list[str]:
    """tokenizer.json ``pre_tokenizer`` -> regexes applied in turn (see pretok.PreTokenizer)."""
    import regex

    from mlxtral.tokenizer.pretok import GPT2

    if node is None:
        return []
    kind = node.get("type")
    if kind == "Sequence":
        return [p for sub in node.get("pretokenizers", []) for p in _pre_patterns(sub, path)]
    if kind == "ByteLevel":
        if node.get("add_prefix_space"):
            raise TokenizerError("ByteLevel pre-tokenizer with add_prefix_space is not supported", path)
        return [GPT2] if node.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}" if node.get("individual_digits") else r"\p{N}+"]
    if kind == "Split":
        pat = node.get("pattern", {})
        if node.get("behavior") != "Isolated" or node.get("invert"):
            behavior = node.get("behavior")
            raise TokenizerError(f"Split pre-tokenizer with behavior {behavior!r} is not supported", path)
        if "Regex" in pat:
            return [pat["Regex"]]
        if "String" in pat:
            return [regex.escape(pat["String"])]
    raise TokenizerError(f"pre-tokenizer {kind!r} is not supported (byte-level BPE only)", path)


def _bpe_from_tokenizer_json(path: Path, config: dict[str, Any], template: str | None) -> Tokenizer:
    from mlxtral.tokenizer.bpe import ByteLevelBPETokenizer
    from mlxtral.tokenizer.pretok import PreTokenizer

    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"model type {model.get('type')!r} is not supported (only BPE)", path)
    if data.get("normalizer") is not None or model.get("byte_fallback"):
        raise TokenizerError(
            "a SentencePiece-style tokenizer.json (normalizer / byte fallback) needs its tokenizer.model "
            "beside it; only byte-level BPE tokenizer.json files are read on their own",
            path,
        )
    decoder = data.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise TokenizerError("only byte-level BPE tokenizer.json is supported (no ByteLevel decoder)", path)
    patterns = _pre_patterns(data.get("pre_tokenizer"), path)

    by_id: dict[int, tuple[str, int]] = {int(i): (t, NORMAL) for t, i in model["vocab"].items()}
    for a in data.get("added_tokens") or []:
        by_id[int(a["id"])] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    n = max(by_id) + 1
    tokens = [by_id.get(i, ("", UNUSED))[0] for i in range(n)]
    types = [by_id.get(i, ("", UNUSED))[1] for i in range(n)]
    ids = {t: i for i, t in enumerate(tokens) if t}

    def special(name: str) -> int | None:
        text = _token_text(config.get(name))
        return ids.get(text) if text else None

    return ByteLevelBPETokenizer(
        tokens,
        model.get("merges") or [],
        PreTokenizer(patterns),
        token_types=types,
        bos_id=special("bos_token"),
        eos_id=special("eos_token"),
        add_bos=bool(config.get("add_bos_token", False)),
        ignore_merges=bool(model.get("ignore_merges", False)),
        chat_template=template,
    )
