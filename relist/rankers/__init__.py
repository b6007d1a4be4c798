"""Initial rankers: the upstream order that re-rankers start from (LibRerank's protocol)."""

from __future__ import annotations

from pathlib import Path

from relist.io import MODEL_META, load_model, read_json
from relist.rankers.dnn import DNNConfig, DNNRanker
from relist.rankers.lambdamart import LambdaMART, LambdaMARTConfig

RANKERS = {"dnn": DNNRanker, "lambdamart": LambdaMART}
RANKER_CONFIGS = {"dnn": DNNConfig, "lambdamart": LambdaMARTConfig}


def get_ranker_class(name: str):
    if name not in RANKERS:
        raise ValueError(f"unknown ranker {name!r}; valid: {sorted(RANKERS)}")
    return RANKERS[name]


def is_ranker_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds an initial ranker (a `relist train ranker` output, or its model alone)."""
    directory = Path(directory)
    meta = directory / MODEL_META if (directory / MODEL_META).is_file() else directory / "config.json"
    return meta.is_file() and read_json(meta).get("model") in RANKERS


def load_ranker(directory: str | Path):
    """Load a ranker saved by ``relist train ranker`` (its model.json names the model; older outputs wrote
    the same as config.json)."""
    directory = Path(directory)
    meta, _ = load_model(directory, legacy_meta="config.json")
    return get_ranker_class(meta["model"]).load(directory)


__all__ = ["RANKERS", "DNNRanker", "LambdaMART", "get_ranker_class", "load_ranker"]
