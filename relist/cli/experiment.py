"""`relist experiment principled|last|unexrl`."""

from __future__ import annotations

from relist.experiments import last, principled, unexrl


def run_principled(cfg: principled.PrincipledExperimentConfig) -> None:
    result = principled.run_experiment(cfg)
    print(result["summary"])
    print(f"wrote {cfg.out}/results.csv, summary.md, metrics.png, obedience.png")


def run_last(cfg: last.LastExperimentConfig) -> None:
    result = last.run_experiment(cfg)
    print(result["summary"])
    print(f"wrote {cfg.out}/results.csv, summary.md, online.md, offline.png, quality.png, offsets.png")


def run_unexrl(cfg: unexrl.UnexrlExperimentConfig) -> None:
    result = unexrl.run_experiment(cfg)
    print(result["summary"])
    print(f"wrote {cfg.out}/results.csv, curves.csv, checks.csv, summary.md, curves.png, stages.png, env.json, runs/")
