"""uvicorn's HTTP/1.1 protocol (h11) with the limits uvicorn itself lacks, for ``relist serve``.

- Header timeout: a request line and headers must be complete within ``header_timeout`` seconds of the
  connection opening, or of a kept-alive connection's first byte of its next request. A client that sends
  them a byte at a time (or nothing at all) no longer holds a connection: it gets 408 (nothing if it sent
  nothing) and the connection is closed. uvicorn bounds only the idle time after a response.
- Connection bound: past ``max_connections`` open connections a request gets 503 with ``Retry-After``
  and a request id, counted in /metrics (uvicorn's own bound answers in plain text, uncounted).
- Load shedding before the body is read: a POST /rerank that the app's ``overloaded()`` would shed gets its
  503 here, without going through the app, so that refusing costs the core that serves as little as it can.
- uvicorn's 400 for bytes that are not HTTP is counted in /metrics too.

The limits and the metrics come from the app's lifespan state (``LIMITS`` key), so every worker process
of ``--workers N`` reads its own. The body timeout is the app's (it reads the body).
"""

from __future__ import annotations

import asyncio
import json
import uuid

from uvicorn.protocols.http.h11_impl import H11Protocol

from relist.serve.settings import LIMITS  # {"header_timeout": s, "max_connections": n, "metrics": ServiceMetrics}

DEFAULT_HEADER_TIMEOUT = 10.0


def raw_response(status: int, phrase: str, payload: dict, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 response with a JSON body that closes the connection."""
    body = json.dumps(payload).encode("utf-8")
    lines = [f"HTTP/1.1 {status} {phrase}", "content-type: application/json", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers] + ["connection: close", "", ""]
    return "\r\n".join(lines).encode("ascii") + body


class ServeProtocol(H11Protocol):
    """H11Protocol plus a header timeout, a counted connection bound and counted protocol errors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        limits = self.app_state.get(LIMITS) or {}
        self.header_timeout = float(limits.get("header_timeout", DEFAULT_HEADER_TIMEOUT))
        self.max_connections = int(limits.get("max_connections") or 0)
        self.metrics = limits.get("metrics")
        self.overloaded = limits.get("overloaded")
        self.header_timer: asyncio.TimerHandle | None = None
        self.partial = False  # bytes of a request whose headers are not complete yet
        self.served_app, self.app = self.app, self._bounded

    def _count(self, path: str, status: int, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe(path, status, 0.0, reason)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_late(self) -> None:
        self.header_timer = None
        if self._in_request() or self.transport.is_closing():
            return
        if self.partial:
            message = f"request headers not complete within {self.header_timeout:g} s"
            self.transport.write(raw_response(408, "Request Timeout", {"error": message}))
            self._count("", 408, "header_timeout")
        self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._in_request():
            if self.header_timer is None:
                self._arm()  # the first byte of a kept-alive connection's next request
            self.partial = True
        super().data_received(data)
        if self._in_request():  # the headers are complete: the app times the body
            self._disarm()
            self.partial = False

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._count("", 400, "bad_http")
        super().send_400_response(msg)

    async def _bounded(self, scope, receive, send) -> None:
        """The app, or 503 while more than ``max_connections`` connections are open or the app would shed."""
        if self.max_connections and len(self.connections) > self.max_connections:
            message = f"more than {self.max_connections} open connections"
            await self._refuse(scope, send, "connections", message, "1", close=True)
            return
        if self.overloaded is not None and scope.get("method") == "POST" and scope.get("path") == "/rerank":
            verdict = self.overloaded()
            if verdict is not None:
                reason, message, retry_after = verdict
                await self._refuse(scope, send, reason, message, retry_after, close=False)
                return
        await self.served_app(scope, receive, send)

    async def _refuse(self, scope, send, reason: str, message: str, retry_after: str, close: bool) -> None:
        """503 with Retry-After and a request id, counted; the unread body is skipped by the protocol."""
        request_id = uuid.uuid4().hex[:12]
        payload = {"error": f"overloaded: {message}; retry shortly", "request_id": request_id}
        body = json.dumps(payload).encode("utf-8")
        self._count(scope.get("path", ""), 503, reason)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", retry_after.encode()),
            (b"x-request-id", request_id.encode()),
        ]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
