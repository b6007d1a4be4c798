"""`relist experiment principled` end to end on a small synthetic dataset (1 seed, few steps)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from relist.cli import COMMANDS, main, make_parser, resolve
from relist.config import build
from relist.data.prepare import PrepareConfig, prepare
from relist.experiments.principled import PrincipledExperimentConfig, plan_runs, random_tie_scores, run_experiment

PROTOCOL = Path(__file__).resolve().parents[1] / "configs" / "protocol.yaml"


def test_principled_experiment_writes_results_summary_and_plots(tmp_path, capsys):
    prepare(PrepareConfig(source="synthetic", out=tmp_path / "data", n_lists=800, n_users=100, n_items=300, seed=1))
    code = main(
        [
            "experiment",
            "principled",
            "--data",
            str(tmp_path / "data"),
            "--models",
            "prm,setrank",
            "--seeds",
            "1",
            "--max-steps",
            "4",
            "--batch-size",
            "64",
            "--out",
            str(tmp_path / "exp"),
            "--sweep-model",
            "prm",
            "--no-progress",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "exp" / "results.csv")))
    variants = {(r["model"], r["variant"]) for r in rows}
    assert {(m, v) for m in ("prm", "setrank") for v in ("base", "+P1", "+P2", "+P1+P2")} <= variants
    assert ("prm", "+P1+P2 λ=0.1") in variants and ("prm", "+P2 window") in variants
    assert all(0.0 <= float(r["test_ndcg@10"]) <= 1.0 for r in rows)
    summary = (tmp_path / "exp" / "summary.md").read_text()
    assert "| initial ranker |" in summary and "| setrank | +P1+P2 |" in summary
    assert "Test metrics, 1 seed, no interval" in summary and "± nan" not in summary
    base = summary[
        summary.index("## Principles against the same model's base") : summary.index("## Against the initial")
    ]
    against = summary[summary.index("## Against the initial ranker") :]
    assert "over seeds and lists" in base and "| prm | +P1+P2 | ndcg@10 |" in base and "| prm | base |" not in base
    assert "| prm | +P2 window | map@10 |" in against and ("(0/1)" in against or "(1/1)" in against)
    assert "Holm" in against and "comparisons of this table" in against
    assert "with 1 seed its smallest possible p is 1)" in against  # the floor follows the seed count
    assert (tmp_path / "exp" / "metrics.png").stat().st_size > 0 and (
        tmp_path / "exp" / "obedience.png"
    ).stat().st_size > 0
    assert (tmp_path / "exp" / "ranker" / "rerank" / "manifest.json").is_file()  # an initial ranker was trained first
    assert "relist: error" not in capsys.readouterr().err


def test_resume_keeps_finished_runs_and_redoes_missing_ones(tmp_path):
    prepare(PrepareConfig(source="synthetic", out=tmp_path / "data", n_lists=400, n_users=50, n_items=150, seed=3))
    args = [
        "experiment",
        "principled",
        "--data",
        str(tmp_path / "data"),
        "--models",
        "midnn",
        "--seeds",
        "1",
        "--max-steps",
        "3",
        "--batch-size",
        "32",
        "--variants",
        "base,+P2",
        "--out",
        str(tmp_path / "exp"),
        "--no-progress",
    ]
    assert main(args) == 0
    runs = tmp_path / "exp" / "runs" / "midnn"
    assert sorted(p.name for p in runs.iterdir()) == ["+P2", "base"]  # only the variants asked for
    kept = runs / "base" / "seed0" / "metrics.json"
    before = kept.stat().st_mtime_ns, kept.read_text()
    summary = (tmp_path / "exp" / "summary.md").read_text()
    (runs / "+P2" / "seed0" / "metrics.json").unlink()  # as if the run had been interrupted
    for name in ("best", "checkpoint"):  # a finished run kept as its record only: no weights
        shutil.rmtree(runs / "base" / "seed0" / name)
    first = list(csv.DictReader(open(tmp_path / "exp" / "results.csv")))
    assert {r["variant"] for r in first} == {"base", "+P2"}
    assert main(args) == 2  # an existing OUT is refused without --resume or --overwrite
    assert main(args + ["--resume"]) == 0
    assert (kept.stat().st_mtime_ns, kept.read_text()) == before  # finished runs are not trained again
    assert (runs / "+P2" / "seed0" / "metrics.json").is_file()
    again = list(csv.DictReader(open(tmp_path / "exp" / "results.csv")))
    assert [(r["variant"], r["test_ndcg@10"]) for r in again] == [(r["variant"], r["test_ndcg@10"]) for r in first]
    assert (tmp_path / "exp" / "summary.md").read_text() == summary  # the record stood in for the weights
    record = runs / "base" / "seed0" / "test_lists.safetensors"
    kept.write_text(kept.read_text() + " ")  # a record of another metrics.json is not read: the weights are gone
    with pytest.raises(ValueError, match="no weights to score the test lists"):
        run_experiment(_config("principled", *args[2:], "--resume"))
    kept.write_text(before[1])
    assert record.is_file()
    metrics = json.loads(kept.read_text())  # a finished run selected on another metric is never mixed in
    metrics["config"]["select_metric"] = "ndcg@10"
    kept.write_text(json.dumps(metrics))
    assert main(args + ["--resume"]) == 2


def test_random_tie_scores_shuffle_ties_only():
    generator = torch.Generator().manual_seed(0)
    initial = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 0.0], [3.0, 2.0, 2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    tops = torch.zeros(4)
    for _ in range(2000):
        scores = random_tie_scores(initial, mask, generator)
        assert scores[0, 4] < scores[0, :4].min()  # untied items keep their place
        assert scores[1, 0] > scores[1, 1:4].max() and scores[1, 3] < scores[1, 1:3].min()
        assert len(set(scores[0, :5].tolist())) == 5  # a strict order
        tops[int(scores[0].argmax())] += 1
    assert (tops / 2000 - 0.25).abs().max() < 0.04  # each of the four tied items is first a quarter of the time


def test_unknown_model_fails_before_any_work(tmp_path, capsys):
    prepare(PrepareConfig(source="synthetic", out=tmp_path / "data", n_lists=200, n_users=20, n_items=50, seed=1))
    argv = ["experiment", "principled", "--data", str(tmp_path / "data"), "--models", "prm,nope"]
    with pytest.raises(SystemExit) as exit_:  # refused by the option's choices, before anything is read
        main([*argv, "--out", str(tmp_path / "exp")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'nope' is not one of" in err and "prm" in err
    assert not (tmp_path / "exp").exists()
    with pytest.raises(ValueError, match="unknown re-ranker 'nope'"):  # and by the library, called directly
        run_experiment(PrincipledExperimentConfig(data=tmp_path / "data", out=tmp_path / "exp", models=("nope",)))
    assert not (tmp_path / "exp" / "ranker").exists()


def test_librerank_files_run_through_the_experiment(tmp_path):
    """LibRerank's data.train is the initial ranker's part: a LambdaMART is trained on it first."""
    from tests.rawfiles import write_librerank

    write_librerank(tmp_path / "raw", seed=2, sizes=(120, 150, 40))
    prepare(PrepareConfig(source="librerank", src=tmp_path / "raw", out=tmp_path / "data", seed=2))
    code = main(
        [
            "experiment",
            "principled",
            "--data",
            str(tmp_path / "data"),
            "--models",
            "dlcm",
            "--seeds",
            "1",
            "--max-steps",
            "3",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "exp"),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "exp" / "results.csv")))
    assert {r["variant"] for r in rows} == {"base", "+P1", "+P2", "+P1+P2"}
    assert (tmp_path / "exp" / "ranker" / "rerank" / "manifest.json").is_file()


def _config(command: str, *argv: str):
    """The configuration the command line builds (nothing is run)."""
    path = ("experiment", command)
    parser = make_parser(path)
    return build(resolve(COMMANDS[path].config), parser.parse_args([*path, *argv]), parser)


def test_protocol_file_settings_reach_every_training_run(tmp_path):
    """configs/protocol.yaml read by experiment principled: every run gets its epochs, selection, patience,
    weight average, λ per variant, perturbation and model sizes; the command line wins over the file."""
    cfg = _config(
        "principled", "--config", str(PROTOCOL), "--data", "d", "--out", str(tmp_path), "--sweep-model", "prm"
    )
    runs = plan_runs(cfg, tmp_path / "data")
    assert len(runs) == 6 * 4 * 5 + 6 * 5  # six models x four variants x 5 seeds, and the sweeps on prm
    for model, variant, seed, run_dir, run in runs:
        assert (run.epochs, run.patience, run.ema_decay, run.select_metric) == (30, 5, 0.95, "list_ce")
        assert (run.batch_size, run.learning_rate, run.use_user, run.seed) == (128, 1e-3, True, seed)
        assert run.out == run_dir and 0 <= seed <= 4
        if variant in ("base", "+P1", "+P2", "+P1+P2"):
            assert (run.p1_weight, run.p2_weight) == (
                {"base": (0, 0), "+P1": (1, 0), "+P2": (0, 1)}.get(variant, (1, 1))
            )
            assert (run.perturbation, run.cs_gradient) == ("adjacent", "both")
    prm = next(run for model, *_, run in runs if model == "prm")
    assert "d_model=64" in prm.model_args and "n_blocks=2" in prm.model_args and ";" not in prm.model_args
    midnn = next(run for model, *_, run in runs if model == "midnn")
    assert "hidden=128/64" in midnn.model_args and "loss=softmax" in midnn.model_args
    sweeps = {variant: run for model, variant, seed, _, run in runs if " " in variant and seed == 0}
    assert (sweeps["+P1+P2 λ=0.3"].p1_weight, sweeps["+P1+P2 λ=0.3"].p2_weight) == (0.3, 0.3)
    assert sweeps["+P2 window"].perturbation == "window" and sweeps["+P2 window"].p1_weight == 0

    mine = _config("principled", "--config", str(PROTOCOL), "--data", "d", "--out", str(tmp_path),
                   "--p1-weight", "0.5", "--perturbation", "pair", "--epochs", "3", "--seeds", "2",
                   "--cs-gradient", "input")  # fmt: skip
    runs = plan_runs(mine, tmp_path / "data")
    assert len(runs) == 6 * 4 * 2 and all(run.epochs == 3 for *_, run in runs)
    assert {run.p1_weight for _, variant, *_, run in runs if variant == "+P1"} == {0.5}
    assert {run.perturbation for _, variant, *_, run in runs if variant == "+P2"} == {"pair"}
    assert {run.cs_gradient for *_, run in runs} == {"input"}
    assert mine.last.epochs == 10  # experiment last's section is read, and left to it


def test_a_misspelt_protocol_key_fails_both_experiments(tmp_path, capsys):
    text = PROTOCOL.read_text(encoding="utf-8")
    for bad in (text.replace("patience:", "pacience:"), text.replace("  users: 400", "  userz: 400")):
        (tmp_path / "bad.yaml").write_text(bad, encoding="utf-8")
        for command in ("principled", "last"):
            with pytest.raises(SystemExit):
                _config(command, "--config", str(tmp_path / "bad.yaml"), "--data", "d", "--out", "o", "--sim", "s")
    assert "unknown option" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a model setting that its model does not have
        _config("principled", "--data", "d", "--out", "o", "--model-args", "prm: d_modle=32")
