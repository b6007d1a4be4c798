"""`relist train evaluator`, `relist train generator`, `relist serve` and `relist experiment last`.

Evaluator and generator are registered re-rankers, so both are fitted by the one ``relist.train.Trainer``
(selection on ``valid``, checkpoints, resume); these commands only fix the settings that differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relist.config import option
from relist.data.store import PreparedDataset
from relist.evaluator import Evaluator  # noqa: F401  (registration)
from relist.generator import REWARDS, Generator  # noqa: F401  (registration)
from relist.rerankers.base import Reranker, load_reranker
from relist.serve.settings import ServeSettings
from relist.train import Trainer, TrainConfig


@dataclass
class TrainEvaluatorConfig:
    data: Path = option(help="prepared re-ranking dataset (the rerank/ folder written by `relist train ranker`)")
    out: Path = option(help="run directory: checkpoints, best/, history, metrics")
    model_args: str = option("", help="evaluator settings as key=value,... (d_model, heads, gru, hidden=512/256/128)")
    train_fraction: float = option(1.0, help="share of the train lists used (a random subset by seed): weaker evaluators")
    seed: int = option(0, help="seed of initialisation, data order and the train subset")
    device: str = option("cpu", help="cpu, cuda, cuda:N or auto")
    epochs: int = option(30, help="maximum passes over the train split")
    batch_size: int = option(128, help="lists per step")
    learning_rate: float = option(1e-3, help="Adam learning rate")
    patience: int = option(5, help="stop after this many validations without improvement (AUC on valid)")
    max_steps: int = option(0, help="stop after this many steps (0: no limit)")
    overwrite: bool = option(False, help="replace OUT if it exists")
    progress: bool = option(True, help="show a progress bar")


@dataclass
class TrainGeneratorConfig:
    data: Path = option(help="prepared re-ranking dataset (the rerank/ folder written by `relist train ranker`)")
    out: Path = option(help="run directory: checkpoints, best/, history, metrics")
    reward: str = option("ndcg", help="per-position reward: NDCG gain on the labels, or the evaluator's click "
                                      "probability", choices=REWARDS)
    evaluator: Path | None = option(None, help="evaluator run directory (its best/), needed for --reward evaluator")
    model_args: str = option("", help="generator settings as key=value,... (encoder, hidden, heads, gamma, samples)")
    seed: int = option(0, help="seed of initialisation, data order and sampling")
    device: str = option("cpu", help="cpu, cuda, cuda:N or auto")
    epochs: int = option(30, help="maximum passes over the train split")
    batch_size: int = option(128, help="lists per step")
    learning_rate: float = option(1e-3, help="Adam learning rate")
    patience: int = option(5, help="stop after this many validations without improvement (NDCG@10 on valid)")
    max_steps: int = option(0, help="stop after this many steps (0: no limit)")
    overwrite: bool = option(False, help="replace OUT if it exists")
    progress: bool = option(True, help="show a progress bar")


def _trainer_config(cfg, model: str, select_metric: str, model_args: str) -> TrainConfig:
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in shared}
    return TrainConfig(**{**values, "model": model, "select_metric": select_metric, "model_args": model_args})


def subset_train(data: PreparedDataset, fraction: float, seed: int) -> PreparedDataset:
    """``data`` with its train split cut to a random ``fraction`` of the lists (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction < 1:
        train = data.split("train")
        keep = max(1, int(round(fraction * len(train))))
        data.splits = {**data.splits, "train": np.sort(np.random.default_rng([seed, 1]).choice(train, keep, replace=False))}
    return data


def train_evaluator(cfg: TrainEvaluatorConfig) -> dict:
    data = subset_train(PreparedDataset(cfg.data), cfg.train_fraction, cfg.seed)
    return Trainer(_trainer_config(cfg, "evaluator", "auc", cfg.model_args), data).fit()


class _GeneratorTrainer(Trainer):
    """The trainer with the reward evaluator attached to every generator it builds."""

    def __init__(self, config: TrainConfig, evaluator: Reranker | None):
        super().__init__(config)
        self.evaluator = evaluator

    def build_model(self) -> Reranker:
        model = super().build_model()
        if self.evaluator is not None:
            model.use_evaluator(self.evaluator.to(self.device))
        return model


def load_evaluator(run: Path) -> Reranker:
    """The best evaluator of a `relist train evaluator` run (or a model directory)."""
    run = Path(run)
    model = load_reranker(run / "best" if (run / "best").is_dir() else run)
    if model.name != "evaluator":
        raise ValueError(f"{run} holds a {model.name!r} model, not an evaluator")
    return model.eval()


def train_generator(cfg: TrainGeneratorConfig) -> dict:
    evaluator = None
    if cfg.reward == "evaluator":
        if cfg.evaluator is None:
            raise ValueError("--reward evaluator needs --evaluator DIR (a `relist train evaluator` run)")
        evaluator = load_evaluator(cfg.evaluator)
    args = ",".join(a for a in (cfg.model_args, f"reward={cfg.reward}") if a)
    return _GeneratorTrainer(_trainer_config(cfg, "generator", "ndcg@10", args), evaluator).fit()


def _table(result: dict) -> str:
    from relist.cli import metrics_table

    return metrics_table({"initial order (test)": result["initial_test"], f"{result['model']} (valid)": result["valid"],
                          f"{result['model']} (test)": result["test"]})


def run_train_evaluator(cfg: TrainEvaluatorConfig) -> None:
    result = train_evaluator(cfg)
    print(_table(result))
    print(f"best step {result['best_step']} of {result['steps']} (selected on valid AUC); wrote {cfg.out}/best")


def run_train_generator(cfg: TrainGeneratorConfig) -> None:
    result = train_generator(cfg)
    print(_table(result))
    print(f"greedy decoding; best step {result['best_step']} of {result['steps']} (selected on valid NDCG@10); "
          f"wrote {cfg.out}/best")


def run_serve(cfg: ServeSettings) -> None:
    from relist.serve.app import serve

    print(f"relist serve: {cfg.run} on http://{cfg.host}:{cfg.port} (POST /rerank, GET /healthz, GET /metrics)")
    serve(cfg)


COMMANDS: dict = {
    ("train", "evaluator"): (TrainEvaluatorConfig, run_train_evaluator,
                             "train LAST's list evaluator (per-position click probability, BCE)", ()),
    ("train", "generator"): (TrainGeneratorConfig, run_train_generator,
                             "train LAST's pointer-network generator (reward-weighted cross-entropy)", ()),
    ("serve",): (ServeSettings, run_serve, "serve a generator + evaluator with LAST over HTTP", ("run",)),
}

