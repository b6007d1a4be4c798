"""The `relist` command: help, seeds, typed options, YAML configs and clean errors."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest
import torch

from relist.cli import COMMANDS, main, make_parser, resolve
from relist.config import _flat_fields


@pytest.mark.parametrize("path", list(COMMANDS))
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: relist " + " ".join(path) in text
    if path not in (("data", "stats"), ("data", "headroom"), ("report",)):  # reading outputs: nothing random
        assert "--seed" in text


def test_prepare_and_stats(tmp_path, capsys):
    assert main(["data", "prepare", "synthetic", "--out", str(tmp_path / "d"), "--n-lists", "400", "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["data", "stats", str(tmp_path / "d"), "--verify"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_lists"] == 400 and stats["verified"] is True
    assert sum(s["n_lists"] for s in stats["splits"].values()) == 400
    assert {"n_labelled", "n_clicks", "n_users", "n_items"} <= set(stats)


def test_misspelt_option_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", "synthetic", "--out", str(tmp_path / "d"), "--n-list", "400"])
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_yaml_config_and_override(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"out: {tmp_path / 'd'}\nn_lists: 300\nseed: 5\n")
    assert main(["data", "prepare", "synthetic", "--config", str(config), "--n-lists", "250"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_lists"] == 250
    config.write_text("out: x\nn_listz: 3\n")
    with pytest.raises(SystemExit):
        main(["data", "prepare", "synthetic", "--config", str(config)])
    assert "unknown option(s) ['n_listz']" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "nothing")]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    assert main(["data", "prepare", "mind", "--out", str(tmp_path / "m")]) == 2
    assert "--src" in capsys.readouterr().err


# --------------------------------------------------------------------------- help: choices and defaults


def command_parser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    """The sub-parser of one command, with its options."""
    parser = make_parser(path)
    for word in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


@pytest.mark.parametrize("path", list(COMMANDS))
def test_help_gives_each_option_one_default_and_its_choices(path):
    """Every option says once what it defaults to (or that it is required); a positional never does; every
    option with a fixed set of values lists them all."""
    cls = resolve(COMMANDS[path].config)
    fields = {dest: f for dest, _, f, _ in _flat_fields(cls)}
    for action in command_parser(path)._actions:
        if action.dest in ("help", "config"):
            continue
        text = action.help
        stated = text.count("(default") + text.count("(required)")
        assert stated == (0 if not action.option_strings else 1), f"{' '.join(path)} {action.dest}: {text!r}"
        choices = fields[action.dest].metadata.get("choices")
        if choices:
            listed = text.split("(one of: ")[1].split(")")[0].replace("; comma-separated", "")
            assert [c.strip() for c in listed.split(",")] == [str(c) for c in choices], text


def _help(path: tuple[str, ...], dest: str) -> str:
    return next(a.help for a in command_parser(path)._actions if a.dest == dest)


def test_help_names_every_value_a_newcomer_can_pick():
    from relist.data.prepare import SOURCES
    from relist.last import MODES, OFFSETS
    from relist.principled import PERTURBATIONS
    from relist.rerankers import REGISTRY
    from relist.rl.agents import METHODS
    from relist.sim.policies import POLICIES

    expected = {
        (("data", "prepare"), "source"): list(SOURCES),
        (("train", "ranker"), "model"): ["lambdamart", "dnn"],
        (("train", "reranker"), "model"): list(REGISTRY),
        (("train", "reranker"), "perturbation"): list(PERTURBATIONS),
        (("train", "generator"), "reward"): ["ndcg", "evaluator"],
        (("serve",), "mode"): list(MODES),
        (("serve",), "offsets"): list(OFFSETS),
        (("rl", "train"), "method"): ["cem", *METHODS],
    }
    for (path, dest), values in expected.items():
        text = _help(path, dest)
        for value in values:
            assert f" {value}," in text or f" {value})" in text, f"{' '.join(path)} --{dest}: {value} not in {text!r}"
    policies = _help(("abtest",), "policies")
    for kind, (_, description) in POLICIES.items():
        form = f"{kind}:DIR" if description.startswith(f"{kind}:DIR") else kind
        assert form in policies, (form, policies)
    assert "reranker:DIR" in policies and "last:DIR" in policies


def test_version_and_top_level_help_are_quick_to_start():
    """`relist --version` and `relist --help` import neither torch nor the options system (YAML)."""
    code = (
        "import sys; from relist.cli import main\n"
        "for argv in (['--version'], ['--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'yaml', 'relist.config') if m in sys.modules)\n"
        "print('imported:', heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "relist 0.1.0" in done.stdout and "COMMAND" in done.stdout
    assert done.stdout.strip().endswith("imported: []"), done.stdout


# --------------------------------------------------------------------------- training runs and their loaders

SMALL = ["--max-steps", "4", "--epochs", "1", "--no-progress", "--batch-size", "64"]


def run_command(argv: list[str], capsys) -> tuple[str, str]:
    assert main(argv) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.fixture(scope="module")
def runs(synthetic_world, tmp_path_factory):
    """A re-ranker, an evaluator and a generator trained by the commands on the initial ranker's data (a few
    steps each), the last two in one LAST run directory."""
    root = tmp_path_factory.mktemp("runs")
    rerank = str(synthetic_world / "ranker" / "rerank")
    for argv in (
        ["train", "reranker", "--data", rerank, "--model", "prm", "--model-args", "d_model=8,n_blocks=1"],
        ["train", "evaluator", "--data", rerank],
        ["train", "generator", "--data", rerank],
    ):
        out = {"reranker": root / "prm", "evaluator": root / "last" / "evaluator"}.get(
            argv[1], root / "last" / "generator"
        )
        assert main([*argv, "--out", str(out), *SMALL]) == 0
    return root


def test_train_reranker_without_an_initial_score_says_so(synthetic_world, runs, tmp_path, capsys):
    from relist.cli.train import without_initial_ranker

    assert without_initial_ranker(synthetic_world / "ranker" / "rerank") is None  # it has init_score
    data = synthetic_world / "data"
    argv = ["train", "reranker", "--data", str(data), "--model", "prm", "--model-args", "d_model=8,n_blocks=1"]
    _, err = run_command([*argv, "--out", str(tmp_path / "bare"), *SMALL], capsys)
    assert "has no init_score feature, so this trains without an initial ranker" in err
    assert f"relist train ranker --data {data}" in err


def test_every_loader_takes_the_directory_its_command_wrote(synthetic_world, runs):
    from relist.data.store import PreparedDataset
    from relist.last import Last, LastConfig, load_last
    from relist.metrics import evaluate_lists
    from relist.rankers import load_ranker
    from relist.rerankers import load_reranker
    from relist.rerankers.evaluator import load_evaluator

    ranker_dir = synthetic_world / "ranker"
    data, rerank = PreparedDataset(synthetic_world / "data"), PreparedDataset(ranker_dir / "rerank")
    stored = json.loads((ranker_dir / "metrics.json").read_text())
    category = [f.name for f in data.schema.item_sparse].index("category")
    again = evaluate_lists(load_ranker(ranker_dir).score, data.batches("test", 512), category_col=category)
    assert again == pytest.approx(stored["test"], rel=1e-9, nan_ok=True)
    for run in (runs / "prm", runs / "last" / "generator", runs / "last" / "evaluator"):
        stored = json.loads((run / "metrics.json").read_text())["test"]
        model = load_reranker(run).eval()  # the run directory, not only its best/
        again = evaluate_lists(model.score, rerank.batches("test", 512))
        assert again["ndcg@10"] == pytest.approx(stored["ndcg@10"], rel=1e-6), run
    assert load_evaluator(runs / "last" / "evaluator").name == "evaluator"
    last = load_last(runs / "last", LastConfig(mode="greedy"))
    assert isinstance(last, Last) and last.config.mode == "greedy"
    batch = next(rerank.batches("test", 16))
    generator = load_reranker(runs / "last" / "generator").eval()
    assert torch.equal(last(batch).order, torch.argsort(generator.score(batch), dim=1, descending=True, stable=True))
    with pytest.raises(FileNotFoundError, match="not a LAST run: no generator/ or evaluator/"):
        load_last(runs / "prm")
    with pytest.raises(ValueError, match="'lambdamart' model is not a re-ranker.*load_ranker"):
        load_reranker(ranker_dir)
    with pytest.raises(FileNotFoundError, match="no model.json there or in best/"):
        load_reranker(runs / "last")


def test_a_policy_of_the_wrong_kind_names_the_right_one(synthetic_world, runs, tmp_path):
    from relist.sim.policies import PolicyContext, make_policy

    ctx = PolicyContext(seed=0, device=torch.device("cpu"))
    ranker_dir = synthetic_world / "ranker"
    for kind, arg, hint in (
        ("ranker", runs / "prm", f"use reranker:{runs / 'prm'}"),
        ("ranker", runs / "last", f"use last:{runs / 'last'}"),
        ("reranker", ranker_dir, f"use ranker:{ranker_dir}"),
        ("last", runs / "prm", f"use reranker:{runs / 'prm'}"),
    ):
        with pytest.raises(FileNotFoundError, match=re.escape(hint)):
            make_policy(kind, str(arg), ctx)
    with pytest.raises(FileNotFoundError) as err:  # a directory of no kind: no hint
        make_policy("ranker", str(tmp_path), ctx)
    assert "use " not in str(err.value)


class RecordingBar:
    """Stands in for tqdm: records what a command reports as it goes."""

    made: list["RecordingBar"] = []

    def __init__(self, total=None, desc=None, **kwargs):
        self.total, self.desc, self.n, self.postfixes, self.closed = total, desc, 0, [], False
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, refresh=True, **values):
        self.postfixes.append(values)

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    import relist.rl.train
    import relist.sim.train

    RecordingBar.made = []
    monkeypatch.setattr(relist.sim.train, "tqdm", RecordingBar)
    monkeypatch.setattr(relist.rl.train, "tqdm", RecordingBar)
    return RecordingBar.made


def test_sim_train_shows_progress_and_its_simulator_loads_back(synthetic_world, tmp_path, bars, capsys):
    from relist.data.store import PreparedDataset
    from relist.metrics import log_loss
    from relist.sim.store import load_simulator
    from relist.sim.train import predict

    data = synthetic_world / "data"
    out = tmp_path / "sim"
    run_command(
        ["sim", "train", "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "256"], capsys
    )
    (bar,) = bars
    steps = -(-len(PreparedDataset(data).split("ranker")) // 256)
    assert bar.total == 2 * steps and bar.n == 2 * steps and bar.closed
    assert [sorted(p) for p in bar.postfixes] == [["epoch", "valid_log_loss"]] * 2
    sim = load_simulator(out)
    stored = json.loads((out / "metrics.json").read_text())["test"]
    held = predict(sim.response, PreparedDataset(data), PreparedDataset(data).split("test"), torch.device("cpu"))
    assert log_loss(held["prob"], held["label"]) == pytest.approx(stored["log_loss"], rel=1e-9)


RL_ENV = dict(source="synthetic", n_items=1500, n_users=300, sizes=[150, 40, 8], session_requests=3.0)


@pytest.mark.parametrize("method", ["unexrl", "cem"])
def test_rl_train_shows_progress_and_the_hand_set_weights_and_its_policy_loads_back(method, tmp_path, bars, capsys):
    import yaml

    from relist.rl.loop import LoopConfig, evaluate
    from relist.rl.store import load_agent

    env_file = tmp_path / "env.yaml"
    env_file.write_text(yaml.safe_dump(RL_ENV))
    out = tmp_path / method
    argv = ["rl", "train", "--env", str(env_file), "--method", method, "--out", str(out)]
    printed, _ = run_command([*argv, "--steps", "10", "--n-envs", "16", "--eval-every", "5", "--seed", "3"], capsys)
    (bar,) = bars
    assert bar.closed and bar.n == bar.total == (10 if method != "cem" else 10 * 16)
    if method != "cem":  # an evaluation every 5 steps reported beside the bar
        assert [sorted(p) for p in bar.postfixes] == [["session_dwell"]] * 3
    result = json.loads((out / "metrics.json").read_text())
    final, handset = result["final"]["session_dwell"], result["handset"]["session_dwell"]
    assert f"session dwell {final:.1f} s against the hand-set weights' {handset:.1f} s" in printed
    policy = load_agent(out)  # the environment rebuilt from what the run recorded
    loop = LoopConfig(steps=10, n_envs=16, eval_every=5)
    again = evaluate(policy.env, policy, loop, 3)  # the same users: the run's final evaluation exactly
    assert again == {k: result["final"][k] for k in again}
    assert evaluate(policy.env, None, loop, 3)["session_dwell"] == pytest.approx(handset, rel=1e-12)
    assert (policy.fusion is not None) == (method == "cem")
