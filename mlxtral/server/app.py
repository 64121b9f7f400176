"""The HTTP side of ``mlxtral serve``: Starlette routes, server-sent events, errors as OpenAI objects.

Routes: POST /v1/chat/completions, POST /v1/completions (also without the /v1 prefix, as
llama-server), GET /v1/models, GET /v1/models/{id}, GET /health. With an API key every route but /health needs
``Authorization: Bearer KEY``. A client that goes away cancels its sequence (its slot is free at the
next step).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxtral.sampling import SamplingParams
from mlxtral.server.protocol import (
    DEFAULT_SAMPLING,
    ApiError,
    GenRequest,
    chunk,
    error_body,
    full_response,
    parse_chat,
    parse_completion,
    usage_chunk,
)
from mlxtral.server.scheduler import Handle, Scheduler, failure

MAX_BODY = 8 * 1024 * 1024  # bytes of a request body
BODY_SECONDS = 60.0  # a request body arrives within this (a client that trickles one is answered 408)
MAX_BODIES = 8 * MAX_BODY  # bytes of bodies being received at once, all connections: past it, 503


class _Gone(Exception):
    """The client disconnected before its request body arrived."""


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    if e.status == 503 and e.code in ("queue_full", "out_of_memory"):
        headers = {"Retry-After": "1"}  # a slot or memory may be free in a moment
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _ApiKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every HTTP route but /health."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.key is not None and scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                e = ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
                await _error(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def request_line(h: Handle) -> str:
    """One line for the log about a finished request: its route, tokens, speed and how it ended."""
    secs = time.perf_counter() - h.submitted
    last = h.last
    kind = "chat" if h.req.kind == "chat" else "completion"
    if last is None:
        return f"{kind}: the client left after {secs:.2f} s"
    if last.error is not None:
        return f"{kind}: error {last.error.status} after {secs:.2f} s"
    u = last.usage or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    gen = u.get("completion_tokens", 0)
    ttft = f", first token {h.first_token - h.submitted:.2f} s" if h.first_token is not None else ""
    return (f"{kind}: prompt {u.get('prompt_tokens', 0)} tokens ({cached} cached), {gen} generated in "
            f"{secs:.2f} s ({gen / secs if secs > 0 else 0:.1f} tok/s{ttft}), finish {last.finish}")


def create_app(model: Any, scheduler: Scheduler, model_name: str, api_key: str | None = None,
               stopping: Callable[[], bool] = lambda: False, log: Callable[[str], None] | None = None,
               sampling: SamplingParams = DEFAULT_SAMPLING) -> Any:
    """The application; ``stopping()`` tells when the server is stopping (request bodies still
    arriving are then given up); ``log`` gets a line per finished request; ``sampling``: what a
    request that leaves a sampling parameter out gets."""
    created = int(time.time())
    inflight = [0]  # bytes of request bodies being received right now, every connection together

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **scheduler.status()})

    def model_object() -> dict[str, Any]:
        c = model.config
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mlxtral",
                "meta": {"backend": model.backend_name, "context": model.max_context, "n_layers": c.n_layers,
                         "n_experts": c.n_experts, "n_experts_per_tok": c.n_experts_per_tok,
                         "vocab_size": c.vocab_size}}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_object()]})

    async def one_model(request: Request) -> Response:
        """GET /v1/models/{id} (the openai client's ``models.retrieve``): the served model."""
        wanted = request.path_params["model_id"]
        if wanted != model_name:
            return _error(ApiError(404, f"no model {_cut(wanted, 80)!r}: this server serves {model_name!r}",
                                   "model", code="model_not_found"))
        return JSONResponse(model_object())

    async def read_body(request: Request) -> bytes:
        """The body, counted as it arrives (a chunked one has no length to check first): at most
        MAX_BODY bytes, within BODY_SECONDS, and given up when the server stops."""
        size = request.headers.get("content-length") or "0"
        if not size.isdigit() or len(size) > 18 or int(size) > MAX_BODY:
            raise ApiError(413, f"the request body is {_cut(size)} bytes; at most {MAX_BODY}")

        async def receive() -> bytes:
            parts: list[bytes] = []
            n = 0
            try:
                async for part in request.stream():
                    n += len(part)
                    inflight[0] += len(part)
                    if n > MAX_BODY:
                        raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
                    if inflight[0] > MAX_BODIES:
                        raise ApiError(503, "too many request bodies arriving at once; retry shortly",
                                       code="server_busy")
                    parts.append(part)
                return b"".join(parts)
            finally:
                inflight[0] -= n

        task = asyncio.ensure_future(receive())
        deadline = time.monotonic() + BODY_SECONDS
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if stopping():
                    raise ApiError(503, "the server is stopping", code="server_stopping")
                if time.monotonic() > deadline:
                    raise ApiError(408, f"the request body did not arrive within {BODY_SECONDS:.0f} s")
        except ClientDisconnect:
            raise _Gone from None
        finally:
            task.cancel()

    async def read_json(request: Request) -> Any:
        raw = await read_body(request)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({_cut(str(e))})") from None
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None

    def endpoint(parse: Callable[[Any, Any, SamplingParams], GenRequest]) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            try:
                body = await read_json(request)
                req = await run_in_threadpool(parse, body, model, sampling)
                constraint = None
                if req.grammar is not None:
                    from mlxtral.server.grammar import Constraint

                    constraint = await run_in_threadpool(Constraint, model.tokenizer, req.grammar)
                h = Handle(req, asyncio.get_running_loop(), constraint)
                scheduler.submit(h)
            except ApiError as e:
                return _error(e)
            except _Gone:  # the client left before its request arrived: nobody to answer
                return Response(status_code=400)
            except (MemoryError, RuntimeError, OSError) as e:  # no thread or memory for its set-up
                failed = failure(e, "setting up the request")
                if failed.status != 503:
                    raise
                if log is not None:
                    log(failed.message)
                return _error(failed)
            watcher = asyncio.ensure_future(_watch_disconnect(request, h))
            if req.stream:
                return StreamingResponse(_stream(h, watcher), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            try:
                return await _collect(h)
            finally:
                _end(h, watcher)

        return handler

    def _end(h: Handle, watcher: asyncio.Future[Any]) -> None:
        watcher.cancel()
        if not h.done:
            h.cancel()
            scheduler.wake()
        if log is not None:
            log(request_line(h))

    async def _watch_disconnect(request: Request, h: Handle) -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                if not h.done:
                    h.cancel()
                    scheduler.wake()
                return

    async def _collect(h: Handle) -> Response:
        parts: list[str] = []
        entries: list[dict[str, Any]] = []
        async for ev in h.events():
            if ev.error is not None:
                return _error(ev.error)
            parts.append(ev.text)
            entries += ev.logprobs
            if ev.finish is not None:
                h.done = True
                assert ev.usage is not None
                return JSONResponse(full_response(h.req, model_name, "".join(parts), ev.finish, entries,
                                                  ev.usage))
        raise AssertionError("unreachable")

    async def _stream(h: Handle, watcher: asyncio.Future[Any]) -> AsyncIterator[str]:
        req = h.req
        offset = req.prompt_chars
        try:
            if req.kind == "chat":
                yield _sse(chunk(req, model_name, "", None, first=True))
            async for ev in h.events():
                if ev.error is not None:
                    yield _sse(ev.error.body())
                    return
                if ev.text or ev.logprobs:
                    yield _sse(chunk(req, model_name, ev.text, None, ev.logprobs, offset=offset))
                    offset += len(ev.text)
                if ev.finish is not None:
                    h.done = True
                    yield _sse(chunk(req, model_name, None if req.kind == "chat" else "", ev.finish))
                    if req.include_usage and ev.usage is not None:
                        yield _sse(usage_chunk(req, model_name, ev.usage))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            _end(h, watcher)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))
        return _error(ApiError(status, f"no route {request.method} {request.url.path}", code="not_found"
                               if status == 404 else None))

    async def server_error(request: Request, exc: Exception) -> Response:
        body = error_body(f"internal error: {type(exc).__name__}", "server_error")
        return JSONResponse(body, status_code=500)

    chat_ep, completion_ep = endpoint(parse_chat), endpoint(parse_completion)
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", one_model, methods=["GET"]),
        Route("/models/{model_id:path}", one_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_ep, methods=["POST"]),
        Route("/chat/completions", chat_ep, methods=["POST"]),
        Route("/v1/completions", completion_ep, methods=["POST"]),
        Route("/completions", completion_ep, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(scheduler.stop)

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, 500: server_error},
                    lifespan=lifespan)
    return _ApiKey(app, api_key)
