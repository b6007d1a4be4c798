"""`relist experiment unexrl`: the UNEX-RL paper's table on a simulated cascade, learning curves, 3/4/5 stages.

For every seed the environment ``--env`` describes (``relist.sim.cascade_env.CascadeEnvConfig``) is built
with its world drawn from the seed (the stage models' errors, and the synthetic truth; unless the file fixes
``seed``), checked (``relist.sim.cascade_check``: stage relevance aligned with the click model, the fusion
that distrusts relevance below the hand-set one, training and evaluation users different people), and
every method is trained on it and evaluated on the held-out evaluation people: session dwell (seconds per
session, the paper's WatchTime) and session length (requests per session).

- **Methods**: CEM, DDPG, TD3, independent DDPG, UNEX-RL-CTDE, UNEX-RL with CIC, the ablations without
  stop-gradient and without CQR, ``unexrl_q1``; the hand-set weights and random fixed weights alongside.
- **Equal budgets**: every method may use ``steps x n_envs`` simulated user-requests for training; CEM's
  count includes every request of every session it plays out to score its candidates.
- **A ceiling**: the best fixed fusion a CEM search with ``reference_budget`` times the budget finds on
  training users ("best fixed fusion (reference)"), so the table says how much of the achievable gain of a
  fixed fusion each method reaches, and whether a per-request policy beats a fixed fusion at all.
- **Learning curves** against requests, evaluated on the same users as the table.
- **Statistics** (``relist.stats``): per method, the mean session dwell over seeds with a two-level 95%
  interval (nested bootstrap over seeds, then evaluation users within a seed: the unit that varies between
  one result and the next); the difference against UNEX-RL (CIC) with its interval and Holm-adjusted
  bootstrap p over the table's comparisons; the exact Wilcoxon signed-rank p of the per-seed values; and
  the count of seeds above the hand-set weights. The outcome can be bimodal across seeds (a run finds a
  better fusion or does not): the counts and Wilcoxon say that where a mean cannot.
- **More stages**, the paper's open question: ``--stage-methods`` on cascades of each count in ``--stages``
  (the environment's sizes for its own count, otherwise sizes spaced geometrically between its first and
  last), every count over the same seeds, each count's worlds checked.

Every (stages, method, seed) run is written to ``runs/`` when it ends, with its evaluation users' outcomes
and a summary of the fusion weights it set; every world's check too. ``--resume`` keeps the finished runs
and refuses an OUT written under other settings (the options that change a run, the environment file's
text, the simulator's files; not the code's version); ``--overwrite`` removes the run records it wrote and
starts over. Verdicts need at least ``MIN_SEEDS_FOR_VERDICT`` seeds. Writes ``results.csv``,
``curves.csv``, ``checks.csv``, ``summary.md``, ``curves.png``, ``env.json`` and, when the stage study ran
(a method at two or more stage counts), ``stages.png``; ``run_experiment`` returns the names written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from relist.config import load_yaml, option
from relist.experiments.plots import write_figures
from relist.grid import run_tasks
from relist.io import atomic_write_csv, atomic_write_text, read_json
from relist.rl.agents import METHODS, method_config
from relist.rl.cem import CEMConfig, cem_curve, train_cem
from relist.rl.loop import LoopConfig, evaluate_users, fixed_policy, greedy_policy, train_agent
from relist.sim.cascade_check import check_cascade, passed
from relist.sim.cascade_env import CascadeEnvConfig, build_env, default_actions, session_metrics
from relist.stats import format_p, holm, nested_bootstrap, wilcoxon_seeds

log = logging.getLogger("relist")
ALL_METHODS = ("cem", *METHODS)
LABELS = {
    "cem": "CEM",
    "ddpg": "DDPG (ranking stage)",
    "td3": "TD3 (ranking stage)",
    "iddpg": "independent DDPG",
    "unexrl_ctde": "UNEX-RL-CTDE",
    "unexrl": "UNEX-RL (CIC)",
    "unexrl_no_sg": "UNEX-RL w/o SG",
    "unexrl_no_cqr": "UNEX-RL w/o CQR",
    "unexrl_q1": "UNEX-RL, Q_g on o_1 only (ours)",
    "default": "hand-set weights",
    "random": "random weights",
    "reference": "best fixed fusion (reference)",
}
PAPER = {
    "unexrl": (1056.2, 24.2),
    "unexrl_ctde": (887.2, 21.6),
    "td3": (763.2, 18.9),
    "ddpg": (732.6, 18.2),
    "cem": (654.0, 15.3),
}
FIXED = ("default", "random", "reference")
REF = "unexrl"
OUTCOMES = ("dwell", "sessions", "requests", "clicks")
MIN_SEEDS_FOR_VERDICT = 5  # a bootstrap over fewer seeds cannot see the spread between worlds
RESUME_IGNORES = (
    "out",
    "resume",
    "overwrite",
    "threads",
    "jobs",
    "ray_address",
    "resamples",
    "seeds",
    "methods",
    "stages",
    "stage_methods",
    "stage_seeds",
)


@dataclass
class UnexrlExperimentConfig:
    env: Path = option(
        help="environment YAML (relist.sim.cascade_env.CascadeEnvConfig fields: source, sim, sizes, ...)"
    )
    out: Path = option(help="output directory")
    seeds: int = option(10, help="seeds per method (each seed draws its own world unless the env file fixes it)")
    seed: int = option(0, help="first seed")
    methods: tuple[str, ...] = option(ALL_METHODS, help="methods of the main table", choices=ALL_METHODS)
    stages: tuple[int, ...] = option((3, 4, 5), help="stage counts of the stage study (empty: skip it)")
    stage_methods: tuple[str, ...] = option(
        ("cem", "unexrl_ctde", "unexrl"), help="methods of the stage study", choices=ALL_METHODS
    )
    stage_seeds: int = option(0, help="seeds of the stage study (0: --seeds)")
    steps: int = option(300, help="training steps (requests of every parallel user)")
    n_envs: int = option(128, help="simulated users in parallel during training")
    updates_per_step: int = option(1, help="gradient updates per training step")
    eval_every: int = option(100, help="steps between evaluations (learning curves)")
    eval_users: int = option(0, help="evaluation users (0: every evaluation person once)")
    cem_population: int = option(12, help="CEM candidates per iteration")
    cem_users: int = option(32, help="training users scoring each CEM candidate")
    reference_budget: float = option(10.0, help="budget of the best-fixed-fusion search, in training budgets (0: none)")
    resamples: int = option(2000, help="bootstrap resamples of every interval and p")
    threads: int = option(1, help="torch threads of each world's runs")
    jobs: int = option(1, help="worlds (stage count x seed) at once, in local worker processes")
    ray_address: str = option("", help="run the worlds on this Ray cluster instead (local: a local one)")
    resume: bool = option(False, help="keep the finished runs in OUT and run the rest")
    overwrite: bool = option(False, help="run everything again into an OUT that holds results")


def stage_sizes(base: tuple[int, ...], n: int) -> tuple[int, ...]:
    if n == len(base):
        return tuple(base)
    first, last = base[0], base[-1]
    return tuple(int(round(first * (last / first) ** (k / (n - 1)))) for k in range(n))


def budget(cfg: UnexrlExperimentConfig) -> int:
    """Simulated user-requests every method may use for training."""
    return cfg.steps * cfg.n_envs


def _loop(cfg: UnexrlExperimentConfig) -> LoopConfig:
    return LoopConfig(
        steps=cfg.steps,
        n_envs=cfg.n_envs,
        updates_per_step=cfg.updates_per_step,
        eval_every=cfg.eval_every,
        eval_users=cfg.eval_users,
    )


def run_method(env, method: str, cfg: UnexrlExperimentConfig, seed: int) -> dict:
    """Train ``method`` on ``env`` for seed ``seed`` and evaluate it; the run's record (metrics, requests used,
    the evaluation users' outcomes and the learning curve)."""
    loop = _loop(cfg)
    started = time.perf_counter()
    curve, used = [], 0
    if method == "cem":
        cem = CEMConfig(iterations=10**6, population=cfg.cem_population, users=cfg.cem_users, budget=budget(cfg))
        weights, history = train_cem(env, cem, seed)
        policy, used = fixed_policy(weights), history[-1]["requests"]
        curve = cem_curve(env, history, _loop(cfg), seed)
    elif method == "reference":
        cem = CEMConfig(
            iterations=10**6,
            population=2 * cfg.cem_population,
            elite=6,
            users=2 * cfg.cem_users,
            init_std=1.0,
            budget=int(cfg.reference_budget * budget(cfg)),
        )
        weights, history = train_cem(env, cem, 7919 + seed)
        policy, used = fixed_policy(weights), history[-1]["requests"]
    elif method == "random":
        g = torch.Generator().manual_seed(seed)
        policy = fixed_policy([torch.rand(1, m, generator=g) * 2 - 1 for m in env.cascade.action_dims])
    elif method == "default":
        policy = None
    else:
        agent, curve = train_agent(env, method_config(method), loop, seed)
        policy, used = greedy_policy(agent), cfg.steps * cfg.n_envs
    seconds = time.perf_counter() - started
    users = evaluate_users(env, policy, loop, seed)
    return {
        "method": method,
        "seed": seed,
        "requests_used": int(used),
        "train_seconds": round(seconds, 2),
        **session_metrics(users),
        "fusion": fusion_summary(env, policy, loop, seed),
        "users": {k: users[k].tolist() for k in OUTCOMES},
        "curve": curve,
    }


@torch.no_grad()
def fusion_summary(env, policy, loop: LoopConfig, seed: int) -> dict[str, dict[str, list[float]]]:
    """Per stage, the mean and standard deviation of each fusion weight the policy sets on the evaluation users'
    first requests (what a run learned, in a form that can be read: a fixed fusion has sd 0)."""
    n = loop.eval_users or env.n_eval_people
    state = env.start(torch.arange(n), loop.eval_seed + seed, "eval")
    pop, ctx = env.first(state)
    out = env.cascade(pop, ctx, policy if policy is not None else default_actions(env.cascade, n))
    return {
        name: {
            "heads": list(heads),
            "mean": [round(float(v), 4) for v in a.mean(0)],
            "sd": [round(float(v), 4) for v in a.std(0)],
        }
        for name, heads, a in zip(env.cascade.names, env.cascade.heads, out.actions)
    }


def _run_path(out: Path, n_stages: int, method: str, seed: int) -> Path:
    return out / "runs" / f"{n_stages}-stages" / method / f"seed-{seed}.json"


def _check_path(out: Path, n_stages: int, seed: int) -> Path:
    return out / "runs" / f"{n_stages}-stages" / "check" / f"seed-{seed}.json"


def _our_files(out: Path) -> list[Path]:
    """The run records and checks an experiment writes under OUT/runs (what --overwrite removes)."""
    return sorted((out / "runs").glob("*-stages/*/seed-*.json"))


def _fingerprint(cfg: UnexrlExperimentConfig) -> dict:
    """What a resumed run must share with the one it continues."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in RESUME_IGNORES}
    settings["env_file"] = Path(cfg.env).read_text(encoding="utf-8")
    env_cfg = load_yaml(CascadeEnvConfig, cfg.env)
    if env_cfg.source == "sim":  # the simulator's own files, wherever the path points
        digest = hashlib.sha256()
        for name in ("config.json", "model.safetensors"):
            path = Path(env_cfg.sim) / name
            digest.update(path.read_bytes() if path.is_file() else b"")
        settings["simulator"] = digest.hexdigest()
    return settings


def _prepare_out(cfg: UnexrlExperimentConfig) -> Path:
    out = Path(cfg.out)
    settings = _fingerprint(cfg)
    stamp = out / "experiment.json"
    if cfg.steps < 1:
        raise ValueError(f"--steps must be at least 1 (it sets every method's budget), got {cfg.steps}")
    if out.exists() and any(out.iterdir()):
        if cfg.overwrite and cfg.resume:
            raise ValueError("--resume and --overwrite contradict each other: pick one")
        if cfg.overwrite:
            if not stamp.is_file():
                raise FileExistsError(f"{out} holds files but no experiment.json: not an unexrl experiment to redo")
            for path in _our_files(out):  # only the records this command writes; nothing else is touched
                path.unlink()
        elif cfg.resume and stamp.is_file():
            before = read_json(stamp)
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            if changed:
                raise ValueError(
                    f"{out}: --resume with different settings ({', '.join(changed)}) than the runs there; "
                    "use a new --out"
                )
        elif cfg.resume:
            raise FileExistsError(f"{out} holds files but no experiment.json: not an unexrl experiment to resume")
        else:
            raise FileExistsError(f"{out} already exists (pass --resume to continue it or --overwrite to redo it)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(settings, indent=2))
    return out


def run_experiment(cfg: UnexrlExperimentConfig) -> dict:
    methods, stage_methods = list(cfg.methods), list(cfg.stage_methods)
    for m in methods + stage_methods:
        if m not in ALL_METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(ALL_METHODS)}")
    if cfg.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {cfg.seeds}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    env_cfg = load_yaml(CascadeEnvConfig, cfg.env)
    out = _prepare_out(cfg)
    base = len(env_cfg.sizes)
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    stage_seeds = seeds[: cfg.stage_seeds] if cfg.stage_seeds > 0 else seeds
    main = ["default", "random", *methods] + (["reference"] if cfg.reference_budget > 0 else [])
    plan = [(base, seeds, main)] + [(n, stage_seeds, ["default", *stage_methods]) for n in cfg.stages if n != base]
    tasks = []  # one per world (stage count x seed) with anything left to do
    for n_stages, run_seeds, run_methods in plan:
        for seed in run_seeds:
            todo = [m for m in run_methods if not _run_path(out, n_stages, m, seed).is_file()]
            if todo or not _check_path(out, n_stages, seed).is_file():
                tasks.append(WorldTask(cfg, env_cfg, out, n_stages, seed, tuple(todo)))
    done = run_tasks(run_world, tasks, jobs=cfg.jobs, ray_address=cfg.ray_address or None, threads=max(cfg.threads, 1))
    infos: dict = {}
    for task, info in zip(tasks, done):
        infos.setdefault(str(task.n_stages), {})[str(task.seed)] = info
    records, checks = [], []
    for n_stages, run_seeds, run_methods in plan:
        for seed in run_seeds:
            checks.append(read_json(_check_path(out, n_stages, seed)))
            records += [{"stages": n_stages, **read_json(_run_path(out, n_stages, m, seed))} for m in run_methods]
    _write_tables(out, records, checks)
    if infos:
        previous = read_json(out / "env.json") if (out / "env.json").is_file() else {}
        for n, by_seed in infos.items():
            previous.setdefault(n, {}).update(by_seed)
        atomic_write_text(out / "env.json", json.dumps(previous, indent=2, default=str))
    summary = _summary(records, checks, methods, stage_methods, cfg, base, env_cfg)
    atomic_write_text(out / "summary.md", summary)
    plots = _plots(out, records, methods, base)
    written = ["results.csv", "curves.csv", "checks.csv", "summary.md", *plots, "env.json", "runs/"]
    return {"rows": [_row(r) for r in records], "checks": checks, "summary": summary, "written": written}


@dataclass(frozen=True)
class WorldTask:
    """What is left to do in one world (a stage count and a seed): its check and the methods not run yet."""

    cfg: UnexrlExperimentConfig
    env_cfg: CascadeEnvConfig
    out: Path
    n_stages: int
    seed: int
    methods: tuple[str, ...]


def run_world(task: WorldTask) -> dict:
    """Build one world, check it if it was not checked yet, and run its missing methods, each written to
    ``runs/`` as it ends; returns the world's description. (A module-level function: any executor of
    ``relist.grid`` can call it.)"""
    sizes = stage_sizes(tuple(task.env_cfg.sizes), task.n_stages)
    env, info = build_env(replace(task.env_cfg, sizes=sizes), task.seed)
    log.info("%d stages %s, seed %d: %s", task.n_stages, sizes, task.seed, info["session"])
    check_file = _check_path(task.out, task.n_stages, task.seed)
    if not check_file.is_file():
        _write_json(check_file, {"n_stages": task.n_stages, "seed": task.seed, **check_cascade(env, task.seed)})
    for method in task.methods:
        record = run_method(env, method, task.cfg, task.seed)
        _write_json(_run_path(task.out, task.n_stages, method, task.seed), record)
        log.info(
            "%d stages, %s, seed %d: session dwell %.1f, length %.2f (%d requests, %.0f s)",
            task.n_stages,
            method,
            task.seed,
            record["session_dwell"],
            record["session_length"],
            record["requests_used"],
            record["train_seconds"],
        )
    return info


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value))


def _row(record: dict) -> dict:
    """A run's line of results.csv: its metrics, and its fusion summary as JSON."""
    row = {k: v for k, v in record.items() if k not in ("users", "curve")}
    if "fusion" in row:
        row["fusion"] = json.dumps(row["fusion"])
    return row


def _write_tables(out: Path, records: list[dict], checks: list[dict]) -> None:
    atomic_write_csv(out / "results.csv", [_row(r) for r in records])
    curves = [
        {"stages": r["stages"], "method": r["method"], "seed": r["seed"], **c} for r in records for c in r["curve"]
    ]
    if curves:
        atomic_write_csv(out / "curves.csv", curves)
    rows = [
        {
            **{k: v for k, v in c.items() if k not in ("relevance_appeal_spearman", "stages")},
            **{f"spearman_{name}": r for name, r in zip(c["stages"], c["relevance_appeal_spearman"])},
        }
        for c in checks
    ]
    if rows:
        atomic_write_csv(out / "checks.csv", rows)


# ---------------------------------------------------------------------------------------------- summary


def _by_seed(records, n_stages: int, method: str) -> dict[int, dict]:
    return {r["seed"]: r for r in records if r["stages"] == n_stages and r["method"] == method}


def _arm(runs: dict[int, dict], seeds: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    dwell = [np.asarray(runs[s]["users"]["dwell"]) for s in seeds]
    sessions = [np.asarray(runs[s]["users"]["sessions"]) for s in seeds]
    return dwell, sessions


def method_stats(records, n_stages: int, methods: list[str], resamples: int, seeds: list[int] | None = None) -> dict:
    """Per method (over ``seeds``, default all): the mean session dwell over seeds with its two-level interval,
    UNEX-RL (CIC) minus the method with interval and bootstrap p (Holm-adjusted over ``methods``), the
    Wilcoxon p over seeds, the seeds above the hand-set weights and above the method's own untrained start,
    and the share of the reference's gain over the hand-set weights."""
    keep = (lambda s: s in seeds) if seeds is not None else (lambda s: True)  # noqa: E731

    def by_seed(method: str) -> dict[int, dict]:
        return {s: r for s, r in _by_seed(records, n_stages, method).items() if keep(s)}

    default, ref, reference = by_seed("default"), by_seed(REF), by_seed("reference")
    stats = {}
    for method in methods:
        runs = by_seed(method)
        seeds_here = sorted(runs)
        if not seeds_here:
            continue
        dwell, sessions = _arm(runs, seeds_here)
        zeros = [np.zeros_like(d) for d in dwell]
        ones = [np.ones_like(d) for d in dwell]
        entry = {
            "seeds": len(seeds_here),
            "mean": nested_bootstrap(dwell, zeros, sessions, ones, resamples=resamples),
            "length": float(np.mean([runs[s]["session_length"] for s in seeds_here])),
            "clicks": float(np.mean([runs[s]["clicks_per_request"] for s in seeds_here])),
            "requests": int(np.mean([runs[s]["requests_used"] for s in seeds_here])),
        }
        common = [s for s in seeds_here if s in default]
        entry["above_default"] = (
            sum(runs[s]["session_dwell"] > default[s]["session_dwell"] for s in common),
            len(common),
        )
        trained = [s for s in seeds_here if runs[s]["curve"]]
        if trained:  # against the untrained start (the warm-started actors, CEM's initial mean)
            entry["above_start"] = (
                sum(runs[s]["session_dwell"] > runs[s]["curve"][0]["session_dwell"] for s in trained),
                len(trained),
            )
        paired = [s for s in seeds_here if s in ref]
        if method != REF and paired:
            a, a_den = _arm(ref, paired)
            b, b_den = _arm(runs, paired)
            entry["vs_ref"] = nested_bootstrap(a, b, a_den, b_den, resamples=resamples)
            entry["wilcoxon"] = wilcoxon_seeds(
                [ref[s]["session_dwell"] for s in paired], [runs[s]["session_dwell"] for s in paired]
            )
        top = [s for s in seeds_here if s in reference and s in default]
        if top and method != "reference":
            gain = np.mean([reference[s]["session_dwell"] - default[s]["session_dwell"] for s in top])
            own = np.mean([runs[s]["session_dwell"] - default[s]["session_dwell"] for s in top])
            entry["share_of_reference"] = float(own / gain) if gain > 0 else float("nan")
        stats[method] = entry
    family = [m for m in stats if "vs_ref" in stats[m] and m not in ("default", "random")]
    for m, p in zip(family, holm([stats[m]["vs_ref"]["p"] for m in family])):
        stats[m]["holm"] = p
    return stats


def _interval(r: dict, digits: int = 0) -> str:
    return f"{r['mean']:.{digits}f} [{r['low']:.{digits}f}, {r['high']:.{digits}f}]"


def _diff(r: dict) -> str:
    return f"{r['mean']:+.0f} [{r['low']:+.0f}, {r['high']:+.0f}]"


def _count(pair: tuple[int, int] | None) -> str:
    return f"{pair[0]}/{pair[1]}" if pair else "-"


def _check_lines(checks: list[dict], n_stages: int) -> list[str]:
    checks = [c for c in checks if c["n_stages"] == n_stages]
    if not checks:
        return []
    ok = sum(passed(c) for c in checks)
    stages = checks[0]["stages"]
    lines = [
        "## Is the environment sound? (`relist sim check-cascade`, each seed's world)",
        "",
        f"Passed on {ok} of {len(checks)} seeds (relevance positively aligned with the click model's appeal at "
        'every stage, the fusion "relevance -1, prior +1" below the hand-set one in appeal and in session '
        "dwell, training and evaluation users different people).",
        "",
        "| seed | Spearman " + " / ".join(stages) + " | appeal hand-set / flipped / best | "
        "dwell hand-set / flipped (s) | users disjoint | train / eval people |",
        "|---|---|---|---|---|---|",
    ]
    for c in sorted(checks, key=lambda c: c["seed"]):
        rho = " / ".join(f"{r:.2f}" for r in c["relevance_appeal_spearman"])
        lines.append(
            f"| {c['seed']} | {rho} | {c['appeal_handset']:.3f} / {c['appeal_flipped']:.3f} / {c['appeal_best']:.3f} | "
            f"{c['dwell_handset']:.0f} / {c['dwell_flipped']:.0f} | {str(c['users_disjoint']).lower()} | "
            f"{c['train_people']} / {c['eval_people']} |"
        )
    return lines + [""]


def _summary(records, checks, methods, stage_methods, cfg, base, env_cfg) -> str:
    main = ["default", "random", *methods] + (["reference"] if cfg.reference_budget > 0 else [])
    stats = method_stats(records, base, main, cfg.resamples)
    n_seeds = max((s["seeds"] for s in stats.values()), default=0)
    world = f"seed {env_cfg.seed} for every run" if env_cfg.seed is not None else "drawn from each run's seed"
    split = f"split seed {env_cfg.split_seed} for every run" if env_cfg.split_seed is not None else "each seed its own"
    reference = (
        f" The reference is a CEM search with {cfg.reference_budget:g}x the budget on training users."
        if cfg.reference_budget > 0
        else ""
    )
    lines = [
        f"# UNEX-RL on a simulated {base}-stage cascade",
        "",
        f"Environment `{cfg.env}` ({env_cfg.source}; stages {' -> '.join(map(str, env_cfg.sizes))}; world "
        f"{world}; held-out people: {split}). Every method trains on a budget of {budget(cfg):,} simulated "
        f"user-requests of training users ({cfg.steps} steps x {cfg.n_envs} users; CEM counts every request of "
        f"the sessions it plays out, {cfg.cem_population} candidates x {cfg.cem_users} users per iteration, and "
        "stops at the candidate that spends the budget) and is evaluated on the held-out evaluation people (the "
        f"same users and random numbers for every method of a seed).{reference}",
        "",
        *_check_lines(checks, base),
        f"## The table ({n_seeds} seed{'s' if n_seeds != 1 else ''})",
        "",
        (
            "Session dwell: mean over seeds [95% interval over seeds and evaluation users, nested bootstrap, "
            if n_seeds != 1
            else "Session dwell [95% interval over the evaluation users only (1 seed, no interval over seeds), "
            "bootstrap, "
        )
        + f"{cfg.resamples} resamples]. UNEX-RL (CIC) minus the method: the difference with the same interval, its "
        "bootstrap p Holm-adjusted over the table's comparisons, and the exact Wilcoxon signed-rank p over seeds. "
        "Above hand-set / above start: seeds where the method's session dwell beats the hand-set weights' / its "
        "own untrained start's (the warm-started actors act close to, not exactly at, the hand-set weights). "
        "Of reference: the share of the best fixed fusion's gain over the hand-set weights.",
        "",
        "| method | seeds | requests used | session dwell (s) | UNEX-RL minus it | Holm p | Wilcoxon p | "
        "above hand-set | above start | of reference | session length | clicks / request | paper WatchTime / "
        "length |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in main:
        st = stats.get(method)
        if st is None:
            continue
        vs = _diff(st["vs_ref"]) if "vs_ref" in st else "-"
        holm_p = format_p(st["holm"], cfg.resamples) if "holm" in st else "-"
        wil = f"{st['wilcoxon']['p']:.3g}" if "wilcoxon" in st else "-"
        above = _count(st["above_default"]) if method != "default" else "-"
        share = f"{st['share_of_reference']:.0%}" if np.isfinite(st.get("share_of_reference", np.nan)) else "-"
        paper = PAPER.get(method)
        lines.append(
            f"| {LABELS[method]} | {st['seeds']} | {st['requests']:,} | {_interval(st['mean'])} | {vs} | {holm_p} | "
            f"{wil} | {above} | {_count(st.get('above_start'))} | {share} | {st['length']:.2f} | {st['clicks']:.3f} | "
            + (f"{paper[0]} / {paper[1]}" if paper else "-")
            + " |"
        )
    lines += ["", *_verdicts(stats, methods, cfg.resamples), *_stage_lines(records, checks, stage_methods, cfg, base)]
    lines += [""]
    return "\n".join(lines) + "\n"


def _verdicts(stats, methods, resamples: int) -> list[str]:
    if REF not in stats:
        return []
    n = stats[REF]["seeds"]
    if n < MIN_SEEDS_FOR_VERDICT:
        return [
            f"No verdicts: {n} seed(s) so far, fewer than {MIN_SEEDS_FOR_VERDICT}; a bootstrap over so few seeds "
            "cannot see how much results vary between worlds, and its intervals are too narrow.",
            "",
        ]
    out = ["Does UNEX-RL (CIC) beat each method, as in the paper? (Holm-adjusted bootstrap p < 0.05)", ""]
    for m in ("unexrl_ctde", "td3", "ddpg", "cem", "iddpg", "unexrl_no_sg", "unexrl_no_cqr", "unexrl_q1"):
        st = stats.get(m)
        if m not in methods or st is None or "vs_ref" not in st:
            continue
        d, p = st["vs_ref"], st["holm"]
        verdict = "not resolved" if p >= 0.05 else ("yes" if d["mean"] > 0 else "no, it is worse")
        out.append(
            f"- vs {LABELS[m]}: {_diff(d)} s (Holm p {format_p(p, resamples)}, Wilcoxon p "
            f"{st['wilcoxon']['p']:.3g}, {st['seeds']} seeds): {verdict}"
        )
    if "reference" in stats and "default" in stats:
        ref_gain = stats["reference"]["mean"]["mean"] - stats["default"]["mean"]["mean"]
        out.append(f"- the best fixed fusion's gain over the hand-set weights: {ref_gain:+.0f} s per session")
    return out + [""]


def _stage_lines(records, checks, stage_methods, cfg, base) -> list[str]:
    counts = sorted({r["stages"] for r in records})
    if len(counts) < 2:
        return []
    # every count over the same seeds (the stage study's), so the rows compare the same worlds
    seeds = sorted(set.intersection(*[{r["seed"] for r in records if r["stages"] == n} for n in counts]))
    lines = [
        "## More stages (the paper's open question)",
        "",
        f"Seeds {', '.join(map(str, seeds))} at every count. Session dwell, mean [95% interval over seeds and "
        "evaluation users]; UNEX-RL (CIC) minus the method at the same count, with the same interval, its bootstrap "
        "p Holm-adjusted over that count's other methods, and the Wilcoxon p over seeds; seeds above the hand-set "
        "weights; check-cascade passed on how many of the seeds' worlds.",
        "",
        "| stages | method | seeds | session dwell (s) | UNEX-RL minus it | Holm p | Wilcoxon p | above hand-set | "
        "session length | check passed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in counts:
        stats = method_stats(records, n, ["default", *stage_methods], cfg.resamples, seeds)
        checked = [c for c in checks if c["n_stages"] == n and c["seed"] in seeds]
        ok = f"{sum(passed(c) for c in checked)}/{len(checked)}" if checked else "-"
        for method, st in stats.items():
            above = _count(st["above_default"]) if method != "default" else "-"
            vs = _diff(st["vs_ref"]) if "vs_ref" in st else "-"
            holm_p = format_p(st["holm"], cfg.resamples) if "holm" in st else "-"
            wil = f"{st['wilcoxon']['p']:.3g}" if "wilcoxon" in st else "-"
            lines.append(
                f"| {n} | {LABELS[method]} | {st['seeds']} | {_interval(st['mean'])} | {vs} | {holm_p} | {wil} | "
                f"{above} | {st['length']:.2f} | {ok} |"
            )
    return lines


def _plots(out: Path, records, methods, base) -> list[str]:
    """curves.png, and stages.png when the stage study has a method at two or more stage counts; returns the
    names written."""
    return write_figures(
        out,
        {
            "curves.png": lambda: curves_figure(records, methods, base),
            "stages.png": lambda: stages_figure(records),
        },
        dpi=120,
    )


def curves_figure(records, methods, base):
    """Session dwell of the evaluation users against the simulated user-requests used for training, one line
    per method at ``base`` stages (mean over seeds), the default and reference policies as levels."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for k, method in enumerate(methods):
        runs = [r for r in records if r["stages"] == base and r["method"] == method and r["curve"]]
        steps = sorted({c["step"] for r in runs for c in r["curve"]})
        if not steps:
            continue
        xs = [np.mean([c["requests"] for r in runs for c in r["curve"] if c["step"] == t]) for t in steps]
        mean = [np.mean([c["session_dwell"] for r in runs for c in r["curve"] if c["step"] == t]) for t in steps]
        ax.plot(xs, mean, marker="o", ms=3, label=LABELS[method], color=f"C{k % 10}")
    for method, style in (("default", "--"), ("reference", ":")):
        runs = [r for r in records if r["stages"] == base and r["method"] == method]
        if runs:
            level = np.mean([r["session_dwell"] for r in runs])
            ax.axhline(level, color="black", linestyle=style, label=LABELS[method])
    ax.set_xlabel("simulated user-requests used for training")
    ax.set_ylabel("session dwell (s) of the evaluation users, mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def stages_figure(records):
    """Session dwell against the number of stages, per method (mean ± sd over seeds); None when no method
    ran at two or more stage counts."""
    import matplotlib.pyplot as plt

    counts = sorted({r["stages"] for r in records})
    names = dict.fromkeys(r["method"] for r in records if r["method"] not in ("random", "reference"))
    ran = {m: {n: _by_seed(records, n, m) for n in counts} for m in names}  # method -> stage count -> seed -> record
    shown = [(k, m) for k, m in enumerate(names) if sum(1 for n in counts if ran[m][n]) >= 2]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, method in shown:
        xs = [n for n in counts if ran[method][n]]
        values = [[r["session_dwell"] for r in ran[method][n].values()] for n in xs]
        means = [np.mean(v) for v in values]
        spread = [np.std(v) for v in values]
        ax.errorbar(xs, means, yerr=spread, marker="o", capsize=3, label=LABELS[method], color=f"C{k % 10}")
    ax.set_xlabel("stages")
    ax.set_ylabel("session dwell (s), mean ± sd over seeds")
    ax.set_xticks(counts)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
