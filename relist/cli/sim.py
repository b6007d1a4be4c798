"""`relist sim train`, `relist sim truth`, `relist sim check-cascade` and `relist abtest`."""

from __future__ import annotations

import json

import torch

from relist.sim.abtest import ABTestConfig
from relist.sim.abtest import run_abtest as abtest
from relist.sim.cascade_check import CheckCascadeConfig, run_check
from relist.sim.train import (
    SimBuildConfig,
    TrainSimConfig,
    train_simulator,
    truth_simulator,
)
from relist.tables import metrics_table

REPORT_COLUMNS = ("log_loss", "auc", "auc_pooled", "ece", "ece_uniform", "mean_predicted", "click_rate")


def _threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def _table(rows: dict[str, dict]) -> str:
    return metrics_table(rows, REPORT_COLUMNS, digits=5)


def _session_lines(result: dict) -> list[str]:
    fit = result["session_fit"]
    counts = fit["requests_per_user"]
    return [
        f"lists per user in the data: {counts['observed_mean']:.3f} over {counts['n_users']} users; "
        f"in the full log (log fraction {counts['log_fraction']}): {counts['fitted_mean']:.3f}",
        f"session fit: ref_clicks {fit['ref_clicks']:.3f}, leave_bias {fit['leave_bias']:.3f} -> "
        f"{fit['logged_requests_per_session']:.2f} requests per session under the logged order "
        f"(target {fit['target_requests_per_session']:.2f})",
    ]


def run_sim_train(cfg: TrainSimConfig) -> None:
    _threads(cfg.threads)
    result = train_simulator(cfg)
    top = f"test_first_{cfg.slate_size}_positions"
    rows = {"response model (test)": result["test"], f"  positions 1-{cfg.slate_size} only": result[top]}
    rows.update({f"{name} (test)": values for name, values in result["references"].items()})
    print(
        f"held-out impressions: {result['test']['n']} (item, position) pairs of the test split; "
        f"fitted on {result['n_train_lists']} lists, best epoch {result['fit']['best_epoch']}"
    )
    print(_table(rows))
    print("order and context terms: " + ", ".join(f"{k} {v:+.3f}" for k, v in result["coefficients"].items()))
    print("\n".join(_session_lines(result)))
    print(f"wrote {cfg.out} (config.json, model.safetensors, metrics.json, reliability.png)")


def run_sim_truth(cfg: SimBuildConfig) -> None:
    _threads(cfg.threads)
    result = truth_simulator(cfg)
    print(f"ground truth on held-out test lists ({result['test']['n']} pairs): the best any response model can do")
    print(_table({"truth (test)": result["test"]}))
    print("\n".join(_session_lines(result)))
    print(f"wrote {cfg.out} (config.json, metrics.json, reliability.png)")


def run_abtest(cfg: ABTestConfig) -> None:
    _threads(cfg.threads)
    result = abtest(cfg)
    print(result["summary"])
    print(f"wrote {cfg.out} (summary.md, results.csv, per_seed.csv, results.json, abtest.png)")


def run_check_cascade(cfg: CheckCascadeConfig) -> None:
    print(json.dumps(run_check(cfg), indent=2))
