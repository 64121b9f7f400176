"""``mlxtral serve``: an OpenAI-compatible HTTP server with continuous batching and a prompt cache.

    from mlxtral.server import bind, run
    sock = bind("127.0.0.1", 8080)          # before the model loads: a taken port fails at once
    run(model, sock, parallel=8)

Needs the optional extra ``mlxtral[serve]`` (starlette, uvicorn; llguidance for response_format).
"""
from __future__ import annotations

import signal
import socket
from typing import Any

from mlxtral.errors import MlxtralError, UsageError

INSTALL_HINT = "pip install 'mlxtral[serve]'"


def check_installed() -> None:
    """One line naming the extra when starlette or uvicorn is missing."""
    missing = []
    for name in ("starlette", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MlxtralError(f"the server needs {' and '.join(missing)}: {INSTALL_HINT}")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port); one line when it is taken or not ours."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:  # UnicodeError: a name IDNA cannot encode
        from mlxtral.display import show

        why = e.strerror if isinstance(e, socket.gaierror) else "not a valid host name"
        raise UsageError(f"cannot listen on {show(host, 100)}: {why}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)  # connections queue from now on, while the model loads
    except OSError as e:
        sock.close()
        what = "the port is in use (another server?)" if e.errno == 98 else (e.strerror or str(e))
        from mlxtral.display import term_safe

        raise MlxtralError(f"cannot listen on {term_safe(host, 100)}:{port}: {what}") from None
    sock.set_inheritable(True)
    return sock


def check_api_key(key: str | None) -> None:
    """An empty key would serve without one: refused (``--api-key "$KEY"`` with KEY unset)."""
    if key is not None and not key.strip():
        raise UsageError("--api-key is empty (an unset variable?): give the key, or leave the option out "
                         "to serve without one")


def run(model: Any, sock: socket.socket, *, model_name: str | None = None, parallel: int = 8,
        max_queue: int = 64, api_key: str | None = None, prompt_cache_bytes: int = 2 << 30,
        prefill_chunk: int = 128, graceful_timeout: float = 30.0, on_ready: Any = None,
        log: Any = None, sampling: Any = None) -> None:
    """Serve until SIGINT/SIGTERM: new connections stop, requests in flight finish (at most
    ``graceful_timeout`` seconds), then the scheduler stops. ``log(line)`` gets a line per finished
    request; ``sampling`` (a SamplingParams): what a request that leaves a parameter out gets
    (default: llama-server's, ``protocol.DEFAULT_SAMPLING``)."""
    import uvicorn

    check_api_key(api_key)

    from mlxtral.server.app import create_app
    from mlxtral.server.prompt_cache import PromptCache, kv_bytes_per_token
    from mlxtral.server.scheduler import Scheduler

    warm = getattr(model.backend, "warm", None)
    if warm is not None:  # compiled now (or loaded from the disk cache), not on the first requests:
        warm(batch=parallel > 1)  # on every rank when the model is split across processes
    itemsize = getattr(getattr(model.backend, "kv_dtype", None), "itemsize", 4)
    cache = PromptCache(prompt_cache_bytes, kv_bytes_per_token(model.config, itemsize)) \
        if prompt_cache_bytes > 0 else None
    sched = Scheduler(model, parallel=parallel, max_queue=max_queue, prefill_chunk=prefill_chunk,
                      prompt_cache=cache)
    sched.start()
    server: Any = None
    from mlxtral.server.protocol import DEFAULT_SAMPLING

    app = create_app(model, sched, model_name or model.path.name, api_key=api_key,
                     stopping=lambda: server is not None and server.should_exit, log=log,
                     sampling=sampling or DEFAULT_SAMPLING)
    import logging

    from mlxtral.server.connections import AcceptErrorFilter, GuardedH11Protocol

    logging.getLogger("asyncio").addFilter(AcceptErrorFilter())
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            http=GuardedH11Protocol, timeout_graceful_shutdown=graceful_timeout,
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready()
    # uvicorn handles SIGINT/SIGTERM while it serves (stop accepting, let the requests in flight
    # finish), then re-raises the signal it caught into the handlers it found: no-op ones here, so
    # that a drained server exits 0 instead of dying of that signal afterwards.
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, lambda *_: None)
        except ValueError:  # not the main thread: uvicorn installs nothing either
            pass
    try:
        server.run(sockets=[sock])
    finally:
        sched.stop()
        for sig, h in old.items():
            signal.signal(sig, h)
