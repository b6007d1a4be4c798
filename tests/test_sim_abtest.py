"""`relist abtest`: end to end on a small synthetic simulator, policy specs, bad input, the paired statistics."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from relist.cli import main
from relist.sim.abtest import METRICS, summarise
from relist.sim.policies import PolicyContext, make_policy, parse_spec, policy_labels
from relist.sim.store import load_simulator
from relist.stats import Z95


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def truth_sim(tmp_path_factory, synthetic_world):
    """A prepared synthetic dataset, a LambdaMART ranker on it and a ground-truth simulator (`relist sim truth`)."""
    root = tmp_path_factory.mktemp("ab")
    for name in ("data", "ranker"):  # the shared world, read only; the simulator is this module's own
        (root / name).symlink_to(synthetic_world / name, target_is_directory=True)
    assert (
        main(
            [
                "sim",
                "truth",
                "--data",
                str(root / "data"),
                "--out",
                str(root / "sim"),
                "--session-requests",
                "3",
                "--max-sessions",
                "2",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    return root


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_abtest_end_to_end(truth_sim, tmp_path, capsys):
    capsys.readouterr()
    args = [
        "abtest",
        "--sim",
        str(truth_sim / "sim"),
        "--policies",
        f"random,logged,ranker:{truth_sim / 'ranker'},oracle",
        "--users",
        "250",
        "--seeds",
        "2",
    ]
    assert main([*args, "--out", str(tmp_path / "ab")]) == 0
    printed = capsys.readouterr().out
    assert "| policy | clicks / request |" in printed and "Lift over `random`" in printed
    for name in ("summary.md", "results.csv", "per_seed.csv", "results.json", "abtest.png"):
        assert (tmp_path / "ab" / name).is_file(), name
    rows = read_rows(tmp_path / "ab" / "results.csv")
    assert len(rows) == 4 * len(METRICS)
    by = {(r["policy"], r["metric"]): r for r in rows}
    assert {r["policy"] for r in rows} == {"random", "logged", "ranker:ranker", "oracle"}
    for name in ("ranker:ranker", "oracle"):  # both know something true about the users; random knows nothing
        row = by[name, "clicks_per_request"]
        assert float(row["lift_low"]) > 0.05 and row["significant"] == "True"
    assert float(by["oracle", "clicks_per_request"]["value"]) > float(
        by["ranker:ranker", "clicks_per_request"]["value"]
    )
    for r in rows:
        assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"])
    per_seed = read_rows(tmp_path / "ab" / "per_seed.csv")
    assert len(per_seed) == 2 * len(rows)
    # the same command again gives the same numbers
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "ab" / "results.csv").read_text() == (tmp_path / "again" / "results.csv").read_text()
    assert main([*args, "--out", str(tmp_path / "ab")]) == 2  # an existing OUT is not replaced silently
    assert "--overwrite" in capsys.readouterr().err


def test_unknown_policy_is_a_clear_error(truth_sim, tmp_path, capsys):
    code = main(
        ["abtest", "--sim", str(truth_sim / "sim"), "--policies", "random,bogus", "--out", str(tmp_path / "ab")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown policy 'bogus'" in err and "valid: random" in err and "ranker" in err
    assert not (tmp_path / "ab").exists()


def test_policy_specs(truth_sim, tmp_path):
    assert parse_spec(["random", " logged", "ranker:/x/r1"]) == [
        ("random", None),
        ("logged", None),
        ("ranker", "/x/r1"),
    ]
    for spec, message in (([], "at least one"), (["random", "random"], "twice"), (["Random"], "unknown policy")):
        with pytest.raises(ValueError, match=message):
            parse_spec(spec)
    # two runs whose folders share a name are two policies, told apart by their whole paths
    parsed = parse_spec(["reranker:a/prm", "reranker:b/prm", "ranker:/x/r1", "greedy:/x/last"])
    assert policy_labels(parsed) == ["reranker:a/prm", "reranker:b/prm", "ranker:r1", "greedy:last"]
    sim = load_simulator(truth_sim / "sim")
    ctx = PolicyContext(seed=0, device=torch.device("cpu"), simulator=sim)
    with pytest.raises(ValueError, match="needs a directory"):
        make_policy("ranker", None, ctx)
    with pytest.raises(FileNotFoundError, match="relist train ranker"):
        make_policy("ranker", str(tmp_path), ctx)
    with pytest.raises(ValueError, match="known ground truth"):
        make_policy("oracle", None, PolicyContext(seed=0, device=torch.device("cpu"), simulator=None))
    # a policy's scores order the candidates; padding is shown last whatever it scores
    users = sim.start(torch.arange(8), 0)
    candidates = sim.candidates(users)
    for name, arg in (("random", None), ("logged", None), ("ranker", str(truth_sim / "ranker")), ("oracle", None)):
        scores = make_policy(name, arg, ctx)(candidates)
        assert scores.shape == candidates.mask.shape and torch.isfinite(scores[candidates.mask]).all()


def test_paired_intervals_are_the_delta_method():
    g = np.random.default_rng(0)
    n = 100
    clicks = g.poisson(3.0, size=n).astype(float)
    base = {"clicks": clicks, "requests": np.full(n, 2.0), "sessions": np.ones(n), "dwell": clicks * 30}
    better = {k: v * 1.1 for k, v in base.items()}
    better["requests"], better["sessions"] = base["requests"], base["sessions"]
    seeds = np.repeat([0, 1], n // 2)
    rows = {(r["policy"], r["metric"]): r for r in summarise({"a": base, "b": better}, seeds)}
    row = rows["a", "clicks_per_user"]  # a per-user mean: the textbook interval
    se = clicks.std(ddof=1) / np.sqrt(n)
    assert row["value"] == pytest.approx(clicks.mean())
    assert row["ci_high"] - row["value"] == pytest.approx(Z95 * se)
    assert rows["a", "clicks_per_request"]["value"] == pytest.approx(clicks.sum() / (2 * n))
    # every user does exactly 10% better: the paired lift is 10% with no uncertainty, although the arms' own
    # intervals overlap
    lift = rows["b", "clicks_per_user"]
    assert lift["lift"] == pytest.approx(0.1) and lift["lift_high"] - lift["lift_low"] == pytest.approx(0.0, abs=1e-9)
    assert rows["b", "clicks_per_user"]["ci_low"] < rows["a", "clicks_per_user"]["ci_high"]
    assert rows["b", "session_length"]["lift"] == pytest.approx(0.0) and not rows["b", "session_length"]["significant"]


def test_reranker_policy_reorders_the_initial_rankers_top(truth_sim, tmp_path):
    import dataclasses

    from relist.batch import rank
    from relist.data.store import PreparedDataset
    from relist.rankers import load_ranker
    from relist.rerankers.base import build_reranker

    rerank_dir = truth_sim / "ranker" / "rerank"
    model = build_reranker("midnn", PreparedDataset(rerank_dir).schema, initial_skip=False)  # an order of its own
    model.save(tmp_path / "run" / "best")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"data": str(rerank_dir)}))
    sim = load_simulator(truth_sim / "sim")
    policy = make_policy(
        "reranker", str(tmp_path / "run"), PolicyContext(seed=0, device=torch.device("cpu"), simulator=sim)
    )
    candidates = sim.candidates(sim.start(torch.arange(32), 0))
    shown = candidates.reorder(rank(policy(candidates), candidates.mask)).truncate(10)
    ranker = load_ranker(truth_sim / "ranker")
    first = ranker.score(candidates)
    order = rank(first, candidates.mask)
    top = candidates.reorder(order).truncate(10)
    init = first.gather(1, order)[:, :10].masked_fill(~top.mask, 0.0).unsqueeze(-1)
    top = dataclasses.replace(top, item_dense=torch.cat([top.item_dense, init], dim=-1))
    expected = top.item_id.gather(1, rank(model.score(top), top.mask))
    assert torch.equal(shown.item_id, expected)  # the ranker's top 10, in the re-ranker's order
    assert not torch.equal(shown.item_id, top.item_id)


def test_one_seed_says_it_has_no_spread_instead_of_printing_zeros():
    from relist.sim.abtest import markdown

    rng = np.random.default_rng(0)

    def outcomes(n):
        requests = rng.integers(1, 6, n).astype(float)
        return {
            "clicks": rng.binomial(10, 0.2, n).astype(float),
            "requests": requests,
            "sessions": np.ones(n),
            "dwell": rng.exponential(60, n),
        }

    for seeds in (1, 2):
        per_policy = {"a": outcomes(40 * seeds), "b": outcomes(40 * seeds)}
        rows = summarise(per_policy, np.repeat(np.arange(seeds), 40))
        text = markdown(rows, ["a", "b"], "header")
        assert ("no spread over seeds" in text) == (seeds == 1)
        assert ("Spread over seeds" in text) == (seeds > 1)
