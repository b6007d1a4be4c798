"""LAST serving speed: the batched exploration against a loop, and the HTTP service under load.

    python benchmarks/bench_last.py [--requests 200] [--threads 1]

1. Exploration: the K = 8 candidates decoded and evaluated in one batched pass against a loop over them
   (the same offsets and noise, checked to give the same lists), (a) for the exploration stage alone and
   (b) for a whole LAST parallel call (``LastConfig(batched=False)`` loops), lists of 30 and 100 at 1 and
   32 requests. Target: batched ≥ 4× faster.
2. Service: `relist serve` in its own process on loopback, this process as the load generator. p50/p99
   latency at one request at a time (batch size 1) and throughput with 16 concurrent clients, for
   generator-only decoding (``--mode greedy``), LAST parallel K = 8, and LAST-8 with the gradient taken
   through the first 10 decoding steps only (``--grad-steps 10``), lists of 30 and 100.
   Target: LAST-8 p50 at most 3× generator-only p50 at batch size 1.

The models are untrained (speed does not depend on the weights), built on a small synthetic schema.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from relist.batch import collate
from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.evaluator import Evaluator, EvaluatorConfig
from relist.generator import Generator
from relist.last import OFFICIAL_STEPS, Last, LastConfig


def random_examples(data: PreparedDataset, length: int, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    schema = data.schema
    out = []
    for _ in range(count):
        sparse = np.stack([rng.integers(1, f.vocab, length) for f in schema.item_sparse], 1)
        out.append({"item_sparse": sparse, "item_dense": rng.normal(size=(length, len(schema.item_dense))).astype("float32"),
                    "user_sparse": np.array([rng.integers(1, f.vocab) for f in schema.user_sparse]),
                    "user_hist": np.zeros((0, len(schema.user_hist)), dtype=np.int64)})
    return out


def timed(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def candidates_only(gen, ev, batch, steps) -> tuple[float, float]:
    """Seconds of the exploration stage alone (decode the K offset candidates, score them with the evaluator),
    one batched pass against a loop over the candidates, with the same offsets and noise (checked equal)."""
    from relist.generator import gumbel
    from relist.last import _Activations

    size, length = batch.mask.shape
    k = len(steps)
    with torch.no_grad():
        space = _Activations(gen.net, gen.inputs(batch), batch.mask, 0.01)
        rows = torch.arange(size)
        greedy = space.decode(space.zero(rows), rows, None)
        unit = space.unit(space.zero(rows), rows, greedy, torch.ones(size, length))
        rep = rows.repeat_interleave(k)
        scale = torch.tensor(steps).repeat(size)
        delta = {n: u[rep] * scale.view(-1, *([1] * (u.dim() - 1))) for n, u in unit.items()}
        noise = gumbel((size * k, length, length), torch.Generator().manual_seed(0))
        cands = batch[rep]

        def batched():
            orders = space.decode(delta, rep, noise)
            return orders, ev.click_probability(cands.reorder(orders))

        def looped():
            out = []
            for j in range(k):
                pick = torch.arange(size) * k + j
                order = space.decode({n: d[pick] for n, d in delta.items()}, rows, noise[pick])
                out.append((order, ev.click_probability(batch.reorder(order))))
            return out

        a, b = batched()[0].view(size, k, length), torch.stack([o for o, _ in looped()], 1)
        assert torch.equal(a, b), "batched and looped candidates disagree"
        repeats = 5 if length == 30 else 2
        return timed(batched, repeats), timed(looped, repeats)


def exploration(gen, ev, data) -> None:
    print("1a. exploration stage (decode + evaluate the K = 8 candidates): one batched pass vs a loop (same lists)")
    print(f"{'list':>6} {'requests':>9} {'batched ms':>11} {'loop ms':>9} {'loop/batched':>13}")
    for length in (30, 100):
        for size in (1, 32):
            batch = collate(random_examples(data, length, size, seed=length + size))
            t_fast, t_slow = candidates_only(gen, ev, batch, OFFICIAL_STEPS)
            print(f"{length:>6} {size:>9} {1000 * t_fast:>11.1f} {1000 * t_slow:>9.1f} {t_slow / t_fast:>12.2f}x")
    print("\n1b. a whole LAST parallel call (greedy list, gradient, candidates, selection): batched vs looped candidates")
    print(f"{'list':>6} {'requests':>9} {'batched ms':>11} {'loop ms':>9} {'loop/batched':>13}")
    for length in (30, 100):
        for size in (1, 32):
            batch = collate(random_examples(data, length, size, seed=length + size))
            fast, slow = Last(gen, ev, LastConfig()), Last(gen, ev, LastConfig(batched=False))
            a, b = fast(batch, torch.Generator().manual_seed(0)), slow(batch, torch.Generator().manual_seed(0))
            assert torch.equal(a.order, b.order), "batched and looped exploration disagree"
            repeats = 5 if length == 30 else 2
            t_fast = timed(lambda: fast(batch, torch.Generator().manual_seed(0)), repeats)
            t_slow = timed(lambda: slow(batch, torch.Generator().manual_seed(0)), repeats)
            print(f"{length:>6} {size:>9} {1000 * t_fast:>11.1f} {1000 * t_slow:>9.1f} {t_slow / t_fast:>12.2f}x")


SERVERS = {"greedy": ["--mode", "greedy"], "LAST-8": ["--mode", "parallel"],
           "LAST-8 g10": ["--mode", "parallel", "--grad-steps", "10"]}  # g10: gradient through the first 10 steps only


def start_server(run: Path, args: list[str], threads: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "relist.cli", "serve", str(run), "--port", str(port), *args,
                             "--threads", str(threads), "--max-items", "128", "--window-ms", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    import httpx

    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def request(length: int, k: int, vocab_sizes, dense_names) -> dict:
    rng = np.random.default_rng(k)
    return {"user": {"id": str(int(rng.integers(1, vocab_sizes["user_id"])))},
            "items": [{"id": str(int(i)), "features": {n: float(rng.normal()) for n in dense_names}}
                      for i in rng.choice(np.arange(1, vocab_sizes["item_id"]), length, replace=False)]}


def service(run: Path, data: PreparedDataset, n: int, threads: int) -> None:
    import httpx

    sizes = {f.name: f.vocab for f in (*data.schema.item_sparse, *data.schema.user_sparse)}
    print("\n2. service over HTTP on loopback (load generator in this process)")
    print(f"{'server':>11} {'list':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s @1':>9} {'req/s @16':>10}")
    p50 = {}
    for mode, server_args in SERVERS.items():
        proc, url = start_server(run, server_args, threads)
        try:
            with httpx.Client(timeout=60) as client:
                for length in (30, 100):
                    bodies = [request(length, k, sizes, data.schema.item_dense) for k in range(n)]
                    for body in bodies[:5]:
                        assert client.post(url + "/rerank", json=body).status_code == 200
                    latencies = []
                    started = time.perf_counter()
                    for body in bodies:
                        t = time.perf_counter()
                        client.post(url + "/rerank", json=body).raise_for_status()
                        latencies.append(time.perf_counter() - t)
                    serial_rate = n / (time.perf_counter() - started)
                    started = time.perf_counter()
                    with ThreadPoolExecutor(16) as pool:
                        list(pool.map(lambda b: httpx.post(url + "/rerank", json=b, timeout=120).raise_for_status(), bodies))
                    rate = n / (time.perf_counter() - started)
                    lat = np.array(latencies) * 1000
                    p50[mode, length] = np.percentile(lat, 50)
                    print(f"{mode:>11} {length:>5} {p50[mode, length]:>8.1f} {np.percentile(lat, 99):>8.1f} "
                          f"{serial_rate:>9.1f} {rate:>10.1f}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    for length in (30, 100):
        for mode in ("LAST-8", "LAST-8 g10"):
            print(f"{mode} p50 / generator-only p50, lists of {length}: {p50[mode, length] / p50['greedy', length]:.2f}x "
                  "(target <= 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(PrepareConfig(source="synthetic", out=root / "data", n_lists=300, n_users=500, n_items=2000, seed=0))
        data = PreparedDataset(root / "data")
        torch.manual_seed(0)
        gen, ev = Generator(data.schema), Evaluator(data.schema, EvaluatorConfig(max_len=128, dropout=0.0))
        exploration(gen, ev, data)
        run = root / "run"
        for part, model in (("generator", gen), ("evaluator", ev)):
            model.save(run / part / "best")
            (run / part / "config.json").write_text(json.dumps({"data": str(root / "data")}))
        service(run, data, args.requests, args.threads)


if __name__ == "__main__":
    main()
