"""The FastAPI application: POST /rerank, GET /healthz, GET /metrics, with micro-batching.

Concurrent /rerank requests wait up to ``window_ms`` (or until ``max_batch`` are queued) and are run
through LAST as one batch on a single worker thread, so the event loop keeps accepting requests while a
batch runs. LAST keeps no state between requests, so several uvicorn worker processes can serve the same
checkpoint (``workers``); each has its own batcher and its own /metrics. The sampling noise comes from
one seeded generator per process, so a request's exploration depends on what it was batched with.

Only ``application/json`` bodies are read (415 otherwise); they are parsed and checked on a worker thread,
off the event loop, and every bad body gets a 4xx naming the problem. When a batch fails, its requests
are served again one by one, so a failure stays with the request that caused it; a 500 names a request
id (the log has the details under it), never internals. Every answer, 2xx or not, is counted in
``/metrics`` by status and reason, after the response body was built.
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
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from relist.batch import collate
from relist.config import from_mapping, to_mapping
from relist.data.store import read_vocab, vocab_file
from relist.last import Last
from relist.rerankers import load_reranker
from relist.rerankers.evaluator import load_evaluator
from relist.serve.metrics import ServiceMetrics
from relist.serve.requests import BadRequest, RequestParser, parse_json
from relist.serve.settings import ServeSettings

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


class MicroBatcher:
    """Collects concurrent requests for a short window and runs them as one batch on a worker thread."""

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

    async def submit(self, example) -> dict:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((example, future))
        return await future

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
                results = await loop.run_in_executor(self.executor, self.service.run, [e for e, _ in pending])
                self.metrics.observe_batch(len(pending))
                for (_, future), result in zip(pending, results):
                    if not future.done():
                        future.set_result(result)
            except Exception:  # noqa: BLE001 - one request may have failed it: serve each alone
                if len(pending) > 1:
                    log.warning("serve: a batch of %d requests failed; serving them one by one", len(pending))
                for example, future in pending:
                    try:
                        (result,) = await loop.run_in_executor(self.executor, self.service.run, [example])
                        self.metrics.observe_batch(1)
                        if not future.done():
                            future.set_result(result)
                    except Exception as err:  # noqa: BLE001 - confined to this request
                        if not future.done():
                            future.set_exception(err)


def create_app(settings: ServeSettings, service: Service | None = None) -> FastAPI:
    service = service or Service(settings)
    metrics = ServiceMetrics()
    batcher = MicroBatcher(service, settings.window_ms, settings.max_batch, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.task = asyncio.create_task(batcher.loop())
        yield
        batcher.task.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    # the interactive docs are off: the body is read and checked by hand (relist.serve.requests), so the
    # generated schema would describe an empty body
    app = FastAPI(title="relist", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, reason: str, started: float) -> JSONResponse:
        metrics.observe("/rerank", status, time.perf_counter() - started, reason)
        return JSONResponse({"error": message}, status_code=status)

    def internal(err: BaseException, started: float) -> JSONResponse:
        """A 500 whose body names a request id, never internals; the log holds the details under that id."""
        request_id = uuid.uuid4().hex[:12]
        log.error("serve: request %s failed: %s: %s", request_id, type(err).__name__, err, exc_info=err)
        return error(500, f"internal error (request id {request_id}); the service keeps serving", "internal", started)

    def parse(body: bytes):
        return service.parser.parse(parse_json(body))

    @app.post("/rerank")
    async def rerank(request: Request):
        started = time.perf_counter()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return error(
                415, f"expected Content-Type application/json, got {content_type or 'none'}", "content_type", started
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return error(
                413,
                f"body of {declared} bytes, more than the limit of {settings.max_body_bytes}",
                "body_too_large",
                started,
            )
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > settings.max_body_bytes:
                return error(
                    413, f"body larger than the limit of {settings.max_body_bytes} bytes", "body_too_large", started
                )
        if batcher.queue.qsize() >= settings.max_queue:  # shed rather than let every request wait
            metrics.observe("/rerank", 503, time.perf_counter() - started, "overloaded")
            return JSONResponse(
                {"error": f"overloaded: {settings.max_queue} requests already waiting; retry shortly"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        try:
            example = await asyncio.to_thread(parse, bytes(body))  # off the event loop
        except BadRequest as err:
            reason = (
                "malformed_json" if err.status == 400 else ("too_large" if err.status == 413 else "invalid_request")
            )
            return error(err.status, str(err), reason, started)
        except Exception as err:  # noqa: BLE001 - a parser bug is this request's 500, not the service's
            return internal(err, started)
        try:
            result = await batcher.submit(example)
            content = json.dumps(result, allow_nan=False).encode("utf-8")
        except Exception as err:  # noqa: BLE001 - confined to this request; the service keeps serving
            return internal(err, started)
        metrics.observe("/rerank", 200, time.perf_counter() - started)
        return Response(content, media_type="application/json")

    @app.get("/healthz")
    async def healthz():
        metrics.observe("/healthz", 200, 0.0)
        return {"status": "ok", "mode": settings.last.mode, "offsets": settings.last.offsets, "pid": os.getpid()}

    @app.get("/readyz")
    async def readyz():
        """Ready: the models are loaded (the app exists only after), the batcher runs, the queue has room."""
        running = batcher.task is not None and not batcher.task.done()
        waiting = batcher.queue.qsize()
        ready = running and waiting < settings.max_queue
        metrics.observe("/readyz", 200 if ready else 503, 0.0)
        return JSONResponse({"ready": ready, "waiting": waiting}, status_code=200 if ready else 503)

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
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level="warning",
            **extra,
            **_limits(settings),
        )
    else:
        uvicorn.run(
            create_app(settings), host=settings.host, port=settings.port, log_level="warning", **_limits(settings)
        )


def _limits(settings: ServeSettings) -> dict:
    """uvicorn's connection bound, keep-alive timeout and shutdown grace period, from the settings."""
    return {
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "timeout_graceful_shutdown": settings.grace_seconds,
    }
