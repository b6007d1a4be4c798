"""`relist experiment principled`: every model × {base, +P1, +P2, +P1+P2} × seeds, with a summary.

Writes ``results.csv`` (one row per model × variant × seed, every metric), ``summary.md`` (means with
their t interval over seeds only, the initial order's rows, and two comparison tables, each variant
against its model's base and every run against the initial order, with the two-level interval over seeds
and lists, its bootstrap p, Holm's adjustment, and the seeds-only t and Wilcoxon p for reference),
``metrics.png`` (bars with CIs) and ``obedience.png`` (P1 obedience on valid over training). With
``--sweep-model M`` it also runs the paper's two open questions on M: the CS-loss weight and the
perturbation strategy. ``--resume`` keeps finished runs and continues an interrupted one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from relist.batch import INITIAL_SCORE
from relist.config import option
from relist.data.store import PreparedDataset
from relist.grid import run_tasks
from relist.io import atomic_write_csv
from relist.metrics import list_metrics, logged_order_scores
from relist.principled import PERTURBATIONS
from relist.rankers.train import TrainRankerConfig, train_ranker
from relist.rerankers import reranker_class
from relist.rerankers.base import load_reranker
from relist.stats import (
    SEEDS_AND_LISTS,
    SEEDS_ONLY,
    crossed_bootstrap,
    format_interval,
    format_p,
    holm,
    seeds_only_t,
    t_ci95,
    wilcoxon_seeds,
)
from relist.train import TrainConfig, initial_order_metrics, train

log = logging.getLogger("relist")

VARIANTS = {"base": (0.0, 0.0), "+P1": (1.0, 0.0), "+P2": (0.0, 1.0), "+P1+P2": (1.0, 1.0)}
REPORTED = ("ndcg@5", "ndcg@10", "map@5", "map@10", "p@5", "auc")
OBEDIENCE = ("obedience_p1@10", "obedience_p2@10")


@dataclass
class PrincipledExperimentConfig:
    data: Path = option(
        help="prepared dataset: a re-ranking dataset (with init_score, or without a ranker split, e.g. "
        "LibRerank's files: the input order is the initial order), or lists with a ranker split, "
        "for which a LambdaMART initial ranker is trained first into OUT/ranker"
    )
    out: Path = option(help="output directory")
    models: tuple[str, ...] = option(("prm", "dlcm", "setrank", "midnn", "pear", "raise"), help="re-rankers to train")
    seeds: int = option(5, help="seeds per model and variant")
    seed: int = option(0, help="first seed (runs use seed, seed+1, ...)")
    epochs: int = option(30, help="maximum epochs per run")
    max_steps: int = option(0, help="cap on optimiser steps per run (0: none)")
    batch_size: int = option(128, help="lists per step")
    learning_rate: float = option(1e-3, help="Adam learning rate")
    patience: int = option(5, help="validations without improvement before stopping")
    cross_fit: int = option(
        0,
        help="initial ranker: also train re-rankers on the ranker split's lists, scored out of "
        "fold by K rankers (relist train ranker --cross-fit; 0: off)",
    )
    ema_decay: float = option(0.95, help="decay per step of the weight average that is validated and kept (0: none)")
    device: str = option("cpu", help="cpu, cuda or auto")
    use_user: bool = option(True, help="personalised re-ranking")
    sweep_model: str = option("", help="also sweep the CS weight and the perturbation on this model")
    overwrite: bool = option(False, help="replace OUT if it exists")
    resume: bool = option(False, help="keep the finished runs in OUT and continue an interrupted one")
    jobs: int = option(1, help="training runs at once, in local worker processes (each run one torch thread)")
    ray_address: str = option("", help="run the training runs on this Ray cluster instead (local: a local one)")
    progress: bool = option(True, help="show progress")


def _same_ranker(ranker_dir: Path, cfg: PrincipledExperimentConfig) -> bool:
    """Whether ``ranker_dir`` holds a finished initial ranker trained with this experiment's settings."""
    metrics = ranker_dir / "metrics.json"
    if not (metrics.is_file() and (ranker_dir / "rerank" / "manifest.json").is_file()):
        return False
    saved = json.loads(metrics.read_text(encoding="utf-8")).get("config", {})
    return (saved.get("seed"), saved.get("cross_fit", 0), saved.get("data")) == (cfg.seed, cfg.cross_fit, str(cfg.data))


def _rerank_data(cfg: PrincipledExperimentConfig) -> Path:
    data = PreparedDataset(cfg.data)
    if INITIAL_SCORE in data.schema.item_dense or len(data.splits.get("ranker", ())) == 0:
        # already in initial-ranker order (a rerank/ folder, or LibRerank's files, whose input order is theirs)
        return Path(cfg.data)

    ranker_dir = Path(cfg.out) / "ranker"
    if not _same_ranker(ranker_dir, cfg):
        log.info("training the LambdaMART initial ranker into %s", ranker_dir)
        train_ranker(
            TrainRankerConfig(
                data=cfg.data,
                out=ranker_dir,
                model="lambdamart",
                seed=cfg.seed,
                cross_fit=cfg.cross_fit,
                overwrite=True,
                progress=False,
            )
        )
    return ranker_dir / "rerank"


def run_experiment(cfg: PrincipledExperimentConfig) -> dict:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it or --resume to continue)")
    models = list(cfg.models)

    for name in models + ([cfg.sweep_model] if cfg.sweep_model else []):
        reranker_class(name)  # unknown names fail before any work
    out.mkdir(parents=True, exist_ok=True)
    data_dir = _rerank_data(cfg)
    data = PreparedDataset(data_dir)
    base = TrainConfig(
        data=data_dir,
        out=out,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        patience=cfg.patience,
        ema_decay=cfg.ema_decay,
        device=cfg.device,
        use_user=cfg.use_user,
        progress=False,
        overwrite=not cfg.resume,
        resume=cfg.resume,
    )
    jobs = [
        (m, v, cfg.seed + s, {"p1_weight": VARIANTS[v][0], "p2_weight": VARIANTS[v][1]})
        for m in models
        for v in VARIANTS
        for s in range(cfg.seeds)
    ]
    if cfg.sweep_model:
        for weight in (0.1, 0.3, 3.0):
            jobs += [
                (cfg.sweep_model, f"+P1+P2 λ={weight:g}", cfg.seed + s, {"p1_weight": weight, "p2_weight": weight})
                for s in range(cfg.seeds)
            ]
        for strategy in PERTURBATIONS[1:]:
            jobs += [
                (cfg.sweep_model, f"+P2 {strategy}", cfg.seed + s, {"p2_weight": 1.0, "perturbation": strategy})
                for s in range(cfg.seeds)
            ]
    runs = []
    for model, variant, seed, extra in jobs:
        run_dir = out / "runs" / model / variant.replace(" ", "_").replace("=", "") / f"seed{seed}"
        runs.append((model, variant, seed, run_dir, replace(base, out=run_dir, model=model, seed=seed, **extra)))
    # training: every run not finished yet, on the executor asked for (results do not depend on it)
    pending = [run_cfg for *_, run_dir, run_cfg in runs if not (cfg.resume and (run_dir / "metrics.json").is_file())]
    run_tasks(train_run, pending, jobs=cfg.jobs, ray_address=cfg.ray_address or None)
    rows, per_list = [], {}
    for model, variant, seed, run_dir, _ in tqdm(runs, desc="runs", disable=not cfg.progress or None):
        result = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        selected_on = result["config"].get("select_metric", "ndcg@10")
        if selected_on != base.select_metric:
            raise ValueError(
                f"{run_dir} was selected on {selected_on}, this experiment selects on "
                f"{base.select_metric}; run it again without --resume"
            )
        per_list.setdefault((model, variant), []).append(_test_lists(load_reranker(run_dir / "best").score, data))
        row = {
            "model": model,
            "variant": variant,
            "seed": seed,
            "best_step": result["best_step"],
            "train_seconds": round(result["train_seconds"], 2),
        }
        row.update({f"test_{k}": v for k, v in result["test"].items()})
        row.update({f"valid_{k}": v for k, v in result["valid"].items()})
        row.update({f"test_{k}": v for k, v in result["obedience_test"].items()})
        rows.append(row)
        atomic_write_csv(out / "results.csv", rows)
    initial = initial_order_metrics(data, "test")
    ties = random_tie_metrics(data, "test", seed=cfg.seed)
    summary = _summary(rows, initial, models, cfg, ties) + _comparisons(
        per_list, _test_lists(logged_order_scores, data)
    )
    (out / "summary.md").write_text(summary, encoding="utf-8")
    _plots(out, rows, initial, models)
    return {"rows": rows, "initial_test": initial, "summary": summary}


def train_run(run_cfg: TrainConfig) -> None:
    """One training run of the grid (a module-level function, so any executor can call it)."""
    train(run_cfg)


def _test_lists(score_fn, data: PreparedDataset) -> dict[str, np.ndarray]:
    """NDCG@10 and MAP@10 of every test list, in the store's order."""
    per, _, _ = list_metrics(score_fn, data.batches("test", 512), ks=(10,))
    return {k: per[k].numpy() for k in ("ndcg@10", "map@10")}


COMPARED = ("ndcg@10", "map@10")


def _comparison_table(title: str, pairs: list[tuple[str, str, np.ndarray, np.ndarray]], note: str) -> str:
    """One table of arms against their references: per pair (model, variant, (S, N) arm, (S, N) reference)
    the difference of the mean with its two-level bootstrap CI over seeds and lists and p, Holm's
    adjustment over every p of the table, the seeds-only t p and the Wilcoxon p over seeds."""
    results = []
    for model, variant, arm, reference in pairs:
        for metric in COMPARED:
            two = crossed_bootstrap(arm[metric], reference[metric])
            per_seed_arm, per_seed_ref = arm[metric].mean(1), reference[metric].mean(1)
            results.append((model, variant, metric, two, seeds_only_t(per_seed_arm, per_seed_ref),
                            wilcoxon_seeds(per_seed_arm, per_seed_ref)))  # fmt: skip
    adjusted = holm([r[3]["p"] for r in results])
    seeds = pairs[0][2][COMPARED[0]].shape[0] if pairs else 0
    lists = pairs[0][2][COMPARED[0]].shape[1] if pairs else 0
    lines = [
        "",
        f"## {title}",
        "",
        f"{note} Δ: mean difference with its 95% CI {SEEDS_AND_LISTS} (two-level paired bootstrap: {seeds} "
        f"seed(s) and the same {lists} test lists, resampled independently); p: its two-sided bootstrap p; "
        f"Holm: p adjusted over the {len(results)} comparisons of this table; t p: paired t-test "
        f"{SEEDS_ONLY}; Wilcoxon: exact signed-rank p over seeds (seeds in favour / seeds; with 5 seeds its "
        "smallest possible p is 0.0625).",
        "",
        "| model | variant | metric | Δ [95% CI] | p | Holm | t p | Wilcoxon |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, variant, metric, two, t, wil), holm_p in zip(results, adjusted):
        t_p = "-" if np.isnan(t["p"]) else f"{t['p']:.2g}"
        lines.append(
            f"| {model} | {variant} | {metric} | {format_interval(two)} | {format_p(two['p'], two['resamples'])} | "
            f"{format_p(holm_p, two['resamples'])} | {t_p} | "
            f"{wil['p']:.3g} ({wil['favour']}/{wil['n']}) |"
        )
    real = [r for r, h in zip(results, adjusted) if h < 0.05]
    lines += ["", f"Differences whose Holm-adjusted p is below 0.05: {len(real)} of {len(results)}."]
    return "\n".join(lines) + "\n"


def _comparisons(per_list: dict, initial: dict[str, np.ndarray]) -> str:
    """Every variant against its model's base, and every run against the initial order, on the same lists."""
    stacked = {key: {m: np.stack([run[m] for run in runs]) for m in COMPARED} for key, runs in per_list.items()}
    against_base = [
        (model, variant, arm, stacked[(model, "base")])
        for (model, variant), arm in stacked.items()
        if variant != "base" and (model, "base") in stacked
        and stacked[(model, "base")][COMPARED[0]].shape == arm[COMPARED[0]].shape
    ]  # fmt: skip
    against_initial = [
        (model, variant, arm, {m: np.broadcast_to(initial[m], arm[m].shape) for m in COMPARED})
        for (model, variant), arm in stacked.items()
    ]
    return _comparison_table(
        "Principles against the same model's base",
        against_base,
        "Each variant minus its model's base, seed by seed, on the same test lists.",
    ) + _comparison_table(
        "Against the initial ranker",
        against_initial,
        "Each row minus the initial order on the same test lists (the initial order has no seed variance).",
    )


def _group(rows, model, variant, key) -> list[float]:
    return [r[key] for r in sorted(rows, key=lambda r: r["seed"]) if r["model"] == model and r["variant"] == variant]


TIE_DRAWS = 50


def random_tie_scores(initial: Tensor, mask: Tensor, generator: torch.Generator) -> Tensor:
    """Scores (B, L) that rank each list by ``initial``, descending, with equal scores in random order:
    a stable sort by score of a random permutation of the items."""
    shuffle = torch.argsort(torch.rand(mask.shape, generator=generator), dim=1)
    shuffled = initial.masked_fill(~mask, float("-inf")).gather(1, shuffle)
    ranked = shuffle.gather(1, torch.argsort(shuffled, dim=1, descending=True, stable=True))
    positions = torch.arange(mask.shape[1], dtype=torch.float32).expand(mask.shape)
    return torch.empty(mask.shape).scatter_(1, ranked, -positions)


def random_tie_metrics(
    data: PreparedDataset, split: str, draws: int = TIE_DRAWS, seed: int = 0
) -> dict[str, tuple[float, float]] | None:
    """The initial ranker's metrics on ``split`` with tied initial scores put in random order: metric ->
    (mean, standard deviation) over ``draws`` draws; None without an ``init_score`` feature.

    A ranker that gives many items the same score (LambdaMART on items with identical features) leaves
    their order to the input's tie-break; any re-ranker breaks those ties its own way, which moves
    NDCG@10 by about as much as re-ranking gains on MIND's few hundred test lists."""
    if INITIAL_SCORE not in data.schema.item_dense:
        return None
    if draws < 2:
        raise ValueError(f"draws must be at least 2 for a standard deviation, got {draws}")
    column = data.schema.item_dense.index(INITIAL_SCORE)
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {}
    for _ in range(draws):
        scores = lambda batch: random_tie_scores(batch.item_dense[..., column], batch.mask, generator)  # noqa: E731
        per_list, _, _ = list_metrics(scores, data.batches(split, 1024), ks=(5, 10))
        for name, per in per_list.items():
            values.setdefault(name, []).append(float(per.nanmean()))
    return {name: (float(np.mean(v)), float(np.std(v, ddof=1))) for name, v in values.items()}


def _summary(
    rows: list[dict],
    initial: dict,
    models: list[str],
    cfg: PrincipledExperimentConfig,
    ties: dict[str, tuple[float, float]] | None = None,
) -> str:
    seeds = cfg.seeds
    lines = [
        f"# Principled learning: {', '.join(models)}",
        "",
        (
            "Test metrics of 1 seed, no interval; "
            if seeds == 1
            else f"Test metrics, mean ± 95% t interval {SEEDS_ONLY}, {seeds} seeds; "
        )
        + "Δ% against the same "
        "model's base (its interval and tests over seeds and lists are in the tables below). Checkpoints are "
        "selected on valid; the selection criterion (listwise cross-entropy) and the weight average were "
        "chosen on MIND with test results in view (docs/principled_mind.md).",
        "",
    ]
    head = "| model | variant | " + " | ".join(REPORTED + OBEDIENCE) + " |"
    lines += [head, "|" + "---|" * (2 + len(REPORTED) + len(OBEDIENCE))]
    lines.append(
        "| initial ranker | (input order) | "
        + " | ".join(f"{initial[m]:.4f}" if m in initial else "-" for m in REPORTED)
        + " | - | - |"
    )
    if ties:
        lines.append(
            f"| initial ranker | ties in random order (mean ± sd, {TIE_DRAWS} draws) | "
            + " | ".join(f"{ties[m][0]:.4f} ± {ties[m][1]:.4f}" if m in ties else "-" for m in REPORTED)
            + " | - | - |"
        )
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for model in dict.fromkeys(r["model"] for r in rows):
        for variant in variants:
            if not _group(rows, model, variant, "seed"):
                continue
            cells = []
            for metric in REPORTED + OBEDIENCE:
                values = _group(rows, model, variant, f"test_{metric}")
                cell = f"{np.mean(values):.4f} ± {t_ci95(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"
                if variant != "base" and metric in REPORTED:
                    base = _group(rows, model, "base", f"test_{metric}")
                    if base:
                        change = 100 * (np.mean(values) - np.mean(base)) / max(abs(np.mean(base)), 1e-12)
                        cell += f" ({change:+.2f}%)"
                cells.append(cell)
            lines.append(f"| {model} | {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Against the initial ranker (test NDCG@10 / MAP@10, mean over seeds):", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        for variant in variants:
            nd, mp = _group(rows, model, variant, "test_ndcg@10"), _group(rows, model, variant, "test_map@10")
            if nd:
                verdict = (
                    "beats" if np.mean(nd) > initial["ndcg@10"] and np.mean(mp) > initial["map@10"] else "does NOT beat"
                )
                line = (
                    f"- {model} {variant}: {np.mean(nd):.4f} / {np.mean(mp):.4f} vs "
                    f"{initial['ndcg@10']:.4f} / {initial['map@10']:.4f}: {verdict} the initial ranker"
                )
                if ties:
                    above = np.mean(nd) > ties["ndcg@10"][0] and np.mean(mp) > ties["map@10"][0]
                    line += f"; {'above' if above else 'NOT above'} its random-tie mean"
                lines.append(line)
    return "\n".join(lines) + "\n"


def _plots(out: Path, rows: list[dict], initial: dict, models: list[str]) -> None:
    import matplotlib  # imported only when plotting: it costs a second of start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(VARIANTS)
    for ax, metric in zip(axes, ("ndcg@10", "map@10")):
        for k, variant in enumerate(VARIANTS):
            means = [np.mean(_group(rows, m, variant, f"test_{metric}") or [np.nan]) for m in models]
            cis = [t_ci95(_group(rows, m, variant, f"test_{metric}")) for m in models]
            ax.bar(np.arange(len(models)) + k * width, means, width, yerr=np.nan_to_num(cis), label=variant, capsize=2)
        ax.axhline(initial[metric], color="black", linestyle="--", label="initial ranker")
        ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models)
        ax.set_title(f"test {metric}")
        low = min(initial[metric], *[r[f"test_{metric}"] for r in rows])
        ax.set_ylim(low * 0.97, None)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for model in models:
        for variant in VARIANTS:
            path = (
                out
                / "runs"
                / model
                / variant.replace(" ", "_")
                / f"seed{min(r['seed'] for r in rows)}"
                / "history.jsonl"
            )
            if path.is_file():
                history = [json.loads(x) for x in path.read_text().splitlines()]
                ax.plot(
                    [h["step"] for h in history],
                    [h["valid"]["obedience_p1@full"] for h in history],
                    label=f"{model} {variant}",
                    linestyle="-" if "P1" in variant else ":",
                )
    ax.set_xlabel("step")
    ax.set_ylabel("P1 obedience (valid, full list)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "obedience.png", dpi=120)
    plt.close(fig)
