"""`relist demo`: the main job on the embedded synthetic data."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from relist.cli.train import ranker_table
from relist.config import option
from relist.data.prepare import PrepareConfig, prepare
from relist.rankers.train import TrainRankerConfig, train_ranker


@dataclass
class DemoConfig:
    out: Path = option(Path(".relist-demo"), help="working directory of the demo (replaced on every run)")
    seed: int = option(0, help="random seed of the data and the ranker")
    n_lists: int = option(20000, help="number of synthetic lists")
    model: str = option("lambdamart", help="initial ranker", choices=("lambdamart", "dnn"))
    progress: bool = option(True, help="show progress")


def run_demo(cfg: DemoConfig) -> None:
    """Prepare synthetic data, train an initial ranker, print its metrics."""
    out = Path(cfg.out)
    print(f"[1/2] preparing {cfg.n_lists} synthetic lists in {out / 'data'}", file=sys.stderr)
    prepare(PrepareConfig(source="synthetic", out=out / "data", seed=cfg.seed, n_lists=cfg.n_lists, overwrite=True))
    print(f"[2/2] training the {cfg.model} initial ranker in {out / 'ranker'}", file=sys.stderr)
    result = train_ranker(
        TrainRankerConfig(
            data=out / "data", out=out / "ranker", model=cfg.model, seed=cfg.seed, overwrite=True, progress=cfg.progress
        )
    )
    print(f"initial ranker on synthetic data (seed {cfg.seed}, {cfg.n_lists} lists)")
    print(ranker_table(result))
