"""Chat templates: a conversation -> prompt token ids.

Templates are recognised, never executed: a file's Jinja text only chooses between the formats
below (so a template that raises, loops forever or renders gigabytes costs nothing), and the
vocabulary chooses the variant. Two formats:

``"mistral"``, ids equal to ``mistral_common``'s ``encode_chat_completion`` for each tokenizer
    version, chosen by the vocabulary:

    - v1 (``[INST]`` is text, Mixtral 8x7B)::

        <s>[INST] {system}\\n\\n{user} [/INST] {answer}</s>[INST] {user2} [/INST]

      BOS once; each user turn and each answer are tokenized on their own (each gets the
      SentencePiece dummy-prefix space); EOS closes every answer; a system prompt goes into the
      first user turn.
    - v2/v3 (``[INST]`` and ``[/INST]`` are control tokens: ``tokenizer.model.v3``, Mixtral 8x22B)::

        <s>[INST]{user}[/INST]{answer}</s>[INST]{system}\\n\\n{user2}[/INST]

      the markers are their control ids, the system prompt goes into the *last* user turn, and
      answers lose their trailing spaces.
    - v7 (``[SYSTEM_PROMPT]`` is a control token too): as v3, with the system prompt in its own
      block ``[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT]`` at its place.

``"chatml"``::

        <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n

    A default system prompt written in the template (SmolLM2's "You are a helpful AI assistant
    named SmolLM...") is added when the conversation has none, as the Jinja template does.

Injection: the template's own text is read with its special tokens (``<|im_start|>``, ``[INST]``
as control ids); messages' contents are plain text (:meth:`Tokenizer.encode_plain`), so no
content ever becomes a control or user-defined token, whatever the vocabulary calls the markers.
Adjacent text (a role name and its content) is tokenized together, as the rendered template is.

Messages are mappings with ``role`` (``system``, ``user``, ``assistant``) and ``content`` (str).
The Mistral format needs ``system`` first only, then ``user`` and ``assistant`` alternating from
``user``; ChatML takes any order. A last ``assistant`` message is continued (a prefill). Anything
else raises ``ChatError``.

Multi-turn chat with a reused KV cache: ``chat_delta`` gives the ids that follow the previous
turn, see its docstring.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mlxtral.display import show
from mlxtral.errors import ChatError, TokenizerError
from mlxtral.tokenizer.base import CONTROL, USER_DEFINED, Tokenizer

TEMPLATES = ("mistral", "chatml")
ROLES = ("system", "user", "assistant")

_SYSTEM_START = "<|im_start|>system"
_IM_END = "<|im_end|>"
_NOT_IN_DEFAULT = re.compile("['\"{}]")  # a default prompt is one Jinja string literal


def _template_error(tokenizer: Tokenizer, message: str) -> TokenizerError:
    return TokenizerError(message, tokenizer.template_source or tokenizer.source)


def template_name(tokenizer: Tokenizer) -> str:
    """``"mistral"`` or ``"chatml"`` for this tokenizer (from its chat template, else its vocabulary)."""
    text = tokenizer.chat_template
    if text:
        if "<|im_start|>" in text:
            return "chatml"
        if "[INST]" in text:
            return "mistral"
        raise _template_error(tokenizer, "unsupported chat template (neither ChatML <|im_start|> nor Mistral "
                                         "[INST])")
    if tokenizer.token_to_id("<|im_start|>") is not None and tokenizer.token_to_id("<|im_end|>") is not None:
        return "chatml"
    spm_like = tokenizer.kind in ("sentencepiece", "llama", "tekken")
    if spm_like and tokenizer.bos_id is not None and tokenizer.eos_id is not None:
        return "mistral"
    raise _template_error(tokenizer, "no chat template in the file and none can be inferred from the "
                                     "vocabulary")


def _marker(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of ``text`` if the vocabulary has it as a control or user-defined token."""
    i = tokenizer.token_to_id(text)
    return i if i is not None and tokenizer.token_type(i) in (CONTROL, USER_DEFINED) else None


def mistral_version(tokenizer: Tokenizer) -> str:
    """``"v1"`` (``[INST]`` is text), ``"v3"`` (``[INST]``/``[/INST]`` are control tokens) or ``"v7"``
    (``[SYSTEM_PROMPT]`` too, and the template, if any, uses it). A version the file states
    (tekken.json) is taken as it is: v2 and v3 are one format, v7 and later too."""
    if _marker(tokenizer, "[INST]") is None or _marker(tokenizer, "[/INST]") is None:
        return "v1"
    stated = tokenizer.instruct_version
    if stated is not None and stated[1:].isdigit():
        return "v1" if int(stated[1:]) <= 1 else "v3" if int(stated[1:]) < 7 else "v7"
    has_system = _marker(tokenizer, "[SYSTEM_PROMPT]") is not None and \
        _marker(tokenizer, "[/SYSTEM_PROMPT]") is not None
    if has_system and (not tokenizer.chat_template or "[SYSTEM_PROMPT]" in tokenizer.chat_template):
        return "v7"
    return "v3"


def default_system_prompt(template: str | None) -> str | None:
    """The system prompt a ChatML Jinja template inserts when the conversation has none: the first
    ``<|im_start|>system\\n...<|im_end|>`` whose text holds no quote or brace (one string literal).

    One pass over the template (each search starts where the previous one ended), whatever it
    holds: 400 KB of repeated ``<|im_start|>system\\n`` costs what 400 KB of anything costs."""
    if not template:
        return None
    pos = 0
    end = -2  # the first <|im_end|> at or after the current content start (-1: none left)
    bad = -2  # the first quote or brace at or after it (len(template): none left)
    while True:
        k = template.find(_SYSTEM_START, pos)
        if k < 0:
            return None
        s = k + len(_SYSTEM_START)
        if template.startswith("\n", s):
            s += 1
        elif template.startswith("\\n", s):
            s += 2
        else:
            pos = k + 1
            continue
        if end < s:
            end = template.find(_IM_END, s)
            if end < 0:
                return None  # no <|im_end|> after this start, hence none after a later one
        if bad < s:
            m = _NOT_IN_DEFAULT.search(template, s)
            bad = m.start() if m else len(template)
        if bad > end:
            return template[s:end].replace("\\n", "\n")
        pos = k + 1


def validate_messages(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                      alternate: bool = True) -> None:
    """Raise ChatError unless every message is a mapping with a known role and string content, and
    the conversation has a user or assistant message. ``alternate`` (the Mistral format, whose
    ``[INST]`` blocks need it, as mistral-common checks): an optional system message first, then
    user/assistant alternating from user. ChatML takes any order, as its Jinja template renders it.
    A last assistant message with ``add_generation_prompt`` is a prefill: the answer continues it."""
    if not messages:
        raise ChatError("the conversation is empty")
    expect = "user"
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatError(f"message {k} must be a mapping with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatError(f"message {k} has unknown role {show(role)} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise ChatError(f"message {k} ({role}) content must be a string, not {type(content).__name__}")
        if not alternate:
            continue
        if role == "system":
            if k != 0:
                raise ChatError(f"message {k} is a system message: the Mistral format takes one, first")
            continue
        if role != expect:
            raise ChatError(
                f"message {k} is {show(role)} but {expect!r} was expected: the Mistral format needs "
                "user/assistant turns alternating, starting with user (after an optional system message)"
            )
        expect = "assistant" if role == "user" else "user"
    if all(m["role"] == "system" for m in messages):
        raise ChatError("the conversation has a system message but no user message")


def _prefill(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> bool:
    """The last message is an assistant's to continue (llama-server's assistant prefill)."""
    return add_generation_prompt and messages[-1]["role"] == "assistant"


def _special_id(tokenizer: Tokenizer, text: str) -> int:
    i = tokenizer.token_to_id(text)
    if i is None:
        raise _template_error(tokenizer, f"the ChatML template needs the token {text} but the vocabulary "
                                         "has none")
    return i


_Part = tuple[str, bool]  # (text, True for the template's own text / False for a message's content)


def _encode_parts(tokenizer: Tokenizer, parts: Sequence[_Part | int]) -> list[int]:
    """Ids of a piece of the rendered prompt: token ids (the template's markers), template text
    (special tokens written in it become their ids) and contents (plain text). Adjacent text,
    template or content, is tokenized together as one run."""
    out: list[int] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            out.extend(tokenizer.encode_plain("".join(run)))
            run.clear()

    for part in parts:
        if isinstance(part, int):
            flush()
            out.append(part)
            continue
        text, literal = part
        if not literal:
            run.append(text)
            continue
        for frag in tokenizer.special_fragments(text):
            if isinstance(frag, int):
                flush()
                out.append(frag)
            else:
                run.append(frag)
    flush()
    return out


def _mistral_segments(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], prefill: bool = False
                      ) -> list[list[int]]:
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise _template_error(tokenizer, "the Mistral chat format needs BOS and EOS tokens")
    version = mistral_version(tokenizer)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    users = [k for k, m in enumerate(messages) if m["role"] == "user"]
    # v1 puts the system prompt into the first user turn, v2/v3 into the last; v7 gives it a block
    system_turn = None if version == "v7" or not users else users[0] if version == "v1" else users[-1]
    segs: list[list[int]] = [[tokenizer.bos_id]]
    for k, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            if version == "v7" and content:
                start, end = _marker(tokenizer, "[SYSTEM_PROMPT]"), _marker(tokenizer, "[/SYSTEM_PROMPT]")
                segs.append(_encode_parts(tokenizer, [start, (content, False), end]))  # type: ignore[list-item]
            else:
                segs.append([])
        elif role == "user":
            text: list[_Part] = [(content, False)]
            if k == system_turn and system:
                text = [(system, False), ("\n\n", True), *text]
            if version == "v1":
                segs.append(_encode_parts(tokenizer, [("[INST] ", True), *text, (" [/INST]", True)]))
            else:
                inst, end_inst = _marker(tokenizer, "[INST]"), _marker(tokenizer, "[/INST]")
                segs.append(_encode_parts(tokenizer, [inst, *text, end_inst]))  # type: ignore[list-item]
        else:
            answer = content if version == "v1" else content.rstrip(" ")
            open_end = prefill and k == len(messages) - 1  # to be continued: no EOS
            segs.append([*tokenizer.encode_plain(answer), *([] if open_end else [tokenizer.eos_id])])
    segs.append([])  # the generation prompt is the user turn itself
    return segs


def _segments(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, template: str
) -> list[list[int]]:
    """The prompt as id lists (a head, one per message, a tail) whose concatenation is the prompt."""
    prefill = _prefill(messages, add_generation_prompt)
    if template == "mistral":
        return _mistral_segments(tokenizer, messages, prefill)
    if template == "chatml":
        start, end = _special_id(tokenizer, "<|im_start|>"), _special_id(tokenizer, _IM_END)
        head: list[int] = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        default = default_system_prompt(tokenizer.chat_template)
        if messages[0]["role"] != "system" and default is not None:
            head += _encode_parts(tokenizer, [start, ("system\n" + default, True), end, ("\n", True)])
        segs = [head]
        for k, m in enumerate(messages):
            close: list[_Part | int] = [] if prefill and k == len(messages) - 1 else [end, ("\n", True)]
            segs.append(_encode_parts(tokenizer, [start, (m["role"] + "\n", True), (m["content"], False),
                                                  *close]))
        opening = add_generation_prompt and not prefill
        segs.append(_encode_parts(tokenizer, [start, ("assistant\n", True)]) if opening else [])
        return segs

    raise TokenizerError(f"unknown chat template {show(template, 30)} (known: {', '.join(TEMPLATES)})")


def apply_chat_template(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    template: str | None = None,
) -> list[int]:
    """Prompt ids for ``messages`` (BOS included when the format has one).

    ``template`` forces ``"mistral"`` or ``"chatml"``; by default it is ``template_name(tokenizer)``.
    """
    name = template or template_name(tokenizer)
    validate_messages(messages, add_generation_prompt, alternate=name == "mistral")
    return [i for seg in _segments(tokenizer, messages, add_generation_prompt, name) for i in seg]


def chat_delta(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    template: str | None = None,
    cached_through_eot: bool = False,
) -> list[int]:
    """Ids to append for the last message of ``messages`` (a new user turn) to a cached prefix.

    With ``cached_through_eot=False`` the cached prefix is
    ``apply_chat_template(messages[:-1], add_generation_prompt=False)``, and
    ``prefix + chat_delta(...) == apply_chat_template(messages)``.

    With ``cached_through_eot=True`` the cache ends right after the end-of-turn token the model
    produced for its last answer (``</s>``, ``<|im_end|>``), fed back to the model: the delta
    then also holds what the template writes after that token (ChatML: ``"\\n"``).
    """
    name = template or template_name(tokenizer)
    validate_messages(messages, add_generation_prompt, alternate=name == "mistral")
    if len(messages) < 2 or messages[-1]["role"] != "user" or messages[-2]["role"] != "assistant":
        raise ChatError("chat_delta needs a conversation ending with an assistant answer then a user message")
    prefix = [i for seg in _segments(tokenizer, messages[:-1], False, name) for i in seg]
    full = [i for seg in _segments(tokenizer, messages, add_generation_prompt, name) for i in seg]
    if full[: len(prefix)] != prefix:
        raise _template_error(tokenizer, f"the {name} template does not extend the previous turns' ids")
    delta = full[len(prefix) :]
    if cached_through_eot:
        eot = tokenizer.eos_ids
        k = len(prefix) - 1
        while k >= 0 and prefix[k] not in eot:
            k -= 1
        if k < 0:
            raise _template_error(tokenizer, "the previous answer has no end-of-turn token")
        delta = prefix[k + 1 :] + delta
    return delta
