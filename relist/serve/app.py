"""The FastAPI application: POST /rerank, GET /healthz, GET /readyz, GET /metrics, with micro-batching.

Concurrent /rerank requests wait up to ``window_ms`` (or until ``max_batch`` are queued) and are run
through LAST as one batch on a single worker thread, so the event loop keeps accepting requests while a
batch runs. LAST keeps no state between requests, so several uvicorn worker processes can serve the same
checkpoint (``workers``); each has its own batcher and its own /metrics. The sampling noise comes from
one seeded generator per process, so a request's exploration depends on what it was batched with.

Only ``application/json`` bodies are read (415 otherwise), within ``body_timeout_seconds`` (408); they are
parsed and checked on a worker thread, off the event loop, and every bad body gets a 4xx naming the
problem. Load is shed with 503 and ``Retry-After`` when ``max_queue`` requests are waiting, or when the
expected wait (the requests admitted ahead x the recent service time per request, ``BatchTime``) exceeds
``deadline_ms``, so that the requests that are served are served in time; the server's protocol sheds
before the body is read (``relist.serve.protocol``), the handler again after it. When a batch
fails, its requests are served again one by one, so a failure stays with the request that caused it.
Every answer carries an ``x-request-id`` header; a 5xx body names it (the log has a 500's details under
it), never internals. Every answer, 2xx or not, is counted in ``/metrics`` by path and status, and every
non-2xx also by reason, after its body was built.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from http import HTTPStatus
from math import ceil
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from relist.batch import collate
from relist.config import from_mapping, to_mapping
from relist.data.store import read_vocab, vocab_file
from relist.last import Last
from relist.rerankers import load_reranker
from relist.rerankers.evaluator import load_evaluator
from relist.serve.metrics import ServiceMetrics
from relist.serve.requests import BadRequest, RequestParser, parse_json
from relist.serve.settings import LIMITS, ServeSettings

log = logging.getLogger("relist")
SETTINGS_ENV = "RELIST_SERVE_SETTINGS"


def run_vocabularies(run: Path, names: set[str]) -> dict[str, list[str] | None]:
    """The raw-id vocabularies a training run carries in ``RUN/vocab`` (None for a field kept as integers).

    Runs written before runs carried them fall back to the training dataset named in their config.json."""
    vocab = run / "vocab"
    if not vocab.is_dir():
        data = Path(json.loads((run / "config.json").read_text())["data"])
        if not (data / "vocab").is_dir():
            raise FileNotFoundError(f"{run} carries no vocab/ and its training data {data} is not there")
        vocab = data / "vocab"
    files = {name: vocab_file(vocab, name) for name in names}
    return {name: read_vocab(path) if path is not None else None for name, path in files.items()}


class Service:
    """The loaded models, the request parser and LAST."""

    def __init__(self, settings: ServeSettings):
        run = Path(settings.run)
        for part in ("generator", "evaluator"):
            if not (run / part).is_dir():
                raise FileNotFoundError(
                    f"{run} has no {part}/ (expected the outputs of `relist train {part} --out {run / part}`)"
                )
        torch.set_num_threads(max(1, settings.threads))
        gen_dir = run / "generator"
        self.generator = load_reranker(gen_dir / "best" if (gen_dir / "best").is_dir() else gen_dir)
        self.evaluator = load_evaluator(run / "evaluator")
        if self.generator.schema != self.evaluator.schema:
            raise ValueError(f"{run}: the generator and the evaluator were trained on different feature schemas")
        schema = self.generator.schema
        names = {f.name for f in (*schema.item_sparse, *schema.user_sparse, *schema.user_hist)}
        vocabs = run_vocabularies(gen_dir, names)
        limit = self.evaluator.config.max_len
        max_items = min(settings.max_items or limit, limit)
        self.parser = RequestParser(schema, vocabs, max_items, settings.max_history, settings.max_id_chars)
        self.config = settings.last_config()
        self.last = Last(self.generator, self.evaluator, self.config)
        self.noise = torch.Generator().manual_seed(settings.seed)

    def exploration(self, winner: int) -> str:
        if winner == 0:
            return "greedy"
        if self.config.mode == "serial":
            return f"serial round {winner}"
        return f"candidate {winner} (step {self.config.steps[winner - 1]:g})"

    def run(self, examples: list[tuple[dict, list[str]]]) -> list[dict]:
        batch = collate([e for e, _ in examples])
        out = self.last(batch, self.noise)
        results = []
        for b, (_, ids) in enumerate(examples):
            n = len(ids)
            order = out.order[b, :n].tolist()
            results.append(
                {
                    "order": [ids[k] for k in order],
                    "scores": out.scores[b, :n].tolist(),
                    "evaluator_score": float(out.value[b]),
                    "exploration": self.exploration(int(out.winner[b])),
                    "candidates": int(out.candidates.shape[1]),
                }
            )
        return results


class BatchTime:
    """Recent service time per request: the batches' seconds over their sizes, both exponentially weighted
    means over the batches (``weight`` on the newest), so that a large batch counts for its size and the
    few small batches of a quiet moment do not make the requests ahead look costlier than they are."""

    def __init__(self, weight: float = 0.1):
        self.weight = weight
        self.size = self.seconds = 0.0  # weighted means; 0 before any batch

    def add(self, size: int, seconds: float) -> None:
        if self.size == 0:
            self.size, self.seconds = float(size), seconds
        else:
            self.size += self.weight * (size - self.size)
            self.seconds += self.weight * (seconds - self.seconds)

    def per_request(self) -> float:
        return self.seconds / self.size if self.size else 0.0

    def drain(self, requests: int) -> float:
        """Seconds expected to serve ``requests`` queued requests."""
        return requests * self.per_request()


class MicroBatcher:
    """Collects concurrent requests for a short window and runs them as one batch on a worker thread.

    It also times its batches (``BatchTime``) and counts the requests admitted and not yet answered, from
    which it expects how long a request admitted now waits for the ones ahead of it."""

    def __init__(self, service: Service, window_ms: float, max_batch: int, metrics: ServiceMetrics):
        self.service, self.window, self.max_batch, self.metrics = (
            service,
            window_ms / 1000.0,
            max(1, max_batch),
            metrics,
        )
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relist-batch")
        self.task: asyncio.Task | None = None
        self.batch_time = BatchTime()
        self.admitted = 0  # requests past load shedding and not answered yet (event loop only)

    def expected_wait(self) -> float:
        """Seconds a request admitted now is expected to wait for the ones ahead of it (0 before any batch)."""
        return self.batch_time.drain(self.admitted)

    async def submit(self, example) -> dict:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((example, future))
        return await future

    async def _run(self, examples: list) -> list[dict]:
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.service.run, examples)
        finally:
            self.batch_time.add(len(examples), time.perf_counter() - started)

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            deadline = loop.time() + self.window
            while len(pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    pending.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            try:
                results = await self._run([e for e, _ in pending])
                self.metrics.observe_batch(len(pending))
                for (_, future), result in zip(pending, results):
                    if not future.done():
                        future.set_result(result)
            except Exception:  # noqa: BLE001 - one request may have failed it: serve each alone
                if len(pending) > 1:
                    log.warning("serve: a batch of %d requests failed; serving them one by one", len(pending))
                for example, future in pending:
                    try:
                        (result,) = await self._run([example])
                        self.metrics.observe_batch(1)
                        if not future.done():
                            future.set_result(result)
                    except Exception as err:  # noqa: BLE001 - confined to this request
                        if not future.done():
                            future.set_exception(err)


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
    service = service or Service(settings)
    metrics = ServiceMetrics()
    batcher = MicroBatcher(service, settings.window_ms, settings.max_batch, metrics)

    def overloaded() -> tuple[str, str, str] | None:
        """(reason, message, Retry-After) when a /rerank request arriving now is to be shed, else None."""
        if batcher.queue.qsize() >= settings.max_queue:  # shed rather than let every request wait
            return "queue_full", f"{settings.max_queue} requests already waiting", "1"
        wait = batcher.expected_wait()
        if settings.deadline_ms and wait * 1000 > settings.deadline_ms:
            message = f"expected wait {wait * 1000:.0f} ms, longer than the deadline of {settings.deadline_ms:g} ms"
            return "deadline", message, str(max(1, ceil(wait)))  # whole seconds, at least one
        return None

    limits = {
        "header_timeout": settings.header_timeout_seconds,
        "max_connections": settings.max_connections,
        "metrics": metrics,
        "overloaded": overloaded,  # the protocol sheds before the body is read, and so does rerank below
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.task = asyncio.create_task(batcher.loop())
        yield {LIMITS: limits}  # read by the server's protocol (relist.serve.protocol), one per process
        batcher.task.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

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

    def internal(request: Request, err: BaseException) -> JSONResponse:
        """A 500 whose body names the request id, never internals; the log holds the details under that id."""
        state = request.scope["state"]
        log.error("serve: request %s failed: %s: %s", state[REQUEST_ID], type(err).__name__, err, exc_info=err)
        state[REASON] = "internal"
        return JSONResponse(internal_error(state[REQUEST_ID]), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        """Unknown paths and methods: the same ``{"error": ...}`` answer, counted under the status's name."""
        reason = HTTPStatus(err.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return answer(request, err.status_code, str(err.detail), reason, err.headers)

    def shed(request: Request, message: str, reason: str, retry_after: str) -> JSONResponse:
        return answer(request, 503, f"overloaded: {message}; retry shortly", reason, {"Retry-After": retry_after})

    def parse(body: bytes):
        return service.parser.parse(parse_json(body))

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
        try:
            body = await asyncio.wait_for(read_body(request), settings.body_timeout_seconds)
        except asyncio.TimeoutError:
            message = f"request body not complete within {settings.body_timeout_seconds:g} s"
            return answer(request, 408, message, "body_timeout", close)
        except BadRequest as err:
            return answer(request, err.status, str(err), "body_too_large", close)
        except ClientDisconnect:
            return answer(request, 499, "the client closed the connection during the body", "client_disconnected")
        verdict = overloaded()
        if verdict is not None:
            reason, message, retry_after = verdict
            return shed(request, message, reason, retry_after)
        batcher.admitted += 1
        try:
            try:
                example = await asyncio.to_thread(parse, body)  # off the event loop
            except BadRequest as err:
                reason = {400: "malformed_json", 413: "too_large"}.get(err.status, "invalid_request")
                return answer(request, err.status, str(err), reason)
            except Exception as err:  # noqa: BLE001 - a parser bug is this request's 500, not the service's
                return internal(request, err)
            try:
                result = await batcher.submit(example)
                content = json.dumps(result, allow_nan=False).encode("utf-8")
            except Exception as err:  # noqa: BLE001 - confined to this request; the service keeps serving
                return internal(request, err)
        finally:
            batcher.admitted -= 1
        return Response(content, media_type="application/json")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "mode": settings.last.mode, "offsets": settings.last.offsets, "pid": os.getpid()}

    @app.get("/readyz")
    async def readyz(request: Request):
        """Ready: the models are loaded (the app exists only after), the batcher runs, the queue has room and
        the expected wait is within the deadline."""
        running = batcher.task is not None and not batcher.task.done()
        waiting, wait_ms = batcher.queue.qsize(), batcher.expected_wait() * 1000
        in_time = not settings.deadline_ms or wait_ms <= settings.deadline_ms
        body = {"ready": running and waiting < settings.max_queue and in_time, "waiting": waiting}
        body["expected_wait_ms"] = round(wait_ms, 1)
        if body["ready"]:
            return body
        request.scope["state"][REASON] = "not_ready"
        body["request_id"] = request.scope["state"][REQUEST_ID]
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def app_from_env() -> FastAPI:
    """The app a uvicorn worker process builds (``workers > 1``): settings come through the environment."""
    return create_app(from_mapping(ServeSettings, json.loads(os.environ[SETTINGS_ENV]), SETTINGS_ENV))


def serve(settings: ServeSettings) -> None:
    """Run uvicorn in the foreground until interrupted."""
    import uvicorn  # only a running server needs it

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
    protocol that adds the header timeout and the counted connection bound (``relist.serve.protocol``)."""
    from relist.serve.protocol import ServeProtocol  # imports uvicorn

    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "http": ServeProtocol,
        "limit_concurrency": None,  # ServeProtocol bounds the connections and counts what it refuses
        "timeout_keep_alive": settings.keep_alive_seconds,
        "timeout_graceful_shutdown": settings.grace_seconds,
    }
