"""The `relist` command. Only this package prints; the library logs and returns results.

Nothing in the library imports it. Each command group is one module here (``data``, ``train``, ``sim``,
``rl``, ``experiment``, ``serve``, ``demo``); ``COMMANDS`` names each command's configuration dataclass
and runner by import path, and only the command being run is imported, so ``relist --help`` and
``relist --version`` answer without importing torch (the one place where a lazy import buys start-up
time).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import NamedTuple

from relist import __version__


class Command(NamedTuple):
    config: str  # "module:Class", the command's configuration dataclass
    run: str  # "module:function", called with the built configuration
    help: str
    positional: tuple[str, ...] = ()


COMMANDS: dict[tuple[str, ...], Command] = {
    ("data", "prepare"): Command(
        "relist.data.prepare:PrepareConfig",
        "relist.cli.data:run_prepare",
        "turn raw files into a prepared dataset",
        ("source",),
    ),
    ("data", "stats"): Command(
        "relist.cli.data:StatsConfig",
        "relist.cli.data:run_stats",
        "print a prepared dataset's counts as JSON",
        ("data",),
    ),
    ("data", "headroom"): Command(
        "relist.data.synthetic:HeadroomConfig",
        "relist.cli.data:run_headroom",
        "NDCG@k and expected clicks under a synthetic dataset's truth: input, true-appeal, greedy and best orders",
        ("data",),
    ),
    ("train", "ranker"): Command(
        "relist.rankers.train:TrainRankerConfig",
        "relist.cli.train:run_train_ranker",
        "train an initial ranker and write the re-ranking splits",
    ),
    ("train", "reranker"): Command(
        "relist.train:TrainConfig",
        "relist.cli.train:run_train_reranker",
        "train a re-ranker (optionally with the P1/P2 consistency losses)",
    ),
    ("train", "evaluator"): Command(
        "relist.train:TrainEvaluatorConfig",
        "relist.cli.train:run_train_evaluator",
        "train LAST's list evaluator (per-position click probability, BCE)",
    ),
    ("train", "generator"): Command(
        "relist.train:TrainGeneratorConfig",
        "relist.cli.train:run_train_generator",
        "train LAST's pointer-network generator (reward-weighted cross-entropy)",
    ),
    ("serve",): Command(
        "relist.serve.settings:ServeSettings",
        "relist.cli.serve:run_serve",
        "serve a generator + evaluator with LAST over HTTP",
        ("run",),
    ),
    ("sim", "train"): Command(
        "relist.sim.train:TrainSimConfig",
        "relist.cli.sim:run_sim_train",
        "fit a click response model on logs and write a user simulator",
    ),
    ("sim", "truth"): Command(
        "relist.sim.train:SimBuildConfig",
        "relist.cli.sim:run_sim_truth",
        "write a user simulator backed by a synthetic dataset's true click model",
    ),
    ("sim", "check-cascade"): Command(
        "relist.sim.cascade_check:CheckCascadeConfig",
        "relist.cli.sim:run_check_cascade",
        "check a cascade environment: stage relevance aligned with the click model, held-out users (JSON)",
    ),
    ("abtest",): Command(
        "relist.sim.abtest:ABTestConfig",
        "relist.cli.sim:run_abtest",
        "compare policies on simulated users (common random numbers, paired CIs)",
    ),
    ("rl", "train"): Command(
        "relist.rl.train:RLTrainConfig",
        "relist.cli.rl:run_rl_train",
        "train one cascade agent (UNEX-RL or a baseline); runs under torchrun",
    ),
    ("experiment", "principled"): Command(
        "relist.experiments.principled:PrincipledExperimentConfig",
        "relist.cli.experiment:run_principled",
        "re-rankers with and without the P1/P2 consistency losses, over seeds",
    ),
    ("experiment", "last"): Command(
        "relist.experiments.last:LastExperimentConfig",
        "relist.cli.experiment:run_last",
        "LAST against generator greedy, best-of-K and a principled re-ranker, offline and in the simulator; "
        "evaluator-quality and offset studies",
    ),
    ("experiment", "unexrl"): Command(
        "relist.experiments.unexrl:UnexrlExperimentConfig",
        "relist.cli.experiment:run_unexrl",
        "UNEX-RL's table on a simulated cascade: methods x seeds, learning curves, 3/4/5 stages",
    ),
    ("report",): Command(
        "relist.report:ReportConfig",
        "relist.cli.demo:run_report",
        "one self-contained HTML page of experiment, demo or training output directories",
        ("dirs",),
    ),
    ("demo",): Command(
        "relist.demo:DemoConfig",
        "relist.cli.demo:run_demo",
        "the whole story on one dataset: data, initial ranker, re-rankers, LAST served, A/B test, cascade RL, report",
    ),
}

GROUP_HELP = {
    "data": "prepared datasets",
    "train": "train rankers, re-rankers and LAST's models",
    "sim": "user simulators",
    "rl": "reinforcement learning on the cascade",
    "experiment": "the papers' studies, over seeds",
}


def resolve(ref: str):
    """The object named by "module:attribute"."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def command_path(argv: list[str]) -> tuple[str, ...] | None:
    """The command named by the leading words of ``argv`` (options before it skipped), if any."""
    words = [a for a in argv if not a.startswith("-")][:2]
    for n in (2, 1):
        if tuple(words[:n]) in COMMANDS:
            return tuple(words[:n])
    return None


def make_parser(full: tuple[str, ...] | None | bool = True) -> argparse.ArgumentParser:
    """The argument parser. Every command gets its sub-parser; the options of a command are added only
    for ``full`` (a command path, or True for every command), since that imports its configuration."""
    parser = argparse.ArgumentParser(
        prog="relist", description="Re-ranking, learning at serving time and cascade RL.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"relist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    groups: dict[str, argparse._SubParsersAction] = {}
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for path, command in COMMANDS.items():
        if len(path) == 1:
            sub = top.add_parser(path[0], help=command.help, description=command.help, allow_abbrev=False)
        else:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=GROUP_HELP.get(path[0], f"{path[0]} commands"), allow_abbrev=False)
                groups[path[0]] = group.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = groups[path[0]].add_parser(path[1], help=command.help, description=command.help, allow_abbrev=False)
        if full is True or full == path:
            from relist.config import add_arguments  # (yaml and typing: not needed for --help or --version)

            add_arguments(sub, resolve(command.config), command.positional)
        sub.set_defaults(_path=path)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser(command_path(argv))
    args = parser.parse_args(argv)
    from relist.config import build

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    command = COMMANDS[args._path]
    cfg = build(resolve(command.config), args, parser)
    started = time.time()
    try:
        resolve(command.run)(cfg)
    except (ValueError, OSError, KeyError) as err:  # OSError: missing files, a full disk (naming the file), ...
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"relist: error: {message}", file=sys.stderr)
        return 2
    record(args._path, cfg, argv, started)
    return 0


def record(path: tuple[str, ...], cfg, argv: list[str], started: float) -> None:
    """After a command succeeds: ``OUT/run.json`` (command line, configuration, seeds, versions) in its output
    directory, and for an experiment ``OUT/report.html`` (`relist report OUT`)."""
    out = getattr(cfg, "out", None)
    if path == ("report",) or out is None or not Path(out).is_dir():
        return
    from relist.report import write_report, write_run_info

    write_run_info(Path(out), cfg, argv, started)
    if path[0] == "experiment":
        print(f"report: {write_report([Path(out)])}", file=sys.stderr)
