"""Tokenizers of Hugging Face folders: ``tokenizer.model`` (SentencePiece) or a ``tokenizer.json``
(byte-level BPE; or SentencePiece-style: BPE merges by rank over characters with byte fallback,
spaces as U+2581 by transformers' legacy normalizer or a ``Metaspace`` pre-tokenizer, as
mlx_lm.convert writes Llama/Mistral folders with transformers 5), plus ``tokenizer_config.json``
(special tokens) and the chat template (``chat_template.jinja``, ``chat_template.json`` or
``tokenizer_config.json``'s, in that order, as transformers looks for it).

Every file is read through :func:`mlxtral.formats.files.read_side_file` (regular files only, a
size cap per kind) and every value is checked for its JSON type before use: a malformed file is
one :class:`TokenizerError` line naming it. Token ids are bounded by the file's own size: every
id is below twice the number of entries it lists (vocabulary plus added tokens) plus 1024, room
for holes but not for a billion-entry table asked by a 4 KB file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxtral.display import show
from mlxtral.errors import TokenizerError
from mlxtral.formats.files import read_side_json, read_side_text
from mlxtral.tokenizer.base import CONTROL, NORMAL, UNUSED, USER_DEFINED, Tokenizer
from mlxtral.tokenizer.llama_spm import SPACE

_MAX_PRE_DEPTH = 8  # nested pre-tokenizer Sequences
MAX_ID_HOLES = 1024  # ids may leave holes: up to twice the entries listed, plus this


def _read_object(path: Path) -> dict[str, Any]:
    data = read_side_json(path, TokenizerError)
    if not isinstance(data, dict):
        raise TokenizerError(f"expected a JSON object, not {_kind(data)}", path)
    return data


def _kind(v: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token_text(config: dict[str, Any], key: str, path: Path) -> str | None:
    """``bos_token`` / ``eos_token``: a string or ``{"content": "..."}`` (an AddedToken)."""
    v = config.get(key)
    if v is None or isinstance(v, str):
        return v or None
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"] or None
    raise TokenizerError(f"{key} must be a string or an object with a string 'content', not "
                         f"{show(v, 60)}", path)


def _template_in(value: Any, path: Path, key: str) -> str | None:
    """A ``chat_template`` value: a string, or a list of ``{"name", "template"}`` (``default``
    first, else the first one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named: dict[str, str] = {}
        for k, d in enumerate(value):
            ok = isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("template"), str)
            if not ok:
                raise TokenizerError(f"{key}[{k}] must be an object with string 'name' and 'template', not "
                                     f"{show(d, 60)}", path)
            named.setdefault(d["name"], d["template"])
        return named.get("default") or next(iter(named.values()), None)
    raise TokenizerError(f"{key} must be a string or a list of named templates, not {_kind(value)}", path)


def chat_template(folder: Path, config: dict[str, Any], config_path: Path) -> tuple[str | None, Path | None]:
    """The folder's chat template and the file it comes from (None, None if there is none)."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return read_side_text(jinja, TokenizerError), jinja
    js = folder / "chat_template.json"
    if js.exists():
        t = _template_in(_read_object(js).get("chat_template"), js, "chat_template")
        if t is not None:
            return t, js
    t = _template_in(config.get("chat_template"), config_path, "chat_template")
    return (t, config_path) if t is not None else (None, None)


def load_hf_tokenizer(folder: str | Path) -> Tokenizer:
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError("not a folder", folder)
    cfg_path = folder / "tokenizer_config.json"
    config: dict[str, Any] = _read_object(cfg_path) if cfg_path.exists() else {}
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerError(f"add_bos_token must be true or false, not {show(add_bos, 40)}", cfg_path)
    for key in ("bos_token", "eos_token"):
        _token_text(config, key, cfg_path)  # checked whichever tokenizer file uses them
    template, template_path = chat_template(folder, config, cfg_path)
    if (folder / "tokenizer.model").exists():
        from mlxtral.tokenizer.spm import SentencePieceTokenizer

        tok: Tokenizer = SentencePieceTokenizer(folder / "tokenizer.model", chat_template=template)
        if add_bos is not None:
            tok.add_bos = add_bos and tok.bos_id is not None
    elif (folder / "tokenizer.json").exists():
        tok = _bpe_from_tokenizer_json(folder / "tokenizer.json", config, cfg_path, template)
    else:
        raise TokenizerError("no tokenizer.model or tokenizer.json in this folder", folder)
    tok.template_source = str(template_path) if template_path is not None else None
    return tok


def _pre_patterns(node: Any, path: Path, out: list[Any], depth: int = 0) -> None:
    """tokenizer.json ``pre_tokenizer`` -> compiled expressions applied in turn (pretok.PreTokenizer)."""
    from mlxtral.tokenizer.pretok import GPT2, compile_file_pattern

    if node is None:
        return
    if not isinstance(node, dict):
        raise TokenizerError(f"pre_tokenizer must be an object, not {_kind(node)}", path)
    kind = node.get("type")
    if kind == "Sequence":
        subs = node.get("pretokenizers")
        if not isinstance(subs, list):
            raise TokenizerError("a Sequence pre-tokenizer needs a list 'pretokenizers'", path)
        if depth >= _MAX_PRE_DEPTH:
            raise TokenizerError(f"pre-tokenizer Sequences nest deeper than {_MAX_PRE_DEPTH}", path)
        for sub in subs:
            _pre_patterns(sub, path, out, depth + 1)
        return
    if kind == "ByteLevel":
        if node.get("add_prefix_space"):
            raise TokenizerError("ByteLevel pre-tokenizer with add_prefix_space is not supported", path)
        if node.get("use_regex", True):
            out.append(GPT2)
        return
    if kind == "Digits":
        out.append(r"\p{N}" if node.get("individual_digits") else r"\p{N}+")
        return
    if kind == "Split":
        pat = node.get("pattern")
        behavior = node.get("behavior")
        if behavior != "Isolated" or node.get("invert"):
            raise TokenizerError(f"Split pre-tokenizer with behavior {show(behavior, 30)} is not supported",
                                 path)
        if isinstance(pat, dict) and isinstance(pat.get("Regex"), str):
            out.append(compile_file_pattern(pat["Regex"], len(out), path))
            return
        if isinstance(pat, dict) and isinstance(pat.get("String"), str):
            import regex

            out.append(regex.escape(pat["String"]))
            return
        raise TokenizerError("Split pre-tokenizer pattern must be {'Regex': str} or {'String': str}, "
                             f"not {show(pat, 60)}", path)
    raise TokenizerError(f"pre-tokenizer {show(kind, 40)} is not supported (byte-level BPE only)", path)


def _added_tokens(data: dict[str, Any], path: Path) -> list[tuple[int, str, bool]]:
    added = data.get("added_tokens")
    if added is None:
        return []
    if not isinstance(added, list):
        raise TokenizerError(f"added_tokens must be a list, not {_kind(added)}", path)
    out: list[tuple[int, str, bool]] = []
    for k, a in enumerate(added):
        if not isinstance(a, dict):
            raise TokenizerError(f"added_tokens[{k}] must be an object, not {_kind(a)}", path)
        tid, content, special = a.get("id"), a.get("content"), a.get("special", False)
        if not _is_int(tid):
            raise TokenizerError(f"added_tokens[{k}] needs an integer 'id', not {show(tid, 40)}", path)
        if not isinstance(content, str) or not content:
            raise TokenizerError(f"added_tokens[{k}] needs a non-empty string 'content', not "
                                 f"{show(content, 40)}", path)
        if not isinstance(special, bool):
            raise TokenizerError(f"added_tokens[{k}].special must be true or false, not "
                                 f"{show(special, 40)}", path)
        out.append((tid, content, special))
    return out


def _token_table(data: dict[str, Any], vocab: dict[str, Any], path: Path) -> tuple[list[str], list[int]]:
    """(tokens, types) by id from ``model.vocab`` and ``added_tokens``; ids bounded by what the file
    lists, so the table is never much larger than the file."""
    added = _added_tokens(data, path)
    n_entries = len(vocab) + len(added)
    limit = 2 * n_entries + MAX_ID_HOLES
    why = f"ids must be integers from 0 to {limit - 1} ({len(vocab)} entries + {len(added)} added tokens)"
    by_id: dict[int, tuple[str, int]] = {}
    for t, i in vocab.items():
        if not _is_int(i) or not 0 <= i < limit:
            raise TokenizerError(f"model.vocab gives {show(t, 40)} the id {show(i, 30)}: {why}", path)
        by_id[i] = (t, NORMAL)
    for i, content, special in added:
        if not 0 <= i < limit:
            raise TokenizerError(f"added token {show(content, 40)} has the id {i}: {why}", path)
        by_id[i] = (content, CONTROL if special else USER_DEFINED)
    if not by_id:
        raise TokenizerError("empty vocabulary", path)
    table = [by_id.get(i, ("", UNUSED)) for i in range(max(by_id) + 1)]
    return [t for t, _ in table], [k for _, k in table]


def _space_prefix(data: dict[str, Any], path: Path) -> tuple[bool, bool]:
    """How a SentencePiece-style tokenizer.json prefixes text with U+2581: (prefix, only when the
    text does not start with a space). Its normalizer (``Prepend`` + ``Replace`` of spaces,
    transformers' legacy Llama/Mistral files) always prefixes; its pre-tokenizer ``Metaspace``
    (``prepend_scheme`` "always") unless the text starts with one. Anything else is refused by name."""
    norm, pre = data.get("normalizer"), data.get("pre_tokenizer")
    steps: list[Any] = []
    for node in (norm, pre):
        if isinstance(node, dict) and node.get("type") == "Sequence":
            subs = node.get("normalizers", node.get("pretokenizers"))
            if not isinstance(subs, list):
                raise TokenizerError("a Sequence normalizer / pre-tokenizer needs a list", path)
            steps += subs
        elif node is not None:
            steps.append(node)
    prefix = replaced = unless = False
    for st in steps:
        kind = st.get("type") if isinstance(st, dict) else None
        if kind == "Prepend" and st.get("prepend") == SPACE:
            prefix = True
        elif kind == "Replace" and st.get("pattern") == {"String": " "} and st.get("content") == SPACE:
            replaced = True
        elif kind == "Metaspace" and st.get("replacement", SPACE) == SPACE:
            scheme = st.get("prepend_scheme", "always" if st.get("add_prefix_space", True) else "never")
            if scheme not in ("always", "never"):
                raise TokenizerError(f"Metaspace prepend_scheme {show(scheme, 30)} is not supported "
                                     "(always, never)", path)
            replaced, unless = True, True
            prefix = prefix or scheme == "always"
        else:
            raise TokenizerError(f"a SentencePiece-style tokenizer.json step {show(kind, 30)} is not "
                                 "supported (Prepend, Replace of spaces by U+2581, Metaspace)", path)
    if not replaced:
        raise TokenizerError("a SentencePiece-style tokenizer.json that does not turn spaces into U+2581 "
                             "is not supported", path)
    return prefix, unless


def _adds_bos(data: dict[str, Any], config: dict[str, Any], bos: str | None) -> bool:
    """``add_bos_token`` when tokenizer_config.json says, else whether the post-processor's single
    template starts with the BOS token (transformers 5 writes only that)."""
    if isinstance(config.get("add_bos_token"), bool):
        return bool(config["add_bos_token"])
    post = data.get("post_processor")
    single = post.get("single") if isinstance(post, dict) else None
    if isinstance(single, list) and single and isinstance(single[0], dict):
        sp = single[0].get("SpecialToken")
        return isinstance(sp, dict) and bos is not None and sp.get("id") == bos
    return False


def _spm_from_tokenizer_json(path: Path, data: dict[str, Any], model: dict[str, Any], vocab: dict[str, Any],
                             merges: list[Any], config: dict[str, Any], config_path: Path,
                             template: str | None) -> Tokenizer:
    """A SentencePiece-style tokenizer.json on its own (what mlx_lm.convert writes for Llama and
    Mistral with transformers 5, no tokenizer.model): its BPE merges by rank over characters, spaces
    as U+2581, bytes with no piece as ``<0xHH>`` tokens, as Hugging Face's tokenizers runs it."""
    from mlxtral.tokenizer.base import BYTE, UNKNOWN, byte_value
    from mlxtral.tokenizer.bpe import parse_merges
    from mlxtral.tokenizer.llama_spm import LlamaSpmTokenizer

    prefix, unless_space = _space_prefix(data, path)
    tokens, types = _token_table(data, vocab, path)
    unk = model.get("unk_token")
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and byte_value(t) is not None:
            types[i] = BYTE
        elif t and t == unk:
            types[i] = UNKNOWN
    ids = {t: i for i, t in enumerate(tokens) if t}
    bos, eos = _token_text(config, "bos_token", config_path), _token_text(config, "eos_token", config_path)
    try:
        tok = LlamaSpmTokenizer(tokens, None, types, bos_id=ids.get(bos) if bos else None,
                                eos_id=ids.get(eos) if eos else None,
                                unk_id=ids.get(unk) if isinstance(unk, str) else None,
                                add_bos=_adds_bos(data, config, bos), add_space_prefix=prefix,
                                chat_template=template, merges=parse_merges(merges))
    except TokenizerError as e:
        if e.path is None:
            raise TokenizerError(e.message, path) from None
        raise
    tok.prefix_unless_space = unless_space
    tok.source = str(path)
    return tok


def _bpe_from_tokenizer_json(path: Path, config: dict[str, Any], config_path: Path,
                             template: str | None) -> Tokenizer:
    from mlxtral.tokenizer.bpe import ByteLevelBPETokenizer
    from mlxtral.tokenizer.pretok import PreTokenizer

    data = _read_object(path)
    model = data.get("model")
    if not isinstance(model, dict):
        raise TokenizerError(f"'model' must be an object, not {_kind(model)}", path)
    if model.get("type") != "BPE":
        raise TokenizerError(f"model type {show(model.get('type'), 30)} is not supported (only BPE)", path)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise TokenizerError(f"model.vocab must be an object of token -> id, not {_kind(vocab)}", path)
    merges = model.get("merges", [])
    if merges is None:
        merges = []
    if not isinstance(merges, list):
        raise TokenizerError(f"model.merges must be a list, not {_kind(merges)}", path)
    if data.get("normalizer") is not None or model.get("byte_fallback"):
        return _spm_from_tokenizer_json(path, data, model, vocab, merges, config, config_path, template)
    decoder = data.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        raise TokenizerError("only byte-level BPE tokenizer.json is supported (no ByteLevel decoder)", path)
    patterns: list[Any] = []
    _pre_patterns(data.get("pre_tokenizer"), path, patterns)
    tokens, types = _token_table(data, vocab, path)
    ids = {t: i for i, t in enumerate(tokens) if t}

    def special(name: str) -> int | None:
        text = _token_text(config, name, config_path)
        return ids.get(text) if text else None

    ignore_merges = model.get("ignore_merges", False)
    add_bos = config.get("add_bos_token", False)
    try:
        tok = ByteLevelBPETokenizer(
            tokens,
            merges,
            PreTokenizer(patterns, str(path)),
            token_types=types,
            bos_id=special("bos_token"),
            eos_id=special("eos_token"),
            add_bos=bool(add_bos),
            ignore_merges=bool(ignore_merges),
            chat_template=template,
        )
    except TokenizerError as e:
        if e.path is None:
            raise TokenizerError(e.message, path) from None
        raise
    tok.source = str(path)
    return tok
