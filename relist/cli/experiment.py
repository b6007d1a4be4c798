"""`relist experiment principled|last|unexrl`."""

from __future__ import annotations

from relist.experiments import last, principled, unexrl


def _report(result: dict, out) -> None:
    print(result["summary"])
    print(f"wrote {out}/: " + ", ".join(result["written"]))


def run_principled(cfg: principled.PrincipledExperimentConfig) -> None:
    _report(principled.run_experiment(cfg), cfg.out)


def run_last(cfg: last.LastExperimentConfig) -> None:
    _report(last.run_experiment(cfg), cfg.out)


def run_unexrl(cfg: unexrl.UnexrlExperimentConfig) -> None:
    _report(unexrl.run_experiment(cfg), cfg.out)
