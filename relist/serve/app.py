"""The FastAPI application: POST /rerank, GET /healthz, GET /readyz, GET /metrics, with micro-batching.

Concurrent /rerank requests wait up to ``window_ms`` (or until ``max_batch`` are queued) and go as one
batch of raw bodies to the model process (``relist.serve.worker``), which parses and checks every body
and runs the good ones through LAST; the event loop of this process only reads, sheds and answers, so
neither parsing nor the model competes with it for the interpreter lock. A watchdog replaces a model
process that exits or hangs (``ModelProcess``); while the new one loads, /rerank is shed with 503
(``model_unavailable``) and /readyz is 503. LAST keeps no state between
requests, so several uvicorn worker processes can serve the same checkpoint (``workers``); each has its
own batcher, model process and /metrics. The sampling noise comes from one seeded generator per model
process, so a request's exploration depends on what it was batched with.

Only ``application/json`` bodies are read (415 otherwise), within ``body_timeout_seconds`` (408); every
bad body gets a 4xx naming the problem. Load is shed with 503 and ``Retry-After`` when ``max_queue``
requests are waiting, or when admitting one more would have a request wait longer than ``deadline_ms``
(the wait so far of the longest-waiting request in the batch it would join, plus the batches ahead and
that batch as the recent batch times say, ``BatchTime``), so that the requests that are served are served
in time; the server's protocol sheds before the body is read, most often without parsing the request
through h11 at all (``relist.serve.protocol``), the handler again after it. An admitted request not
answered within ``request_timeout_ms`` gets 504 (and is dropped from the queue if it is still there).
Every answer carries an ``x-request-id`` header; a 5xx body names it (the log has a 500's details under
it), never internals. Every answer, 2xx or not, is counted in ``/metrics`` by path and status, and every
non-2xx also by reason, after its body was built.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from http import HTTPStatus
from math import ceil
from typing import NamedTuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from relist.config import from_mapping, to_mapping
from relist.serve.metrics import ServiceMetrics
from relist.serve.requests import BadRequest
from relist.serve.service import Service
from relist.serve.settings import ADMITTED, LIMITS, ServeSettings
from relist.serve.worker import Answer, InProcess, ModelProcess, ModelUnavailable

log = logging.getLogger("relist")
MODEL_UNAVAILABLE = "the model process is starting again (the last one exited or hung)"
SETTINGS_ENV = "RELIST_SERVE_SETTINGS"


class BatchTime:
    """How long a batch takes, as a line in its size: seconds = fixed + per_request x size, fitted by least
    squares over the recent batches, exponentially weighted (``weight`` on the newest).

    Much of a batch's time can be fixed (a greedy decode runs its steps once for the whole batch): dividing
    it by the batch's size, as this did, made the few requests of a small batch look costly, so fewer were
    admitted, the batches stayed small and the server shed nearly everything under a retry storm. While the
    recent batches have (nearly) all had one size, the line cannot be told from a proportion, and the time
    is taken as proportional to the size (the cautious reading); batches of other sizes then show the
    fixed part."""

    def __init__(self, weight: float = 0.1):
        self.weight = weight
        self.batches = 0
        self.size = self.seconds = self.size2 = self.cross = 0.0  # weighted means of s, t, s^2 and s*t
        self.lock = threading.Lock()  # added to by the batching thread, read by the event loop

    def add(self, size: int, seconds: float) -> None:
        values = (float(size), seconds, float(size) ** 2, size * seconds)
        with self.lock:
            if not self.batches:
                self.size, self.seconds, self.size2, self.cross = values
            else:
                w = self.weight
                self.size, self.seconds, self.size2, self.cross = (
                    m + w * (v - m) for m, v in zip((self.size, self.seconds, self.size2, self.cross), values)
                )
            self.batches += 1

    def line(self) -> tuple[float, float]:
        """(fixed seconds per batch, seconds per request), both at least 0."""
        with self.lock:
            return self._line()

    def _line(self) -> tuple[float, float]:
        if not self.batches:
            return 0.0, 0.0
        variance = self.size2 - self.size**2
        proportional = self.seconds / self.size
        if variance < 0.25:  # sizes within about one of each other
            return 0.0, proportional
        slope = min(max((self.cross - self.size * self.seconds) / variance, 0.0), proportional)
        return max(self.seconds - slope * self.size, 0.0), slope

    def per_request(self) -> float:
        return self.line()[1]

    def drain(self, requests: int, max_batch: int = 1 << 30) -> float:
        """Seconds expected to answer ``requests`` queued requests, in batches of at most ``max_batch``."""
        if requests <= 0:
            return 0.0
        fixed, slope = self.line()
        return -(-requests // max_batch) * fixed + requests * slope


class Admission(NamedTuple):
    """An admitted request: its key among the requests admitted and not answered yet (``MicroBatcher.live``,
    which holds when each was admitted)."""

    key: int


class MicroBatcher:
    """Collects concurrent request bodies for a short window and has the runner (the model process, or a
    service in this process) answer them as one batch.

    The batches are formed and sent by a thread of their own, not by the event loop: when the loop is
    busy (refusing a retry storm), a batcher waiting for its turn on the loop left the model idle between
    batches for as long as a turn took. The loop only queues bodies and, when a batch's answers come back,
    hands them to the waiting requests.

    It also times its batches (``BatchTime``) and keeps when each request admitted and not yet answered
    was admitted, from which it expects how long a request admitted now waits for the ones ahead of it
    (``expected_wait``), and how long the one that has waited longest in the batch it would join will have
    waited when that batch is answered (``batch_wait``, what the deadline bounds). A request whose waiter
    gave up (its admitted-request timeout) is left out of the batch it would have joined."""

    def __init__(self, runner, window_ms: float, max_batch: int, metrics: ServiceMetrics):
        self.runner, self.window, self.max_batch, self.metrics = (
            runner,
            window_ms / 1000.0,
            max(1, max_batch),
            metrics,
        )
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # (body, future), or None to stop
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batch_time = BatchTime()
        self.live: dict[int, float] = {}  # admitted, not answered: key -> when, oldest first (event loop only)
        self.keys = itertools.count()
        self.running = (0, 0.0)  # the batch the runner has: (size, perf_counter when it went)

    def start(self) -> None:
        """Start the batching thread; answers go back to the running event loop."""
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._work, name="relist-batch", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def running_ok(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def waiting(self) -> int:
        return self.queue.qsize()

    def running_for(self) -> float:
        """Seconds the batch with the runner has run (0 when none runs)."""
        size, started = self.running
        return time.perf_counter() - started if size else 0.0

    @property
    def admitted(self) -> int:
        """Requests past load shedding and not answered yet."""
        return len(self.live)

    def expected_wait(self) -> float:
        """Seconds until a request admitted now is answered, as the batch times say: what is left of the
        batch running (which it cannot join), then the window and the batches of the other requests admitted
        ahead of it and its own (0 before any batch). Counting the running batch's requests as if they were
        still to be batched, as this once did, expected a third of the wait that came."""
        if not self.batch_time.batches:
            return 0.0
        size, started = self.running
        left = 0.0
        if size:
            left = max(self.batch_time.drain(size, self.max_batch) - (time.perf_counter() - started), 0.0)
        return left + self.window + self.batch_time.drain(self.admitted - size + 1, self.max_batch)

    def batch_wait(self) -> float:
        """Seconds the request that has waited longest in the batch a request admitted now would join will
        have waited when that batch is answered: its wait so far plus ``expected_wait``. A batch is answered
        all at once, so each request admitted into it delays the ones admitted before it; bounding only the
        newcomer's own wait, as this once did, let the requests wait 1.1x the deadline at the median and 1.9x
        at the 99th percentile (LAST-8, 256 clients retrying at once). The requests admitted are taken to be
        batched in the order they were admitted (the running batch holds the oldest), which holds but for a
        body that comes late."""
        size = self.running[0]
        ahead = self.admitted - size  # admitted, not in the running batch
        if ahead <= 0 or ahead % self.max_batch == 0:  # it would open a batch of its own
            return self.expected_wait()
        first = size + (ahead // self.max_batch) * self.max_batch  # the oldest of the batch it would join
        at = next(itertools.islice(self.live.values(), first, None))
        return time.perf_counter() - at + self.expected_wait()

    def admit(self) -> Admission:
        admission = Admission(next(self.keys))
        self.live[admission.key] = time.perf_counter()
        return admission

    def settle(self, admission: Admission) -> None:
        """An admitted request is done (answered, timed out or let go): it no longer waits."""
        self.live.pop(admission.key, None)

    async def submit(self, body: bytes) -> Answer:
        future = asyncio.get_running_loop().create_future()
        self.queue.put((body, future))
        return await future

    # ---- the batching thread ----------------------------------------------------------------------------
    def _collect(self) -> list | None:
        """The next batch: the first request, then what comes within the window (None: stop)."""
        pending = []
        while not pending:
            item = self.queue.get()
            if item is None:
                return None
            if not item[1].done():  # else its request timed out while waiting
                pending.append(item)
        deadline = time.monotonic() + self.window
        while len(pending) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)  # stop after this batch
                break
            if not item[1].done():
                pending.append(item)
        return pending

    def _work(self) -> None:
        while (pending := self._collect()) is not None:
            bodies = [body for body, _ in pending]
            started = time.perf_counter()
            self.running = (len(bodies), started)
            try:
                answers = self.runner.call(bodies)
                self.batch_time.add(len(bodies), time.perf_counter() - started)  # a failed batch times nothing
                self.metrics.observe_batch(len(bodies))
            except ModelUnavailable as err:  # a new model process is loading: these requests may retry
                answers = [Answer(503, message=str(err))] * len(bodies)
            except Exception as err:  # noqa: BLE001 - the model process died: this batch's requests fail
                answers = [Answer(500, message=f"{type(err).__name__}: {err}")] * len(bodies)
            finally:
                self.running = (0, 0.0)
            try:
                self.loop.call_soon_threadsafe(_deliver, [future for _, future in pending], answers)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return


def _deliver(futures: list[asyncio.Future], answers: list[Answer]) -> None:
    for future, answer in zip(futures, answers):
        if not future.done():
            future.set_result(answer)


REASON, REQUEST_ID = "relist.reason", "relist.request_id"  # per-request scope state the middleware reads


def internal_error(request_id: str) -> dict:
    """The body of a 500: the request id, never internals (the log has the details under the id)."""
    return {"error": f"internal error (request id {request_id}); the service keeps serving", "request_id": request_id}


class Counted:
    """ASGI middleware: every answer gets an ``x-request-id`` header and is counted in the metrics by path
    and status (a non-2xx also by the reason its handler put in the request's state) when its headers are
    sent, that is after its body was built. An exception no handler caught becomes a 500 naming the request
    id (the log has the details); one after the answer has started is logged."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        request_id = state[REQUEST_ID] = uuid.uuid4().hex[:12]
        answered = False

        async def counted_send(message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
                self.metrics.observe(scope["path"], message["status"], time.perf_counter() - started, state.get(REASON))
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except Exception as err:  # noqa: BLE001 - this request's failure, not the service's
            log.error("serve: request %s failed: %s: %s", request_id, type(err).__name__, err, exc_info=err)
            if not answered:
                state[REASON] = "internal"
                await JSONResponse(internal_error(request_id), status_code=500)(scope, receive, counted_send)


def create_app(settings: ServeSettings, service: Service | None = None) -> FastAPI:
    """The app; without ``service`` the models are loaded in a model process of their own (this call waits
    for it and raises what loading raised), with one it is run in this process (tests, the demo)."""
    metrics = ServiceMetrics()
    if service is not None:
        runner = InProcess(service)
    else:
        runner = ModelProcess(settings, hang_timeout=settings.model_timeout_seconds, on_lost=metrics.observe_model_lost)
    batcher = MicroBatcher(runner, settings.window_ms, settings.max_batch, metrics)

    def overloaded() -> tuple[str, str, str] | None:
        """(reason, message, Retry-After) when a /rerank request arriving now is to be shed, else None."""
        if not runner.ready:
            return "model_unavailable", MODEL_UNAVAILABLE, str(max(1, ceil(runner.start_seconds)))
        stuck = batcher.running_for()
        if stuck * 1000 > settings.request_timeout_ms:  # it would time out behind that batch: say so at once
            message = (
                f"the model has run one batch for {stuck:.1f} s, longer than the request timeout of "
                f"{settings.request_timeout_ms:g} ms"
            )
            return "model_stalled", message, "1"
        if batcher.waiting() >= settings.max_queue:  # shed rather than let every request wait
            return "queue_full", f"{settings.max_queue} requests already waiting", "1"
        if not batcher.admitted:  # nothing ahead: shedding cannot make it sooner (nor tell how long it takes)
            return None
        wait = batcher.batch_wait()
        if settings.deadline_ms and wait * 1000 > settings.deadline_ms:
            message = (
                f"expected wait {wait * 1000:.0f} ms (of the longest-waiting request in the batch it would join), "
                f"longer than the deadline of {settings.deadline_ms:g} ms"
            )
            return "deadline", message, str(max(1, ceil(wait)))  # whole seconds, at least one
        return None

    def admit() -> tuple[tuple[str, str, str] | None, Admission | None]:
        """(``overloaded()``, None), or (None, the admission) when it is None: the request is admitted and the
        caller calls ``release(admission)`` once it is answered."""
        verdict = overloaded()
        return (verdict, None) if verdict is not None else (None, batcher.admit())

    def release(admission: Admission) -> None:
        batcher.settle(admission)

    reading = {"bodies": 0}  # /rerank requests whose bodies are being read
    limits = {
        "header_timeout": settings.header_timeout_seconds,
        "write_timeout": settings.write_timeout_seconds,
        "shed_pause": settings.shed_pause_ms / 1000,
        "max_connections": settings.max_connections,
        "max_body_bytes": settings.max_body_bytes,
        "metrics": metrics,
        "overloaded": overloaded,  # the protocol sheds before the body is read, and so does rerank below
        "admit": admit,  # the protocol admits a /rerank request from its headers (and releases it after)
        "release": release,
        "connections": None,  # the server's set of open connections, filled in by the protocol
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield {LIMITS: limits}  # read by the server's protocol (relist.serve.protocol), one per process
        reserve = shutdown_reserve(settings.grace_seconds)
        runner.close(timeout=reserve / 2)  # ends a batch in the model process, if any, so that the thread stops
        batcher.stop(timeout=reserve / 2)

    # the interactive docs are off: the body is read and checked by hand (relist.serve.requests), so the
    # generated schema would describe an empty body
    app = FastAPI(title="relist", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(Counted, metrics=metrics)

    def answer(request: Request, status: int, message: str, reason: str, headers: dict | None = None) -> JSONResponse:
        """An error answer, ``{"error": message}`` (and the request id for a 5xx), and its reason for the metrics."""
        state = request.scope["state"]
        state[REASON] = reason
        body = {"error": message, "request_id": state[REQUEST_ID]} if status >= 500 else {"error": message}
        return JSONResponse(body, status_code=status, headers=headers)

    def internal(request: Request, details: str) -> JSONResponse:
        """A 500 whose body names the request id, never internals; the log holds the details under that id."""
        state = request.scope["state"]
        log.error("serve: request %s failed: %s", state[REQUEST_ID], details)
        state[REASON] = "internal"
        return JSONResponse(internal_error(state[REQUEST_ID]), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        """Unknown paths and methods: the same ``{"error": ...}`` answer, counted under the status's name."""
        reason = HTTPStatus(err.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return answer(request, err.status_code, str(err.detail), reason, err.headers)

    def shed(request: Request, message: str, reason: str, retry_after: str) -> JSONResponse:
        return answer(request, 503, f"overloaded: {message}; retry shortly", reason, {"Retry-After": retry_after})

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > settings.max_body_bytes:
                raise BadRequest(f"body larger than the limit of {settings.max_body_bytes} bytes", 413)
        return bytes(body)

    @app.post("/rerank")
    async def rerank(request: Request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            message = f"expected Content-Type application/json, got {content_type or 'none'}"
            return answer(request, 415, message, "content_type")
        close = {"Connection": "close"}  # the body is left unread: do not keep the connection
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            message = f"body of {declared} bytes, more than the limit of {settings.max_body_bytes}"
            return answer(request, 413, message, "body_too_large", close)
        reading["bodies"] += 1
        try:
            body = await asyncio.wait_for(read_body(request), settings.body_timeout_seconds)
        except asyncio.TimeoutError:
            message = f"request body not complete within {settings.body_timeout_seconds:g} s"
            return answer(request, 408, message, "body_timeout", close)
        except BadRequest as err:
            return answer(request, err.status, str(err), "body_too_large", close)
        except ClientDisconnect:
            return answer(request, 499, "the client closed the connection during the body", "client_disconnected")
        finally:
            reading["bodies"] -= 1
        held = request.scope["state"].get(ADMITTED)  # the protocol's admission from the headers, if it holds
        own = held is None or held["admission"] is None  # the app run without the protocol, or a stalled body
        if own:
            verdict, admission = admit()
            if verdict is not None:
                reason, message, retry_after = verdict
                return shed(request, message, reason, retry_after)
        try:
            outcome = await asyncio.wait_for(batcher.submit(body), settings.request_timeout_ms / 1000)
        except asyncio.TimeoutError:
            message = (
                f"not answered within {settings.request_timeout_ms:g} ms of being admitted (--request-timeout-ms); "
                "the model is slower than the queue expected"
            )
            return answer(request, 504, message, "request_timeout")
        finally:
            if own:
                release(admission)
        if outcome.status == 200:
            return Response(outcome.body, media_type="application/json")
        if outcome.status == 503:  # the model process went before it took this request's batch
            retry = {"Retry-After": str(max(1, ceil(runner.start_seconds)))}
            return answer(request, 503, f"{outcome.message}; retry shortly", "model_unavailable", retry)
        if outcome.status < 500:
            reason = {400: "malformed_json", 413: "too_large"}.get(outcome.status, "invalid_request")
            return answer(request, outcome.status, outcome.message, reason)
        return internal(request, outcome.message)

    @app.get("/healthz")
    async def healthz():
        """Live: the event loop answers (the model process may be loading again after it died)."""
        return {
            "status": "ok",
            "mode": settings.last.mode,
            "offsets": settings.last.offsets,
            "pid": os.getpid(),
            "model_pid": runner.pid,
        }

    @app.get("/readyz")
    async def readyz(request: Request):
        """Ready: the batcher runs, a /rerank request arriving now would not be shed (``overloaded``: the
        model process is up, no batch is past the request timeout, the queue has room, the expected wait is
        within the deadline) and the open connections are within their bound."""
        verdict = overloaded()
        connections = len(limits["connections"] or ())
        room = not settings.max_connections or connections <= settings.max_connections
        body = {"ready": batcher.running_ok and verdict is None and room, "waiting": batcher.waiting()}
        body["expected_wait_ms"] = round(batcher.expected_wait() * 1000, 1)
        body["in_flight"] = batcher.admitted  # admitted and not answered yet
        body["reading_bodies"] = reading["bodies"]  # requests whose bodies are still coming
        body["model_ready"] = runner.ready
        body["batch_running_ms"] = round(batcher.running_for() * 1000, 1)
        body["connections"] = connections
        if body["ready"]:
            return body
        request.scope["state"][REASON] = "not_ready"
        body["request_id"] = request.scope["state"][REQUEST_ID]
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


SWITCH_INTERVAL = 0.001  # seconds; CPython's default is 0.005


def app_from_env() -> FastAPI:
    """The app a uvicorn worker process builds (``workers > 1``): settings come through the environment."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    return create_app(from_mapping(ServeSettings, json.loads(os.environ[SETTINGS_ENV]), SETTINGS_ENV))


def serve(settings: ServeSettings) -> None:
    """Run uvicorn in the foreground until interrupted.

    The batching thread takes the interpreter lock a few times a batch (to send it, to take its answers);
    while the event loop is busy, each time waited up to the switch interval, so the interval is shortened."""
    import uvicorn  # only a running server needs it

    sys.setswitchinterval(SWITCH_INTERVAL)
    if settings.workers > 1:
        os.environ[SETTINGS_ENV] = json.dumps(to_mapping(settings))
        Service(settings)  # fail here, with the message, rather than in every worker
        # loading torch and the models takes longer than uvicorn's default 5 s worker health check on a busy machine
        extra = (
            {"timeout_worker_healthcheck": 120}
            if "timeout_worker_healthcheck" in inspect.signature(uvicorn.run).parameters
            else {}
        )
        uvicorn.run(
            "relist.serve.app:app_from_env",
            factory=True,
            workers=settings.workers,
            **extra,
            **uvicorn_options(settings),
        )
    else:
        uvicorn.run(create_app(settings), **uvicorn_options(settings))


def uvicorn_options(settings: ServeSettings) -> dict:
    """uvicorn's settings: address, keep-alive timeout and shutdown grace period from the settings, and the
    protocol that adds the header and write timeouts, the connection bound and shedding from the bytes
    received (``relist.serve.protocol``)."""
    from relist.serve.protocol import ServeProtocol  # imports uvicorn

    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "http": ServeProtocol,
        "limit_concurrency": None,  # ServeProtocol bounds the connections and counts what it refuses
        "timeout_keep_alive": settings.keep_alive_seconds,
        # in-flight requests get the grace period less what closing the model process and the batcher takes
        # after them, so that the process is gone within --grace-seconds
        "timeout_graceful_shutdown": max(
            settings.grace_seconds - shutdown_reserve(settings.grace_seconds) - uvicorn_stop_seconds(settings.workers),
            0.0,
        ),
    }


def uvicorn_stop_seconds(workers: int) -> float:
    """What uvicorn takes of the grace period besides the wait for in-flight requests (measured on a busy
    2-core machine): noticing the signal (it looks every 0.1 s), closing the open connections (0.05-0.09 s
    for 200) and returning after the lifespan, 0.2 s; with ``workers`` > 1 also its supervisor, which looks
    for the signal every 0.5 s before it passes it on, and the worker processes' own exit and join, 1.2 s
    more (idle, with 1 s of grace, two workers had exited 1.43-1.53 s after SIGTERM). With 1 s of grace
    and 200 stalled connections one process exited after 1.02-1.08 s without the 0.2 s, 0.77-0.83 s with."""
    return UVICORN_STOP_SECONDS + (SUPERVISOR_STOP_SECONDS if workers > 1 else 0.0)


UVICORN_STOP_SECONDS, SUPERVISOR_STOP_SECONDS = 0.2, 1.2  # see uvicorn_stop_seconds


def shutdown_reserve(grace: float) -> float:
    """Seconds of the grace period kept for closing the model process and the batcher after the in-flight
    requests: a quarter of it, at most 1 s."""
    return min(grace / 4, 1.0)
