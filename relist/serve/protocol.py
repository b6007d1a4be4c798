"""uvicorn's HTTP/1.1 protocol (h11) with the limits uvicorn itself lacks, for ``relist serve``.

- Header timeout: a request line and headers must be complete within ``header_timeout`` seconds of the
  connection opening, or of a kept-alive connection's first byte of its next request. A client that sends
  them a byte at a time (or nothing at all) no longer holds a connection: it gets 408 (nothing if it sent
  nothing) and the connection is closed. uvicorn bounds only the idle time after a response.
- Write timeout: a connection whose bytes stay unsent for ``write_timeout`` seconds (a client that
  pipelines requests and never reads the answers, or stops reading mid-answer) is aborted and counted in
  /metrics (``relist_connections_closed_total``); uvicorn waited on it forever.
- Connection bound: past ``max_connections`` open connections a request gets 503 with ``Retry-After``
  and a request id, counted in /metrics (uvicorn's own bound answers in plain text, uncounted). GET
  /healthz and /readyz are still answered, on a connection closed after the answer, so that probes see
  the service (and /readyz says it is not ready while the bound is passed).
- Load shedding and admission before the body is read: a POST /rerank that the app's ``overloaded()``
  would shed gets its 503 here, without going through the app; one it would not is admitted here (counted
  among the requests ahead until its answer), so that the requests whose headers arrive in the same moment
  see each other rather than all passing the check and all being shed after their bodies were read. A
  request whose body is not all here ``BODY_STALL`` seconds after its headers stops counting until the app
  has read it (and admits it again), so that stalled uploads do not have the requests behind them shed.
  When the request line and headers arrive in one piece (the usual case), the refusal is written
  straight from the bytes received, without h11, an ASGI task or the app, and the body is skipped as it
  arrives: under a retry storm (clients that retry a 503 at once), refusing costs the server's core as
  little as it can. The connection is then not read for ``shed_pause`` seconds, so that a client
  retrying at once is heard at most that often rather than as fast as the loop can refuse it (each
  refusal of such a storm otherwise took a turn of the loop from the requests being served). Anything
  unusual in the headers (chunked bodies, ``Expect``, ``Connection``) takes the ordinary path.
- uvicorn's 400 for bytes that are not HTTP is counted in /metrics too.

The limits and the metrics come from the app's lifespan state (``LIMITS`` key), so every worker process
of ``--workers N`` reads its own. The body timeout is the app's (it reads the body).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from relist.serve.settings import ADMITTED, LIMITS  # LIMITS: the app's create_app says what it holds

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_WRITE_TIMEOUT = 10.0
PROBES = ("/healthz", "/readyz")
BODY_STALL = 0.05  # seconds after its headers by which an admitted request's body is expected to be all here
SHED_LINE = b"POST /rerank HTTP/1.1\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,12})[ \t]*(?=\r\n|$)")
_ORDINARY_PATH = (b"\r\ntransfer-encoding:", b"\r\nexpect:", b"\r\nconnection:")  # left to h11


def raw_response(status: int, phrase: str, payload: dict, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 response with a JSON body that closes the connection."""
    body = json.dumps(payload).encode("utf-8")
    lines = [f"HTTP/1.1 {status} {phrase}", "content-type: application/json", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers] + ["connection: close", "", ""]
    return "\r\n".join(lines).encode("ascii") + body


def shed_response(message: str, retry_after: str) -> tuple[bytes, str]:
    """A kept-alive 503 with Retry-After and a new request id, written without h11; (bytes, request id)."""
    request_id = os.urandom(6).hex()  # as uuid4().hex[:12], for a fifth of the time
    error = json.dumps(f"overloaded: {message}; retry shortly")
    body = f'{{"error": {error}, "request_id": "{request_id}"}}'.encode("utf-8")
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: {retry_after}\r\nx-request-id: {request_id}\r\n\r\n"
    )
    return head.encode("ascii") + body, request_id


class ServeProtocol(H11Protocol):
    """H11Protocol plus header and write timeouts, a counted connection bound that probes pass, shedding
    straight from the received bytes, and counted protocol errors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        limits = self.app_state.get(LIMITS) or {}
        self.header_timeout = float(limits.get("header_timeout", DEFAULT_HEADER_TIMEOUT))
        self.write_timeout = float(limits.get("write_timeout", DEFAULT_WRITE_TIMEOUT))
        self.shed_pause = float(limits.get("shed_pause", 0.0))
        self.max_connections = int(limits.get("max_connections") or 0)
        self.max_body_bytes = int(limits.get("max_body_bytes") or 0)
        self.metrics = limits.get("metrics")
        self.overloaded = limits.get("overloaded")
        self.admit, self.release = limits.get("admit"), limits.get("release")
        if LIMITS in self.app_state and limits.get("connections") is None:
            limits["connections"] = self.connections  # the server's set, for /readyz
        self.header_timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None
        self.pause_timer: asyncio.TimerHandle | None = None
        self.partial = False  # bytes of a request whose headers are not complete yet
        self.skip = 0  # body bytes of a request shed from its headers, still to be read and dropped
        self.pre_admitted = None  # the admission of a request admitted from its bytes, on its way to _bounded
        self.served_app, self.app = self.app, self._bounded

    def _count(self, path: str, status: int, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe(path, status, 0.0, reason)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    # ---- header timeout ---------------------------------------------------------------------------------
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
        if self.partial and not self.skip:
            message = f"request headers not complete within {self.header_timeout:g} s"
            self.transport.write(raw_response(408, "Request Timeout", {"error": message}))
            self._count("", 408, "header_timeout")
        self.transport.close()  # a shed request's body that stopped coming is let go without an answer

    # ---- write timeout ----------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=0)  # told (pause_writing) whenever the kernel cannot take more
        self._arm()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def _write_stalled(self) -> None:
        self.write_timer = None
        if self.metrics is not None:
            self.metrics.observe_closed("write_timeout")
        self.transport.abort()  # close() would wait for the unsent bytes, which the client never takes

    def connection_lost(self, exc) -> None:
        self._disarm()
        for timer in (self.write_timer, self.pause_timer):
            if timer is not None:
                timer.cancel()
        self.write_timer = self.pause_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self._drop_admission()  # else the app has it and releases it
        super().connection_lost(exc)

    # ---- reading ------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.skip:
            taken = min(self.skip, len(data))
            self.skip -= taken
            data = data[taken:]
            if self.skip:
                return
            self._disarm()
            self._idle_again()
            if not data:
                return
        shed = False
        while data.startswith(SHED_LINE) and self._idle():
            rest = self._admit_from_bytes(data)
            if rest is None:
                break
            shed, data = True, rest
            if not data or self.skip:
                break
        if shed:
            if self.shed_pause > 0 and self.pause_timer is None:
                self.flow.pause_reading()  # a client told to retry later is not heard again at once
                self.pause_timer = self.loop.call_later(self.shed_pause, self._resume_after_shed)
            if not data or self.skip:
                return
        if not self._in_request():
            if self.header_timer is None:
                self._arm()  # the first byte of a kept-alive connection's next request
            self.partial = True
        super().data_received(data)
        if self._in_request():  # the headers are complete: the app times the body
            self._disarm()
            self.partial = False

    def _resume_after_shed(self) -> None:
        self.pause_timer = None
        if not self.transport.is_closing():
            self.flow.resume_reading()
            if not self.skip and not self._in_request():
                self._keep_alive()

    def _idle_again(self) -> None:
        """After a response written here: uvicorn's keep-alive timer (once reading resumes, if paused)."""
        if self.pause_timer is None:
            self._keep_alive()

    def _idle(self) -> bool:
        """Between requests, with nothing buffered in h11: bytes received now start a request."""
        return (
            not self._in_request()
            and not self.partial
            and not self.flow.write_paused  # a client not reading its answers: h11's path pauses its reading
            and self.conn.our_state is h11.IDLE
            and self.conn.their_state is h11.IDLE
            and not self.conn.trailing_data[0]
        )

    def _admit_from_bytes(self, data: bytes) -> bytes | None:
        """If ``data`` holds the whole head of a POST /rerank: shed it (answer it, drop its body, ``skip``
        counting what is still to come, and return the bytes after it), or admit it (``pre_admitted``; h11
        reads it next and ``_bounded`` serves it) and return None. None too when the head is not all here or
        is unusual (the ordinary path decides).

        Admitting here, in the same turn of the loop as the check, lets the requests that arrive together
        see each other: checked a turn later, all of them passed the check while there was room, and all but
        a few were then refused the expensive way."""
        if self.admit is None or self.transport.is_closing():
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = data[len(SHED_LINE) - 2 : end].lower()
        if any(name in head for name in _ORDINARY_PATH) or head.count(b"\r\ncontent-length:") > 1:
            return None
        match = _CONTENT_LENGTH.search(head)
        if match is None and b"\r\ncontent-length:" in head:
            return None  # a length this reader does not take (say 0000000000000034): h11 reads it, or refuses it
        length = int(match.group(1)) if match else 0
        if self.max_body_bytes and length > self.max_body_bytes:
            return None  # the app answers 413 and closes
        if self.max_connections and len(self.connections) > self.max_connections:
            return None  # the bound's own answer, which closes
        verdict, admission = self.admit()
        if verdict is None:
            self.pre_admitted = admission
            return None
        reason, message, retry_after = verdict
        self._unset_keepalive_if_required()
        response, _ = shed_response(message, retry_after)
        self.transport.write(response)
        self._count("/rerank", 503, reason)
        start = end + 4
        available = len(data) - start
        if available < length:
            self.skip = length - available
            self._arm()  # the rest of the body must come within the header timeout
            return b""
        self._disarm()
        self._idle_again()
        return data[start + length :]

    def _keep_alive(self) -> None:
        """Idle again after a response written here: uvicorn's keep-alive timer, as after its own responses."""
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _drop_admission(self) -> None:
        """A request admitted from its bytes that will never reach the app (bad HTTP, connection lost)."""
        if self.pre_admitted is not None:
            admission, self.pre_admitted = self.pre_admitted, None
            self.release(admission)

    def send_400_response(self, msg: str) -> None:
        self._count("", 400, "bad_http")
        self._drop_admission()
        super().send_400_response(msg)

    # ---- the app, behind the bounds ------------------------------------------------------------------------
    async def _bounded(self, scope, receive, send) -> None:
        """The app, or 503 while more than ``max_connections`` connections are open (probes are answered, on
        a connection closed afterwards) or the app would shed."""
        admission, self.pre_admitted = self.pre_admitted, None
        if self.max_connections and len(self.connections) > self.max_connections:
            if admission is not None:
                self.release(admission)
            if scope.get("method") == "GET" and scope.get("path") in PROBES:

                async def closing(message) -> None:  # answered, then the connection goes
                    if message["type"] == "http.response.start":
                        message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
                    await send(message)

                await self.served_app(scope, receive, closing)
                return
            message = f"more than {self.max_connections} open connections"
            await self._refuse(scope, send, "connections", message, "1", close=True)
            return
        if self.admit is not None and scope.get("method") == "POST" and scope.get("path") == "/rerank":
            verdict = None
            if admission is None:
                verdict, admission = self.admit()
            if verdict is not None:
                reason, message, retry_after = verdict
                await self._refuse(scope, send, reason, message, retry_after, close=False)
                return
            # counted from its headers, so that the requests whose headers arrive together see each other
            # (checked after the body, all were admitted), unless its body stalls (``_let_go``)
            held = scope.setdefault("state", {})[ADMITTED] = {"admission": admission}
            stall = self.loop.call_later(BODY_STALL, self._let_go, self.cycle, held)
            try:
                await self.served_app(scope, receive, send)
            finally:
                stall.cancel()
                if held["admission"] is not None:
                    self.release(held["admission"])
            return
        await self.served_app(scope, receive, send)

    def _let_go(self, cycle, held: dict) -> None:
        """A request admitted from its headers whose body is not all here ``BODY_STALL`` seconds later stops
        counting among the requests ahead (the app admits it again once its body is read): stalled uploads
        made every request behind them expect a wait they never caused, and be shed."""
        if cycle is self.cycle and cycle.more_body and held["admission"] is not None:
            self.release(held["admission"])
            held["admission"] = None

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
