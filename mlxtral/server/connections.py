"""Connections the server keeps: a bounded number, each sending its request's headers in time.

uvicorn closes a keep-alive connection that stays silent after a response, but not one that never
sends a request, nor one that sends part of a header and stops (a slowloris): each holds a file
descriptor for good, and past the process's descriptor limit every new client is refused while
asyncio logs a traceback per failed ``accept()``. :class:`GuardedH11Protocol` is uvicorn's h11
protocol with two bounds more:

* a request's headers must be complete within :data:`HEADER_TIMEOUT` seconds of the connection (or
  of the previous response on a kept-alive one), else the connection is closed (the body has its
  own deadline, :data:`mlxtral.server.app.BODY_SECONDS`);
* at most :func:`max_connections` connections are open at once: one more closes the connection
  that has waited longest without a request under way (or, when every one has a request under
  way, itself), so the descriptors never run out and idle sockets cannot lock new clients out.

:class:`AcceptErrorFilter` keeps asyncio's "out of system resource" log to one line a minute.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 30.0  # seconds for a request's headers


def max_connections() -> int:
    """Half the descriptors this process may open beyond 128 for its own files, 16 to 4096."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, (soft - 128) // 2))


class GuardedH11Protocol(H11Protocol):  # type: ignore[misc]
    """uvicorn's h11 protocol with a header deadline and a cap on open connections."""

    limit = max_connections()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: Any = None
        self._since = time.monotonic()  # when it last had a request under way (or connected)
        if len(self.connections) > self.limit:
            idle = [c for c in self.connections if c is not self and c._idle()]
            if not idle:
                transport.close()
                return
            min(idle, key=lambda c: c._since).transport.close()
        self._arm()

    def _idle(self) -> bool:
        """No request under way (none yet, or its response sent), and not closing already."""
        return (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(HEADER_TIMEOUT, self._headers_late)

    def _headers_late(self) -> None:
        self._deadline = None
        if self._idle():
            self.transport.close()  # no request under way: its headers never came

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._since = time.monotonic()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)


class AcceptErrorFilter(logging.Filter):
    """asyncio's "socket.accept() out of system resource" error at most once a minute."""

    def __init__(self) -> None:
        super().__init__()
        self.last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if "accept() out of system resource" not in str(record.msg):
            return True
        now = time.monotonic()
        if now - self.last < 60:
            return False
        self.last = now
        record.exc_info = None  # one line, not the traceback
        record.exc_text = None
        return True
