"""The service under load: closed-loop clients against the real `relist serve` on loopback.

    python benchmarks/bench_serve_load.py [--seconds 5] [--clients 1,16,64,256] [--retry now,after] [--big 32]

A small model is trained first (synthetic data, a LambdaMART initial ranker, LAST's evaluator and
generator at their default sizes for a few steps; speed does not depend on how well they are trained).
Then, for generator-only decoding (``--mode greedy``) and LAST parallel with its 8 candidate steps, one
server each (the service's defaults: 500 ms deadline, shedding on) is loaded by 1, 16, 64 and 256
clients in turn, for ``--seconds`` after a one-second warm-up. Each client sends its next request as soon
as the last one was answered; after a 503 it retries at once (``now``: a retry storm, where refusing
requests takes the server's core from the model) or after the Retry-After the answer asked for (``after``).

Reported per level: requests/s served (2xx) and the ratio to the same server at 1 client (the reference
measured in this run), p50/p99 of the served and of the shed (503) requests separately, errors (any
other status or a broken connection), the shed share, the server's peak RSS, and whether its /metrics
counted the shed requests the clients received. The deployed weights' hash (SHA-256 of the model files)
is taken before and after, and the greedy server answers a few probe requests identically before and
after the load (its weights in memory did not change). Target: the served p99 at 256 clients <= 1 s.

Then (``--big N``, 0 to skip) the greedy server is probed on GET /healthz every 20 ms, first idle and then
while N clients send large valid bodies (a test list and a history of 1,000 clicks with long ids, about
250 kB each): /healthz p50/p99 in both, and the large requests' statuses and rate.

The server (its HTTP process and its model process) runs on one core and the load generator (asyncio,
raw HTTP/1.1 over keep-alive connections) on the other, where the machine has two; the training
beforehand uses both. The machine's load average is printed before and after: other processes on the
machine take their share of both cores, and the numbers move with them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.rankers.train import TrainRankerConfig, train_ranker

MODES = {"greedy": ["--mode", "greedy"], "LAST-8": ["--mode", "parallel"]}


def train_run(root: Path) -> Path:
    """A run directory with generator/ and evaluator/, trained briefly on synthetic lists."""
    prepare(PrepareConfig(source="synthetic", out=root / "data", n_lists=1000, n_users=300, n_items=1000, seed=0))
    train_ranker(
        TrainRankerConfig(data=root / "data", out=root / "ranker", seed=0, n_estimators=20, list_len=30, progress=False)
    )
    common = ["--data", str(root / "ranker" / "rerank"), "--max-steps", "4", "--batch-size", "32", "--no-progress"]
    for part in ("evaluator", "generator"):
        cmd = [sys.executable, "-m", "relist.cli", "train", part, *common, "--out", str(root / "run" / part)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return root / "run"


def weights_hash(run: Path) -> str:
    """SHA-256 over the run's model files (names and contents), in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(run.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json") and "checkpoint" not in path.parts:
            digest.update(str(path.relative_to(run)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def bodies(data: PreparedDataset, count: int) -> list[bytes]:
    """Test lists of the prepared data as clients send them: raw ids, named features."""
    sparse = [f.name for f in data.schema.item_sparse]

    def vocab(name):
        try:
            return data.vocab(name)
        except KeyError:  # a field kept as integers: clients send the integer as a string
            fields = (*data.schema.item_sparse, *data.schema.user_sparse)
            return [str(k) for k in range(next(f.vocab for f in fields if f.name == name))]

    vocabs = {name: vocab(name) for name in sparse + [data.schema.user_sparse[0].name]}
    out = []
    for index in data.split("test")[:count]:
        rows = range(int(data.offsets[index]), int(data.offsets[index + 1]))
        items = [
            {
                "id": vocabs[sparse[0]][int(data.item_sparse[r, 0])],
                "features": {
                    **{n: vocabs[n][int(data.item_sparse[r, j])] for j, n in enumerate(sparse) if j},
                    **{n: float(data.item_dense[r, j]) for j, n in enumerate(data.schema.item_dense)},
                },
            }
            for r in rows
        ]
        user = {"id": vocabs[data.schema.user_sparse[0].name][int(data.user_sparse[index, 0])]}
        out.append(json.dumps({"user": user, "items": items}).encode())
    return out


def start_server(run: Path, args: list[str], cores: set[int] | None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "relist.cli", "serve", str(run), "--port", str(port), "--threads", "1", *args]
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, preexec_fn=pin)
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


class Rss:
    """The server's peak resident memory (its HTTP process and its model process together), sampled every
    0.2 s in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.process, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def now(self) -> int:
        processes = [self.process, *self.process.children(recursive=True)]
        return sum(p.memory_info().rss for p in processes)

    def _sample(self):
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, self.now())

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return max(self.peak, self.now())


async def exchange(reader, writer, body: bytes) -> tuple[int, dict]:
    """One POST /rerank on a kept-alive connection: (status, headers)."""
    writer.write(
        b"POST /rerank HTTP/1.1\r\nHost: relist\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    await reader.readexactly(int(headers.get("content-length", 0)))
    return int(lines[0].split()[1]), headers


async def load(port: int, clients: int, payloads: list[bytes], warmup: float, seconds: float, backoff: bool):
    """Closed-loop clients: (status, latency, whether it started within the measured window) of every request."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    results: list[tuple[int, float, bool]] = []

    async def client(k: int) -> None:
        reader = writer = None
        sent = k
        while loop.time() < end:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = payloads[sent % len(payloads)]
            sent += 1
            began = loop.time()
            try:
                status, headers = await exchange(reader, writer, body)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                status, headers = -1, {"connection": "close"}
            results.append((status, loop.time() - began, began >= start))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
            if status == 503 and backoff:
                await asyncio.sleep(float(headers.get("retry-after", 1)))
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return results


def large_bodies(data: PreparedDataset, count: int) -> list[bytes]:
    """Valid bodies of about 250 kB: a test list and a history of 1,000 clicks with long (unknown) ids."""
    out = []
    for body in bodies(data, count):
        request = json.loads(body)
        request["user"]["history"] = [{"item_id": f"{'h' * 230}{n}"} for n in range(1000)]
        out.append(json.dumps(request).encode())
    return out


async def probe_health(port: int, seconds: float, every: float = 0.02) -> list[float]:
    """GET /healthz every ``every`` s on one kept-alive connection for ``seconds``: the latencies."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies, end = [], loop.time() + seconds
    while loop.time() < end:
        began = loop.time()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relist\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        latencies.append(loop.time() - began)
        await asyncio.sleep(max(0.0, every - (loop.time() - began)))
    writer.close()
    return latencies


async def health_under_big_bodies(port: int, clients: int, payloads: list[bytes], seconds: float):
    """/healthz latencies while ``clients`` closed-loop clients send ``payloads``, and their results."""
    load_task = asyncio.ensure_future(load(port, clients, payloads, 0.5, seconds, True))
    await asyncio.sleep(0.5)
    latencies = await probe_health(port, seconds)
    return latencies, await load_task


def metric(port: int, name: str, **labels) -> float:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(w in line for w in want)
    )


def probe(port: int, payloads: list[bytes]) -> list[dict]:
    import httpx

    url, headers = f"http://127.0.0.1:{port}/rerank", {"content-type": "application/json"}
    return [httpx.post(url, content=body, headers=headers, timeout=60).json() for body in payloads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per load level")
    parser.add_argument("--clients", default="1,16,64,256")
    parser.add_argument("--retry", default="now,after", help="after a 503: retry now, or after its Retry-After")
    parser.add_argument("--big", type=int, default=32, help="clients sending large bodies while /healthz is probed")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    levels = [int(c) for c in args.clients.split(",")]
    retries = args.retry.split(",")
    available = sorted(os.sched_getaffinity(0))
    server_cores, load_cores = ({available[0]}, set(available[1:])) if len(available) > 1 else (None, None)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = train_run(Path(tmp))
        data = PreparedDataset(Path(tmp) / "ranker" / "rerank")
        payloads = bodies(data, 200)
        big = large_bodies(data, 20) if args.big else []
        lengths = [len(json.loads(b)["items"]) for b in payloads]
        print(f"trained in {time.perf_counter() - started:.0f} s; {len(payloads)} request bodies, lists of "
              f"{min(lengths)}-{max(lengths)} items ({np.mean(lengths):.1f} on average)")  # fmt: skip
        if server_cores:
            print(f"cores: server {sorted(server_cores)} (1 core, torch threads 1), load generator "
                  f"{sorted(load_cores)} ({len(load_cores)} core(s)), of {len(available)} on this machine")  # fmt: skip
        else:
            print("cores: one core, shared by the server and the load generator")
        before = weights_hash(run)
        rows = []
        probes_equal = None
        for mode, mode_args in MODES.items():
            proc, port = start_server(run, mode_args, server_cores)
            if load_cores:
                os.sched_setaffinity(0, load_cores)
            try:
                first = probe(port, payloads[:5])
                rss = Rss(proc.pid)
                for retry in retries:
                    for clients in levels:
                        shed_before = metric(port, "relist_requests_total", path="/rerank", status="503")
                        results = asyncio.run(load(port, clients, payloads, 1.0, args.seconds, retry == "after"))
                        time.sleep(0.5)
                        counted = metric(port, "relist_requests_total", path="/rerank", status="503") - shed_before
                        received = sum(1 for status, _, _ in results if status == 503)
                        measured = [(status, seconds) for status, seconds, inside in results if inside]
                        rows.append((mode, retry, clients, measured, rss.peak, counted == received))
                        time.sleep(1.0)  # the queue drains before the next level
                peak = rss.close()
                rows[-1] = rows[-1][:4] + (peak, rows[-1][5])
                if mode == "greedy":
                    probes_equal = probe(port, payloads[:5]) == first
                    if args.big:
                        time.sleep(1.0)
                        idle = asyncio.run(probe_health(port, args.seconds))
                        health = asyncio.run(health_under_big_bodies(port, args.big, big, args.seconds))
            finally:
                if load_cores:
                    os.sched_setaffinity(0, set(available))
                proc.terminate()
                proc.wait(timeout=30)
        after = weights_hash(run)

    report(rows, args.seconds)
    if args.big:
        busy, results = health
        statuses = {}
        for status, _, inside in results:
            if inside:
                statuses[status] = statuses.get(status, 0) + 1
        sizes = [len(b) for b in big]
        print(
            f"\nGET /healthz every 20 ms, greedy server: idle p50 {np.percentile(idle, 50) * 1000:.1f} ms, p99 "
            f"{np.percentile(idle, 99) * 1000:.1f} ms ({len(idle)} probes); with {args.big} clients sending "
            f"{min(sizes) // 1000}-{max(sizes) // 1000} kB valid bodies: p50 {np.percentile(busy, 50) * 1000:.1f} ms, "
            f"p99 {np.percentile(busy, 99) * 1000:.1f} ms, max {max(busy) * 1000:.1f} ms ({len(busy)} probes); the "
            f"large requests: {dict(sorted(statuses.items()))} in {args.seconds:g} s"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    print(f"\nweights sha256 before {before}")
    print(f"weights sha256 after  {after}  ({'unchanged' if before == after else 'CHANGED'})")
    print(f"greedy server: probe answers after the load {'identical' if probes_equal else 'DIFFERENT'} to before")
    for mode, retry, clients, results, _, _ in rows:
        if clients == max(levels):
            served = [t for s, t in results if 200 <= s < 300]
            p99 = np.percentile(served, 99) if served else float("inf")
            verdict = "met" if p99 <= 1.0 else "NOT met"
            print(f"target served p99 <= 1 s, {clients} clients, {mode}, retry {retry}: {p99 * 1000:.0f} ms, {verdict}")


def report(rows, seconds: float) -> None:
    print(
        f"\n{'server':>7} {'retry':>5} {'clients':>7} {'served/s':>9} {'x @1':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'shed p50':>9} {'shed p99':>9} {'shed':>7} {'errors':>6} {'RSS MB':>7} {'503s counted':>12}"
    )
    reference = {}
    for mode, retry, clients, results, rss, counted in rows:
        served = np.array([t for s, t in results if 200 <= s < 300]) * 1000
        shed = np.array([t for s, t in results if s == 503]) * 1000
        errors = sum(1 for s, _ in results if not (200 <= s < 300 or s == 503))  # 504s (timeouts) among them
        rate = len(served) / seconds
        reference.setdefault((mode, retry), rate)
        pct = lambda a, q: f"{np.percentile(a, q):.1f}" if len(a) else "-"  # noqa: E731
        share = len(shed) / max(len(results), 1)
        ratio = f"{rate / reference[mode, retry]:.2f}" if reference[mode, retry] else "-"
        print(
            f"{mode:>7} {retry:>5} {clients:>7} {rate:>9.1f} {ratio:>6} {pct(served, 50):>8} "
            f"{pct(served, 99):>8} {pct(shed, 50):>9} {pct(shed, 99):>9} {share:>7.1%} {errors:>6} "
            f"{rss / 2**20:>7.0f} {'all' if counted else 'NOT all':>12}"
        )


if __name__ == "__main__":
    main()
