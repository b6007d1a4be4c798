"""LAST serving speed: the batched exploration against a loop, and the HTTP service under load.

    python benchmarks/bench_last.py [--requests 200] [--rounds 3] [--threads 1]

1. Exploration: the K = 8 candidates decoded and evaluated in one batched pass against a loop over them
   (the same offsets and noise, checked to give the same lists), (a) for the exploration stage alone and
   (b) for a whole LAST parallel call (``LastConfig(batched=False)`` loops), lists of 30 and 100 at 1 and
   32 requests. Target: batched ≥ 4× faster. (c) LAST's gradient step, teacher forcing replayed step by
   step through the decoding loop against the one-pass ``PointerNet.teacher_forced`` (same gradients).
   (d) LAST-8 against generator-only decoding as calls in this process, without HTTP.
2. Service: `relist serve` in its own process on loopback, this process as the load generator. p50/p99
   latency at one request at a time (batch size 1) and throughput with 16 concurrent clients, for
   generator-only decoding (``--mode greedy``), LAST parallel K = 8, and LAST-8 with the gradient taken
   through the first 10 decoding steps only (``--grad-steps 10``), lists of 30 and 100. The three servers
   run side by side and every request body goes to each in turn, so the ratios are paired; the latency
   measurement is repeated ``--rounds`` times and reported as median [min-max].
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
from relist.last import OFFICIAL_STEPS, Last, LastConfig
from relist.rerankers.evaluator import Evaluator, EvaluatorConfig
from relist.rerankers.generator import Generator


def random_examples(data: PreparedDataset, length: int, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    schema = data.schema
    out = []
    for _ in range(count):
        sparse = np.stack([rng.integers(1, f.vocab, length) for f in schema.item_sparse], 1)
        out.append(
            {
                "item_sparse": sparse,
                "item_dense": rng.normal(size=(length, len(schema.item_dense))).astype("float32"),
                "user_sparse": np.array([rng.integers(1, f.vocab) for f in schema.user_sparse]),
                "user_hist": np.zeros((0, len(schema.user_hist)), dtype=np.int64),
            }
        )
    return out


def timed(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def candidates_only(gen, ev, batch, steps):
    """The exploration stage alone (decode the K offset candidates, score them with the evaluator) as LAST runs
    it, one batched pass and a loop over the candidates, with the same offsets and noise (checked equal)."""
    from relist.last import _Activations
    from relist.rerankers.generator import gumbel

    size, length = batch.mask.shape
    k = len(steps)
    with torch.inference_mode():
        space = _Activations(gen.net, gen.inputs(batch), batch.mask, 0.01)
        rows = torch.arange(size)
        greedy = space.decode(space.zero(rows), rows, None)
        unit = space.unit(space.zero(rows), rows, greedy, torch.ones(size, length))
        rep = rows.repeat_interleave(k)
        scale = torch.tensor(steps).repeat(size)
        delta = {n: u[rep] * scale.view(-1, *([1] * (u.dim() - 1))) for n, u in unit.items()}
        noise = gumbel((size * k, length, length), torch.Generator().manual_seed(0))
        cands = batch[rep]

    @torch.inference_mode()
    def batched():
        orders = space.decode(delta, rep, noise)
        return orders, ev.click_probability(cands.reorder(orders))

    @torch.inference_mode()
    def looped():
        out = []
        for j in range(k):
            pick = torch.arange(size) * k + j
            order = space.decode({n: d[pick] for n, d in delta.items()}, rows, noise[pick])
            out.append((order, ev.click_probability(batch.reorder(order))))
        return out

    a, b = batched()[0].view(size, k, length), torch.stack([o for o, _ in looped()], 1)
    assert torch.equal(a, b), "batched and looped candidates disagree"
    return batched, looped


def compare(fast, slow, length: int, size: int, rounds: int) -> None:
    """One row: median [min-max] over rounds of the batched and looped times and of their ratio."""
    repeats = 5 if length == 30 else 2
    times = np.array([(timed(fast, repeats), timed(slow, repeats)) for _ in range(rounds)]) * 1000
    ratio = times[:, 1] / times[:, 0]
    print(
        f"{length:>6} {size:>9} {np.median(times[:, 0]):>11.1f} {np.median(times[:, 1]):>9.1f} "
        f"{np.median(ratio):>12.2f}x"
        f"  [{ratio.min():.2f}-{ratio.max():.2f}]"
    )


def exploration(gen, ev, data, rounds: int) -> None:
    print(
        f"1a. exploration stage (decode + evaluate the K = 8 candidates): one batched pass vs a loop (same lists); "
        f"median over {rounds} rounds, [min-max] of the ratio"
    )
    print(f"{'list':>6} {'requests':>9} {'batched ms':>11} {'loop ms':>9} {'loop/batched':>13}")
    for length in (30, 100):
        for size in (1, 32):
            batch = collate(random_examples(data, length, size, seed=length + size))
            compare(*candidates_only(gen, ev, batch, OFFICIAL_STEPS), length, size, rounds)
    print(
        "\n1b. a whole LAST parallel call (greedy list, gradient, candidates, selection): batched vs looped candidates"
    )
    print(f"{'list':>6} {'requests':>9} {'batched ms':>11} {'loop ms':>9} {'loop/batched':>13}")
    for length in (30, 100):
        for size in (1, 32):
            batch = collate(random_examples(data, length, size, seed=length + size))
            fast, slow = Last(gen, ev, LastConfig()), Last(gen, ev, LastConfig(batched=False))
            a, b = fast(batch, torch.Generator().manual_seed(0)), slow(batch, torch.Generator().manual_seed(0))
            assert torch.equal(a.order, b.order), "batched and looped exploration disagree"
            compare(
                lambda: fast(batch, torch.Generator().manual_seed(0)),
                lambda: slow(batch, torch.Generator().manual_seed(0)),
                length,
                size,
                rounds,
            )


def gradient(gen, data, rounds: int) -> None:
    """The gradient step of LAST parallel (log π of the greedy list, backward to the activations): teacher
    forcing step by step through the decoding loop against ``PointerNet.teacher_forced`` (one pass)."""
    from relist.last import _Activations

    print("\n1c. LAST's gradient step at one request: the decoding loop replayed vs one-pass teacher forcing")
    print(f"{'list':>6} {'requests':>9} {'one-pass ms':>11} {'loop ms':>9} {'loop/one pass':>13}")
    for length in (30, 100):
        batch = collate(random_examples(data, length, 1, seed=length + 1))
        with torch.inference_mode():
            space = _Activations(gen.net, gen.inputs(batch), batch.mask, 0.01)
            rows = torch.arange(1)
            greedy = space.decode(space.zero(rows), rows, None)
        advantage = torch.randn(1, length, generator=torch.Generator().manual_seed(0))

        def step(one_pass: bool):
            states, init = space.states.clone().requires_grad_(), space.init.clone().requires_grad_()
            mask, order = batch.mask.clone(), greedy.clone()
            log_p = (
                gen.net.teacher_forced(states, init, mask, order)
                if one_pass
                else gen.net.decode(states, init, mask, order=order)[1]
            )
            return torch.autograd.grad((advantage * log_p).sum(), (states, init))

        fast, slow = step(True), step(False)
        assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item()) for a, b in zip(fast, slow))
        compare(lambda: step(True), lambda: step(False), length, 1, rounds)


def in_process(gen, ev, data, rounds: int) -> None:
    """LAST-8 against generator-only decoding as calls in this process (no HTTP, no JSON): the stricter ratio,
    since the service's fixed per-request costs no longer dilute it. Calls alternate between the two."""
    print(
        "\n1d. one request in process: LAST parallel K = 8 vs generator-only (greedy list + its evaluator score), "
        "alternating calls; median [min-max] of the per-round ratio of medians"
    )
    print(f"{'list':>6} {'greedy ms':>10} {'LAST-8 ms':>10} {'LAST/greedy':>12}")
    for length in (30, 100):
        batch = collate(random_examples(data, length, 1, seed=length + 2))
        greedy, last = Last(gen, ev, LastConfig(steps=())), Last(gen, ev, LastConfig())
        calls = 20 if length == 30 else 8
        times = []
        for r in range(rounds):
            t = {0: [], 1: []}
            for i in range(calls + 1):
                for j, model in enumerate((greedy, last)):
                    started = time.perf_counter()
                    model(batch, torch.Generator().manual_seed(i))
                    if i:  # the first call of each is a warm-up
                        t[j].append(time.perf_counter() - started)
            times.append((np.median(t[0]) * 1000, np.median(t[1]) * 1000))
        times = np.array(times)
        ratio = times[:, 1] / times[:, 0]
        print(
            f"{length:>6} {np.median(times[:, 0]):>10.1f} {np.median(times[:, 1]):>10.1f} {np.median(ratio):>11.2f}x"
            f"  [{ratio.min():.2f}-{ratio.max():.2f}]"
        )


SERVERS = {
    "greedy": ["--mode", "greedy"],
    "LAST-8": ["--mode", "parallel"],
    "LAST-8 g10": ["--mode", "parallel", "--grad-steps", "10"],
}  # g10: gradient through the first 10 steps only


def start_server(run: Path, args: list[str], threads: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relist.cli",
            "serve",
            str(run),
            "--port",
            str(port),
            *args,
            "--threads",
            str(threads),
            "--max-items",
            "128",
            "--window-ms",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
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
    return {
        "user": {"id": str(int(rng.integers(1, vocab_sizes["user_id"])))},
        "items": [
            {"id": str(int(i)), "features": {n: float(rng.normal()) for n in dense_names}}
            for i in rng.choice(np.arange(1, vocab_sizes["item_id"]), length, replace=False)
        ],
    }


def service(run: Path, data: PreparedDataset, n: int, threads: int, rounds: int) -> None:
    """All servers run at once; each request body goes to each server in turn (rotating which goes first), so
    that the load of a shared machine falls on all of them alike and the ratios are paired."""
    import httpx

    sizes = {f.name: f.vocab for f in (*data.schema.item_sparse, *data.schema.user_sparse)}
    print(
        f"\n2. service over HTTP on loopback (load generator in this process), {n} requests x {rounds} rounds per "
        "server and list length, one at a time, interleaved across the servers"
    )
    servers = {}
    try:
        for mode, server_args in SERVERS.items():
            servers[mode] = start_server(run, server_args, threads)
        modes = list(servers)
        p50, p99, rate1, rate16 = {}, {}, {}, {}
        with httpx.Client(timeout=60) as client:
            for length in (30, 100):
                bodies = [request(length, k, sizes, data.schema.item_dense) for k in range(n)]
                for mode in modes:
                    for body in bodies[:5]:
                        assert client.post(servers[mode][1] + "/rerank", json=body).status_code == 200
                for r in range(rounds):
                    latencies = {mode: [] for mode in modes}
                    for i, body in enumerate(bodies):
                        for j in range(len(modes)):
                            mode = modes[(i + j) % len(modes)]
                            t = time.perf_counter()
                            client.post(servers[mode][1] + "/rerank", json=body).raise_for_status()
                            latencies[mode].append(time.perf_counter() - t)
                    for mode in modes:
                        lat = np.array(latencies[mode]) * 1000
                        p50.setdefault((mode, length), []).append(np.percentile(lat, 50))
                        p99.setdefault((mode, length), []).append(np.percentile(lat, 99))
                        rate1.setdefault((mode, length), []).append(1000 / lat.mean())
                for mode in modes:
                    url = servers[mode][1]
                    started = time.perf_counter()
                    with ThreadPoolExecutor(16) as pool:
                        list(
                            pool.map(
                                lambda b: httpx.post(url + "/rerank", json=b, timeout=120).raise_for_status(), bodies
                            )
                        )
                    rate16[mode, length] = n / (time.perf_counter() - started)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    spread = lambda v: f"{np.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]"  # noqa: E731 - median [min-max] over rounds
    print("median [min-max] over the rounds")
    print(f"{'server':>11} {'list':>5} {'p50 ms':>20} {'p99 ms':>20} {'req/s @1':>18} {'req/s @16':>10}")
    for length in (30, 100):
        for mode in modes:
            key = mode, length
            print(
                f"{mode:>11} {length:>5} {spread(p50[key]):>20} {spread(p99[key]):>20} "
                f"{spread(rate1[key]):>18} {rate16[key]:>10.1f}"
            )
    for length in (30, 100):
        for mode in modes[1:]:
            ratios = np.array(p50[mode, length]) / np.array(p50["greedy", length])
            print(
                f"{mode} p50 / generator-only p50, lists of {length}: {np.median(ratios):.2f}x, per round "
                f"{' '.join(f'{x:.2f}' for x in ratios)} (target <= 3x)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of every measurement (spread)")
    parser.add_argument("--no-service", action="store_true", help="only the in-process measurements (1a-1d)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(PrepareConfig(source="synthetic", out=root / "data", n_lists=300, n_users=500, n_items=2000, seed=0))
        data = PreparedDataset(root / "data")
        torch.manual_seed(0)
        gen, ev = (
            Generator(data.schema).eval(),
            Evaluator(data.schema, EvaluatorConfig(max_len=128, dropout=0.0)).eval(),
        )
        exploration(gen, ev, data, args.rounds)
        gradient(gen, data, args.rounds)
        in_process(gen, ev, data, args.rounds)
        run = root / "run"
        for part, model in (("generator", gen), ("evaluator", ev)):
            model.save(run / part / "best")
            (run / part / "config.json").write_text(json.dumps({"data": str(root / "data")}))
        if not args.no_service:
            service(run, data, args.requests, args.threads, args.rounds)


if __name__ == "__main__":
    main()
