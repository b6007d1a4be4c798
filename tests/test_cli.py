"""The `relist` command: help, seeds, typed options, YAML configs and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from relist.cli import COMMANDS, main


@pytest.mark.parametrize("path", list(COMMANDS))
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: relist " + " ".join(path) in text
    if path != ("data", "stats"):  # a read-only inspection has nothing random
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


def test_installed_command_runs_the_demo(tmp_path):
    relist = [sys.executable, "-m", "relist.cli"]
    done = subprocess.run(
        [*relist, "demo", "--out", str(tmp_path / "demo"), "--n-lists", "1500", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("logged order (test)") for line in lines)
    assert any(line.startswith("lambdamart (test)") for line in lines)
    assert "ndcg@10" in done.stdout
