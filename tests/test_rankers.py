"""Initial rankers on synthetic data with a known click model: they must beat the logged order."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.metrics import evaluate_lists, logged_order_scores
from relist.rankers import load_ranker
from relist.rankers.train import TrainRankerConfig, train_ranker


@pytest.fixture(scope="module", params=[0, 1])
def synthetic(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"syn{request.param}") / "data"
    prepare(PrepareConfig(source="synthetic", out=out, n_lists=3000, n_users=300, n_items=800, seed=request.param))
    return out, request.param


@pytest.mark.parametrize("model, extra", [("lambdamart", {}), ("dnn", {})])
def test_ranker_beats_logged_order_and_writes_rerank_data(synthetic, tmp_path, model, extra):
    data_dir, seed = synthetic
    result = train_ranker(
        TrainRankerConfig(data=data_dir, out=tmp_path / "r", model=model, seed=seed, progress=False, **extra)
    )
    on_disk = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert on_disk["test"] == result["test"]
    # the logged display order of synthetic data is random, the truth is learnable from the features
    assert result["test"]["ndcg@10"] > result["logged_test"]["ndcg@10"] + 0.03
    assert result["valid"]["map@10"] > result["logged_valid"]["map@10"]

    data = PreparedDataset(data_dir)
    rerank = PreparedDataset(tmp_path / "r" / "rerank")
    assert {k: len(v) for k, v in rerank.splits.items()} == {k: len(data.split(k)) for k in ("train", "valid", "test")}
    assert rerank.lengths().max() == 10 and rerank.schema.item_dense[-1] == "init_score"
    # each re-ranking list is its source list's top 10 by the ranker, in that order
    ranker = load_ranker(tmp_path / "r")
    source = data.batch(data.split("test")[:50])
    scores = ranker.score(source)
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :10]
    cut = rerank.batch(rerank.split("test")[:50])
    assert torch.equal(cut.item_sparse[..., 0], source.item_sparse[..., 0].gather(1, top))
    assert torch.equal(cut.label, source.label.gather(1, top))
    init = cut.item_dense[..., -1]
    assert (init[:, :-1] >= init[:, 1:]).all()


@pytest.mark.parametrize("model, extra", [("lambdamart", {"n_estimators": 30}), ("dnn", {"max_epochs": 1})])
def test_saved_ranker_scores_identically(synthetic, tmp_path, model, extra):
    data_dir, seed = synthetic
    train_ranker(TrainRankerConfig(data=data_dir, out=tmp_path / "r", model=model, seed=seed, progress=False, **extra))
    data = PreparedDataset(data_dir)
    batch = data.batch(data.split("valid")[:64])
    first, second = load_ranker(tmp_path / "r"), load_ranker(tmp_path / "r")
    a, b = first.score(batch), second.score(batch)
    assert torch.equal(a, b)
    # padding never outranks a real item
    assert torch.isinf(a[~batch.mask]).all() and torch.isfinite(a[batch.mask]).all()
    assert not list((tmp_path / "r").glob("*.pt")) and not list((tmp_path / "r").glob("*.pkl"))


def test_same_seed_same_ranker(synthetic, tmp_path):
    data_dir, seed = synthetic
    runs = [
        train_ranker(
            TrainRankerConfig(
                data=data_dir, out=tmp_path / f"r{k}", model="dnn", seed=seed, progress=False, max_epochs=1
            )
        )
        for k in range(2)
    ]
    assert runs[0]["test"] == runs[1]["test"]


def test_logged_order_scores_reproduce_the_input_order(synthetic):
    data = PreparedDataset(synthetic[0])
    batches = list(data.batches("test", 256))
    logged = evaluate_lists(logged_order_scores, batches)
    # scoring the true logged labels themselves can only be as good or better
    oracle = evaluate_lists(lambda b: b.label, batches)
    assert oracle["ndcg@10"] >= logged["ndcg@10"]
    assert oracle["ndcg@10"] == pytest.approx(
        1.0 * np.mean([bool(b.label[i].sum() > 0) for b in batches for i in range(b.size)])
    )


def test_train_ranker_refuses_existing_output(synthetic, tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(FileExistsError):
        train_ranker(TrainRankerConfig(data=synthetic[0], out=tmp_path / "r", progress=False))


def test_cross_fitting_adds_the_ranker_lists_scored_out_of_fold(synthetic, tmp_path):
    data_dir, seed = synthetic
    if seed:
        pytest.skip("one synthetic dataset is enough")
    plain = train_ranker(
        TrainRankerConfig(data=data_dir, out=tmp_path / "plain", seed=0, n_estimators=30, progress=False)
    )
    train_ranker(
        TrainRankerConfig(data=data_dir, out=tmp_path / "cf", seed=0, n_estimators=30, cross_fit=3, progress=False)
    )
    data, cf = PreparedDataset(data_dir), PreparedDataset(tmp_path / "cf" / "rerank")
    n_train, n_ranker = len(data.split("train")), len(data.split("ranker"))
    assert len(cf.split("train")) == n_train + n_ranker
    plain_rerank = PreparedDataset(tmp_path / "plain" / "rerank")
    for split in ("valid", "test"):  # still ordered by the one ranker fitted on the whole ranker split
        a, b = plain_rerank.batch(plain_rerank.split(split)), cf.batch(cf.split(split))
        assert torch.equal(a.item_sparse, b.item_sparse) and torch.equal(a.item_dense, b.item_dense)
    # the added lists are the ranker split's, ordered and scored by rankers that did not see them: their
    # scores differ from the main ranker's, which was fitted on them
    added = cf.batch(cf.split("train")[n_train:])
    source = data.batch(data.split("ranker"))
    assert sorted(added.user_sparse[:, 0].tolist()) == sorted(source.user_sparse[:, 0].tolist())
    init = added.item_dense[..., -1].masked_fill(~added.mask, float("-inf"))
    assert (init[:, :-1] >= init[:, 1:]).all()  # each in its own ranker's order
    main = load_ranker(tmp_path / "cf")
    rescored = main.score(dataclasses.replace(added, item_dense=added.item_dense[..., :-1]))
    assert not torch.allclose(rescored[added.mask], added.item_dense[..., -1][added.mask])
    with pytest.raises(ValueError, match="cross_fit"):
        train_ranker(
            TrainRankerConfig(data=data_dir, out=tmp_path / "bad", seed=0, n_estimators=5, cross_fit=1, progress=False)
        )
    assert plain["test"] == pytest.approx(json.loads((tmp_path / "cf" / "metrics.json").read_text())["test"])


def test_no_fold_ranker_scores_a_list_it_was_fitted_on(synthetic, monkeypatch):
    data_dir, seed = synthetic
    from relist.rankers.lambdamart import LambdaMART
    from relist.rankers.train import fit_out_of_fold

    fitted = LambdaMART.fit

    def recording_fit(self, data, *args, **kwargs):
        self.fitted_rows = set(data.split("ranker").tolist())
        return fitted(self, data, *args, **kwargs)

    monkeypatch.setattr(LambdaMART, "fit", recording_fit)
    data = PreparedDataset(data_dir)
    pairs = fit_out_of_fold(
        TrainRankerConfig(data=data_dir, out=data_dir, seed=seed, n_estimators=5, cross_fit=4),
        data,
        torch.device("cpu"),
    )
    held = [set(rows.tolist()) for _, rows in pairs]
    assert set().union(*held) == set(data.split("ranker").tolist()) and sum(map(len, held)) == len(data.split("ranker"))
    for ranker, rows in pairs:
        assert not ranker.fitted_rows & set(rows.tolist())
        assert len(ranker.fitted_rows) + len(rows) == len(data.split("ranker"))
