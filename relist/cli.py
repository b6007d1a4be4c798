"""The `relist` command. Only this module prints; the library logs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from relist import __version__
from relist.config import add_arguments, build, option
from relist.data.prepare import PrepareConfig
from relist.rankers.train import TrainRankerConfig
from relist.last_commands import COMMANDS as LAST_COMMANDS
from relist.sim.commands import COMMANDS as SIM_COMMANDS
from relist.rl.commands import COMMANDS as RL_COMMANDS
from relist.experiments.last import LastExperimentConfig
from relist.experiments.principled import PrincipledExperimentConfig
from relist.train import TrainConfig

TABLE_METRICS = ("ndcg@5", "ndcg@10", "map@5", "map@10", "p@5", "clicks@10", "auc", "alpha_ndcg@10")


@dataclass
class StatsConfig:
    data: Path = option(help="prepared dataset directory")
    verify: bool = option(False, help="also recompute the content hash and check it against the manifest")


@dataclass
class DemoConfig:
    out: Path = option(Path(".relist-demo"), help="working directory of the demo (replaced on every run)")
    seed: int = option(0, help="random seed of the data and the ranker")
    n_lists: int = option(20000, help="number of synthetic lists")
    model: str = option("lambdamart", help="initial ranker", choices=("lambdamart", "dnn"))
    progress: bool = option(True, help="show progress")


def metrics_table(rows: dict[str, dict[str, float]], metrics=TABLE_METRICS) -> str:
    """A fixed-width table: one row per named result, one column per metric."""
    metrics = [m for m in metrics if any(m in r for r in rows.values())]
    name_width = max(len(n) for n in rows) + 2
    lines = ["".ljust(name_width) + "".join(m.rjust(14) for m in metrics)]
    for name, values in rows.items():
        lines.append(name.ljust(name_width) + "".join(
            (f"{values[m]:.4f}" if m in values else "-").rjust(14) for m in metrics))
    return "\n".join(lines)


def ranker_table(result: dict) -> str:
    return metrics_table({
        "logged order (test)": result["logged_test"],
        f"{result['model']} (valid)": result["valid"],
        f"{result['model']} (test)": result["test"],
        f"{result['model']} top-{result['config']['list_len']} (test)": result["rerank_test"],
    })


def run_prepare(cfg: PrepareConfig) -> None:
    from relist.data.prepare import prepare
    from relist.data.store import PreparedDataset

    out = prepare(cfg)
    print(json.dumps({"out": str(out), **PreparedDataset(out).counts}, indent=2))


def run_stats(cfg: StatsConfig) -> None:
    from relist.data.store import PreparedDataset

    data = PreparedDataset(cfg.data)
    report = {"source": data.manifest["source"], **data.counts, "content_hash": data.manifest["content_hash"]}
    if cfg.verify:
        report["verified"] = data.verify()
    print(json.dumps(report, indent=2))
    if cfg.verify and not report["verified"]:
        raise ValueError(f"{cfg.data}: content hash does not match the manifest (files changed after preparation)")


def run_train_ranker(cfg: TrainRankerConfig) -> None:
    from relist.rankers.train import train_ranker

    result = train_ranker(cfg)
    print(ranker_table(result))
    print(f"\nwrote {cfg.out}/metrics.json and the re-ranking dataset {cfg.out}/rerank")


def run_train_reranker(cfg: TrainConfig) -> None:
    from relist.train import train

    result = train(cfg)
    if not result:  # a non-zero rank under torchrun: rank 0 reports
        return
    print(metrics_table({
        "initial order (test)": result["initial_test"],
        f"{result['model']} (valid)": result["valid"],
        f"{result['model']} (test)": result["test"],
    }))
    rates = result["obedience_test"]
    print("\nobedience on test: " + ", ".join(f"{k.removeprefix('obedience_')} {v:.3f}" for k, v in rates.items()))
    print(f"best step {result['best_step']} of {result['steps']}; wrote {cfg.out}/metrics.json and {cfg.out}/best")


def run_experiment_principled(cfg: PrincipledExperimentConfig) -> None:
    from relist.experiments.principled import run_experiment

    result = run_experiment(cfg)
    print(result["summary"])
    print(f"wrote {cfg.out}/results.csv, summary.md, metrics.png, obedience.png")


def run_experiment_last(cfg: LastExperimentConfig) -> None:
    from relist.experiments.last import run_experiment

    result = run_experiment(cfg)
    print(result["summary"])
    print(f"wrote {cfg.out}/results.csv, summary.md, online.md, offline.png, quality.png, offsets.png")


def run_demo(cfg: DemoConfig) -> None:
    """The main job: prepare synthetic data, train an initial ranker, print its metrics."""
    from relist.data.prepare import prepare
    from relist.rankers.train import train_ranker

    out = Path(cfg.out)
    print(f"[1/2] preparing {cfg.n_lists} synthetic lists in {out / 'data'}", file=sys.stderr)
    prepare(PrepareConfig(source="synthetic", out=out / "data", seed=cfg.seed, n_lists=cfg.n_lists, overwrite=True))
    print(f"[2/2] training the {cfg.model} initial ranker in {out / 'ranker'}", file=sys.stderr)
    result = train_ranker(TrainRankerConfig(data=out / "data", out=out / "ranker", model=cfg.model, seed=cfg.seed,
                                            overwrite=True, progress=cfg.progress))
    print(f"initial ranker on synthetic data (seed {cfg.seed}, {cfg.n_lists} lists)")
    print(ranker_table(result))


# (command words) -> (config dataclass, runner, help, positional fields). Subsystems keep their commands in
# their own `commands.py` (same shape) so that this file does not grow with every model family.
Command = tuple[type, Callable, str, tuple[str, ...]]
COMMANDS: dict[tuple[str, ...], Command] = {
    ("data", "prepare"): (PrepareConfig, run_prepare, "turn raw files into a prepared dataset", ("source",)),
    ("data", "stats"): (StatsConfig, run_stats, "print a prepared dataset's counts as JSON", ("data",)),
    ("train", "ranker"): (TrainRankerConfig, run_train_ranker, "train an initial ranker and write the re-ranking splits", ()),
    ("train", "reranker"): (TrainConfig, run_train_reranker, "train a re-ranker (optionally with the P1/P2 consistency losses)", ()),
    ("experiment", "principled"): (PrincipledExperimentConfig, run_experiment_principled,
                                   "re-rankers with and without the P1/P2 consistency losses, over seeds", ()),
    ("experiment", "last"): (LastExperimentConfig, run_experiment_last,
                             "LAST against generator greedy, best-of-K and a principled re-ranker, offline and in the "
                             "simulator; evaluator-quality and offset studies", ()),
    ("demo",): (DemoConfig, run_demo, "prepare synthetic data, train an initial ranker, print its metrics", ()),
    **SIM_COMMANDS,
    **LAST_COMMANDS,
    **RL_COMMANDS,
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relist", description="Re-ranking, learning at serving time and cascade RL.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"relist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    groups: dict[str, argparse._SubParsersAction] = {}
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for path, (cls, _, help_text, positional) in COMMANDS.items():
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=help_text, allow_abbrev=False)
        else:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=f"{path[0]} commands", allow_abbrev=False)
                groups[path[0]] = group.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=help_text, allow_abbrev=False)
        add_arguments(sub, cls, positional)
        sub.set_defaults(_path=path)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cls, run, _, _ = COMMANDS[args._path]
    sub = parser  # errors from config merging are reported against the command's own usage
    cfg = build(cls, args, sub)
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"relist: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
