"""`relist serve`: the real uvicorn server on loopback, called over HTTP — answers, errors, batching, metrics."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from relist.batch import collate
from relist.cli import main
from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.rankers.train import TrainRankerConfig, train_ranker
from relist.rerankers.evaluator import load_evaluator
from relist.serve.requests import RequestParser, raw_vocabularies, request_for_list


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    prepare(PrepareConfig(source="synthetic", out=root / "data", n_lists=600, n_users=100, n_items=200, seed=2))
    train_ranker(TrainRankerConfig(data=root / "data", out=root / "ranker", seed=2, n_estimators=20, progress=False))
    common = ["--data", str(root / "ranker" / "rerank"), "--max-steps", "6", "--batch-size", "32", "--no-progress"]
    assert (
        main(
            [
                "train",
                "evaluator",
                *common,
                "--out",
                str(root / "run" / "evaluator"),
                "--model-args",
                "d_model=16,heads=2,gru=16,hidden=32",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "generator",
                *common,
                "--out",
                str(root / "run" / "generator"),
                "--model-args",
                "encoder=16,hidden=8",
            ]
        )
        == 0
    )
    return root / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, *args: str, wait: float = 60):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relist.cli", "serve", str(run), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + wait
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 60 s")


@pytest.fixture(scope="module")
def server(run_dir):
    proc, url = start_server(  # no shedding: on a busy machine a burst of a test may be shed
        run_dir,
        *("--window-ms", "40", "--max-items", "12", "--max-body-bytes", "60000", "--deadline-ms", "0"),
        *("--header-timeout-seconds", "1", "--body-timeout-seconds", "1"),
    )
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def request_body(data: PreparedDataset, k: int) -> dict:
    """Test list ``k`` of the prepared data as a client sends it."""
    return request_for_list(data, int(data.split("test")[k]))


def test_rerank_answers_with_a_reordered_list_scored_by_the_evaluator(run_dir, server):
    data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    body = request_body(data, 0)
    reply = httpx.post(server + "/rerank", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    ids = [item["id"] for item in body["items"]]
    assert sorted(out["order"]) == sorted(ids) and len(out["scores"]) == len(ids)
    # scores follow the input items and rank into the served order
    assert [ids[k] for k in sorted(range(len(ids)), key=lambda k: -out["scores"][k])] == out["order"]
    assert out["candidates"] == 9 and (out["exploration"] == "greedy" or out["exploration"].startswith("candidate"))
    # the reported evaluator score is the evaluator's on the served order, recomputed here
    ev = load_evaluator(run_dir / "evaluator")
    parser = RequestParser(ev.schema, raw_vocabularies(data), 12)
    example, _ = parser.parse(body)
    batch = collate([example])
    served = torch.tensor([[ids.index(i) for i in out["order"]]])
    with torch.no_grad():
        value = float(ev.click_probability(batch.reorder(served)).mean())
    assert value == pytest.approx(out["evaluator_score"], abs=1e-5)


BAD = [
    (b'{"items": [', 400, "malformed JSON"),
    (b"[1, 2]", 422, "expected a JSON object"),
    (b'{"items": []}', 422, "empty"),
    (b'{"items": "N1"}', 422, "expected a list"),
    (b'{"items": [{"id": 7}]}', 422, "expected a string id"),
    (b'{"items": [{"id": "a", "features": {"nope": 1}}]}', 422, "unknown feature 'nope'"),
    (b'{"items": [{"id": "a", "features": {"init_score": NaN}}]}', 400, "NaN"),
    (b'{"items": [{"id": "a", "features": {"init_score": 1e999}}]}', 422, "not finite"),
    (b'{"items": [{"id": "a", "features": {"init_score": "x"}}]}', 422, "expected a number"),
    (b'{"items": [{"id": "a"}], "colour": 1}', 422, "unknown field"),
    (json.dumps({"items": [{"id": str(k)} for k in range(13)]}).encode(), 413, "more than the limit of 12"),
    (b'{"items": [' + b" " * 70000 + b"]}", 413, "limit"),
    (b'{"items": [{"id": "a", "features": {"init_score": 1e39}}]}', 422, "outside the float32 range"),
    (b'{"items": [{"id": "a", "features": {"init_score": 3.5e38}}]}', 422, "outside the float32 range"),
    (b'{"items": [{"id": "a", "features": {"init_score": ' + b"9" * 500 + b"}}]}", 422, "float32 range"),
    (b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
    (b'{"items": [{"id": "\\ud800"}]}', 422, "lone surrogate"),
    (b'{"items": [{"id": "' + b"x" * 300 + b'"}]}', 422, "more than the limit of 256"),
]


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_service_keeps_serving(run_dir, server):
    data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    good = request_body(data, 1)
    counted_before = errors_counted(server)
    for body, status, message in BAD:
        reply = httpx.post(server + "/rerank", content=body, headers={"content-type": "application/json"}, timeout=30)
        assert reply.status_code == status, (body[:60], reply.text)
        assert message in reply.json()["error"], reply.text
        assert httpx.post(server + "/rerank", json=good, timeout=30).status_code == 200
    # bad user parts of an otherwise good request
    for user, status, message in (
        ({"features": [1]}, 422, "user.features: expected an object"),
        ({"history": [{}] * 1001}, 413, "user.history: 1001 items, more than the limit of 1000"),
    ):
        reply = httpx.post(server + "/rerank", json={**good, "user": user}, timeout=30)
        assert reply.status_code == status and message in reply.json()["error"], reply.text
    # only JSON bodies are read
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        reply = httpx.post(server + "/rerank", content=json.dumps(good).encode(), headers=headers, timeout=30)
        assert reply.status_code == 415 and "application/json" in reply.json()["error"], reply.text
    # a missing dense feature is named
    partial = {"items": [{"id": good["items"][0]["id"], "features": {"init_score": 1.0}}]}
    reply = httpx.post(server + "/rerank", json=partial, timeout=30)
    assert reply.status_code == 422 and "missing dense feature" in reply.json()["error"]
    # every answer the client got is counted, by status and reason
    after = errors_counted(server)
    counted = {key[1:]: n - counted_before.get(key, 0) for key, n in after.items() if key[0] == "/rerank"}
    statuses = [status for _, status, _ in BAD]
    expected = {
        ("400", "malformed_json"): statuses.count(400),
        ("413", "body_too_large"): 1,  # the 70,000-byte body, past --max-body-bytes
        ("413", "too_large"): statuses.count(413),  # 13 candidates and a history of 1001 (not the body above)
        ("415", "content_type"): 3,
        ("422", "invalid_request"): statuses.count(422) + 2,  # user.features; the missing dense feature
    }
    assert {k: v for k, v in counted.items() if v} == expected, counted


def test_concurrent_requests_are_micro_batched_and_counted(run_dir, server):
    data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    bodies = [request_body(data, k % 20) for k in range(24)]

    def metric(text: str, name: str) -> float:
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")
        )

    before = httpx.get(server + "/metrics").text
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda b: httpx.post(server + "/rerank", json=b, timeout=60), bodies))
    assert all(r.status_code == 200 for r in replies), [(r.status_code, r.text[:150]) for r in replies]
    for body, reply in zip(bodies, replies):  # every answer is about its own request
        assert sorted(reply.json()["order"]) == sorted(i["id"] for i in body["items"])
    after = httpx.get(server + "/metrics").text
    requests = metric(after, "relist_batched_requests_total") - metric(before, "relist_batched_requests_total")
    batches = metric(after, "relist_batches_total") - metric(before, "relist_batches_total")
    assert requests == 24 and batches < 24  # some requests shared a batch
    assert (
        metric(after, "relist_rerank_latency_seconds_count") - metric(before, "relist_rerank_latency_seconds_count")
        == 24
    )
    assert 'relist_requests_total{path="/rerank",status="200"}' in after


@pytest.mark.slow
def test_two_workers_serve_the_same_checkpoint(run_dir):
    proc, url = start_server(run_dir, "--workers", "2", "--mode", "greedy", wait=240)
    try:
        data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
        body = request_body(data, 2)
        orders = {tuple(httpx.post(url + "/rerank", json=body, timeout=30).json()["order"]) for _ in range(6)}
        assert len(orders) == 1  # greedy decoding: every worker gives the same answer
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_copied_run_serves_the_same_answers_without_its_training_data(run_dir, tmp_path):
    """The run carries its vocabularies: copied elsewhere, with the training data moved away, a fresh server
    with the same seed answers the same requests (sent one at a time) with the same lists and scores."""
    data_dir = Path(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    data = PreparedDataset(data_dir)
    bodies = [request_body(data, k) for k in range(8)]

    def answers(run: Path) -> list[dict]:
        proc, url = start_server(run, "--seed", "7")
        try:
            return [httpx.post(url + "/rerank", json=body, timeout=30).json() for body in bodies]
        finally:
            proc.terminate()
            proc.wait(timeout=20)

    before = answers(run_dir)
    assert all("order" in a for a in before), before
    shutil.copytree(run_dir, tmp_path / "copied-run")
    moved = data_dir.with_name(data_dir.name + "-moved")
    data_dir.rename(moved)
    try:
        after = answers(tmp_path / "copied-run")
    finally:
        moved.rename(data_dir)
    assert after == before


def test_a_failing_request_fails_alone_and_the_batch_is_served():
    """One poisoned request in a micro-batch: the batch is served again request by request, the poisoned one
    gets a 500 carrying its error (for the log) and every other request its answer."""
    import asyncio

    from relist.serve.app import MicroBatcher
    from relist.serve.metrics import ServiceMetrics
    from relist.serve.worker import InProcess

    sizes = []

    class Service:
        parser = EchoParser()

        def run(self, examples):
            sizes.append(len(examples))
            if "poison" in examples:
                raise IndexError("index 18 is out of bounds")
            return [{"echo": e} for e in examples]

    async def scenario():
        batcher = MicroBatcher(InProcess(Service()), window_ms=50, max_batch=64, metrics=ServiceMetrics())
        batcher.start()
        requests = [f"r{k}" for k in range(20)] + ["poison"]
        results = await asyncio.gather(*(batcher.submit(json.dumps(r).encode()) for r in requests))
        batcher.stop()
        return requests, results

    requests, results = asyncio.run(scenario())
    assert sizes[0] == 21 and sizes[1:] == [1] * 21  # one batch, then each request alone
    assert [json.loads(a.body)["echo"] for a in results[:-1]] == requests[:-1]
    assert results[-1].status == 500 and "IndexError: index 18" in results[-1].message


def test_a_500_names_a_request_id_never_internals_and_is_counted(tmp_path):
    from fastapi.testclient import TestClient

    from relist.serve.app import create_app
    from relist.serve.settings import ServeSettings

    class Service:
        parser = EchoParser()

        def run(self, examples):
            if any(e.get("fail") for e in examples):
                raise IndexError("index 18 is out of bounds for dimension 0 with size 7")
            return [{"scores": [float("nan")]} if e.get("nan") else {"ok": True} for e in examples]

    app = create_app(ServeSettings(run=tmp_path, window_ms=1.0), service=Service())
    with TestClient(app) as client:
        for body in ({"fail": True}, {"nan": True}):  # a model error; a score JSON cannot carry
            reply = client.post("/rerank", json=body)
            assert reply.status_code == 500 and "request id" in reply.json()["error"]
            assert reply.json()["request_id"] == reply.headers["x-request-id"]
            assert "IndexError" not in reply.text and "index 18" not in reply.text
        assert client.post("/rerank", json={}).json() == {"ok": True}  # and the service keeps serving
        text = client.get("/metrics").text
    assert 'relist_requests_total{path="/rerank",status="500"} 2' in text
    assert 'relist_requests_total{path="/rerank",status="200"} 1' in text
    assert 'relist_request_errors_total{path="/rerank",status="500",reason="internal"} 2' in text


# Hypothesis's text leaves out surrogates (3 in 2,000 strings held one even when asked for them): strings
# with a lone surrogate, which no UTF-8 answer can echo, are drawn on purpose
LONE_SURROGATE = st.builds(
    lambda a, s, b: a + s + b,
    st.text(max_size=4),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.text(max_size=4),
)
TEXT = st.text(max_size=20) | LONE_SURROGATE
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**600), max_value=10**600)
    | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | LONE_SURROGATE, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def holds_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(holds_lone_surrogate(k) or holds_lone_surrogate(v) for k, v in value.items())
    return isinstance(value, list) and any(holds_lone_surrogate(v) for v in value)


def _mutations(good: dict):
    """Bodies near a good one (a field replaced by arbitrary JSON, an item's feature or id changed) and
    arbitrary JSON, as bytes; ids may hold lone surrogates (escaped, as a client's JSON encoder writes them)."""
    item = good["items"][0]
    feature = st.sampled_from(sorted(item["features"]))
    near = st.one_of(
        st.builds(lambda v: {**good, "items": v}, JSON),
        st.builds(lambda v: {**good, "user": v}, JSON),
        st.builds(lambda k, v: {**good, "items": [{**item, "features": {**item["features"], k: v}}]}, feature, JSON),
        st.builds(lambda v: {**good, "items": [{**item, "id": v}]}, JSON | st.text(max_size=12) | LONE_SURROGATE),
        st.builds(lambda v: {**good, "user": {"id": "u", "history": v}}, JSON),
        st.builds(lambda k, v: {**good, k: v}, st.text(max_size=6) | LONE_SURROGATE, JSON),
    )
    return st.one_of(near, JSON).map(lambda body: json.dumps(body).encode())


@pytest.fixture
def fixed_examples():
    """Hypothesis draws some strings and numbers from the constants of the project's modules loaded at the
    time, so its examples depended on which other tests had run first (the same command gave the same
    examples; -k and the whole file did not). This turns that off for the test, where the installed
    Hypothesis has it (a private function; without it the seed alone fixes the examples)."""
    from hypothesis.internal.conjecture import providers

    if not hasattr(providers, "_get_local_constants"):
        yield
        return
    saved = providers._get_local_constants
    providers._get_local_constants = lambda: providers.Constants()
    providers.CONSTANTS_CACHE.cache.clear()  # values cached with the constants of earlier tests
    try:
        yield
    finally:
        providers._get_local_constants = saved
        providers.CONSTANTS_CACHE.cache.clear()


def test_fuzzed_bodies_get_a_4xx_never_a_5xx_and_the_metrics_count_them(run_dir, fixed_examples):
    """Property-based: generated bodies sent one at a time (nothing is shed) to a fresh server. Every bad
    body gets a 4xx naming its problem, a good request after each succeeds, and /metrics counts exactly
    the statuses the client received. Bounded (300 examples, no deadline) and deterministic (a fixed seed,
    no example database, no constants from other modules)."""
    proc, url = start_server(run_dir, "--max-items", "12")
    data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    good = request_body(data, 0)
    received: dict[int, int] = {}
    surrogates: list[int] = []  # statuses of the bodies holding a lone surrogate somewhere

    @seed(20260415)
    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_mutations(good))
    def check(body: bytes):
        reply = httpx.post(url + "/rerank", content=body, headers={"content-type": "application/json"}, timeout=30)
        received[reply.status_code] = received.get(reply.status_code, 0) + 1
        assert reply.status_code < 500, (body[:200], reply.text)
        if holds_lone_surrogate(json.loads(body)):
            surrogates.append(reply.status_code)
        if reply.status_code >= 400:
            assert isinstance(reply.json().get("error"), str) and reply.json()["error"], reply.text
        after = httpx.post(url + "/rerank", json=good, timeout=30)
        received[after.status_code] = received.get(after.status_code, 0) + 1
        assert after.status_code == 200

    try:
        check()
        text = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    counted = {}
    for line in text.splitlines():
        if line.startswith('relist_requests_total{path="/rerank"'):
            counted[int(line.split('status="')[1].split('"')[0])] = int(float(line.split()[-1]))
    assert counted == received and received.get(200, 0) >= 300 and set(received) - {200}, received
    assert surrogates and all(400 <= status < 500 for status in surrogates if status != 200), surrogates
    print(
        f"fuzz: statuses received {dict(sorted(received.items()))}, "
        f"counted by /metrics {dict(sorted(counted.items()))}; {len(surrogates)} bodies held a lone surrogate"
    )


def test_overload_is_shed_with_retry_after_and_readyz_says_so(tmp_path):
    """With the batch worker busy, requests queue up to --max-queue; the next ones get 503 with
    Retry-After at once (instead of waiting), /readyz reports not ready, and all recover afterwards."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from relist.serve.app import create_app
    from relist.serve.settings import ServeSettings

    release = threading.Event()

    class Service:
        parser = EchoParser()

        def run(self, examples):
            release.wait(timeout=30)
            return [{"ok": True} for _ in examples]

    settings = ServeSettings(run=tmp_path, window_ms=1.0, max_batch=1, max_queue=2)
    with TestClient(create_app(settings, service=Service())) as client, ThreadPoolExecutor(8) as pool:
        first = pool.submit(client.post, "/rerank", json={})  # taken by the worker, which blocks
        time.sleep(0.5)
        queued = [pool.submit(client.post, "/rerank", json={}) for _ in range(2)]
        time.sleep(0.5)
        shed = client.post("/rerank", json={})
        ready = client.get("/readyz")
        release.set()
        answers = [f.result(timeout=30) for f in [first, *queued]]
        after = client.get("/readyz")
        text = client.get("/metrics").text
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1" and "overloaded" in shed.json()["error"]
    assert shed.json()["request_id"] == shed.headers["x-request-id"]  # a 5xx names its request id
    assert ready.status_code == 503 and ready.json()["ready"] is False and ready.json()["waiting"] == 2
    assert [a.status_code for a in answers] == [200, 200, 200] and after.status_code == 200
    assert 'relist_requests_total{path="/rerank",status="503"} 1' in text
    assert 'relist_request_errors_total{path="/rerank",status="503",reason="queue_full"} 1' in text
    assert client.app.openapi_url is None  # no schema that would describe an empty body


class EchoParser:
    def parse(self, body):
        return body


class SlowService:
    """Stands in for a slow model: every request in a batch costs ``per_request`` seconds."""

    parser = EchoParser()

    def __init__(self, per_request: float):
        self.per_request = per_request

    def run(self, examples):
        time.sleep(self.per_request * len(examples))
        return [{"ok": True} for _ in examples]


@contextmanager
def serving(app, settings):
    """The app behind uvicorn, with the service's own protocol and options, on loopback in a thread."""
    import uvicorn

    from relist.serve.app import uvicorn_options

    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://{settings.host}:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def burst(client: httpx.Client, url: str, clients: int) -> list[tuple[int, float, str | None]]:
    """``clients`` requests sent at the same moment: (status, seconds, Retry-After) of each."""
    start = threading.Barrier(clients)

    def one(_):
        start.wait()
        t = time.perf_counter()
        reply = client.post(url + "/rerank", json={})
        return reply.status_code, time.perf_counter() - t, reply.headers.get("retry-after")

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def test_a_burst_past_the_expected_wait_deadline_is_shed_and_the_served_stay_in_time(tmp_path):
    """A model that takes 40 ms per request and a 150 ms deadline: a burst of 40 requests gets 503s with
    Retry-After for those whose expected wait is past the deadline, and the served ones come back in time;
    without the deadline every request is served and the last waits for all 39 ahead of it. One request at
    a time, before and after, is never shed."""
    from relist.serve.app import create_app
    from relist.serve.settings import ServeSettings

    per_request, clients = 0.04, 40
    outcomes = {}
    for deadline_ms in (150.0, 0.0):
        settings = ServeSettings(
            run=tmp_path, port=free_port(), window_ms=1.0, max_batch=2, max_queue=10_000, deadline_ms=deadline_ms
        )
        with serving(create_app(settings, service=SlowService(per_request)), settings) as url:
            with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=clients)) as client:
                light = [client.post(url + "/rerank", json={}).status_code for _ in range(6)]
                outcomes[deadline_ms] = burst(client, url, clients)
                time.sleep(0.3)  # the admitted requests drain
                after = [client.post(url + "/rerank", json={}).status_code for _ in range(3)]
                text = client.get(url + "/metrics").text
        assert light == [200] * 6 and after == [200] * 3, (light, after)
        shed = [r for r in outcomes[deadline_ms] if r[0] == 503]
        counted = f'relist_request_errors_total{{path="/rerank",status="503",reason="deadline"}} {len(shed)}'
        assert (counted in text) if shed else ('reason="deadline"' not in text), text
    served = [seconds for status, seconds, _ in outcomes[150.0] if status == 200]
    shed = [(seconds, retry) for status, seconds, retry in outcomes[150.0] if status == 503]
    assert {status for status, _, _ in outcomes[150.0]} == {200, 503}
    assert len(shed) >= clients // 2 and all(retry is not None and int(retry) >= 1 for _, retry in shed)
    assert max(served) < 0.7 and max(seconds for seconds, _ in shed) < 0.7, (sorted(served), shed)
    unshed = [seconds for status, seconds, _ in outcomes[0.0] if status == 200]
    assert len(unshed) == clients and max(unshed) > 0.8 * clients * per_request  # the control: no bound


def read_until_closed(sock: socket.socket, limit: float) -> bytes:
    sock.settimeout(limit)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return received


def trickle(url: str, prefix: bytes, rest: bytes, pause: float = 0.3) -> tuple[bytes, float]:
    """Send ``prefix`` at once and then ``rest`` a byte at a time, ``pause`` s apart, until the server answers
    or closes; (what it sent, seconds until it closed)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        started = time.perf_counter()
        sock.sendall(prefix)
        for k in range(len(rest)):
            if select.select([sock], [], [], pause)[0]:
                break  # the server answered or closed
            try:
                sock.sendall(rest[k : k + 1])
            except OSError:
                break
        received = read_until_closed(sock, 10)
        return received, time.perf_counter() - started


def errors_counted(url: str) -> dict[tuple[str, str, str], int]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("relist_request_errors_total{"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1 : line.index("}")].split(","))
            out[tuple(labels[k].strip('"') for k in ("path", "status", "reason"))] = int(float(line.split()[-1]))
    return out


def test_slow_headers_and_bodies_get_408_and_their_connections_are_closed(run_dir, server):
    """The real server with 1 s header and body timeouts: headers sent a byte every 0.3 s (30 s in all), a
    body stalled at a byte every 0.3 s, and a connection that sends nothing are all let go within about
    a second, the first two with a 408 counted in /metrics; the next request is served."""
    data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    body = json.dumps(request_body(data, 0)).encode()
    head = (
        b"POST /rerank HTTP/1.1\r\nHost: relist\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    before = errors_counted(server)
    slow_head, head_seconds = trickle(server, b"", head + body)
    slow_body, body_seconds = trickle(server, head, body)
    silent, silent_seconds = trickle(server, b"", b"")  # nothing sent: closed, not answered
    after = errors_counted(server)
    for received, seconds in ((slow_head, head_seconds), (slow_body, body_seconds)):
        assert seconds < 4 and (received == b"" or received.startswith(b"HTTP/1.1 408")), (seconds, received[:200])
    assert b"request body not complete within 1 s" in slow_body or slow_body == b""
    assert silent == b"" and silent_seconds < 4
    grew = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    assert grew(("(other)", "408", "header_timeout")) == 1 and grew(("/rerank", "408", "body_timeout")) == 1, after
    assert httpx.post(server + "/rerank", content=body, headers={"content-type": "application/json"}).status_code == 200


def test_every_non_2xx_is_counted_by_status_and_reason_and_a_5xx_names_a_request_id(tmp_path):
    """Unknown paths and methods, bytes that are not HTTP, connections past the bound and a failure no
    handler caught: each answer is counted by path, status and reason; every 5xx body names its request id
    (the x-request-id header of the answer) and no internals."""
    from relist.serve.app import Counted, create_app
    from relist.serve.metrics import ServiceMetrics
    from relist.serve.settings import ServeSettings

    settings = ServeSettings(run=tmp_path, port=free_port(), window_ms=1.0, max_connections=2)
    with serving(create_app(settings, service=SlowService(0.0)), settings) as url:
        host, port = url.removeprefix("http://").split(":")
        with httpx.Client(timeout=10) as client:
            missing, wrong_method = client.get(url + "/nowhere"), client.get(url + "/rerank")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            garbage = read_until_closed(sock, 5)
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]  # the bound: 2 connections
        try:
            time.sleep(0.2)
            refused = httpx.post(url + "/rerank", json={}, timeout=10)
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        served = httpx.post(url + "/rerank", json={}, timeout=10)
        counted = errors_counted(url)
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert garbage.startswith(b"HTTP/1.1 400")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["request_id"] == refused.headers["x-request-id"] and "connections" in refused.json()["error"]
    assert served.status_code == 200 and served.headers["x-request-id"]
    assert counted == {
        ("(other)", "404", "not_found"): 1,
        ("/rerank", "405", "method_not_allowed"): 1,
        ("(other)", "400", "bad_http"): 1,
        ("/rerank", "503", "connections"): 1,
    }

    async def failing(scope, receive, send):  # a failure outside every handler
        raise KeyError("secret internal detail")

    from fastapi.testclient import TestClient

    metrics = ServiceMetrics()
    reply = TestClient(Counted(failing, metrics)).get("/rerank")
    assert reply.status_code == 500 and reply.json()["request_id"] == reply.headers["x-request-id"]
    assert "secret" not in reply.text and "KeyError" not in reply.text
    assert metrics.errors == {("/rerank", 500, "internal"): 1}


def test_batch_time_is_a_line_in_the_batch_size():
    """Batches of 64 that take 84 ms and single requests that take 21 ms, alternating, are a fixed 20 ms plus
    1 ms a request: 100 queued requests in batches of 64 are expected to take 2 x 20 + 100 x 1 = 140 ms (the
    per-request mean, 105 ms / 65, said 162 ms; the batch of one alone, 21 ms a request, 2.1 s). While every
    batch has had one size the time is taken as proportional to it; nothing is expected before any batch."""
    from relist.serve.app import BatchTime

    assert BatchTime().drain(50) == 0.0
    timing = BatchTime(weight=0.1)
    for k in range(400):
        size = 64 if k % 2 else 1
        timing.add(size, 0.020 + 0.001 * size)
    fixed, per_request = timing.line()
    assert fixed == pytest.approx(0.020, rel=1e-6) and per_request == pytest.approx(0.001, rel=1e-6)
    assert timing.drain(100, max_batch=64) == pytest.approx(0.140, rel=1e-6)
    same = BatchTime()
    for _ in range(20):
        same.add(8, 0.080)
    assert same.line() == pytest.approx((0.0, 0.010)) and same.drain(30, 64) == pytest.approx(0.300)


def test_the_expected_wait_counts_what_is_left_of_the_running_batch():
    """A request admitted while a batch runs waits for what is left of it, then for its own batch: with a
    batch of 32 running for 100 of its 340 ms, 10 more requests queued and batches of 20 ms + 10 ms a request,
    the next one expects 240 + 2 (window) + 20 + 11 x 10 ms."""
    from relist.serve.app import MicroBatcher
    from relist.serve.metrics import ServiceMetrics

    batcher = MicroBatcher(None, window_ms=2, max_batch=64, metrics=ServiceMetrics())
    assert batcher.expected_wait() == 0.0  # nothing known before any batch
    for size in (1, 64) * 50:
        batcher.batch_time.add(size, 0.020 + 0.010 * size)
    now = time.perf_counter()
    batcher.live = {k: now - 0.150 + k * 1e-6 for k in range(42)}
    batcher.running = (32, now - 0.100)
    assert batcher.admitted == 42
    assert batcher.expected_wait() == pytest.approx(0.240 + 0.002 + 0.020 + 0.110, abs=0.005)


def test_the_deadline_bounds_the_longest_wait_in_the_batch_a_request_joins():
    """A batch is answered all at once, so a request joining one delays those admitted into it before: with
    the oldest of the next batch admitted 150 ms ago, the check adds its wait so far to the newcomer's expected
    wait; a request that would open a batch of its own (none waiting, or the next batch full) is checked on
    its own wait. Admissions are kept oldest first and each leaves when it is settled."""
    from relist.serve.app import MicroBatcher
    from relist.serve.metrics import ServiceMetrics

    batcher = MicroBatcher(None, window_ms=2, max_batch=4, metrics=ServiceMetrics())
    for size in (1, 4) * 50:
        batcher.batch_time.add(size, 0.020 + 0.010 * size)
    batcher.running = (4, time.perf_counter())
    running = [batcher.admit() for _ in range(4)]
    assert batcher.batch_wait() == pytest.approx(batcher.expected_wait(), abs=1e-3)  # nobody waiting
    waiting = batcher.admit()
    batcher.live[waiting.key] -= 0.150  # the oldest of the next batch came 150 ms ago
    assert batcher.batch_wait() == pytest.approx(0.150 + batcher.expected_wait(), abs=0.005)
    more = [batcher.admit() for _ in range(3)]  # the next batch is full: a newcomer opens the one after
    assert batcher.batch_wait() == pytest.approx(batcher.expected_wait(), abs=1e-3)
    for admission in (*running, waiting, *more):
        batcher.settle(admission)
    assert batcher.admitted == 0 and batcher.live == {}


def test_ids_of_fields_without_a_vocabulary_are_canonical_ascii_numbers():
    """Unicode digits ('²' passes str.isdigit but int() refuses it; '５' and '05' would alias id 5) are unknown
    ids, as a vocabulary miss is, never a 500."""
    from relist.data.store import Schema, SparseField
    from relist.serve.requests import RequestParser

    schema = Schema((SparseField("item_id", 10),), ("x",), (SparseField("user_id", 10),), (SparseField("item_id", 10),))
    parser = RequestParser(schema, {}, 12)
    assert [parser._id("item_id", v, "items[0].id") for v in ("5", "0", "9", "10", "05", "５", "²", "①", "-1", "")] == [
        5, 0, 9, 0, 0, 0, 0, 0, 0, 0
    ]  # fmt: skip


class GatedService:
    """A model that holds every batch until ``gate`` is set, recording the bodies of each batch it got."""

    parser = EchoParser()

    def __init__(self, payload: object = True):
        self.gate, self.batches, self.payload = threading.Event(), [], payload

    def run(self, examples):
        self.batches.append(list(examples))
        self.gate.wait(timeout=30)
        return [{"ok": self.payload, "echo": e} for e in examples]


def test_an_admitted_request_not_answered_in_time_gets_504_and_leaves_the_queue(tmp_path):
    """--request-timeout-ms bounds how long an admitted request waits: with the model holding a batch, the
    request in it and the one queued behind it get 504 naming the setting and a request id, counted by
    reason; the queued one is left out of the next batch (the model never sees it), and the service
    serves the next request."""
    from fastapi.testclient import TestClient

    from relist.serve.app import create_app
    from relist.serve.settings import ServeSettings

    service = GatedService()
    settings = ServeSettings(run=tmp_path, window_ms=1.0, max_batch=1, request_timeout_ms=400)
    with TestClient(create_app(settings, service=service)) as client, ThreadPoolExecutor(4) as pool:
        held = pool.submit(client.post, "/rerank", json={"k": "held"})
        time.sleep(0.1)
        queued = pool.submit(client.post, "/rerank", json={"k": "queued"})
        answers = [held.result(timeout=30), queued.result(timeout=30)]
        service.gate.set()
        after = client.post("/rerank", json={"k": "after"})
        text = client.get("/metrics").text
    for reply in answers:
        assert reply.status_code == 504 and "--request-timeout-ms" in reply.json()["error"], reply.text
        assert reply.json()["request_id"] == reply.headers["x-request-id"]
    assert after.status_code == 200 and after.json()["echo"] == {"k": "after"}
    assert [b for batch in service.batches for b in batch] == [{"k": "held"}, {"k": "after"}]  # never "queued"
    assert 'relist_request_errors_total{path="/rerank",status="504",reason="request_timeout"} 2' in text


def test_batches_are_formed_and_run_while_the_event_loop_is_busy():
    """The batching thread takes what is queued without waiting for turns of the event loop: requests
    queued before the loop blocks for 0.6 s are batched and run during the block, all in one batch (a
    batcher on the loop took one request per turn, and a busy loop's 2 ms window closed after two)."""
    import asyncio

    from relist.serve.app import MicroBatcher
    from relist.serve.metrics import ServiceMetrics
    from relist.serve.worker import InProcess

    runs = []

    class Service:
        parser = EchoParser()

        def run(self, examples):
            runs.append((time.perf_counter(), len(examples)))
            return [{"echo": e} for e in examples]

    async def scenario():
        batcher = MicroBatcher(InProcess(Service()), window_ms=2, max_batch=64, metrics=ServiceMetrics())
        batcher.start()
        waiting = [asyncio.ensure_future(batcher.submit(json.dumps(k).encode())) for k in range(40)]
        await asyncio.sleep(0)  # every submit has queued its body
        blocked_from = time.perf_counter()
        time.sleep(0.6)  # the loop is busy: no turn for anyone
        blocked_until = time.perf_counter()
        answers = await asyncio.gather(*waiting)
        batcher.stop()
        return answers, blocked_from, blocked_until

    answers, blocked_from, blocked_until = asyncio.run(scenario())
    assert [json.loads(a.body)["echo"] for a in answers] == list(range(40))
    assert sum(size for _, size in runs) == 40 and runs[0][1] >= 39  # the first may go alone
    assert all(blocked_from <= at <= blocked_until for at, _ in runs), (runs, blocked_from, blocked_until)


def raw_post(body: bytes, path: str = "/rerank") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: relist\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def read_response(sock: socket.socket, limit: float = 10) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response from ``sock``: (status, headers, body)."""
    sock.settimeout(limit)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a body"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def test_a_request_shed_from_its_headers_gets_a_proper_503_and_its_connection_stays_usable(tmp_path):
    """With the model busy and the queue full, a POST /rerank whose head arrives in one piece is refused
    from its bytes: a 503 with Retry-After, a request id (header and body) and JSON, counted; its body, sent
    in pieces after the answer, is skipped; the connection is not read again for --shed-pause-ms; and a
    request on the same connection once there is room is served."""
    from relist.serve.app import create_app
    from relist.serve.settings import ServeSettings

    service = GatedService()
    settings = ServeSettings(run=tmp_path, port=free_port(), window_ms=1.0, max_batch=1, max_queue=1, shed_pause_ms=300)
    body = json.dumps({"k": "shed", "pad": "x" * 20_000}).encode()
    with serving(create_app(settings, service=service), settings) as url, ThreadPoolExecutor(4) as pool:
        held = pool.submit(httpx.post, url + "/rerank", json={"k": "held"}, timeout=30)
        time.sleep(0.3)
        queued = pool.submit(httpx.post, url + "/rerank", json={"k": "queued"}, timeout=30)
        time.sleep(0.3)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            request = raw_post(body)
            head_end = request.index(b"\r\n\r\n") + 4
            sock.sendall(request[: head_end + 100])  # the head and the start of the body
            status, headers, payload = read_response(sock)
            shed_at = time.perf_counter()
            for k in range(head_end + 100, len(request), 5000):  # the rest of the body, in pieces
                sock.sendall(request[k : k + 5000])
            service.gate.set()
            assert held.result(timeout=30).status_code == 200 and queued.result(timeout=30).status_code == 200
            sock.sendall(raw_post(json.dumps({"k": "again"}).encode()))
            again_status, _, again = read_response(sock)
            answered_at = time.perf_counter()
        text = httpx.get(url + "/metrics").text
    assert status == 503 and headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    assert json.loads(payload)["request_id"] == headers["x-request-id"] and "overloaded" in json.loads(payload)["error"]
    assert again_status == 200 and json.loads(again)["echo"] == {"k": "again"}  # the skipped body left no trace
    assert answered_at - shed_at >= 0.3  # not heard again within the pause
    assert 'relist_request_errors_total{path="/rerank",status="503",reason="queue_full"} 1' in text
    assert [b["k"] for batch in service.batches for b in batch] == ["held", "queued", "again"]


def test_a_body_is_never_read_as_a_request_when_its_length_is_written_unusually(tmp_path):
    """A shed request whose Content-Length the fast path does not read (zero-padded past 12 digits) is left
    to h11, which reads the same length: its body, itself an HTTP request, is skipped, not answered."""
    from relist.serve.app import create_app
    from relist.serve.settings import ServeSettings

    service = GatedService()
    settings = ServeSettings(run=tmp_path, port=free_port(), window_ms=1.0, max_batch=1, max_queue=1)
    hidden = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with serving(create_app(settings, service=service), settings) as url, ThreadPoolExecutor(4) as pool:
        held = pool.submit(httpx.post, url + "/rerank", json={"k": "held"}, timeout=30)
        time.sleep(0.3)
        queued = pool.submit(httpx.post, url + "/rerank", json={"k": "queued"}, timeout=30)
        time.sleep(0.3)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            head = (
                b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %016d\r\n\r\n" % len(hidden)
            )
            sock.sendall(head + hidden)
            status, _, _ = read_response(sock)
            sock.settimeout(1.0)
            try:
                extra = sock.recv(65536)
            except TimeoutError:
                extra = b""
        service.gate.set()
        assert held.result(timeout=30).status_code == 200 and queued.result(timeout=30).status_code == 200
    assert status in (503, 400, 422)  # shed, or refused as a body; never a second answer
    assert b"HTTP/1.1" not in extra, extra[:200]


def test_a_client_that_never_reads_its_answers_is_cut_off_after_the_write_timeout(tmp_path):
    """A client that pipelines requests for large answers and reads none of them is let go once its
    bytes have waited --write-timeout-seconds (1 s) unsent, and counted; uvicorn alone held it forever."""
    from relist.serve.app import create_app
    from relist.serve.settings import ServeSettings

    service = GatedService(payload="x" * 500_000)
    service.gate.set()
    settings = ServeSettings(run=tmp_path, port=free_port(), window_ms=1.0, write_timeout_seconds=1.0)
    with serving(create_app(settings, service=service), settings) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's buffers fill quickly
        sock.connect((host, int(port)))
        sock.setblocking(False)
        pending = raw_post(b"{}") * 40  # 40 answers of half a megabyte, none read
        started = time.perf_counter()
        while pending and time.perf_counter() - started < 5:
            try:
                pending = pending[sock.send(pending) :]
            except BlockingIOError:
                time.sleep(0.05)
        closed = None
        while closed is None and time.perf_counter() - started < 15:
            time.sleep(0.5)
            counted = httpx.get(url + "/metrics").text
            if 'relist_connections_closed_total{reason="write_timeout"} 1' in counted:
                closed = time.perf_counter() - started
        sock.setblocking(True)
        received = read_until_closed(sock, 5)  # the rest of what the server had sent, then the end
        sock.close()
    assert closed is not None, counted
    assert len(received) < 40 * 500_000  # the answers it never took were dropped with the connection


def test_health_probes_are_answered_past_the_connection_bound(tmp_path):
    """With --max-connections 2 held by idle clients, /rerank gets 503 but /healthz is answered 200 and
    /readyz says why it is not ready, each on a connection closed after its answer."""
    from relist.serve.app import create_app
    from relist.serve.settings import ServeSettings

    settings = ServeSettings(run=tmp_path, port=free_port(), window_ms=1.0, max_connections=2)
    with serving(create_app(settings, service=SlowService(0.0)), settings) as url:
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            time.sleep(0.2)
            refused = httpx.post(url + "/rerank", json={}, timeout=10)
            live, ready = httpx.get(url + "/healthz", timeout=10), httpx.get(url + "/readyz", timeout=10)
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        ready_after = httpx.get(url + "/readyz", timeout=10)
    assert refused.status_code == 503 and "connections" in refused.json()["error"]
    assert live.status_code == 200 and live.json()["status"] == "ok" and live.headers["connection"] == "close"
    assert ready.status_code == 503 and ready.json()["ready"] is False and ready.json()["connections"] == 3
    assert ready.headers["connection"] == "close"
    assert ready_after.status_code == 200 and ready_after.json()["ready"] is True


def large_body(data: PreparedDataset, k: int) -> dict:
    """A valid request of about 250 kB: a test list and a history of 1,000 clicks with long (unknown) ids."""
    body = request_body(data, k)
    body["user"]["history"] = [{"item_id": f"{'h' * 230}{n}"} for n in range(1000)]
    return body


def test_probes_answer_while_the_model_process_is_stopped_and_a_dead_one_is_replaced(run_dir):
    """The real server parses, checks and runs requests in its model process, off the event loop. With
    that process stopped (SIGSTOP) and 8 large valid bodies in flight, /healthz, /readyz and /metrics
    answer at once and the requests get 504 after --request-timeout-ms; once it continues, requests are
    served. A malformed body sent meanwhile gets 504 too, not its 400: bodies are parsed in the model process,
    never on the event loop. Killed (SIGKILL), it is replaced: requests meanwhile get a 5xx naming a request
    id, then 200 from the new process."""
    proc, url = start_server(run_dir, "--request-timeout-ms", "2500", "--deadline-ms", "0")  # nothing shed
    data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    good, bodies = request_body(data, 0), [large_body(data, k) for k in range(8)]
    try:
        model = httpx.get(url + "/healthz").json()["model_pid"]
        assert model is not None and model != proc.pid
        assert httpx.post(url + "/rerank", json=good, timeout=30).status_code == 200
        os.kill(model, signal.SIGSTOP)
        with ThreadPoolExecutor(9) as pool:
            waiting = [pool.submit(httpx.post, url + "/rerank", json=b, timeout=30) for b in bodies]
            malformed = pool.submit(
                httpx.post, url + "/rerank", content=b'{"user": ', headers={"content-type": "application/json"}
            )
            time.sleep(0.3)
            probes = [httpx.get(url + path, timeout=5) for path in ("/healthz", "/readyz", "/metrics")]
            in_flight = sum(not f.done() for f in waiting)
            answers = [f.result() for f in waiting]
            unparsed = malformed.result()
        os.kill(model, signal.SIGCONT)
        after_stop = httpx.post(url + "/rerank", json=good, timeout=30)
        text = httpx.get(url + "/metrics").text
        os.kill(model, signal.SIGKILL)
        statuses, deadline = [], time.time() + 120
        while time.time() < deadline:
            reply = httpx.post(url + "/rerank", json=good, timeout=30)
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                break
            assert reply.status_code >= 500 and reply.json()["request_id"] == reply.headers["x-request-id"]
            time.sleep(0.5)
        replaced = httpx.get(url + "/healthz").json()["model_pid"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert in_flight == 8 and [p.status_code for p in probes[::2]] == [200, 200]  # answered while all waited
    assert probes[1].status_code in (200, 503) and "waiting" in probes[1].json()
    for reply in [*answers, unparsed]:
        assert reply.status_code == 504 and "--request-timeout-ms" in reply.json()["error"], reply.text
    assert after_stop.status_code == 200
    assert 'relist_request_errors_total{path="/rerank",status="504",reason="request_timeout"} 9' in text
    assert statuses[-1] == 200 and replaced not in (None, model), (statuses, replaced)


def test_sigterm_with_200_stalled_connections_exits_within_the_grace_period(run_dir):
    """The real server with a 1 s grace period, 60 s header and body timeouts and 200 stalled connections
    (100 that sent half their headers, 100 stuck in their bodies) exits within the grace period of SIGTERM,
    after answering the request it was serving (held in the stopped model process until the signal); its
    model process goes with it."""
    grace = 1.0  # the tightest: uvicorn's own stop takes a fifth of it
    proc, url = start_server(
        run_dir,
        *("--grace-seconds", str(grace), "--header-timeout-seconds", "60", "--body-timeout-seconds", "60"),
        *("--deadline-ms", "0"),  # nothing is shed
    )
    data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    host, port = url.removeprefix("http://").split(":")
    model = httpx.get(url + "/healthz").json()["model_pid"]
    stalled = []

    def reaches(key: str, expected: int) -> None:
        deadline = time.time() + 30
        while httpx.get(url + "/readyz", timeout=5).json()[key] < expected:
            assert time.time() < deadline, f"/readyz {key} did not reach {expected}"
            time.sleep(0.05)

    try:
        for k in range(200):
            sock = socket.create_connection((host, int(port)))
            head = raw_post(b"x" * 1000)
            sock.sendall(head[:30] if k % 2 else head[: head.index(b"\r\n\r\n") + 14])
            stalled.append(sock)
        reaches("reading_bodies", 100)  # the stuck bodies' requests are in the app
        os.kill(model, signal.SIGSTOP)
        served = socket.create_connection((host, int(port)))
        served.sendall(raw_post(json.dumps(request_body(data, 1)).encode()))
        reaches("in_flight", 1)
        os.kill(model, signal.SIGCONT)
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        exited = time.perf_counter() - started
        status, _, answer = read_response(served)
        served.close()
    finally:
        for sock in stalled:
            sock.close()
        if proc.poll() is None:
            proc.kill()
    print(f"SIGTERM with 200 stalled connections: exited in {exited:.2f} s (grace {grace:g} s)")
    assert exited < grace, exited
    assert status == 200 and "order" in json.loads(answer)
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(model, 0)


@pytest.mark.slow  # a real server of its own, 25-65 s
def test_a_model_process_that_exits_or_hangs_is_replaced_without_waiting_for_a_request(run_dir):
    """The watchdog of the model process, with --model-timeout-seconds 2 and LAST serial taking 0.8 s a
    batch (--serial-seconds): killed while idle, the process is replaced with no /rerank sent (/readyz is 503
    meanwhile, then 200 again); stopped while idle, it is found by its unanswered ping, killed and replaced;
    stopped before it took a batch, the batch's request gets a retryable 503 after the model timeout (not a
    504 after the much longer request timeout: nothing of it ran); stopped while computing a batch, that
    request gets a 500 naming a request id after the model timeout; killed while computing a batch, the
    batch's requests get their 500 at once, before a new process has loaded (any queued behind them a 503
    with Retry-After). Every loss is counted by reason."""
    proc, url = start_server(
        run_dir,
        *("--model-timeout-seconds", "2", "--request-timeout-ms", "30000", "--deadline-ms", "0"),
        *("--mode", "serial", "--serial-steps", "100000", "--serial-seconds", "0.8"),
    )
    data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    good = request_body(data, 0)

    def model_pid() -> int | None:
        return httpx.get(url + "/healthz", timeout=5).json()["model_pid"]

    def replaced(old: int, limit: float = 60) -> tuple[int, list[int]]:
        """Wait for a new model process: (its pid, the /readyz statuses seen meanwhile)."""
        seen, deadline = [], time.time() + limit
        while time.time() < deadline:
            seen.append(httpx.get(url + "/readyz", timeout=5).status_code)
            pid = model_pid()
            if pid not in (None, old) and seen[-1] == 200:
                return pid, seen
            time.sleep(0.1)
        raise AssertionError(f"model process {old} was not replaced within {limit:g} s: {seen[-5:]}")

    def computing(pool: ThreadPoolExecutor, n: int) -> list:
        """``n`` requests sent, once their batch has been in the model process for 0.3 s (it is computing)."""
        waiting = [pool.submit(httpx.post, url + "/rerank", json=good, timeout=60) for _ in range(n)]
        deadline = time.time() + 10
        while httpx.get(url + "/readyz", timeout=5).json()["batch_running_ms"] < 300:
            assert time.time() < deadline, "no batch was sent to the model process"
            time.sleep(0.02)
        return waiting

    try:
        assert httpx.post(url + "/rerank", json=good, timeout=30).status_code == 200
        first = model_pid()
        os.kill(first, signal.SIGKILL)  # idle, and no request comes
        second, seen_exit = replaced(first)
        os.kill(second, signal.SIGSTOP)  # idle: only the watchdog's ping can tell
        third, seen_hang = replaced(second)
        assert httpx.post(url + "/rerank", json=good, timeout=30).status_code == 200
        os.kill(third, signal.SIGSTOP)  # right after a request: the next batch is sent but never taken
        started = time.perf_counter()
        untaken = httpx.post(url + "/rerank", json=good, timeout=60)
        untaken_seconds = time.perf_counter() - started
        fourth, _ = replaced(third)
        with ThreadPoolExecutor(4) as pool:
            waiting = computing(pool, 1)
            os.kill(fourth, signal.SIGSTOP)  # stopped in the middle of the batch
            hung = waiting[0].result()
        fifth, _ = replaced(fourth)
        with ThreadPoolExecutor(4) as pool:
            waiting = computing(pool, 4)
            os.kill(fifth, signal.SIGKILL)
            killed = [f.result() for f in waiting]
        loading = model_pid()  # asked as soon as the answers came: the new process is still loading
        sixth, _ = replaced(fifth)
        after = httpx.post(url + "/rerank", json=good, timeout=30)
        text = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert 503 in seen_exit and 503 in seen_hang, (seen_exit, seen_hang)
    for old in (first, second, third, fourth, fifth):
        with pytest.raises(ProcessLookupError):  # killed and reaped, none left behind
            os.kill(old, 0)
    assert untaken.status_code == 503 and untaken.headers["retry-after"], untaken.text
    assert 2.0 <= untaken_seconds < 15, untaken_seconds
    assert hung.status_code == 500 and hung.json()["request_id"] == hung.headers["x-request-id"], hung.text
    statuses = [r.status_code for r in killed]  # 500 in the killed batch; 503 (retry) for any queued behind it
    assert set(statuses) <= {500, 503} and 500 in statuses and loading is None, ([r.text for r in killed], loading)
    assert all(r.headers["retry-after"] for r in killed if r.status_code == 503)
    assert after.status_code == 200 and sixth not in (None, fifth)
    assert 'relist_model_processes_lost_total{reason="exited"} 2' in text
    assert 'relist_model_processes_lost_total{reason="hung"} 3' in text


def test_stalled_uploads_do_not_count_ahead_and_the_requests_behind_them_are_served(tmp_path):
    """30 clients that send their headers and part of their bodies, then stall, against a model taking 50 ms
    a request and a 500 ms deadline: admitted from their headers, they would count as 30 requests ahead
    (1.5 s of expected wait) and every request behind them would be shed. They stop counting once their
    bodies are late (/readyz: reading 30, in flight 0), good requests sent one at a time are all served, and
    the stalled ones are served (or shed, never failed) when their bodies finally come."""
    from relist.serve.app import create_app
    from relist.serve.protocol import BODY_STALL
    from relist.serve.settings import ServeSettings

    settings = ServeSettings(run=tmp_path, port=free_port(), window_ms=1.0, max_batch=4, deadline_ms=500.0)
    stalled = []
    with serving(create_app(settings, service=SlowService(0.05)), settings) as url:
        with httpx.Client(timeout=30) as client:
            warm = [client.post(url + "/rerank", json={}).status_code for _ in range(3)]  # the batch times
            body = b'{"k": "' + b"x" * 2000 + b'"}'
            for _ in range(30):
                sock = socket.create_connection((settings.host, settings.port))
                request = raw_post(body)
                sock.sendall(request[: len(request) - 1000])
                stalled.append((sock, request[len(request) - 1000 :]))
                time.sleep(1.5 * BODY_STALL)  # they come one after another (together, most would be shed)
            deadline = time.time() + 10
            while (ready := client.get(url + "/readyz").json())["reading_bodies"] < 30:
                assert time.time() < deadline, ready
                time.sleep(0.02)
            time.sleep(0.2)  # past the time a body is expected to be all here
            ready = client.get(url + "/readyz").json()
            behind = [client.post(url + "/rerank", json={}).status_code for _ in range(10)]
            for sock, rest in stalled:
                sock.sendall(rest)
            late = [read_response(sock)[0] for sock, _ in stalled]
    for sock, _ in stalled:
        sock.close()
    assert warm == [200] * 3 and behind == [200] * 10, (warm, behind)
    assert ready["reading_bodies"] == 30 and ready["in_flight"] == 0, ready
    assert set(late) <= {200, 503} and 200 in late, late


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak memory from /proc")
@pytest.mark.slow  # a real server of its own, 25-65 s
def test_32_concurrent_bodies_of_45k_history_items_leave_the_memory_bounded(run_dir):
    """32 concurrent bodies of almost 1 MiB, each a history of 45,000 clicks (the audit's case: the server went
    from 437 MB to 4.68 GB): each gets 413 naming the limit (--max-history), and neither the server's nor its model
    process's peak memory grows by more than 300 MB."""
    proc, url = start_server(run_dir, "--deadline-ms", "0")  # nothing shed: every body is read and parsed
    data = PreparedDataset(json.loads((run_dir / "generator" / "config.json").read_text())["data"])
    body = request_body(data, 0)
    body["user"]["history"] = [{"item_id": f"N{n % 100}"} for n in range(45_000)]
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) < 1 << 20
    try:
        model = httpx.get(url + "/healthz").json()["model_pid"]
        before = {pid: peak_rss_mb(pid) for pid in (proc.pid, model)}
        headers = {"content-type": "application/json"}
        with ThreadPoolExecutor(32) as pool:
            replies = list(
                pool.map(lambda _: httpx.post(url + "/rerank", content=raw, headers=headers, timeout=60), range(32))
            )
        grown = {pid: peak_rss_mb(pid) - before[pid] for pid in before}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    limit = "user.history: 45000 items, more than the limit of 1000"
    assert all(r.status_code == 413 and limit in r.json()["error"] for r in replies), replies[0].text
    print(f"32 bodies of 45k history items: peak memory grew by {grown[proc.pid]:.0f} MB (server), "
          f"{grown[model]:.0f} MB (model process)")  # fmt: skip
    assert max(grown.values()) < 300, grown


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the model processes in /proc")
@pytest.mark.slow  # a real server of its own, 25-65 s
def test_sigterm_while_a_new_model_process_loads_leaves_no_process_behind(run_dir):
    """Killed, the model process is replaced; a SIGTERM while the new one is still loading ends the server
    within its grace period and the loading process with it (it was left running, orphaned, until it tried
    to say it was ready)."""
    proc, url = start_server(run_dir, "--grace-seconds", "2")
    try:
        first = httpx.get(url + "/healthz").json()["model_pid"]
        os.kill(first, signal.SIGKILL)
        deadline = time.time() + 10
        while not (loading := [p for p in child_pids(proc.pid) if p != first]):
            assert time.time() < deadline, "no new model process was started"
            time.sleep(0.01)
        time.sleep(0.3)  # it is loading torch and the models
        assert httpx.get(url + "/healthz").json()["model_pid"] is None  # not loaded yet
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        exited = time.perf_counter() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    left = [p for p in loading if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text()]
    assert exited < 2.0 and not left, (exited, left)
