"""`relist experiment last` end to end on synthetic data and a ground-truth simulator, in this process and in
worker processes."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from relist.cli import main
from relist.data.prepare import PrepareConfig, prepare
from relist.rankers.train import TrainRankerConfig, train_ranker


@pytest.mark.slow
def test_experiment_last_end_to_end(tmp_path):
    torch.set_num_threads(1)
    prepare(PrepareConfig(source="synthetic", out=tmp_path / "data", n_lists=800, n_users=120, n_items=300, seed=4))
    train_ranker(
        TrainRankerConfig(data=tmp_path / "data", out=tmp_path / "ranker", seed=4, n_estimators=20, progress=False)
    )
    assert (
        main(
            [
                "sim",
                "truth",
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "sim"),
                "--session-requests",
                "2",
                "--max-sessions",
                "1",
                "--seed",
                "4",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "experiment",
                "last",
                "--data",
                str(tmp_path / "data"),
                "--ranker",
                str(tmp_path / "ranker"),
                "--sim",
                str(tmp_path / "sim"),
                "--out",
                str(tmp_path / "exp"),
                "--seeds",
                "2",
                "--epochs",
                "1",
                "--users",
                "40",
                "--sweep-seeds",
                "1",
                "--fractions",
                "0.1,1",
                "--noise",
                "1",
            ]
        )
        == 0
    )
    for name in ("results.csv", "summary.md", "online.md", "offline.png", "quality.png", "offsets.png"):
        assert (tmp_path / "exp" / name).is_file(), name
    with open(tmp_path / "exp" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    offline = {r["method"] for r in rows if r["study"] == "offline"}
    assert {"generator greedy", "best-of-8 sampling", "LAST parallel", "LAST serial", "initial order"} <= offline
    assert any("oracle selection" in m for m in offline)  # the oracle variant is labelled wherever it appears
    assert {r["seed"] for r in rows if r["study"] == "quality"} == {"0"}
    summary = (tmp_path / "exp" / "summary.md").read_text()
    assert "oracle selection: test labels" in summary and "Lift over `generator greedy`" in summary
    assert "online learning, delay 0" in summary and "## Delayed feedback" in summary
    offline_table = summary[summary.index("### Offline comparisons") : summary.index("### Online comparisons")]
    assert "over seeds and lists" in offline_table and "| evaluator |" not in offline_table
    assert "| LAST parallel | best-of-8 sampling | ndcg@10 |" in offline_table
    assert "over seeds and users" in summary and "### Delayed feedback and LAST against greedy, over seeds" in summary


def _world(root):
    prepare(PrepareConfig(source="synthetic", out=root / "data", n_lists=500, n_users=60, n_items=200, seed=5))
    train_ranker(TrainRankerConfig(data=root / "data", out=root / "ranker", seed=5, n_estimators=8, progress=False))
    sim = ["sim", "truth", "--data", str(root / "data"), "--out", str(root / "sim"), "--seed", "5"]
    assert main(sim + ["--session-requests", "2", "--max-sessions", "1"]) == 0


@pytest.mark.slow  # the executors' equality is in the default suite through tests/test_grid.py
def test_seeds_in_two_worker_processes_give_the_results_of_one_process(tmp_path):
    """Two seeds (the second without the quality and offset studies) in this process and with --jobs 2: the
    same results.csv and summary; the one-seed study tables say so instead of showing "± nan"."""
    _world(tmp_path)
    args = ["experiment", "last", "--data", str(tmp_path / "data"), "--ranker", str(tmp_path / "ranker"),
            "--sim", str(tmp_path / "sim"), "--seeds", "2", "--seed", "3", "--epochs", "1", "--max-steps", "2",
            "--batch-size", "32", "--users", "12", "--sweep-seeds", "1", "--fractions", "1", "--noise", "1",
            "--offset-kinds", "activations", "--offset-steps", "0/0/6/7", "--steps", "0,0,6,7",
            "--delays", "0"]  # fmt: skip
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "results.csv").read_text() == (two / "results.csv").read_text()
    assert (one / "summary.md").read_text() == (two / "summary.md").read_text()
    with open(one / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["seed"] for r in rows if r["study"] == "offline"} == {"3", "4"}
    assert {r["seed"] for r in rows if r["study"] in ("quality", "offsets")} == {"3"}
    assert "best-of-4 sampling" in {r["method"] for r in rows}  # K is the number of --steps
    summary = (one / "summary.md").read_text()
    quality = summary[summary.index("## Evaluator quality") :]
    assert "1 seed, no interval" in quality and "nan" not in quality
    assert (one / "quality.png").is_file() and (one / "offsets.png").is_file()


def test_protocol_file_sets_lasts_methods_and_the_command_line_wins():
    from pathlib import Path

    from relist.cli import COMMANDS, make_parser, resolve
    from relist.config import build
    from relist.experiments.last import methods_of
    from relist.last import OFFICIAL_STEPS

    protocol = Path(__file__).resolve().parents[1] / "configs" / "protocol.yaml"
    path = ("experiment", "last")
    parser = make_parser(path)

    def config(*argv):
        args = parser.parse_args([*path, "--config", str(protocol), "--data", "d", "--sim", "s", "--out", "o", *argv])
        return build(resolve(COMMANDS[path].config), args, parser)

    cfg = config()
    assert (cfg.last.epochs, cfg.last.users, cfg.last.sweep_seeds, cfg.last.delays) == (10, 400, 2, (0, 500, 2000))
    assert (cfg.protocol.seeds, cfg.protocol.p1_weight, cfg.protocol.p2_weight) == (5, 1.0, 1.0)
    methods, oracle = methods_of(cfg.last)
    assert list(methods) == ["generator greedy", "best-of-8 sampling", "LAST parallel", "LAST serial"]
    assert methods["LAST parallel"].steps == OFFICIAL_STEPS == oracle.steps and oracle.select == "oracle"
    assert methods["best-of-8 sampling"].steps == (0.0,) * 8 and methods["LAST serial"].serial_steps == 8
    assert cfg.principled.epochs == 30  # the principled section is read, and left to that experiment
    mine = config("--steps", "0,0,5", "--serial-steps", "0", "--scale", "0.02", "--epochs", "2")
    methods, _ = methods_of(mine.last)
    assert "best-of-3 sampling" in methods and methods["LAST serial"].serial_steps == 3
    assert {m.scale for m in methods.values()} == {0.02} and mine.last.epochs == 2


@pytest.mark.slow  # five seeds' runs (about a minute); the executors' and records' plumbing is shared with principled
def test_resume_keeps_recorded_seeds_and_the_truth_judges_and_tops_the_ladder(tmp_path):
    """--truth adds the true click model as a judge (offline, online) and as the ladder's oracle rung, whose
    order agreement with itself is exactly 1; --resume runs only the seeds without a record of the same
    settings, and gives what a fresh run gives."""
    torch.set_num_threads(1)
    _world(tmp_path)
    args = ["experiment", "last", "--data", str(tmp_path / "data"), "--ranker", str(tmp_path / "ranker"),
            "--sim", str(tmp_path / "sim"), "--truth", str(tmp_path / "sim"), "--epochs", "1",
            "--max-steps", "2", "--batch-size", "32", "--users", "12", "--sweep-seeds", "1", "--fractions", "1",
            "--noise", "3", "--offset-kinds", "activations", "--offset-steps", "0/0/6/7", "--steps", "0,0,6,7",
            "--delays", "0"]  # fmt: skip
    out = tmp_path / "resumed"
    assert main(args + ["--out", str(out), "--seeds", "1"]) == 0
    record = out / "runs" / "seed0" / "record.safetensors"
    first = record.stat().st_mtime_ns
    assert main(args + ["--out", str(out), "--seeds", "2"]) != 0  # OUT exists: --resume or --overwrite
    assert main(args + ["--out", str(out), "--seeds", "2", "--resume"]) == 0
    assert record.stat().st_mtime_ns == first  # seed 0 was read, not run again
    assert (out / "runs" / "seed1" / "record.safetensors").is_file()
    assert main(args + ["--out", str(tmp_path / "fresh"), "--seeds", "2"]) == 0
    assert (out / "results.csv").read_text() == (tmp_path / "fresh" / "results.csv").read_text()
    assert (out / "summary.md").read_text() == (tmp_path / "fresh" / "summary.md").read_text()

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(r["truth_clicks"] for r in rows if r["study"] == "offline")
    assert {r["seed"] for r in rows if r["study"] == "online_truth"} == {"0", "1"}
    ladder = {r["method"]: r for r in rows if r["study"] == "quality"}
    assert float(ladder["true click model (oracle ceiling)"]["order_agreement"]) == 1.0
    assert float(ladder["evaluator 100% + noise 3"]["order_agreement"]) < 1.0
    summary = (out / "summary.md").read_text()
    assert "### Online comparisons (the true click model's users)" in summary
    assert "| LAST parallel | generator greedy | truth_clicks |" in summary
    online = json.loads((out / "online.json").read_text())  # each judge's online rows, the truth's included
    assert set(online) == {"online", "online_truth", "delayed"}
    assert {r["policy"] for r in online["online_truth"]} >= {"LAST parallel", "generator greedy"}

    # another setting: the recorded seed is of other settings and runs again
    assert main(args + ["--out", str(out), "--seeds", "1", "--resume", "--users", "10"]) == 0
    assert record.stat().st_mtime_ns != first


def test_order_agreement_is_one_for_the_judge_itself_none_for_its_opposite_and_a_half_when_blind():
    from types import SimpleNamespace

    from relist.data.synthetic import SyntheticClickModel, SyntheticParams
    from relist.experiments.last import ClickModelEvaluator, order_agreement
    from relist.sim.response import TruthResponse
    from tests.test_rerankers import random_batch

    truth = TruthResponse(SyntheticClickModel.sample(SyntheticParams(n_users=30, n_items=80), seed=1))
    judge = SimpleNamespace(response=truth, slate_size=8)
    batch = random_batch(0, size=40, length=8)  # users 1..19 and items 1..59 of the truth; lists of 1-8 items
    itself = ClickModelEvaluator(judge)

    class Opposite:
        def click_probability(self, shown):
            return -itself.click_probability(shown)

    class Blind:  # the same total whatever the order
        def click_probability(self, shown):
            return shown.mask.float()

    assert order_agreement(itself, judge, batch, seed=0) == 1.0
    assert order_agreement(Opposite(), judge, batch, seed=0) == 0.0
    assert order_agreement(Blind(), judge, batch, seed=0) == 0.5
    shorter = SimpleNamespace(response=truth, slate_size=3)  # the judge sees the first 3 only: agreement falls
    assert 0.5 < order_agreement(itself, shorter, batch, seed=0) < 1.0


def test_offline_lists_in_chunks_are_one_call_when_they_fit_and_greedy_is_unchanged_by_chunks():
    from relist.experiments.last import last_scores
    from relist.last import Last, LastConfig
    from tests.test_last import small_models
    from tests.test_rerankers import random_batch

    generator, evaluator = small_models()
    batch = random_batch(3, size=10, length=6)
    last = Last(generator, evaluator, LastConfig(steps=(0.0, 0.0, 6.0, 7.0)))
    whole = last(batch, torch.Generator().manual_seed(5)).scores
    assert torch.equal(last_scores(last, batch, 5, chunk=10), whole)
    chunked = last_scores(last, batch, 5, chunk=3)
    assert chunked.shape == whole.shape
    assert torch.equal(chunked[:3], last(batch[:3], torch.Generator().manual_seed(5)).scores)  # the first chunk
    greedy = Last(generator, evaluator, LastConfig(steps=()))
    assert torch.equal(last_scores(greedy, batch, 5, chunk=3), greedy(batch).scores)


def test_a_seed_folder_of_other_settings_is_emptied_and_only_its_own_stamp_resumes(tmp_path):
    from relist.experiments.last import _stamp_changes, open_seed_folder

    run = tmp_path / "seed0"
    assert not open_seed_folder(run, '{"epochs": 2}', resume=True)  # nothing to resume yet
    (run / "evaluator").mkdir()
    (run / "evaluator" / "state.json").write_text("{}")
    assert open_seed_folder(run, '{"epochs": 2}', resume=True)  # interrupted under the same settings
    assert (run / "evaluator" / "state.json").is_file()
    assert not open_seed_folder(run, '{"epochs": 3}', resume=True)  # other settings: nothing is reused
    assert not (run / "evaluator").exists()
    assert (run / "stamp.json").read_text() == '{"epochs": 3}'
    (run / "evaluator").mkdir()
    assert not open_seed_folder(run, '{"epochs": 3}', resume=False)  # no --resume: a fresh start
    assert not (run / "evaluator").exists()
    changes = _stamp_changes('{"data_content_hash": "a", "seed": 0}', '{"data_content_hash": "b", "seed": 0}')
    assert "data_content_hash" in changes and "seed" not in changes
