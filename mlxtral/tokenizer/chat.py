"""Chat templates: a conversation -> prompt token ids.

Two formats, chosen from the file's ``chat_template`` text or, without one, from the vocabulary:

``"mistral"`` (Mistral / Mixtral Instruct v1, ids equal to ``mistral_common``'s
    ``MistralTokenizer.v1().encode_chat_completion``)::

        <s>[INST] {system}\\n\\n{user} [/INST] {answer}</s>[INST] {user2} [/INST]

    BOS once; each user turn and each answer are tokenized on their own (each gets the
    SentencePiece dummy-prefix space); EOS closes every answer; a system prompt goes into the
    first user turn.

``"chatml"``::

        <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n

    A default system prompt written in the template (SmolLM2's "You are a helpful AI assistant
    named SmolLM...") is added when the conversation has none, as the Jinja template does.
    Role names and contents are tokenized as plain text, never parsed for special tokens, so a
    user cannot inject ``<|im_end|>``; the template's own markers are token ids.

Messages are mappings with ``role`` (``system`` first only, then ``user`` and ``assistant``
alternating, starting with ``user``) and ``content`` (str). Anything else raises ``ChatError``.

Multi-turn chat with a reused KV cache: ``chat_delta`` gives the ids that follow the previous
turn, see its docstring.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mlxtral.errors import ChatError, TokenizerError
from mlxtral.tokenizer.base import Tokenizer

TEMPLATES = ("mistral", "chatml")
ROLES = ("system", "user", "assistant")

_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")


def template_name(tokenizer: Tokenizer) -> str:
    """``"mistral"`` or ``"chatml"`` for this tokenizer (from its chat template, else its vocabulary)."""
    text = tokenizer.chat_template
    if text:
        if "<|im_start|>" in text:
            return "chatml"
        if "[INST]" in text:
            return "mistral"
        raise TokenizerError("unsupported chat template (neither ChatML <|im_start|> nor Mistral [INST])")
    if tokenizer.token_to_id("<|im_start|>") is not None and tokenizer.token_to_id("<|im_end|>") is not None:
        return "chatml"
    spm_like = tokenizer.kind in ("sentencepiece", "llama")
    if spm_like and tokenizer.bos_id is not None and tokenizer.eos_id is not None:
        return "mistral"
    raise TokenizerError("no chat template in the file and none can be inferred from the vocabulary")


def default_system_prompt(template: str | None) -> str | None:
    """The system prompt a ChatML Jinja template inserts when the conversation has none."""
    if not template:
        return None
    m = _DEFAULT_SYSTEM.search(template)
    if m is None:
        return None
    return m.group(1).replace("\\n", "\n")


def validate_messages(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> None:
    """Raise ChatError unless: optional system first, then user/assistant alternating from user."""
    if not messages:
        raise ChatError("the conversation is empty")
    expect = "user"
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatError(f"message {k} must be a mapping with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatError(f"message {k} has unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise ChatError(f"message {k} ({role}) content must be a string, not {type(content).__name__}")
        if role == "system":
            if k != 0:
                raise ChatError(f"message {k} is a system message: only the first message may be one")
            continue
        if role != expect:
            raise ChatError(
                f"message {k} is {role!r} but {expect!r} was expected: roles must alternate "
                "user/assistant, starting with user (after an optional system message)"
            )
        expect = "assistant" if role == "user" else "user"
    if messages[-1]["role"] == "system":
        raise ChatError("the conversation has a system message but no user message")
    if add_generation_prompt and messages[-1]["role"] != "user":
        last = messages[-1]["role"]
        raise ChatError(f"the last message must be from the user to prompt an answer, not {last!r}")


def _special_id(tokenizer: Tokenizer, text: str) -> int:
    i = tokenizer.token_to_id(text)
    if i is None:
        raise TokenizerError(f"the ChatML template needs the token {text} but the vocabulary has none")
    return i


def _segments(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, template: str
) -> list[list[int]]:
    """The prompt as id lists (a head, one per message, a tail) whose concatenation is the prompt."""
    enc = tokenizer.encode
    segs: list[list[int]] = []
    if template == "mistral":
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise TokenizerError("the Mistral chat format needs BOS and EOS tokens")
        segs.append([tokenizer.bos_id])
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        first_user = True
        for m in messages:
            if m["role"] == "user":
                content = m["content"]
                if first_user and system:
                    content = system + "\n\n" + content
                first_user = False
                segs.append(enc(f"[INST] {content} [/INST]"))
            elif m["role"] == "assistant":
                segs.append([*enc(m["content"]), tokenizer.eos_id])
            else:
                segs.append([])
        segs.append([])  # the generation prompt is the user turn itself
        return segs
    if template == "chatml":
        start, end = _special_id(tokenizer, "<|im_start|>"), _special_id(tokenizer, "<|im_end|>")
        nl = enc("\n")
        head: list[int] = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        default = default_system_prompt(tokenizer.chat_template)
        if messages[0]["role"] != "system" and default is not None:
            head += [start, *enc("system\n" + default), end, *nl]
        segs.append(head)
        for m in messages:
            segs.append([start, *enc(f"{m['role']}\n{m['content']}"), end, *nl])
        segs.append([start, *enc("assistant\n")] if add_generation_prompt else [])
        return segs
    raise TokenizerError(f"unknown chat template {template!r} (known: {', '.join(TEMPLATES)})")


def apply_chat_template(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    template: str | None = None,
) -> list[int]:
    """Prompt ids for ``messages`` (BOS included when the format has one).

    ``template`` forces ``"mistral"`` or ``"chatml"``; by default it is ``template_name(tokenizer)``.
    """
    validate_messages(messages, add_generation_prompt)
    name = template or template_name(tokenizer)
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
    validate_messages(messages, add_generation_prompt)
    if len(messages) < 2 or messages[-1]["role"] != "user" or messages[-2]["role"] != "assistant":
        raise ChatError("chat_delta needs a conversation ending with an assistant answer then a user message")
    name = template or template_name(tokenizer)
    prefix = [i for seg in _segments(tokenizer, messages[:-1], False, name) for i in seg]
    full = [i for seg in _segments(tokenizer, messages, add_generation_prompt, name) for i in seg]
    if full[: len(prefix)] != prefix:
        raise TokenizerError(f"the {name} template does not extend the previous turns' ids")
    delta = full[len(prefix) :]
    if cached_through_eot:
        eot = tokenizer.eos_ids
        k = len(prefix) - 1
        while k >= 0 and prefix[k] not in eot:
            k -= 1
        if k < 0:
            raise TokenizerError("the previous answer has no end-of-turn token")
        delta = prefix[k + 1 :] + delta
    return delta
