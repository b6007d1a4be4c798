"""Session-wide fixtures: what several test modules need is prepared once per run.

Fixtures here are shared: a test may read them, never change them (copy first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.rankers.train import TrainRankerConfig, train_ranker
from tests.shared_data import MIND_SUBSET, TRIVAGO_RIO


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory) -> Path:
    """A synthetic dataset with a known click model (``data/``: 1,500 lists, 200 users, 500 items, seed 1) and
    a LambdaMART initial ranker on it (``ranker/``, whose ``rerank/`` is the re-ranking dataset)."""
    root = tmp_path_factory.mktemp("world")
    prepare(PrepareConfig(source="synthetic", out=root / "data", n_lists=1500, n_users=200, n_items=500, seed=1))
    train_ranker(TrainRankerConfig(data=root / "data", out=root / "ranker", seed=1, n_estimators=40, progress=False))
    return root


def prepared_subset(tmp_path_factory, source: str, src: Path, first_file: str) -> PreparedDataset:
    """A real subset beside the repository prepared with seed 0; skips where ``src/first_file`` is absent."""
    if not (src / first_file).is_file():
        pytest.skip(f"{source} subset not found at {src}")
    out = tmp_path_factory.mktemp(source) / "seed0"
    return PreparedDataset(prepare(PrepareConfig(source=source, src=src, out=out, seed=0)))


@pytest.fixture(scope="session")
def mind_data(tmp_path_factory) -> PreparedDataset:
    """The MIND 5k subset, prepared with seed 0."""
    return prepared_subset(tmp_path_factory, "mind", MIND_SUBSET, "behaviors.tsv")


@pytest.fixture(scope="session")
def trivago_data(tmp_path_factory) -> PreparedDataset:
    """The trivago Rio subset, prepared with seed 0."""
    return prepared_subset(tmp_path_factory, "trivago", TRIVAGO_RIO, "train.csv")
