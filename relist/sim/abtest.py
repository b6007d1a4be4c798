"""`relist abtest`: policies against the same simulated users, as an online A/B test would compare them.

Design
- Every policy meets the same users: for seed s, users 0..N-1 are drawn from the simulator's
  population by keyed random numbers, and every draw (candidates, clicks, dwell, leaving, returning) is
  keyed by (seed, user, request, slot) (``relist.sim.rng``). Where two policies show a user the same
  thing, the user does the same thing: common random numbers, so differences are paired.
- The unit of analysis is a (seed, user) pair; units are independent. Per-user metrics are means over
  units; per-request metrics are ratios of sums (clicks per request = all clicks / all requests).
- 95% confidence intervals by the delta method: a ratio R = sum(a) / sum(b) has influence
  (a_i - R b_i) / mean(b) per unit, and its standard error is their standard deviation / sqrt(n).
- The lift of policy P over the first policy, R_P / R_0 - 1, has the paired influence
  (R_P / R_0) (IF_P,i / R_P - IF_0,i / R_0) from the same units, which removes the between-user
  variance that both arms share; a lift whose interval excludes 0 is marked as real.
- The spread across seeds (standard deviation of the per-seed values) is reported beside each value.

Outputs in OUT: ``summary.md`` (the tables the command prints), ``results.csv`` (one row per policy and
metric), ``per_seed.csv``, ``results.json`` and ``abtest.png`` (each metric with its interval).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from relist.config import option
from relist.io import atomic_directory
from relist.runtime import resolve_device
from relist.sim.policies import PolicyContext, make_policy, parse_spec, policy_kinds, policy_labels
from relist.sim.session import Simulator, in_batches, outcomes
from relist.sim.store import load_simulator
from relist.stats import normal_interval, ratio_influence

log = logging.getLogger("relist")

# name -> (numerator, denominator or None for per user, label)
METRICS = {
    "clicks_per_request": ("clicks", "requests", "clicks / request"),
    "clicks_per_user": ("clicks", None, "clicks / user"),
    "session_length": ("requests", "sessions", "requests / session"),
    "sessions_per_user": ("sessions", None, "sessions / user"),
    "dwell_per_user": ("dwell", None, "dwell s / user"),
}


@dataclass
class ABTestConfig:
    sim: Path = option(help="simulator directory (from `relist sim train` or `relist sim truth`)")
    policies: tuple[str, ...] = option(
        help=f"policies, the first is the baseline (kinds: {policy_kinds()}; random:SEED fixes its seed)"
    )
    out: Path = option(help="output directory: summary.md, results.csv, per_seed.csv, results.json, abtest.png")
    users: int = option(2000, help="simulated users per seed")
    seeds: int = option(3, help="number of seeds (independent draws of users and outcomes)")
    seed: int = option(0, help="first seed; seeds are seed, seed+1, ...")
    batch_size: int = option(1024, help="users simulated together")
    device: str = option("cpu", help="cpu, cuda, cuda:N or auto")
    overwrite: bool = option(False, help="replace OUT if it exists")
    threads: int = option(
        1, help="torch intra-op threads (0: torch's default); small per-request tensors gain nothing from more"
    )


def summarise(per_policy: dict[str, dict[str, np.ndarray]], seed_of_unit: np.ndarray) -> list[dict]:
    """One row per (policy, metric): value, CI, lift over the first policy with a paired CI, spread over seeds."""
    names = list(per_policy)
    base = names[0]
    seeds = np.unique(seed_of_unit)
    rows = []
    for metric, (num_key, den_key, _) in METRICS.items():
        stats = {}
        for name in names:
            out = per_policy[name]
            num = out[num_key]
            den = out[den_key] if den_key else np.ones_like(num)
            stats[name] = ratio_influence(num, den)
            per_seed = [ratio_influence(num[seed_of_unit == s], den[seed_of_unit == s])[0] for s in seeds]
            stats[name] += (per_seed,)
        r0, if0, _ = stats[base]
        for name in names:
            r, inf, per_seed = stats[name]
            low, high = normal_interval(inf, r)
            row = {
                "policy": name,
                "metric": metric,
                "value": r,
                "ci_low": low,
                "ci_high": high,
                "seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                "per_seed": per_seed,
                "n_units": int(len(inf)),
            }
            if name != base and r0 != 0:
                lift = r / r0 - 1.0
                lift_inf = (r / r0) * (inf / r - if0 / r0) if r != 0 else -inf / r0
                lo, hi = normal_interval(lift_inf, lift)
                row.update(lift=lift, lift_low=lo, lift_high=hi, significant=bool(lo > 0 or hi < 0))
            rows.append(row)
    return rows


def markdown(rows: list[dict], names: list[str], header: str) -> str:
    lines = [
        header,
        "",
        "| policy | " + " | ".join(label for _, _, label in METRICS.values()) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    by = {(r["policy"], r["metric"]): r for r in rows}
    for name in names:
        cells = [
            f"{by[name, m]['value']:.4g} [{by[name, m]['ci_low']:.4g}, {by[name, m]['ci_high']:.4g}]" for m in METRICS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Lift over `{names[0]}` (paired 95% CI; * = the interval excludes 0):",
        "",
        "| policy | " + " | ".join(label for _, _, label in METRICS.values()) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name in names[1:]:
        cells = []
        for m in METRICS:
            r = by[name, m]
            cells.append(
                f"{100 * r['lift']:+.2f}% [{100 * r['lift_low']:+.2f}, {100 * r['lift_high']:+.2f}]"
                + ("*" if r["significant"] else "")
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if all(len(r["per_seed"]) < 2 for r in rows):
        return "\n".join([*lines, "", "1 seed: no spread over seeds to show."]) + "\n"
    lines += [
        "",
        "Spread over seeds (standard deviation of the per-seed values):",
        "",
        "| policy | " + " | ".join(label for _, _, label in METRICS.values()) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{by[name, m]['seed_std']:.3g}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], names: list[str], path: Path) -> None:
    import matplotlib  # imported only when plotting: it costs a second of start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["policy"], r["metric"]): r for r in rows}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.6))
    for ax, (metric, (_, _, label)) in zip(axes, METRICS.items()):
        values = [by[n, metric]["value"] for n in names]
        errors = [
            [v - by[n, metric]["ci_low"] for n, v in zip(names, values)],
            [by[n, metric]["ci_high"] - v for n, v in zip(names, values)],
        ]
        ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=[f"C{k}" for k in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(label)
        low = min(by[n, metric]["ci_low"] for n in names)
        ax.set_ylim(bottom=max(0.0, low - 0.25 * (max(values) - low + 1e-9)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def simulate(sim: Simulator, policy, n_users: int, seed: int, batch_size: int) -> dict[str, np.ndarray]:
    """Per-user outcomes of users 0..n_users-1 under ``policy`` (batches do not change the result)."""
    result = in_batches(n_users, batch_size, lambda keys: outcomes(sim.run(policy, keys, seed)))
    return {k: v.numpy() for k, v in result.items()}


def run_abtest(cfg: ABTestConfig) -> dict:
    specs = parse_spec(cfg.policies)  # bad names fail before anything is loaded
    if cfg.users < 2 or cfg.seeds < 1 or cfg.batch_size < 1:
        raise ValueError(
            f"need --users >= 2, --seeds >= 1 and --batch-size >= 1, got {cfg.users}, {cfg.seeds}, {cfg.batch_size}"
        )
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    device = resolve_device(cfg.device)
    sim = load_simulator(cfg.sim, device)
    names = policy_labels(specs)
    per_policy = {name: {} for name in names}
    seconds = {name: 0.0 for name in names}
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    for seed in seeds:
        for name, (kind, arg) in zip(names, specs):
            policy = make_policy(kind, arg, PolicyContext(seed=seed, device=device, simulator=sim))
            started = time.perf_counter()
            result = simulate(sim, policy, cfg.users, seed, cfg.batch_size)
            seconds[name] += time.perf_counter() - started
            for key, values in result.items():
                per_policy[name].setdefault(key, []).append(values)
            log.info(
                "abtest: seed %d %s: %.4f clicks/request", seed, name, result["clicks"].sum() / result["requests"].sum()
            )
    per_policy = {n: {k: np.concatenate(v) for k, v in d.items()} for n, d in per_policy.items()}
    seed_of_unit = np.repeat(seeds, cfg.users)
    rows = summarise(per_policy, seed_of_unit)
    header = (
        f"A/B test on simulator `{cfg.sim}`: {cfg.users} users x {cfg.seeds} seeds ({cfg.seed}..{seeds[-1]}), "
        f"common random numbers; value [95% CI] over {cfg.users * cfg.seeds} (seed, user) units."
    )
    summary = markdown(rows, names, header)
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "policies": names,
        "rows": rows,
        "seconds": seconds,
        "summary": summary,
    }
    with atomic_directory(out) as tmp:
        (tmp / "summary.md").write_text(summary)
        (tmp / "results.json").write_text(json.dumps(result, indent=2))
        fields = [
            "policy",
            "metric",
            "value",
            "ci_low",
            "ci_high",
            "lift",
            "lift_low",
            "lift_high",
            "significant",
            "seed_std",
            "n_units",
        ]
        with open(tmp / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        with open(tmp / "per_seed.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["seed", "policy", "metric", "value"])
            for r in rows:
                writer.writerows([s, r["policy"], r["metric"], v] for s, v in zip(seeds, r["per_seed"]))
        plot(rows, names, tmp / "abtest.png")
    return result
