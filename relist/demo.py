"""The main job end to end (`relist demo`): every part of relist on one dataset, with one seed.

Stages, each writing a directory under ``OUT`` that the matching command would write:

1. ``data/``: the dataset (the embedded synthetic source by default; ``--data mind|trivago --src PATH``);
2. ``ranker/``: the LambdaMART initial ranker and its re-ranking splits (``ranker/rerank``);
3. ``reranker/`` and ``reranker_principled/``: one re-ranker without and with the P1+P2 losses;
4. ``last/evaluator`` and ``last/generator``: LAST's models;
5. ``serve/``: LAST served in process by the real HTTP service on loopback (some test lists sent as a
   client would), with the deployed weights' hash before and after;
6. ``sim/``: the user simulator (the synthetic truth's click model, or one fitted on the data's logs);
7. ``abtest/``: the A/B test of logged order, initial ranker, both re-rankers, generator greedy and LAST;
8. ``cascade/``: a short UNEX-RL run against TD3 and the hand-set weights on a cascade built on the same
   kind of world (`experiment unexrl` with one seed and no stage study).

``summary.md`` holds the headline tables: re-ranking (offline NDCG@10 on the test lists, online clicks per
request on simulated users) and the cascade (session dwell). With one seed an interval is over test
lists or simulated users only, never over training seeds, and the tables say so.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from relist.config import option
from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.io import atomic_write_text, read_json
from relist.last import weights_hash
from relist.serve.requests import raw_vocabularies, request_for_list

MARKER = "demo.json"  # a directory the demo wrote: only such a directory is replaced
DATA_CHOICES = ("synthetic", "mind", "trivago")


@dataclass
class DemoConfig:
    out: Path = option(
        Path(".relist-demo"),
        help="working directory (a directory an earlier demo wrote is replaced; any other is refused)",
    )
    data: str = option("synthetic", help="dataset of the story", choices=DATA_CHOICES)
    src: Path | None = option(None, help="raw files of --data mind or trivago (e.g. ../shared/data/mind_small_5k)")
    seed: int = option(0, help="seed of the data, every model and the simulated users")
    n_lists: int = option(12000, help="synthetic: number of lists")
    reranker: str = option(
        "prm",
        help="the re-ranker trained without and with P1+P2",
        choices=("prm", "dlcm", "setrank", "midnn", "pear", "raise"),
    )
    reranker_args: str = option(
        "d_model=32,n_blocks=1", help="its settings (key=value,...; the default is PRM's: give another model's with it)"
    )
    epochs: int = option(4, help="most epochs of each re-ranker, evaluator and generator")
    users: int = option(1000, help="simulated users of the A/B test")
    serve_requests: int = option(64, help="test lists sent to the in-process service")
    rl_steps: int = option(60, help="cascade: training steps of each RL method")
    rl_envs: int = option(32, help="cascade: simulated users in parallel during training")
    cascade_items: int = option(2000, help="cascade on synthetic data: catalogue size")
    eval_users: int = option(500, help="cascade: evaluation users (0: every held-out person once)")
    threads: int = option(2, help="torch threads")
    progress: bool = option(False, help="progress bars of the training runs")


def _check_out(cfg: DemoConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(
                f"{out} holds files the demo did not write (no {MARKER}): choose another --out or remove it yourself"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"written_by": "relist demo", "started": time.time()}))
    return out


def _prepare(cfg: DemoConfig, out: Path) -> Path:
    data = out / "data"
    if cfg.data == "synthetic":
        prepare(PrepareConfig(source="synthetic", out=data, seed=cfg.seed, n_lists=cfg.n_lists))
    else:
        if cfg.src is None:
            raise ValueError(f"--data {cfg.data} needs --src: the folder of its raw files")
        prepare(PrepareConfig(source=cfg.data, src=Path(cfg.src), out=data, seed=cfg.seed))
    return data


# --- offline: the same policies as the A/B test, on the logged test lists ------------------------------------


def _mean_interval(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=float)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    mean = float(values.mean())
    return {"value": mean, "ci_low": mean - half, "ci_high": mean + half}


def offline_ndcg(data_dir: Path, sim_dir: Path, specs: list[str], seed: int) -> dict[str, dict]:
    """NDCG@10 on the labels of the data's test lists for each policy spec (the A/B test's policies, so the
    offline and online columns judge the same orders); mean and 95% normal interval over test lists."""
    from relist.metrics import per_list_metrics
    from relist.sim.policies import PolicyContext, make_policy, parse_spec, policy_labels
    from relist.sim.store import load_simulator

    data = PreparedDataset(data_dir)
    sim = load_simulator(sim_dir, torch.device("cpu"))
    ctx = PolicyContext(seed=seed, device=torch.device("cpu"), simulator=sim)
    parsed = parse_spec(specs)
    policies = {label: make_policy(n, a, ctx) for label, (n, a) in zip(policy_labels(parsed), parsed)}
    values: dict[str, list[np.ndarray]] = {name: [] for name in policies}
    with torch.no_grad():
        for batch in data.batches("test", 512):
            for name, policy in policies.items():
                scores = policy(batch)
                per_list = per_list_metrics(scores.double(), batch.label.double(), batch.mask, ks=(10,))
                values[name].append(per_list["ndcg@10"].numpy())
    return {name: {**_mean_interval(np.concatenate(v)), "n_lists": int(sum(map(len, v)))} for name, v in values.items()}


# --- LAST served in process ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(run: Path, seed: int) -> Iterator[tuple[str, object]]:
    """``relist serve RUN`` (LAST parallel) on a free loopback port in a thread: (url, service)."""
    import uvicorn

    from relist.serve.app import Service, create_app, uvicorn_options
    from relist.serve.settings import ServeSettings

    settings = ServeSettings(run=run, port=_free_port(), seed=seed)
    service = Service(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, service), **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the in-process service did not start")
        time.sleep(0.02)
    try:
        yield f"http://{settings.host}:{settings.port}", service
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serve_in_process(run: Path, data_dir: Path, n_requests: int, seed: int) -> dict:
    """Send ``n_requests`` test lists of ``data_dir`` (a re-ranking dataset: the initial ranker's top lists with
    its ``init_score``, what the service gets in production) to LAST served over HTTP, one at a time and then
    all at once; the answers' statuses, latencies and exploration, and the deployed weights' hash before and
    after."""
    import httpx

    data = PreparedDataset(data_dir)
    vocabs = raw_vocabularies(data)
    bodies = [request_for_list(data, int(i), vocabs) for i in data.split("test")[:n_requests]]
    with served(run, seed) as (url, service):
        before = weights_hash(service.generator, service.evaluator)
        latencies, statuses, exploration, first_error = [], {}, {}, None
        with httpx.Client(timeout=30) as client:
            for body in bodies:
                started = time.perf_counter()
                answer = client.post(f"{url}/rerank", json=body)
                latencies.append(time.perf_counter() - started)
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                if answer.status_code != 200 and first_error is None:
                    first_error = answer.text[:500]
                if answer.status_code == 200:
                    kind = "greedy list" if answer.json()["exploration"] == "greedy" else "a searched candidate"
                    exploration[kind] = exploration.get(kind, 0) + 1
        from concurrent.futures import ThreadPoolExecutor

        def one(body: dict) -> int:
            with httpx.Client(timeout=30) as c:
                return c.post(f"{url}/rerank", json=body).status_code

        with ThreadPoolExecutor(16) as pool:
            concurrent = list(pool.map(one, bodies))
        concurrent_statuses = {str(k): concurrent.count(k) for k in sorted(set(concurrent))}
        after = weights_hash(service.generator, service.evaluator)
    lat = np.array(latencies) * 1000
    return {
        "requests": len(bodies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "concurrent": len(concurrent),
        "concurrent_statuses": concurrent_statuses,
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "exploration": exploration,
        "weights_before": before,
        "weights_after": after,
        "weights_unchanged": before == after,
        "first_error": first_error,
    }


# --- the cascade ----------------------------------------------------------------------------------------------


def cascade_env_text(cfg: DemoConfig, sim_dir: Path) -> str:
    """The cascade environment of the demo: a synthetic catalogue, or the demo's simulator of the logs."""
    sizes = f"sizes: [{min(200, cfg.cascade_items // 2)}, 50, 10]\n"
    if cfg.data == "synthetic":
        return (
            f"source: synthetic\nn_items: {cfg.cascade_items}\nn_users: 2000\n{sizes}reward: dwell\nmax_sessions: 3\n"
        )
    return f"source: sim\nsim: {sim_dir.resolve()}\n{sizes}reward: dwell\nmax_sessions: 3\n"


# --- the story ------------------------------------------------------------------------------------------------

STAGES = 8


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = lambda line: None) -> dict:
    """Run every stage (module docstring); ``say`` gets one line per stage. Returns the headline results and
    writes ``OUT/summary.md`` and ``OUT/report.html``."""
    from relist.experiments.unexrl import UnexrlExperimentConfig
    from relist.experiments.unexrl import run_experiment as run_unexrl
    from relist.rankers.train import TrainRankerConfig, train_ranker
    from relist.report import write_report, write_run_info
    from relist.sim.abtest import ABTestConfig, run_abtest
    from relist.sim.train import SimBuildConfig, TrainSimConfig, train_simulator, truth_simulator
    from relist.train import (
        TrainConfig,
        TrainEvaluatorConfig,
        TrainGeneratorConfig,
        train,
        train_evaluator,
        train_generator,
    )

    started = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = _check_out(cfg)
    times: dict[str, float] = {}

    def stage(k: int, text: str) -> None:
        times[text] = time.time()
        say(f"[{k}/{STAGES}] {text} ({time.time() - started:.0f} s)")

    stage(1, f"preparing the {cfg.data} dataset in {out / 'data'}")
    data_dir = _prepare(cfg, out)
    manifest = PreparedDataset(data_dir).manifest

    stage(2, "training the LambdaMART initial ranker")
    ranker = train_ranker(
        TrainRankerConfig(data=data_dir, out=out / "ranker", model="lambdamart", seed=cfg.seed, progress=cfg.progress)
    )
    rerank = out / "ranker" / "rerank"
    common = dict(data=rerank, seed=cfg.seed, epochs=cfg.epochs, patience=2, progress=cfg.progress)

    stage(3, f"training {cfg.reranker} without and with the P1+P2 consistency losses")
    args = dict(model=cfg.reranker, model_args=cfg.reranker_args, **common)
    train(TrainConfig(out=out / "reranker", **args))
    train(TrainConfig(out=out / "reranker_principled", p1_weight=1.0, p2_weight=1.0, **args))

    stage(4, "training LAST's evaluator and generator")
    train_evaluator(TrainEvaluatorConfig(out=out / "last" / "evaluator", **common))
    train_generator(TrainGeneratorConfig(out=out / "last" / "generator", **common))

    stage(5, f"serving LAST over HTTP in process ({cfg.serve_requests} test lists)")
    serving = serve_in_process(out / "last", rerank, cfg.serve_requests, cfg.seed)
    (out / "serve").mkdir()
    atomic_write_text(out / "serve" / "serve.json", json.dumps(serving, indent=2))

    if cfg.data == "synthetic":
        stage(6, "writing the simulator of the synthetic truth's click model")
        truth_simulator(SimBuildConfig(data=data_dir, out=out / "sim", seed=cfg.seed))
    else:
        stage(6, "fitting the user simulator on the logs")
        train_simulator(TrainSimConfig(data=data_dir, out=out / "sim", seed=cfg.seed, progress=cfg.progress))

    specs = [
        "logged",
        f"ranker:{out / 'ranker'}",
        f"reranker:{out / 'reranker'}",
        f"reranker:{out / 'reranker_principled'}",
        f"greedy:{out / 'last'}",
        f"last:{out / 'last'}",
    ]
    labels = {
        "logged": "logged order",
        "ranker:ranker": "initial ranker (LambdaMART)",
        "reranker:reranker": f"{cfg.reranker}",
        "reranker:reranker_principled": f"{cfg.reranker} +P1+P2",
        "greedy:last": "generator greedy",
        "last:last": "LAST parallel",
    }
    stage(7, f"A/B test of {len(specs)} policies on {cfg.users} simulated users")
    ab = run_abtest(ABTestConfig(sim=out / "sim", policies=tuple(specs), out=out / "abtest", users=cfg.users, seeds=1))
    offline = offline_ndcg(data_dir, out / "sim", specs, cfg.seed)

    stage(8, f"UNEX-RL against TD3 and the hand-set weights on a cascade ({cfg.rl_steps} steps)")
    (out / "cascade_env.yaml").write_text(cascade_env_text(cfg, out / "sim"))
    run_unexrl(
        UnexrlExperimentConfig(
            env=out / "cascade_env.yaml",
            out=out / "cascade",
            seeds=1,
            seed=cfg.seed,
            methods=("td3", "unexrl"),
            stages=(),
            steps=cfg.rl_steps,
            n_envs=cfg.rl_envs,
            eval_every=cfg.rl_steps,
            eval_users=cfg.eval_users,
            reference_budget=0.0,
            threads=cfg.threads,
        )
    )
    result = {
        "data": cfg.data,
        "manifest_hash": manifest.get("content_hash"),
        "ranker": {k: v for k, v in ranker.items() if k.startswith("logged_test") or k == "test"},
        "rerank": _rerank_rows(ab, offline, labels),
        "cascade": _cascade_rows(out / "cascade", cfg.seed),
        "serve": serving,
        "seconds": round(time.time() - started, 1),
    }
    summary = summary_markdown(cfg, result)
    atomic_write_text(out / "summary.md", summary)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=float))
    result["summary"] = summary
    write_run_info(out, cfg, started=started)
    result["report"] = str(write_report([out], out / "report.html", title=f"relist demo ({cfg.data})"))
    return result


def _rerank_rows(ab: dict, offline: dict[str, dict], labels: dict[str, str]) -> list[dict]:
    online = {r["policy"]: r for r in ab["rows"] if r["metric"] == "clicks_per_request"}
    rows = []
    for name in ab["policies"]:
        row = {"method": labels.get(name, name), "policy": name, "ndcg@10": offline[name], "clicks": online[name]}
        rows.append(row)
    return rows


CASCADE_LABELS = {"default": "hand-set weights", "random": "random weights", "td3": "TD3", "unexrl": "UNEX-RL"}


def _cascade_rows(out: Path, seed: int) -> list[dict]:
    """Session dwell (dwell per session) of each method on the evaluation users, from the experiment's run
    records; 95% delta-method interval over those users."""
    from relist.stats import normal_interval, ratio_influence

    rows = []
    for method, label in CASCADE_LABELS.items():
        path = out / "runs" / "3-stages" / method / f"seed-{seed}.json"
        if not path.is_file():
            continue
        users = read_json(path)["users"]
        value, influence = ratio_influence(np.asarray(users["dwell"], float), np.asarray(users["sessions"], float))
        low, high = normal_interval(influence, value)
        rows.append({"method": label, "value": value, "ci_low": low, "ci_high": high, "n_users": len(influence)})
    return rows


def _cell(stat: dict, digits: int = 4) -> str:
    if not np.isfinite(stat.get("ci_low", float("nan"))):
        return f"{stat['value']:.{digits}f} (no interval)"
    return f"{stat['value']:.{digits}f} [{stat['ci_low']:.{digits}f}, {stat['ci_high']:.{digits}f}]"


def summary_markdown(cfg: DemoConfig, result: dict) -> str:
    n_lists = result["rerank"][0]["ndcg@10"]["n_lists"] if result["rerank"] else 0
    lines = [
        f"# relist demo: {cfg.data}, seed {cfg.seed}",
        "",
        "## Re-ranking",
        "",
        f"One training seed, so each interval is a 95% interval over the {n_lists} test lists (offline) or the "
        f"{cfg.users} simulated users (online) only: it says nothing of how much another training seed would "
        "move a number. Offline: NDCG@10 on the logged test clicks, whole lists. Online: clicks per request on "
        "the simulator (the synthetic truth's click model, or one fitted on the logs), the same users and "
        "random numbers for every policy.",
        "",
        "| method | offline NDCG@10 [95% CI over lists] | online clicks per request [95% CI over users] |",
        "|---|---|---|",
    ]
    for row in result["rerank"]:
        lines.append(f"| {row['method']} | {_cell(row['ndcg@10'])} | {_cell(row['clicks'])} |")
    lines += ["", "## Cascade", ""]
    lines += [
        "Session dwell (seconds of reading per session) on held-out evaluation users, one seed of each "
        f"method, {cfg.rl_steps} training steps x {cfg.rl_envs} users: a short run that shows the pieces work, "
        "not the study (`relist experiment unexrl`, docs/unexrl_mind.md). The interval is over evaluation "
        "users only.",
        "",
        "| method | session dwell [95% CI over users] |",
        "|---|---|",
    ]
    for row in result["cascade"]:
        lines.append(f"| {row['method']} | {_cell(row, 1)} |")
    s = result["serve"]
    lines += [
        "",
        "## Serving",
        "",
        f"LAST served over HTTP in process: {s['requests']} test lists one at a time (statuses {s['statuses']}, "
        f"p50 {s['latency_ms_p50']:.1f} ms, p99 {s['latency_ms_p99']:.1f} ms), then {s['concurrent']} at once "
        f"(statuses {s['concurrent_statuses']}; a 503 is a request shed past the service's deadline). "
        f"Exploration of the served lists: {s['exploration']}. Deployed "
        f"weights {'unchanged' if s['weights_unchanged'] else 'CHANGED'} (SHA-256 {s['weights_before'][:16]}…).",
        "",
        f"Whole demo: {result['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"
