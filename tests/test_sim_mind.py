"""The simulator on the real MIND 5k subset: user-item features of recombined requests, and (slow) the full fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from relist.cli import main
from relist.sim.pool import ListPool
from tests.shared_data import MIND_SUBSET as MIND

if not (MIND / "behaviors.tsv").is_file():
    pytest.skip(f"MIND 5k subset not found at {MIND}", allow_module_level=True)


@pytest.fixture(scope="module")
def mind(mind_data):
    return mind_data


def test_requests_recompute_the_history_shares_for_their_user(mind):
    """A pool request puts a list in front of another user; the history-share features must follow the user."""
    pool = ListPool.from_dataset(mind, "test", max_candidates=None)
    names = list(mind.schema.item_dense)
    columns = [names.index("category_affinity"), names.index("subcategory_affinity")]
    assert len(pool.affinity) == 2
    # mind.py shares over the whole history; the dataset keeps the last max_hist items: compare where nothing was cut
    history = [
        len(line.split(b"\t")[3].split()) for line in (MIND / "behaviors.tsv").read_bytes().splitlines() if line.strip()
    ]
    index = torch.tensor(
        [k for k, i in enumerate(mind.split("test")) if history[i] <= mind.manifest["info"]["max_hist"]]
    )
    assert len(index) > 200
    own = pool.compose(index, index)
    stored = pool.item_dense[index]
    torch.testing.assert_close(own.item_dense[..., columns], stored[..., columns], atol=1e-6, rtol=0)
    # another user's history gives other shares; item-level columns do not move
    other = pool.compose(index.roll(1), index)
    assert not torch.allclose(other.item_dense[..., columns], stored[..., columns])
    keep = [k for k in range(len(names)) if k not in columns]
    assert torch.equal(other.item_dense[..., keep], stored[..., keep])


@pytest.mark.slow
def test_sim_train_and_abtest_on_mind(mind, tmp_path, capsys):
    assert main(["train", "ranker", "--data", str(mind.root), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert (
        main(["sim", "train", "--data", str(mind.root), "--out", str(tmp_path / "sim"), "--log-fraction", "0.0319"])
        == 0
    )
    metrics = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    test, refs = metrics["test"], metrics["references"]
    assert test["log_loss"] < refs["rate per position"]["log_loss"] - 0.005
    assert test["auc"] > refs["rate per position"]["auc"] + 0.03 and test["ece"] < 0.01
    assert (
        main(
            [
                "abtest",
                "--sim",
                str(tmp_path / "sim"),
                "--policies",
                f"random,logged,ranker:{tmp_path / 'r'}",
                "--users",
                "2000",
                "--seeds",
                "2",
                "--out",
                str(tmp_path / "ab"),
            ]
        )
        == 0
    )
    rows = {(r["policy"], r["metric"]): r for r in json.loads((tmp_path / "ab" / "results.json").read_text())["rows"]}
    ranker = rows["ranker:r", "clicks_per_request"]
    assert ranker["significant"] and ranker["lift"] > 0.1  # offline NDCG@10: LambdaMART 0.37 against 0.29-0.30
    assert np.isfinite(rows["logged", "clicks_per_request"]["lift"])
