"""Initial rankers: the upstream order that re-rankers start from (LibRerank's protocol)."""

from __future__ import annotations

import json
from pathlib import Path

from relist.rankers.dnn import DNNConfig, DNNRanker
from relist.rankers.lambdamart import LambdaMART, LambdaMARTConfig

RANKERS = {"dnn": DNNRanker, "lambdamart": LambdaMART}
RANKER_CONFIGS = {"dnn": DNNConfig, "lambdamart": LambdaMARTConfig}


def get_ranker_class(name: str):
    if name not in RANKERS:
        raise ValueError(f"unknown ranker {name!r}; valid: {sorted(RANKERS)}")
    return RANKERS[name]


def load_ranker(directory: str | Path):
    """Load a ranker saved by ``relist train ranker`` (its config.json names the model)."""
    meta = json.loads((Path(directory) / "config.json").read_text())
    return get_ranker_class(meta["model"]).load(Path(directory))


__all__ = ["RANKERS", "DNNRanker", "LambdaMART", "get_ranker_class", "load_ranker"]
