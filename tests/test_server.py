"""`mlxtral serve`: the real server in a subprocess on a free local port with a tiny random model,
driven by the official `openai` client (and raw HTTP for the error paths); plus the protocol, the
prompt cache and the scheduler's queue in-process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import BACKENDS, random_weights, tiny_args, write_gguf  # noqa: E402

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "sk-test-key"
CTX = 512


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, err: list[str]) -> None:
        self.proc = proc
        self.url = url  # http://127.0.0.1:PORT
        self.err = err  # the server's stderr lines so far
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def http(self, method: str, path: str, body: Any = None, key: str | None = KEY, raw: bytes | None = None
             ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def _drain(f: Any, into: list[str]) -> None:
    """Keep the server's stderr pipe drained, its lines kept (bounded)."""
    for line in iter(f.readline, b""):
        if len(into) < 10_000:
            into.append(line.decode(errors="replace"))


def _raw(s: Server, head: bytes, parts: list[bytes], pause: float = 0.0) -> bytes:
    """Send a request by hand (``head`` then ``parts``) and return what came back (b"" if the server
    closed the connection first)."""
    host, port = s.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as c:
        try:
            c.sendall(head)
            for p in parts:
                c.sendall(p)
                time.sleep(pause)
        except OSError:
            pass  # the server answered (and closed) before the whole body was sent
        try:
            return c.recv(65536)
        except OSError:
            return b""


def start_server(model: Path, *args: str) -> Server:
    cmd = [sys.executable, "-m", "mlxtral.cli", "serve", str(model), "--port", "0", "--backend", "numpy",
           "-c", str(CTX), *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env={**os.environ, "MLXTRAL_BACKEND": "numpy"})
    assert proc.stderr is not None
    deadline = time.time() + 120
    seen = []
    while time.time() < deadline:
        line = proc.stderr.readline().decode()
        if not line:
            break
        seen.append(line)
        if " on http://" in line:
            url = line.rsplit(" on ", 1)[1].strip().removesuffix("/v1")
            threading.Thread(target=_drain, args=(proc.stderr, seen), daemon=True).start()
            return Server(proc, url, seen)
    proc.kill()
    raise AssertionError(f"the server did not start: {''.join(seen)}")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = tiny_args()
    return write_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf", random_weights(args, 0), args)


@pytest.fixture(scope="module")
def server(model_file: Path) -> Any:
    s = start_server(model_file, "--api-key", KEY, "--parallel", "8")
    yield s
    if s.proc.poll() is None:
        s.proc.send_signal(signal.SIGTERM)
        try:
            s.proc.wait(20)
        except subprocess.TimeoutExpired:
            s.proc.kill()


def _complete(s: Server, prompt: str, n: int = 12, **kw: Any) -> Any:
    return s.client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, **kw)


# ---- the happy paths, with the openai client ------------------------------------------------------


def test_models_and_health(server: Server) -> None:
    ids = [m.id for m in server.client.models.list().data]
    assert ids == ["tiny.gguf"]
    got = server.client.models.retrieve("tiny.gguf")  # GET /v1/models/{id}
    assert got.id == "tiny.gguf" and got.object == "model"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4")
    r = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2, extra_body={"prediction": None, "audio": None,
                                                                        "function_call": None})
    assert r.choices[0].message.content is not None
    code, body = server.http("GET", "/health", key=None)  # /health needs no key
    assert code == 200 and body["status"] == "ok" and body["slots"] == 8


def test_chat(server: Server) -> None:
    r = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=10, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(server: Server) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    full = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    chunks = list(server.client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_length_and_stream(server: Server) -> None:
    r = _complete(server, "The quick brown fox", 9)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 9
    parts = [c.choices[0].text for c in server.client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=9, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == r.choices[0].text


def test_seed_reproducible(server: Server) -> None:
    def draw(seed: int) -> str:
        r = server.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16,
                                             temperature=1.0, seed=seed)
        return r.choices[0].text

    a, b, c = draw(7), draw(7), draw(8)
    assert a == b
    assert a != c


def test_stop_strings_never_leak(server: Server) -> None:
    ref = _complete(server, "Numbers and letters", 24).choices[0].text
    assert len(ref) >= 12
    stop = ref[6:10]  # may straddle token boundaries
    want = ref[: ref.index(stop)]
    r = server.client.completions.create(model="tiny", prompt="Numbers and letters", max_tokens=24,
                                         temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    parts = [c.choices[0].text for c in server.client.completions.create(
        model="tiny", prompt="Numbers and letters", max_tokens=24, temperature=0, stop=stop, stream=True)
        if c.choices]
    assert "".join(parts) == want


def test_logprobs(server: Server) -> None:
    r = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert abs(e.logprob - tops[0]) < 1e-6  # greedy: the chosen token is the most likely one
    c = server.client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                         logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == len("Hello")
    # the text is the tokens' pieces (a completion's first one keeps its leading space), and each
    # offset points at its token's piece in prompt + text (OpenAI's and llama-cpp-python's)
    assert "".join(lp.tokens) == c.choices[0].text
    full = "Hello" + c.choices[0].text
    assert [full[o : o + len(t)] for o, t in zip(lp.text_offset, lp.tokens, strict=True)] == lp.tokens
    parts = [ch.choices[0].logprobs for ch in server.client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2, stream=True)
        if ch.choices and ch.choices[0].logprobs]
    assert [o for p in parts for o in p.text_offset] == lp.text_offset  # streamed the same


def test_chat_logprobs_add_up_to_the_content(server: Server, model_file: Path) -> None:
    """A chat answer starts its own text (no leading space on its first piece, SentencePiece): its
    first logprobs entry, and the alternatives beside it, are shown the same way, so the entries'
    bytes add up to the content (OpenAI's), streamed or not."""
    import mlxtral
    from mlxtral.server.scheduler import Scheduler

    tok = mlxtral.load(model_file, backend="numpy", max_context=64).tokenizer
    the = tok.encode("the", bos=False)[-1]  # "▁the"
    dec = tok.stream_decoder()
    assert Scheduler._token_info(the, -0.5, dec)["token"] == "the"
    dec.add(the)
    assert Scheduler._token_info(the, -0.5, dec)["token"] == " the"
    assert Scheduler._token_info(tok.eos_id, -0.5, dec)["bytes"] == []
    for prompt in ("Hello", "Tell me a story", "Why?"):
        msgs = [{"role": "user", "content": prompt}]
        r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                  logprobs=True, top_logprobs=2)
        got = b"".join(bytes(e.bytes) for e in r.choices[0].logprobs.content)
        assert got == r.choices[0].message.content.encode(), (got, r.choices[0].message.content)


def test_prompt_cache_reports_cached_tokens(server: Server) -> None:
    system = "You are a helpful assistant who answers in one short sentence. " * 4
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "What is a fox?"}]
    first = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    again = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 1
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content
    other = [{"role": "system", "content": system}, {"role": "user", "content": "And a dog?"}]
    r = server.client.chat.completions.create(model="tiny", messages=other, max_tokens=4, temperature=0)
    shared = r.usage.prompt_tokens_details.cached_tokens
    assert shared > len(system) // 8  # the shared system prompt
    cached: dict[int, int] = {}

    def ask(i: int) -> None:  # at the same time: each copies the cached prefix
        m = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}]
        u = server.client.chat.completions.create(model="tiny", messages=m, max_tokens=4, temperature=0)
        cached[i] = u.usage.prompt_tokens_details.cached_tokens

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(n >= shared for n in cached.values()) and len(cached) == 3


def test_json_schema_output_validates(server: Server) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "color": {"enum": ["red", "green", "blue"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "color", "n"], "additionalProperties": False}
    for seed in (1, 2):
        r = server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Give me JSON"}], max_tokens=120,
            temperature=0.8, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        obj = json.loads(r.choices[0].message.content)
        assert set(obj) == {"ok", "color", "n"} and isinstance(obj["ok"], bool)
        assert obj["color"] in ("red", "green", "blue") and 0 <= obj["n"] <= 9


def test_concurrent_greedy_clients_get_their_solo_text(server: Server) -> None:
    prompts = [f"Story number {i} begins with" for i in range(8)]
    solo = [_complete(server, p, 10).choices[0].text for p in prompts]
    out: dict[int, str] = {}

    def run(i: int) -> None:
        out[i] = _complete(server, prompts[i], 10).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [out[i] for i in range(8)] == solo


# ---- errors, with raw HTTP -------------------------------------------------------------------------


def _is_error(body: Any) -> dict[str, Any]:
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def test_api_key_required(server: Server) -> None:
    for key in (None, "wrong"):
        code, body = server.http("GET", "/v1/models", key=key)
        assert code == 401 and _is_error(body)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": "abc"}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": 3}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 10}}, "logit_bias"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format"),
    # an attacker's: a thousand-digit integer where a float goes, a non-object x-guidance
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 10**1000}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": -(10**400)}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 10**4000}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "object", "x-guidance": "junk"}}}},
     "response_format"),
])
def test_bad_parameters_are_400(server: Server, body: dict[str, Any], param: str) -> None:
    code, out = server.http("POST", "/v1/chat/completions", body)
    assert code == 400
    e = _is_error(out)
    assert e["type"] == "invalid_request_error" and e["param"] == param
    assert len(e["message"]) < 400  # a huge value is not echoed whole


def test_llama_server_parameter_names(server: Server) -> None:
    """llama-server's ``repeat_penalty`` and ``n_predict`` mean mlx-lm's/OpenAI's
    ``repetition_penalty`` and ``max_tokens``; both names at once must agree."""
    msgs = [{"role": "user", "content": "Hello"}]
    base = {"messages": msgs, "temperature": 0}
    url = "/v1/chat/completions"
    code, a = server.http("POST", url, {**base, "max_tokens": 5, "repetition_penalty": 1.3})
    code2, b = server.http("POST", url, {**base, "n_predict": 5, "repeat_penalty": 1.3})
    assert code == code2 == 200, (a, b)
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and b["usage"]["completion_tokens"] <= 5
    code, c = server.http("POST", "/v1/completions", {"prompt": "The quick", "n_predict": -1,
                                                      "temperature": 0})
    assert code == 200 and c["usage"]["completion_tokens"] > 16  # -1: to the end of the context, not 16
    code, e = server.http("POST", "/v1/chat/completions", {**base, "repeat_penalty": 1.1,
                                                          "repetition_penalty": 1.2})
    assert code == 400 and _is_error(e)["param"] == "repeat_penalty"
    code, e = server.http("POST", "/v1/chat/completions", {**base, "n_predict": 0})
    assert code == 400 and _is_error(e)["param"] == "max_tokens"


def test_a_last_assistant_message_is_continued(server: Server, model_file: Path) -> None:
    """llama-server's assistant prefill: the answer continues the last assistant message, its
    text as a completion of the same prompt ids gives it (a leading space kept)."""
    import mlxtral

    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Well, the"}]
    ids = mlxtral.load(model_file, backend="numpy").apply_chat_template(msgs)
    code, out = server.http("POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 6,
                                                             "temperature": 0})
    assert code == 200, out
    want = _complete(server, ids, 6).choices[0].text  # type: ignore[arg-type]
    assert out["choices"][0]["message"]["content"] == want


def test_context_overflow_names_the_numbers(server: Server) -> None:
    code, out = server.http("POST", "/v1/completions", {"prompt": list(range(100, 100 + CTX + 5))})
    e = _is_error(out)
    assert code == 400 and e["code"] == "context_length_exceeded" and str(CTX + 5) in e["message"]
    # a max_tokens beyond the context is not an error (editors send 4096 by habit): the answer ends
    # with the context, finish_reason "length", as llama-server's
    code, out = server.http("POST", "/v1/completions", {"prompt": "hello", "max_tokens": 100 * CTX,
                                                        "temperature": 0})
    assert code == 200, out
    u, finish = out["usage"], out["choices"][0]["finish_reason"]
    assert u["prompt_tokens"] + u["completion_tokens"] == CTX if finish == "length" else finish == "stop"


def test_not_found_bad_json_wrong_method(server: Server) -> None:
    code, out = server.http("GET", "/v1/nothing")
    assert code == 404 and _is_error(out)
    code, out = server.http("POST", "/v1/completions", raw=b"{not json")
    assert code == 400 and "JSON" in _is_error(out)["message"]
    code, out = server.http("GET", "/v1/completions")
    assert code == 405 and _is_error(out)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(server: Server, stream: bool) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "A very long story", "max_tokens": 400, "temperature": 0,
                       "stream": stream}).encode()
    with socket.create_connection((host, int(port))) as c:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        if stream:
            assert b"data:" in c.recv(4096) + c.recv(4096)
        deadline = time.time() + 20
        while server.http("GET", "/health")[1]["active"] != 1 and time.time() < deadline:
            time.sleep(0.02)
        assert server.http("GET", "/health")[1]["active"] == 1
    deadline = time.time() + 20
    while time.time() < deadline:
        if server.http("GET", "/health")[1]["active"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the disconnected request still holds its slot")


def test_hostile_bodies_are_answered_and_leave_no_traceback(server: Server) -> None:
    """A chunked body past the limit is cut off as it arrives (413), JSON nested past the parser's
    depth is a 400, an unknown parameter's name is echoed cut, and a client that leaves in the
    middle of its body leaves no traceback in the server's log."""
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + auth + b"\r\n"
    mib = b"x" * (1 << 20)
    got = _raw(server, head, [b"%x\r\n%s\r\n" % (len(mib), mib)] * 12 + [b"0\r\n\r\n"])
    assert got.startswith(b"HTTP/1.1 413"), got[:200]
    code, out = server.http("POST", "/v1/chat/completions",
                            raw=b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert code == 400 and "nested too deeply" in _is_error(out)["message"]
    code, out = server.http("POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "x"}], "k" * 1_000_000: 1})
    e = _is_error(out)
    assert code == 400 and len(e["message"]) < 200 and len(e["param"]) < 100
    n = len(server.err)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n" + auth
            + b"Content-Type: application/json\r\n\r\n")
    assert _raw(server, head, [b'{"pro'], pause=0.2) == b""  # no answer: the client left
    time.sleep(0.5)
    assert server.http("GET", "/health")[0] == 200
    assert not any("Traceback" in line or "Exception" in line for line in server.err[n:]), server.err[n:]


def test_sigterm_does_not_wait_for_a_stalled_body(model_file: Path) -> None:
    s = start_server(model_file)
    host, port = s.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as c:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) == 0
        assert time.time() - t0 < 8
    assert not any("Traceback" in line for line in s.err), s.err


def test_alias_and_request_log(model_file: Path) -> None:
    """--alias names the model for clients; every finished request is a line on stderr."""
    s = start_server(model_file, "--alias", "my-moe")
    try:
        assert [m.id for m in s.client.models.list().data] == ["my-moe"]
        r = s.client.completions.create(model="my-moe", prompt="Hello", max_tokens=3, temperature=0)
        assert r.model == "my-moe"
        deadline = time.time() + 10
        while not any("completion: prompt" in line for line in s.err) and time.time() < deadline:
            time.sleep(0.05)
        line = next(line for line in s.err if "completion: prompt" in line)
        assert "3 generated" in line and "tok/s" in line and "finish length" in line, line
    finally:
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(20)


def test_empty_api_key_is_refused(model_file: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mlxtral.cli", "serve", str(model_file), "--port", "0",
                        "--api-key", ""], capture_output=True, timeout=60)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and err.count("\n") == 0 and "--api-key is empty" in err


# ---- the command line ------------------------------------------------------------------------------


def test_port_taken_is_one_line(model_file: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "mlxtral.cli", "serve", str(model_file), "--port", str(port)]
        r = subprocess.run(cmd, capture_output=True, timeout=60)
    err = r.stderr.decode().strip()
    assert r.returncode == 1 and err.count("\n") == 0 and f"127.0.0.1:{port}" in err and "in use" in err


def test_sigterm_drains_and_exits(model_file: Path) -> None:
    s = start_server(model_file, "--parallel", "2")
    try:
        got: dict[str, Any] = {}

        def run() -> None:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
            got["r"] = c.completions.create(model="t", prompt="Drain me", max_tokens=60, temperature=0)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 20
        while s.http("GET", "/health")[1]["active"] == 0 and time.time() < deadline:
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert s.proc.wait(30) == 0
        assert got["r"].usage.completion_tokens == 60  # the request in flight finished
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


# ---- in-process ------------------------------------------------------------------------------------


def test_queue_full_is_503() -> None:
    import asyncio

    from mlxtral.sampling import SamplingParams
    from mlxtral.server.protocol import ApiError, GenRequest
    from mlxtral.server.scheduler import Handle, Scheduler

    model = SimpleNamespace(backend=None, tokenizer=SimpleNamespace(vocab_size=10, eos_ids={0}))
    sched = Scheduler(model, parallel=1, max_queue=2)  # not started: requests stay queued
    loop = asyncio.new_event_loop()
    try:
        req = GenRequest("completion", [1, 2], 4, SamplingParams())
        for _ in range(3):  # one for the free slot, two waiting
            sched.submit(Handle(req, loop))
        with pytest.raises(ApiError) as e:
            sched.submit(Handle(req, loop))
        assert e.value.status == 503 and e.value.code == "queue_full"
        assert "1 of 1 slots running and 2 of 2 queue places taken" in e.value.message, e.value.message
        from mlxtral.server.app import _error

        assert _error(e.value).headers["retry-after"] == "1"
    finally:
        loop.close()


def test_prompt_cache_lru_by_bytes() -> None:
    from mlxtral.generate import Session
    from mlxtral.server.prompt_cache import PromptCache

    def sess(ids: list[int]) -> Session:
        return Session(SimpleNamespace(offset=len(ids), max_context=100, trim=lambda n: None), list(ids))

    pc = PromptCache(max_bytes=10 * 8, bytes_per_token=8)  # ten tokens
    pc.put(sess([1, 2, 3, 4]))
    pc.put(sess([5, 6, 7, 8]))
    s, n = pc.take([1, 2, 3, 9])
    assert n == 3 and s.tokens == [1, 2, 3, 4] and len(pc) == 1
    pc.put(s)
    pc.put(sess([9, 9, 9, 9]))  # 12 tokens in all: the oldest ([5, 6, 7, 8]) goes
    assert pc.take([5, 6]) == (None, 0) and len(pc) == 2
    pc.put(sess([1, 2, 3, 4, 5]))  # supersedes [1, 2, 3, 4]
    assert len(pc) == 2 and pc.nbytes == 9 * 8


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxtral.errors import MlxtralError
    from mlxtral.server import check_installed

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(MlxtralError, match=r"pip install 'mlxtral\[serve\]'"):
        check_installed()


def test_batched_decode_is_bit_identical_to_solo(model_file: Path) -> None:
    import numpy as np

    import mlxtral
    from mlxtral.server.batched import decode_batch

    m = mlxtral.load(model_file, backend="numpy", max_context=64)
    prompts = [[1, 100 + i, 200 + 3 * i, 7][: 2 + i % 3] for i in range(5)]  # different positions
    solo, batch = [], []
    for p in prompts:
        s = m.new_session()
        m.backend.forward(p[:-1], s.cache)
        solo.append(m.backend.forward(p[-1:], s.cache))
        b = m.new_session()
        m.backend.forward(p[:-1], b.cache)
        batch.append(b.cache)
    out = decode_batch(m.backend, [p[-1] for p in prompts], batch)  # [5, V]
    for i in range(len(prompts)):
        np.testing.assert_array_equal(out[i], solo[i])
        assert batch[i].offset == len(prompts[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduler_matches_the_generation_loop(model_file: Path, backend: str) -> None:
    """Three requests at once through the scheduler give what model.generate gives for each alone
    (greedy and seeded sampling, a stop string); the MLX backend takes the one-forward-per-sequence
    path, the NumPy one the batched decode."""
    import asyncio

    import mlxtral
    from mlxtral.sampling import SamplingParams
    from mlxtral.server.prompt_cache import PromptCache
    from mlxtral.server.protocol import GenRequest
    from mlxtral.server.scheduler import Handle, Scheduler

    m = mlxtral.load(model_file, backend=backend, max_context=128)
    cases = [([1, 415, 2936], dict(temperature=0.0), []),
             ([1, 330, 1628, 302], dict(temperature=0.9, seed=3), []),
             ([1, 415, 2936, 9060], dict(temperature=0.7, top_k=40, seed=5), ["e"])]
    want = [m.generate(ids, max_tokens=12, session=m.new_session(), stop=stop, **kw)
            for ids, kw, stop in cases]
    sched = Scheduler(m, parallel=4, prefill_chunk=2, prompt_cache=PromptCache(1 << 30, 1024))

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        hs = [Handle(GenRequest("completion", ids, 12, SamplingParams(**kw), stop=stop), loop)
              for ids, kw, stop in cases]
        for h in hs:
            sched.submit(h)

        async def text(h: Handle) -> str:
            return "".join([ev.text async for ev in h.events()])

        return await asyncio.gather(*(text(h) for h in hs))

    sched.start()
    try:
        assert asyncio.run(run()) == want
    finally:
        sched.stop()


def test_memory_running_out_fails_the_request_not_the_server(model_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A session's KV cache that cannot be allocated (under ulimit -v: numpy's MemoryError in
    new_session) killed the scheduler thread, and every later request hung. Now that request gets
    a 503 and the next one its answer; a step that fails ends its sequences, not the worker."""
    import asyncio

    import mlxtral
    from mlxtral.sampling import SamplingParams
    from mlxtral.server.protocol import GenRequest
    from mlxtral.server.scheduler import Handle, Scheduler

    m = mlxtral.load(model_file, backend="numpy", max_context=128)
    want = m.generate([1, 415, 2936], max_tokens=6, session=m.new_session(), temperature=0.0)
    real = m.new_session
    calls = {"n": 0}

    def new_session() -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("Unable to allocate 90.0 MiB for an array with shape (30, 3, 4096, 64)")
        return real()

    monkeypatch.setattr(m, "new_session", new_session)
    sched = Scheduler(m, parallel=2, prefill_chunk=8)

    async def ask() -> tuple[str, Any]:
        h = Handle(GenRequest("completion", [1, 415, 2936], 6, SamplingParams(temperature=0.0)),
                   asyncio.get_running_loop())
        sched.submit(h)
        text, err = "", None
        async for ev in h.events():
            text += ev.text
            err = err or ev.error
        return text, err

    sched.start()
    try:
        _, err = asyncio.run(ask())
        assert err is not None and err.status == 503 and err.code == "out_of_memory", err
        assert asyncio.run(ask()) == (want, None)  # the worker lives on
        assert sched._thread.is_alive()
    finally:
        sched.stop()


@pytest.mark.parametrize("host", ["a" * 64, "x..y", "a." * 3000])
def test_bind_refuses_a_host_name_in_one_line(host: str) -> None:
    """A label IDNA cannot encode (UnicodeError, not gaierror) is a usage error; the name is cut."""
    from mlxtral.errors import MlxtralError
    from mlxtral.server import bind

    with pytest.raises(MlxtralError) as e:
        bind(host, 0)
    assert str(e.value).startswith("cannot listen on ") and len(str(e.value)) < 300


def test_prompt_cache_counts_what_a_trimmed_cache_holds() -> None:
    """A cached session trimmed to a few tokens still holds the buffers (MLX) or the pages (NumPy)
    of every position it filled: the byte cap counts those, or it would never evict (an attacker's
    long prompts, then short ones sharing their first tokens, grew an MLX server without bound)."""
    from tiny_models import tiny_args

    from mlxtral.backends.numpy_backend import KVCache as NpCache
    from mlxtral.generate import Session
    from mlxtral.server.prompt_cache import PromptCache

    args = tiny_args()
    per_pos = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4
    c = NpCache(args, 1024)
    c.offset = 300
    c.trim(3)
    assert c.offset == 3 and c.held_bytes == 300 * per_pos
    pc = PromptCache(max_bytes=1 << 30, bytes_per_token=per_pos)
    assert pc.size(Session(c, [1, 2, 3])) == 300 * per_pos
    mx = pytest.importorskip("mlx.core")
    from mlxtral.backends.mlx_backend import KVCache as MlxCache

    m = MlxCache(1, args.n_kv_heads, args.head_dim, 4096, mx.float32)
    k = mx.zeros((1, args.n_kv_heads, 300, args.head_dim))
    m.update(0, 0, k, k)
    m.offset = 300
    m.trim(3)
    assert pc.size(Session(m, [1, 2, 3])) == m.nbytes == 2 * 512 * args.n_kv_heads * args.head_dim * 4


def test_text_no_context_holds_is_refused_before_tokenizing(server: Server) -> None:
    """A prompt longer than any context of this server can hold is a 400 from its length alone (an
    8 MB prompt was tokenized whole first: minutes of CPU, going on after its client left)."""
    text = "a" * ((8 << 20) - 200)  # the body limit's worth
    for path, body, param in (("/v1/completions", {"prompt": text}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]},
                               "messages")):
        code, out = server.http("POST", path, body)
        e = _is_error(out)
        assert code == 400 and e["code"] == "context_length_exceeded" and e["param"] == param, out
        assert "characters" in e["message"]  # counted, not tokenized


def test_max_chars_never_refuses_a_text_that_fits(model_file: Path) -> None:
    import mlxtral

    tok = mlxtral.load(model_file, backend="numpy", max_context=64).tokenizer
    for text in ("Hello there", "a" * 1000, " " * 500, "e\u0301" * 300, "日本語のテキスト" * 50,
                 "\n\n\t" * 99, "[INST] hi [/INST]" * 20, "\U0001F600" * 100):
        assert len(text) <= tok.max_chars(len(tok.encode(text))), text[:20]


def test_connections_without_a_request_are_closed() -> None:
    """A connection whose request headers do not come within HEADER_TIMEOUT (none, or a part of
    them: a slowloris) is closed; past the cap a new connection closes the longest-idle one, so
    idle sockets can neither exhaust the descriptors nor lock new clients out."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState

    from mlxtral.server.connections import GuardedH11Protocol

    class Transport:
        def __init__(self) -> None:
            self.closed = False

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)

        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...
        def write(self, data: bytes) -> None: ...

    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    config = uvicorn.Config(app, http=GuardedH11Protocol)
    config.load()
    loop = asyncio.new_event_loop()
    state = ServerState()
    try:
        def connect() -> tuple[GuardedH11Protocol, Transport]:
            p = GuardedH11Protocol(config=config, server_state=state, app_state={}, _loop=loop)
            t = Transport()
            p.connection_made(t)  # type: ignore[arg-type]
            return p, t

        p, t = connect()
        p.data_received(b"POST /v1/completions HTTP/1.1\r\nX-a: ")  # part of a header, then nothing
        assert p._deadline is not None and not t.closed
        p._headers_late()  # what the deadline calls
        assert t.closed
        p.connection_lost(None)
        old = GuardedH11Protocol.limit
        GuardedH11Protocol.limit = 2
        try:
            conns = [connect() for _ in range(3)]  # the third closes the first, the longest idle
            assert [t.closed for _, t in conns] == [True, False, False]
        finally:
            GuardedH11Protocol.limit = old
    finally:
        loop.close()


def test_sampling_defaults_as_llama_server(model_file: Path) -> None:
    """A request that leaves a sampling parameter out gets llama-server's default (temperature 0.8,
    top_k 40, top_p 0.95, min_p 0.05), or serve's --temp/--top-k/--top-p/--min-p/--repeat-penalty;
    a parameter the request gives is its own."""
    import mlxtral
    from mlxtral.sampling import SamplingParams
    from mlxtral.server.protocol import DEFAULT_SAMPLING, parse_chat, parse_completion

    m = mlxtral.load(model_file, backend="numpy", max_context=64)
    msgs = {"messages": [{"role": "user", "content": "Hi"}]}
    s = parse_chat(msgs, m).sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty) == (0.8, 40, 0.95, 0.05, 1.0)
    assert parse_completion({"prompt": "Hi"}, m).sampling == DEFAULT_SAMPLING
    mine = SamplingParams(0.0, 0, 1.0, 0.0, 1.1)
    s = parse_chat(msgs, m, mine).sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty) == (0.0, 0, 1.0, 0.0, 1.1)
    s = parse_chat({**msgs, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}, m).sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (1.0, 0, 1.0, 0.0)


def test_serve_sampling_flags(model_file: Path) -> None:
    """serve --temp 0: requests without a temperature are greedy (the same text every time); a bad
    value is one line before anything loads."""
    s = start_server(model_file, "--temp", "0")
    try:
        texts = {s.client.completions.create(model="tiny", prompt="Once", max_tokens=8).choices[0].text
                 for _ in range(3)}
        assert len(texts) == 1, texts
    finally:
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(20)
    for bad in (["--top-p", "0"], ["--temp", "-1"], ["--min-p", "1"], ["--top-k", "-2"]):
        cmd = [sys.executable, "-m", "mlxtral.cli", "serve", str(model_file), "--port", "0", *bad]
        r = subprocess.run(cmd, capture_output=True, timeout=60)
        err = r.stderr.decode().strip()
        assert r.returncode == 2 and err.count("\n") == 0 and err.startswith("error: "), (bad, err)


def test_no_thread_for_a_request_is_a_503(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose set-up cannot start a thread (memory short under ulimit -v) is a 503
    out_of_memory with Retry-After and one log line, not a 500 with a traceback in the log."""
    from starlette.testclient import TestClient

    import mlxtral
    from mlxtral.server import app as app_mod
    from mlxtral.server.scheduler import Scheduler

    m = mlxtral.load(model_file, backend="numpy", max_context=64)
    lines: list[str] = []
    sched = Scheduler(m, parallel=1, max_queue=1)  # not started: nothing runs

    def no_thread(*a: Any, **k: Any) -> Any:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(app_mod, "parse_completion", no_thread)
    client = TestClient(app_mod.create_app(m, sched, "tiny", log=lines.append))
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "out_of_memory" and "thread" in r.json()["error"]["message"]
    assert len(lines) == 1 and "setting up the request" in lines[0]
