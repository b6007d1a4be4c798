"""`relist experiment unexrl`: the UNEX-RL paper's table on a simulated cascade, learning curves, 3/4/5 stages.

For every seed and method (CEM, DDPG, TD3, independent DDPG, UNEX-RL-CTDE, UNEX-RL with CIC, and the
ablations without stop-gradient and without CQR) one agent is trained on the environment ``--env``
describes (``relist.sim.cascade_env.CascadeEnvConfig``) and evaluated on fixed users: session dwell
(seconds per session, the paper's WatchTime) and session length (requests per session). The same
users and random numbers serve every method of a seed (eval seed ``10000 + seed``), so differences are
paired; the hand-set default weights and random fixed weights are evaluated alongside.

Then the paper's open question, more stages: the stage-count study trains ``--stage-methods`` on
cascades of each count in ``--stages`` (the environment's sizes for its own count, otherwise sizes
spaced geometrically between its first and last).

Writes ``results.csv`` (one row per stages x method x seed), ``curves.csv`` (learning curves),
``summary.md`` (mean ± 95% CI over seeds (t), paired t-tests against UNEX-RL, the verdict on the paper's
ordering), ``curves.png`` and ``stages.png``; ``env.json`` describes the calibrated environment.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from relist.config import load_yaml, option
from relist.io import atomic_write_csv
from relist.rl.agents import METHODS, method_config
from relist.rl.cem import CEMConfig, train_cem
from relist.rl.loop import (
    LoopConfig,
    evaluate,
    fixed_policy,
    greedy_policy,
    train_agent,
)
from relist.sim.cascade_env import CascadeEnvConfig, build_env
from relist.stats import paired_t_p, t_ci95

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
}
PAPER = {
    "unexrl": (1056.2, 24.2),
    "unexrl_ctde": (887.2, 21.6),
    "td3": (763.2, 18.9),
    "ddpg": (732.6, 18.2),
    "cem": (654.0, 15.3),
}
METRICS = ("session_dwell", "session_length")


@dataclass
class UnexrlExperimentConfig:
    env: Path = option(
        help="environment YAML (relist.sim.cascade_env.CascadeEnvConfig fields: source, sim, sizes, ...)"
    )
    out: Path = option(help="output directory")
    seeds: int = option(5, help="seeds per method")
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
    eval_users: int = option(1000, help="users of the final evaluation (curves use half)")
    cem_iterations: int = option(8, help="CEM iterations")
    threads: int = option(1, help="torch threads")
    overwrite: bool = option(False, help="replace OUT if it exists")


def stage_sizes(base: tuple[int, ...], n: int) -> tuple[int, ...]:
    if n == len(base):
        return tuple(base)
    first, last = base[0], base[-1]
    return tuple(int(round(first * (last / first) ** (k / (n - 1)))) for k in range(n))


def run_method(env, method: str, cfg: UnexrlExperimentConfig, seed: int) -> tuple[dict, list[dict]]:
    loop = LoopConfig(
        steps=cfg.steps,
        n_envs=cfg.n_envs,
        updates_per_step=cfg.updates_per_step,
        eval_every=cfg.eval_every,
        eval_users=max(cfg.eval_users // 2, 2),
    )
    started = time.perf_counter()
    if method == "cem":
        weights, cem_curve = train_cem(env, CEMConfig(iterations=cfg.cem_iterations), seed)
        policy = fixed_policy(weights)
        curve = [
            {"step": c["iteration"], "requests": c["requests"], "session_dwell": c["mean_score"]} for c in cem_curve
        ]
    elif method in ("default", "random"):
        if method == "random":
            g = torch.Generator().manual_seed(seed)
            policy = fixed_policy([torch.rand(1, m, generator=g) * 2 - 1 for m in env.cascade.action_dims])
        else:
            policy = None
        curve = []
    else:
        agent, curve = train_agent(env, method_config(method), loop, seed)
        policy = greedy_policy(agent)
    seconds = time.perf_counter() - started
    final = evaluate(env, policy, replace(loop, eval_users=cfg.eval_users), seed)
    return {"method": method, "seed": seed, "train_seconds": round(seconds, 2), **final}, curve


def run_experiment(cfg: UnexrlExperimentConfig) -> dict:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    methods, stage_methods = list(cfg.methods), list(cfg.stage_methods)
    for m in methods + stage_methods:
        if m not in ALL_METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(ALL_METHODS)}")
    if cfg.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {cfg.seeds}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    env_cfg = load_yaml(CascadeEnvConfig, cfg.env)
    counts = list(cfg.stages)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    rows, curves, envs = [], [], {}
    stage_seeds = seeds[: cfg.stage_seeds] if cfg.stage_seeds > 0 else seeds
    plan = [(len(env_cfg.sizes), m, seeds) for m in ["default", "random", *methods]]
    plan += [(n, m, stage_seeds) for n in counts if n != len(env_cfg.sizes) for m in ["default", *stage_methods]]
    for n_stages, method, run_seeds in plan:
        if n_stages not in envs:
            sizes = stage_sizes(tuple(env_cfg.sizes), n_stages)
            envs[n_stages] = build_env(replace(env_cfg, sizes=sizes))
            log.info("environment with %d stages %s: %s", n_stages, sizes, envs[n_stages][1]["session"])
        env = envs[n_stages][0]
        for seed in run_seeds:
            row, curve = run_method(env, method, cfg, seed)
            rows.append({"stages": n_stages, **row})
            curves += [{"stages": n_stages, "method": method, "seed": seed, **c} for c in curve]
            log.info(
                "%d stages, %s, seed %d: session dwell %.1f, length %.2f",
                n_stages,
                method,
                seed,
                row["session_dwell"],
                row["session_length"],
            )
            atomic_write_csv(out / "results.csv", rows)
            atomic_write_csv(out / "curves.csv", curves)
    (out / "env.json").write_text(json.dumps({n: info for n, (_, info) in envs.items()}, indent=2, default=str))
    summary = _summary(rows, methods, stage_methods, counts, len(env_cfg.sizes), cfg, envs)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    _plots(out, rows, curves, methods, len(env_cfg.sizes))
    return {"rows": rows, "summary": summary}


def _values(rows, stages, method, metric) -> list[float]:
    return [r[metric] for r in sorted(rows, key=lambda r: r["seed"]) if r["stages"] == stages and r["method"] == method]


def _summary(rows, methods, stage_methods, counts, base_stages, cfg, envs) -> str:
    info = envs[base_stages][1]
    lines = [
        f"# UNEX-RL on a simulated {base_stages}-stage cascade",
        "",
        f"Environment `{cfg.env}`: {info['source']}, {info['n_items']:,} items, {info['n_users']:,} users, stages "
        f"{' -> '.join(map(str, info['sizes']))}; sessions calibrated so that the hand-set weights give "
        f"{info['session']['target_requests_per_session']:.2f} requests per session (first session). "
        f"Training: {cfg.steps} steps x {cfg.n_envs} users; evaluation on {cfg.eval_users} users per seed "
        f"(the same users for every method of a seed). Mean ± 95% CI (t) over {cfg.seeds} seed(s); "
        "p: paired t-test across seeds against UNEX-RL (CIC).",
        "",
        "| method | session dwell (s) | session length (requests) | clicks / request | paper WatchTime / length |",
        "|---|---|---|---|---|",
    ]
    ref = "unexrl" if "unexrl" in methods else None
    for method in ["default", "random", *methods]:
        cells = []
        for metric in METRICS + ("clicks_per_request",):
            v = _values(rows, base_stages, method, metric)
            cell = f"{np.mean(v):.4g} ± {t_ci95(v):.3g}"
            if ref and method not in (ref, "default", "random") and metric in METRICS:
                cell += f" (p={paired_t_p(_values(rows, base_stages, ref, metric), v):.2g})"
            cells.append(cell)
        paper = PAPER.get(method)
        cells.append(f"{paper[0]} / {paper[1]}" if paper else "-")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    if ref:
        lines += [
            "",
            "Does UNEX-RL (CIC) beat each method, as in the paper? (mean difference over seeds, paired t-test)",
            "",
        ]
        for other in [
            m
            for m in ("unexrl_ctde", "td3", "ddpg", "cem", "iddpg", "unexrl_no_sg", "unexrl_no_cqr", "unexrl_q1")
            if m in methods
        ]:
            parts = []
            for metric in METRICS:
                a, b = _values(rows, base_stages, ref, metric), _values(rows, base_stages, other, metric)
                diff, p = float(np.mean(a) - np.mean(b)), paired_t_p(a, b)
                verdict = (
                    "yes" if diff > 0 and p < 0.05 else ("no, worse" if diff < 0 and p < 0.05 else "not significantly")
                )
                parts.append(f"{metric.replace('_', ' ')} {diff:+.4g} (p={p:.2g}): {verdict}")
            lines.append(f"- vs {LABELS[other]}: " + "; ".join(parts))
    others = [n for n in counts if n != base_stages]
    if others:
        n_seeds = cfg.stage_seeds if cfg.stage_seeds > 0 else cfg.seeds
        lines += [
            "",
            "## More stages (the paper's open question)",
            "",
            f"Mean ± 95% CI over {n_seeds} seed(s).",
            "",
            "| stages | sizes | method | session dwell (s) | session length |",
            "|---|---|---|---|---|",
        ]
        for n in sorted(set(counts) | {base_stages}):
            if n not in envs:
                continue
            for method in ["default", *stage_methods]:
                d, s = _values(rows, n, method, "session_dwell"), _values(rows, n, method, "session_length")
                if d:
                    lines.append(
                        f"| {n} | {' -> '.join(map(str, envs[n][1]['sizes']))} | {LABELS[method]} | "
                        f"{np.mean(d):.4g} ± {t_ci95(d):.3g} | {np.mean(s):.3g} ± {t_ci95(s):.2g} |"
                    )
    return "\n".join(lines) + "\n"


def _plots(out: Path, rows, curves, methods, base_stages) -> None:
    import matplotlib  # imported only when plotting: it costs a second of start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, method in enumerate(methods):
        points = [c for c in curves if c["stages"] == base_stages and c["method"] == method]
        steps = sorted({c["step"] for c in points})  # CEM's request counts differ by seed: group by step
        if steps:
            xs = [np.mean([c["requests"] for c in points if c["step"] == t]) for t in steps]
            mean = [np.mean([c["session_dwell"] for c in points if c["step"] == t]) for t in steps]
            ax.plot(xs, mean, marker="o", ms=3, label=LABELS[method], color=f"C{k}")
    default = np.mean(_values(rows, base_stages, "default", "session_dwell"))
    ax.axhline(default, color="black", linestyle="--", label="hand-set weights")
    ax.set_xlabel("simulated requests used for training")
    ax.set_ylabel("session dwell (s), mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    counts = sorted({r["stages"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows if r["method"] != "random")):
        xs = [n for n in counts if _values(rows, n, method, "session_dwell")]
        if len(xs) < 2:
            continue
        means = [np.mean(_values(rows, n, method, "session_dwell")) for n in xs]
        errs = [t_ci95(_values(rows, n, method, "session_dwell")) for n in xs]
        ax.errorbar(xs, means, yerr=np.nan_to_num(errs), marker="o", capsize=3, label=LABELS[method], color=f"C{k}")
    ax.set_xlabel("stages")
    ax.set_ylabel("session dwell (s)")
    ax.set_xticks(counts)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=120)
    plt.close(fig)
