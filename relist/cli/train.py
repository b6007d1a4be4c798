"""`relist train ranker|reranker|evaluator|generator`."""

from __future__ import annotations

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


def run_train_reranker(cfg: TrainConfig) -> None:
    result = train(cfg)
    if not result:  # a non-zero rank under torchrun: rank 0 reports
        return
    print(_trained_table(result))
    rates = result["obedience_test"]
    print("\nobedience on test: " + ", ".join(f"{k.removeprefix('obedience_')} {v:.3f}" for k, v in rates.items()))
    print(f"best step {result['best_step']} of {result['steps']}; wrote {cfg.out}/metrics.json and {cfg.out}/best")


def run_train_evaluator(cfg: TrainEvaluatorConfig) -> None:
    result = train_evaluator(cfg)
    print(_trained_table(result))
    print(f"best step {result['best_step']} of {result['steps']} (selected on valid group AUC); wrote {cfg.out}/best")


def run_train_generator(cfg: TrainGeneratorConfig) -> None:
    result = train_generator(cfg)
    print(_trained_table(result))
    print(
        f"greedy decoding; best step {result['best_step']} of {result['steps']} (selected on valid NDCG@10); "
        f"wrote {cfg.out}/best"
    )
