"""The OpenAI wire format: request bodies checked into :class:`GenRequest`, error objects, and the
response / stream-chunk builders. No web framework here, so every rule is testable on plain dicts.

Supported parameters: messages / prompt, max_tokens (max_completion_tokens), temperature, top_p,
top_k, min_p, seed, stop, frequency_penalty, presence_penalty (OpenAI's additive penalties over
the generated tokens), repetition_penalty (mlx-lm's name; llama-server's repeat_penalty is taken too:
the multiplicative penalty over the last 64 tokens), n_predict (llama-server's max_tokens; -1: to the
end of the context),
logprobs / top_logprobs (of the model's distribution, before penalties and grammar masks),
n (1 only), stream, stream_options.include_usage, response_format (text, json_object,
json_schema). Known OpenAI fields without an effect here (model, user, store, metadata, ...) are
accepted and ignored; logit_bias, best_of, echo, suffix, tools and functions only at their neutral
values (400 otherwise); fields nobody knows are refused (400) so that a typo is never silently
dropped.
"""
from __future__ import annotations

import json
import math
import numbers
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlxtral.errors import MlxtralError, UsageError
from mlxtral.sampling import SamplingParams, check_seed

MAX_TOP_LOGPROBS = 20  # chat (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # legacy completions (OpenAI's limit)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # the legacy endpoint's documented default
UNTIL_CONTEXT_END = 1 << 30  # a max_tokens every context cuts

# Accepted, no effect (documented above).
_IGNORED = {"model", "user", "store", "metadata", "service_tier", "parallel_tool_calls", "modalities",
            "reasoning_effort"}
# Accepted at their neutral value only (400 otherwise, rather than silently ignored).
_NEUTRAL = {"logit_bias": lambda v: not v, "best_of": lambda v: v in (None, 1), "echo": lambda v: not v,
            "suffix": lambda v: not v, "tools": lambda v: not v, "tool_choice": lambda v: v in (None, "none"),
            "functions": lambda v: not v, "function_call": lambda v: v in (None, "none"),
            "prediction": lambda v: v is None, "audio": lambda v: v is None,
            "web_search_options": lambda v: v is None}
# llama-server's names for the same parameters (a client written for it sends these)
ALIASES = {"repeat_penalty": "repetition_penalty", "n_predict": "max_tokens"}
_COMMON = {*ALIASES, "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
           "frequency_penalty", "presence_penalty", "repetition_penalty", "n", "stream", "stream_options",
           "logprobs"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}
COMPLETION_FIELDS = _COMMON | {"prompt", "response_format"}


class ApiError(Exception):
    """An error the client gets as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          503: "server_overloaded"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class GenRequest:
    """One checked request, ready for the scheduler."""

    kind: str  # "chat" or "completion"
    prompt_ids: list[int]
    max_tokens: int | None  # None: until the end of the context
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    grammar: str | None = None  # an llguidance grammar (from response_format)
    prompt_chars: int = 0  # a completion's prompt text length: its logprobs' text_offset starts there
    continues: bool | None = None  # the text continues the prompt's (default: a completion's does;
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])  # a prefilled chat answer's too)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.continues is None:
            self.continues = self.kind == "completion"


# ---- field checks ----------------------------------------------------------------------------------


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    try:
        ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v)) \
            and lo <= float(v) <= hi
    except OverflowError:  # an integer of a thousand digits
        ok = False
    if not ok:
        raise ApiError(400, f"{name} must be a number from {lo:g} to {hi:g}, got {_shown(v)}", name)
    return float(v)


def _whole(body: Mapping[str, Any], name: str, default: int | None, lo: int, hi: int | None = None
           ) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v > hi):
        want = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ApiError(400, f"{name} must be a whole number {want}, got {_shown(v)}", name)
    return int(v)


def _bool(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, got {_shown(v)}", name)
    return v


def _shown(v: Any) -> str:
    """``v`` for a message, at most 60 characters (a string's repr; anything else its JSON; an
    integer of thousands of digits cut before Python has to write it all)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**60:
        return f"an integer of {len(str(v))} digits" if abs(v) < 10**4000 else "an integer of 4000+ digits"
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    """The body with llama-server's aliases under their OpenAI names (both given and different: 400)."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in allowed and k not in _IGNORED and k not in _NEUTRAL)
    if unknown:
        name = _shown(unknown[0])  # a key's length is the client's choice: cut like every echoed value
        raise ApiError(400, f"unknown or unsupported parameter {name}", name[1:-1])
    for k, neutral in _NEUTRAL.items():
        if k in body and not neutral(body[k]):
            raise ApiError(400, f"{k} is not supported by this server", k)
    out = dict(body)
    for alias, name in ALIASES.items():
        if alias not in out:
            continue
        v = out.pop(alias)
        if alias == "n_predict" and isinstance(v, int) and not isinstance(v, bool) and v == -1:
            v = UNTIL_CONTEXT_END  # llama-server's -1 (cut to the context like any max_tokens)
        if name in out and out[name] != v:
            raise ApiError(400, f"{alias} and {name} are the same parameter: give one", alias)
        out[name] = v
    return out


def _stops(body: Mapping[str, Any]) -> list[str]:
    from mlxtral.generate import check_stops

    v = body.get("stop")
    if v is None:
        return []
    if not isinstance(v, (str, list)):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    try:
        return [s for s in check_stops(v) if s]
    except UsageError as e:
        raise ApiError(400, str(e), "stop") from None


# what a request that leaves a sampling parameter out gets: llama-server's defaults (a local model
# sampled at OpenAI's temperature 1 with nothing cut is often incoherent); serve's --temp, --top-k,
# --top-p, --min-p and --repeat-penalty change them
DEFAULT_SAMPLING = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def _sampling(body: Mapping[str, Any], default: SamplingParams = DEFAULT_SAMPLING) -> SamplingParams:
    temperature = _number(body, "temperature", default.temperature, 0.0, 2.0)  # OpenAI's range
    top_p = _number(body, "top_p", default.top_p, 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "top_p must be above 0 (1 = off)", "top_p")
    top_k = _whole(body, "top_k", default.top_k, 0)
    min_p = _number(body, "min_p", default.min_p, 0.0, 1.0)
    if min_p >= 1.0:
        raise ApiError(400, "min_p must be below 1 (0 = off)", "min_p")
    rep = _number(body, "repetition_penalty", default.repetition_penalty, 0.5, 10.0)
    try:
        seed = check_seed("seed", body.get("seed"))
    except UsageError as e:
        raise ApiError(400, str(e), "seed") from None
    return SamplingParams(temperature, top_k or 0, top_p, min_p, rep, seed=seed)


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include = False
    if opts is not None:
        if not isinstance(opts, Mapping):
            raise ApiError(400, "stream_options must be an object", "stream_options")
        if not stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
        include = _bool(opts, "include_usage")
    return stream, include


def _n(body: Mapping[str, Any]) -> None:
    n = _whole(body, "n", 1, 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {_shown(n)}", "n")


def response_format_grammar(body: Mapping[str, Any]) -> str | None:
    """The llguidance grammar for ``response_format`` (None for text / absent)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, Mapping) or not isinstance(rf.get("type"), str):
        raise ApiError(400, "response_format must be an object with a 'type'", "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping) or not isinstance(js.get("schema", {}), Mapping):
            raise ApiError(400, "response_format.json_schema must be an object with a 'schema' object",
                           "response_format")
        schema = js.get("schema", {})
    else:
        raise ApiError(400, f"response_format type must be text, json_object or json_schema, got "
                            f"{_shown(kind)}", "response_format")
    from mlxtral.server.grammar import schema_grammar

    return schema_grammar(schema)


# ---- requests --------------------------------------------------------------------------------------


def _message_text(k: int, m: Any) -> dict[str, str]:
    if not isinstance(m, Mapping):
        raise ApiError(400, f"messages[{k}] must be an object with 'role' and 'content'", "messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{k}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and m.get("role") == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{k}].content must be a string or a list of text parts", "messages")
    role = m.get("role")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    return {"role": role, "content": content}  # type: ignore[dict-item]


def parse_chat(body: Any, model: Any, default: SamplingParams = DEFAULT_SAMPLING) -> GenRequest:
    body = _check_fields(body, CHAT_FIELDS)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    messages = [_message_text(k, m) for k, m in enumerate(msgs)]
    _text_fits(model, sum(len(m["content"]) for m in messages), "messages")
    try:
        ids = model.apply_chat_template(messages)
    except MlxtralError as e:
        raise ApiError(400, e.message, "messages") from None
    _n(body)
    mt = _whole(body, "max_completion_tokens", None, 1)
    if mt is None:
        mt = _whole(body, "max_tokens", None, 1)
    lp = _bool(body, "logprobs")
    top = _whole(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) or 0
    if top and not lp:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    req = _finish(body, "chat", ids, mt, lp, top, model, default)
    req.continues = messages[-1]["role"] == "assistant"  # a prefill: the answer goes on from its text
    return req


def parse_completion(body: Any, model: Any, default: SamplingParams = DEFAULT_SAMPLING) -> GenRequest:
    body = _check_fields(body, COMPLETION_FIELDS)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # one prompt in a batch of one
    if isinstance(p, str):
        _text_fits(model, len(p), "prompt")
        ids = model.encode(p)
    elif isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
        v = model.config.vocab_size
        bad = [i for i in p if not 0 <= i < v]
        if bad:
            raise ApiError(400, f"prompt token {_shown(bad[0])} is outside the vocabulary (0..{v - 1})",
                           "prompt")
        ids = list(p)
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                       "prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    _n(body)
    mt = _whole(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS, 1)
    lp = _whole(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    req = _finish(body, "completion", ids, mt, lp is not None, lp or 0, model, default)
    if lp is not None:  # OpenAI's text_offset counts prompt + completion (as llama-cpp-python's)
        req.prompt_chars = len(p) if isinstance(p, str) else len(model.tokenizer.decode(ids))
    return req


def _text_fits(model: Any, n_chars: int, param: str) -> None:
    """Text that no context of this server can hold is refused before it is tokenized."""
    limit = model.tokenizer.max_chars(model.max_context)
    if n_chars > limit:
        raise ApiError(400, f"the {param} has {n_chars} characters: more than the context of "
                            f"{model.max_context} tokens can hold", param, "context_length_exceeded")


def _finish(body: Mapping[str, Any], kind: str, ids: list[int], max_tokens: int | None, logprobs: bool,
            top: int, model: Any, default: SamplingParams = DEFAULT_SAMPLING) -> GenRequest:
    ctx = model.max_context
    if len(ids) >= ctx:
        raise ApiError(400, f"the prompt has {len(ids)} tokens but the context holds {ctx}: shorten it "
                            "(or restart the server with a larger --max-context)",
                       "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    if max_tokens is not None:  # as llama-server: the answer ends at a full context ("length"),
        max_tokens = min(max_tokens, ctx - len(ids))  # not a 400 for a client's habitual max_tokens
    stream, include = _stream(body)
    return GenRequest(
        kind=kind, prompt_ids=ids, max_tokens=max_tokens, sampling=_sampling(body, default),
        stop=_stops(body),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        logprobs=logprobs, top_logprobs=top, stream=stream, include_usage=include,
        grammar=response_format_grammar(body),
    )


# ---- responses -------------------------------------------------------------------------------------


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": entries}


def completion_logprobs(entries: list[dict[str, Any]], start: int = 0) -> dict[str, Any]:
    """The legacy shape: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    offsets, pos = [], start
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def full_response(req: GenRequest, model_name: str, text: str, finish: str, entries: list[dict[str, Any]],
                  use: dict[str, Any]) -> dict[str, Any]:
    if req.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": chat_logprobs(entries) if req.logprobs else None,
                                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish,
                  "logprobs": completion_logprobs(entries, req.prompt_chars) if req.logprobs else None}
        obj = "text_completion"
    return {"id": _id(req), "object": obj, "created": req.created, "model": model_name,
            "system_fingerprint": "mlxtral", "choices": [choice], "usage": use}


def chunk(req: GenRequest, model_name: str, text: str | None, finish: str | None,
          entries: list[dict[str, Any]] | None = None, first: bool = False, offset: int = 0
          ) -> dict[str, Any]:
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta,
                                  "logprobs": chat_logprobs(entries) if req.logprobs and entries else None,
                                  "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "",
                  "logprobs": completion_logprobs(entries, offset) if req.logprobs and entries else None,
                  "finish_reason": finish}
        obj = "text_completion"
    out = {"id": _id(req), "object": obj, "created": req.created, "model": model_name,
           "system_fingerprint": "mlxtral", "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: GenRequest, model_name: str, use: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": _id(req), "object": obj, "created": req.created, "model": model_name,
            "system_fingerprint": "mlxtral", "choices": [], "usage": use}


def _id(req: GenRequest) -> str:
    return ("chatcmpl-" if req.kind == "chat" else "cmpl-") + req.id
