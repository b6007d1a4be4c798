"""The large world with known truth: its committed configuration, and the headroom the truth measures
(the exact best order against brute force, the greedy and true-appeal orders, the input order's expected
clicks against the clicks the data holds)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import relist.data.synthetic as synthetic
from relist.config import from_mapping, read_yaml
from relist.data.prepare import PrepareConfig
from relist.data.store import PreparedDataset, random_splits, split_fractions
from relist.data.synthetic import (
    ORDERS,
    SyntheticClickModel,
    SyntheticParams,
    appeal_order,
    best_order,
    expected_clicks,
    find_truth,
    format_headroom,
    greedy_order,
    truth_headroom,
)

LARGE = Path(__file__).resolve().parents[1] / "configs" / "worlds" / "large.yaml"


def test_the_large_world_config_has_the_split_sizes_asked_for():
    """configs/worlds/large.yaml as `relist data prepare synthetic --config` reads it (source and --out come
    from the command line): a re-ranking train split of at least 50,000 lists and a test split of 20,000."""
    prepared = from_mapping(PrepareConfig, {**read_yaml(LARGE), "source": "synthetic", "out": "unused"}, str(LARGE))
    splits = random_splits(prepared.n_lists, split_fractions(prepared.splits), prepared.seed)
    assert len(splits["train"]) >= 50_000 and len(splits["test"]) >= 20_000
    assert sum(len(v) for v in splits.values()) == prepared.n_lists


def _lists(seed: int, size: int, length: int, kappa: float = 0.9):
    """A truth with a strong redundancy penalty and few categories, and random padded lists of its items."""
    model = SyntheticClickModel.sample(SyntheticParams(n_users=30, n_items=60, n_categories=3, kappa=kappa), seed)
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, 30, (size,), generator=g)
    items = torch.stack([torch.randperm(60, generator=g)[:length] for _ in range(size)])
    lengths = torch.randint(1, length + 1, (size,), generator=g)
    return model, users, items, torch.arange(length)[None] < lengths[:, None]


def _brute_force(model, users, items, mask, k: int) -> torch.Tensor:
    """The most expected clicks over every permutation of each list's real items (padding kept last)."""
    best = torch.zeros(len(users))
    length = items.shape[1]
    for b in range(len(users)):
        n = int(mask[b].sum())
        orders = torch.tensor([[*perm, *range(n, length)] for perm in itertools.permutations(range(n))])
        many = len(orders)
        value = expected_clicks(model, users[b].expand(many), items[b].expand(many, -1), mask[b].expand(many, -1),
                                orders, k)  # fmt: skip
        best[b] = value.max()
    return best


@pytest.mark.parametrize("seed,k", [(0, 6), (1, 3), (2, 1)])
def test_the_exact_best_order_is_the_best_permutation(seed, k):
    model, users, items, mask = _lists(seed, 24, 6)
    exact = best_order(model, users, items, mask, k)
    value = expected_clicks(model, users, items, mask, exact, k)
    assert torch.allclose(value, _brute_force(model, users, items, mask, k), atol=1e-5)
    for order in (exact, greedy_order(model, users, items, mask), appeal_order(model, users, items, mask)):
        assert torch.equal(order.sort(1).values, torch.arange(6).expand(24, -1))  # a permutation of each list
        assert torch.equal(mask.gather(1, order), mask)  # real items first, padding last
        assert (expected_clicks(model, users, items, mask, order, k) <= value + 1e-6).all()


def test_the_exact_order_in_parts_is_the_same(monkeypatch):
    model, users, items, mask = _lists(3, 40, 8)
    whole = best_order(model, users, items, mask, 8)
    monkeypatch.setattr(synthetic, "EXACT_VALUES", 7 * 256 * 8)  # 7 lists at a time
    assert torch.equal(best_order(model, users, items, mask, 8), whole)


def test_greedy_takes_the_most_clicked_item_given_those_above():
    model, users, items, mask = _lists(4, 30, 7)
    order = greedy_order(model, users, items, mask)
    for position in range(7):
        for b in range(30):
            left = [i for i in range(7) if mask[b, i] and i not in order[b, :position].tolist()]
            if not left:
                continue
            chosen = []
            for i in left:  # the click probability of i at this position below the items chosen so far
                shown = torch.tensor([*order[b, :position].tolist(), i])
                prob = model.click_prob(
                    users[b : b + 1], items[b : b + 1, shown], torch.ones(1, position + 1, dtype=bool)
                )
                chosen.append(float(prob[0, -1]))
            assert int(order[b, position]) == left[int(np.argmax(chosen))]


def test_with_no_redundancy_penalty_every_order_of_the_truth_agrees():
    model, users, items, mask = _lists(5, 20, 6, kappa=0.0)
    exact = expected_clicks(model, users, items, mask, best_order(model, users, items, mask, 6), 6)
    for order in (greedy_order(model, users, items, mask), appeal_order(model, users, items, mask)):
        assert torch.allclose(expected_clicks(model, users, items, mask, order, 6), exact, atol=1e-6)


def test_headroom_on_the_logged_lists_and_the_initial_rankers_lists(synthetic_world):
    logged = PreparedDataset(synthetic_world / "data")
    raw = truth_headroom(logged, "ranker", k=10)
    assert raw["input"] == "logged display" and not raw["exact"] and len(raw["orders"]) == 3
    # the labels were drawn from the truth in the logged order: its expected clicks match the clicks held
    batch = logged.batch(logged.split("ranker"))
    observed = batch.label[:, :10].sum(1).numpy()
    users, items = batch.user_sparse[:, 0] - 1, (batch.item_id - 1).clamp_min(0)
    expected = expected_clicks(
        find_truth(logged), users, items, batch.mask, torch.arange(batch.list_len).expand(batch.size, -1), 10
    )
    gap = observed - expected.numpy()
    assert abs(gap.mean()) < 4 * gap.std() / np.sqrt(len(gap))
    assert raw["orders"][ORDERS[0]]["expected_clicks"] == pytest.approx(float(expected.mean()), rel=1e-5)

    rerank = PreparedDataset(synthetic_world / "ranker" / "rerank")
    result = truth_headroom(rerank, "test", k=10)  # the truth found through the dataset it was derived from
    assert result["input"] == "initial ranker" and result["exact"] and list(result["orders"]) == list(ORDERS)
    clicks = {name: entry["expected_clicks"] for name, entry in result["orders"].items()}
    assert clicks[ORDERS[3]] >= max(clicks[ORDERS[0]], clicks[ORDERS[1]], clicks[ORDERS[2]]) - 1e-6
    mean, half = result["orders"][ORDERS[3]]["diff_vs_input"]["expected_clicks"]
    assert mean == pytest.approx(clicks[ORDERS[3]] - clicks[ORDERS[0]], abs=1e-5) and half > 0
    text = format_headroom(result)
    assert all(name in text for name in ORDERS[1:]) and "input (initial ranker)" in text
    assert "not computed" in format_headroom(raw)


def test_a_dataset_without_truth_is_refused(tmp_path, synthetic_world):
    data = PreparedDataset(synthetic_world / "data")
    data.root, data.manifest = tmp_path, {**data.manifest, "info": {}}
    with pytest.raises(FileNotFoundError, match="truth.safetensors"):
        truth_headroom(data)


def test_the_headroom_command_prints_every_order_of_a_rerank_dataset(synthetic_world, capsys):
    from relist.cli import main

    assert main(["data", "headroom", str(synthetic_world / "ranker" / "rerank")]) == 0
    table = capsys.readouterr().out
    for row in ("| input (initial ranker) |", "| true appeal |", "| greedy under the redundancy penalty |"):
        assert row in table
    assert "best under the truth (exact)" in table  # lists of 10: the exact order is computed
