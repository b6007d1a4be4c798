"""`relist train ranker|reranker|evaluator|generator`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from relist.batch import INITIAL_SCORE
from relist.rankers.train import TrainRankerConfig, train_ranker
from relist.tables import metrics_table
from relist.train import (
    TrainConfig,
    TrainEvaluatorConfig,
    TrainGeneratorConfig,
    train,
    train_evaluator,
    train_generator,
)


def ranker_table(result: dict) -> str:
    model, top = result["model"], result["config"]["list_len"]
    return metrics_table(
        {
            "logged order (test)": result["logged_test"],
            f"{model} (valid)": result["valid"],
            f"{model} (test)": result["test"],
            f"{model} top-{top} (test)": result["rerank_test"],
        }
    )


def _trained_table(result: dict) -> str:
    return metrics_table(
        {
            "initial order (test)": result["initial_test"],
            f"{result['model']} (valid)": result["valid"],
            f"{result['model']} (test)": result["test"],
        }
    )


def run_train_ranker(cfg: TrainRankerConfig) -> None:
    result = train_ranker(cfg)
    print(ranker_table(result))
    ours, logged = result["valid"]["ndcg@10"], result["logged_valid"]["ndcg@10"]
    verdict = "better" if ours > logged else "not better: consider the logged order as the initial order"
    print(
        f"\non valid, the {cfg.model} ranker's NDCG@10 is {ours:.4f} against the logged order's {logged:.4f} "
        f"({verdict}); the re-ranking splits are in the ranker's order"
    )
    print(f"wrote {cfg.out}/metrics.json and the re-ranking dataset {cfg.out}/rerank")


def without_initial_ranker(data: Path) -> str | None:
    """The note for a re-ranking run on ``data`` when its lists carry no initial ranker's score (None otherwise,
    or when ``data`` is no prepared dataset: training says so)."""
    from relist.data.store import PreparedDataset

    try:
        schema = PreparedDataset(data).schema
    except (OSError, ValueError):
        return None
    if INITIAL_SCORE in schema.item_dense:
        return None
    return (
        f"note: {data} has no {INITIAL_SCORE} feature, so this trains without an initial ranker: each list is "
        "re-ranked from its order in the data, with no initial score to start from; `relist train ranker --data "
        f"{data} --out DIR` writes DIR/rerank, the same lists ordered and scored by an initial ranker"
    )


def _note_initial_ranker(data: Path) -> None:
    note = without_initial_ranker(data) if os.environ.get("RANK", "0") == "0" else None
    if note:
        print(note, file=sys.stderr)


def run_train_reranker(cfg: TrainConfig) -> None:
    _note_initial_ranker(cfg.data)
    result = train(cfg)
    if not result:  # a non-zero rank under torchrun: rank 0 reports
        return
    print(_trained_table(result))
    rates = result["obedience_test"]
    print("\nobedience on test: " + ", ".join(f"{k.removeprefix('obedience_')} {v:.3f}" for k, v in rates.items()))
    print(f"best step {result['best_step']} of {result['steps']}; wrote {cfg.out}/metrics.json and {cfg.out}/best")


def run_train_evaluator(cfg: TrainEvaluatorConfig) -> None:
    _note_initial_ranker(cfg.data)
    result = train_evaluator(cfg)
    print(_trained_table(result))
    print(f"best step {result['best_step']} of {result['steps']} (selected on valid group AUC); wrote {cfg.out}/best")


def run_train_generator(cfg: TrainGeneratorConfig) -> None:
    _note_initial_ranker(cfg.data)
    result = train_generator(cfg)
    print(_trained_table(result))
    print(
        f"greedy decoding; best step {result['best_step']} of {result['steps']} (selected on valid NDCG@10); "
        f"wrote {cfg.out}/best"
    )
