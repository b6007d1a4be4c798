"""`relist experiment principled`: every model × {base, +P1, +P2, +P1+P2} × seeds, with a summary.

Writes ``results.csv`` (one row per model × variant × seed, every metric), ``summary.md`` (means with
their t interval over seeds only, the initial order's rows, and two comparison tables, each variant
against its model's base and every run against the initial order, with the two-level interval over seeds
and lists, its bootstrap p, Holm's adjustment, and the seeds-only t and Wilcoxon p for reference),
``metrics.png`` (bars with CIs, the y axis from zero or marked as broken) and ``obedience.png`` (P1
obedience on valid over training, one panel per model). With ``--sweep-model M`` it also runs the paper's
two open questions on M: the CS-loss weight and the perturbation strategy. ``--resume`` keeps finished runs
and continues an interrupted one.

The settings that decide the results (seeds, epochs, patience, selection criterion, weight average, λ1 and
λ2, perturbation, model sizes, the sweep's weights and perturbations) are options from
``relist.experiments.protocol``, so one protocol file (``--config configs/protocol.yaml``) fixes them for
this experiment and ``relist experiment last`` alike; their defaults are the paper's equal weights (λ = 1)
and adjacent swap, and the training defaults of ``relist train reranker``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from relist.batch import INITIAL_SCORE
from relist.config import option
from relist.data.store import PreparedDataset
from relist.experiments.plots import metric_axis, write_figures
from relist.experiments.protocol import LastStudy, PrincipledStudy, TrainingProtocol, model_settings
from relist.grid import run_tasks
from relist.io import atomic_save_tensors, atomic_write_csv, file_digest
from relist.metrics import list_metrics, logged_order_scores
from relist.rankers.train import TrainRankerConfig, train_ranker
from relist.rerankers import REGISTRY, reranker_class
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
from relist.tables import mean_cell, seeds_interval
from relist.train import TrainConfig, initial_order_metrics, train

log = logging.getLogger("relist")

VARIANTS = ("base", "+P1", "+P2", "+P1+P2")
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
    models: tuple[str, ...] = option(
        ("prm", "dlcm", "setrank", "midnn", "pear", "raise"),
        help="re-rankers to train",
        choices=tuple(sorted(REGISTRY)),
    )
    variants: tuple[str, ...] = option(
        VARIANTS,
        help="which of the paper's four variants to train (base is what the others are compared with)",
        choices=VARIANTS,
    )
    max_steps: int = option(0, help="cap on optimiser steps per run (0: none)")
    cross_fit: int = option(
        0,
        help="initial ranker: also train re-rankers on the ranker split's lists, scored out of "
        "fold by K rankers (relist train ranker --cross-fit; 0: off)",
    )
    device: str = option("cpu", help="cpu, cuda or auto")
    sweep_model: str = option(
        "", help="also sweep the CS weight and the perturbation on this model", choices=("", *sorted(REGISTRY))
    )
    overwrite: bool = option(False, help="replace OUT if it exists")
    resume: bool = option(False, help="keep the finished runs in OUT and continue an interrupted one")
    jobs: int = option(1, help="training runs at once, in local worker processes (each run one torch thread)")
    ray_address: str = option("", help="run the training runs on this Ray cluster instead (local: a local one)")
    progress: bool = option(True, help="show progress")
    protocol: TrainingProtocol = option(
        TrainingProtocol(), flatten=True, help="the settings both studies share (a protocol file's top level)"
    )
    principled: PrincipledStudy = option(
        PrincipledStudy(), flatten=True, help="this study's settings (a protocol file's principled: section)"
    )
    last: LastStudy = option(
        LastStudy(), help="experiment last's settings (a protocol file's last: section; not used by this command)"
    )


def variant_weights(protocol: TrainingProtocol) -> dict[str, tuple[float, float]]:
    """(λ1, λ2) of each variant: the paper's four, with the protocol's weights."""
    p1, p2 = protocol.p1_weight, protocol.p2_weight
    return {"base": (0.0, 0.0), "+P1": (p1, 0.0), "+P2": (0.0, p2), "+P1+P2": (p1, p2)}


def plan_runs(cfg: PrincipledExperimentConfig, data_dir: Path) -> list[tuple[str, str, int, Path, TrainConfig]]:
    """Every training run of the experiment: (model, variant, seed, run directory, its configuration)."""
    protocol, study = cfg.protocol, cfg.principled
    settings = model_settings(protocol.model_args)
    base = TrainConfig(
        data=data_dir,
        out=Path(cfg.out),
        epochs=study.epochs,
        max_steps=cfg.max_steps,
        batch_size=protocol.batch_size,
        learning_rate=protocol.learning_rate,
        patience=protocol.patience,
        ema_decay=protocol.ema_decay,
        select_metric=protocol.select_metric,
        perturbation=protocol.perturbation,
        cs_gradient=protocol.cs_gradient,
        device=cfg.device,
        use_user=protocol.use_user,
        progress=False,
        overwrite=not cfg.resume,
        resume=cfg.resume,
    )
    seeds = [protocol.seed + s for s in range(protocol.seeds)]
    weights = variant_weights(protocol)
    jobs = [
        (m, v, seed, {"p1_weight": weights[v][0], "p2_weight": weights[v][1]})
        for m in cfg.models
        for v in VARIANTS
        if v in cfg.variants
        for seed in seeds
    ]
    if cfg.sweep_model:
        for weight in study.sweep_weights:
            jobs += [
                (cfg.sweep_model, f"+P1+P2 λ={weight:g}", seed, {"p1_weight": weight, "p2_weight": weight})
                for seed in seeds
            ]
        for strategy in study.sweep_perturbations:
            jobs += [
                (cfg.sweep_model, f"+P2 {strategy}", seed, {"p2_weight": protocol.p2_weight, "perturbation": strategy})
                for seed in seeds
            ]
    runs = []
    for model, variant, seed, extra in jobs:
        run_dir = Path(cfg.out) / "runs" / model / _variant_dir(variant) / f"seed{seed}"
        run_cfg = replace(base, out=run_dir, model=model, seed=seed, model_args=settings.get(model, ""), **extra)
        runs.append((model, variant, seed, run_dir, run_cfg))
    return runs


def _variant_dir(variant: str) -> str:
    return variant.replace(" ", "_").replace("=", "")


def _same_ranker(ranker_dir: Path, cfg: PrincipledExperimentConfig) -> bool:
    """Whether ``ranker_dir`` holds a finished initial ranker trained with this experiment's settings."""
    metrics = ranker_dir / "metrics.json"
    if not (metrics.is_file() and (ranker_dir / "rerank" / "manifest.json").is_file()):
        return False
    saved = json.loads(metrics.read_text(encoding="utf-8")).get("config", {})
    wanted = (cfg.protocol.seed, cfg.cross_fit, str(cfg.data))
    return (saved.get("seed"), saved.get("cross_fit", 0), saved.get("data")) == wanted


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
                seed=cfg.protocol.seed,
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
    runs = plan_runs(cfg, data_dir)
    select_metric = cfg.protocol.select_metric
    # training: every run not finished yet, on the executor asked for (results do not depend on it)
    pending = [run_cfg for *_, run_dir, run_cfg in runs if not (cfg.resume and (run_dir / "metrics.json").is_file())]
    run_tasks(train_run, pending, jobs=cfg.jobs, ray_address=cfg.ray_address or None)
    rows, per_list = [], {}
    for model, variant, seed, run_dir, _ in tqdm(runs, desc="runs", disable=not cfg.progress or None):
        result = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        selected_on = result["config"].get("select_metric", "ndcg@10")
        if selected_on != select_metric:
            raise ValueError(
                f"{run_dir} was selected on {selected_on}, this experiment selects on "
                f"{select_metric}; run it again without --resume"
            )
        per_list.setdefault((model, variant), []).append(run_test_lists(run_dir, data))
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
    ties = random_tie_metrics(data, "test", seed=cfg.protocol.seed)
    summary = _summary(rows, initial, models, cfg, ties) + _comparisons(
        per_list, _test_lists(logged_order_scores, data)
    )
    (out / "summary.md").write_text(summary, encoding="utf-8")
    written = ["results.csv", "summary.md", *_plots(out, rows, initial, models)]
    return {"rows": rows, "initial_test": initial, "summary": summary, "written": written}


def train_run(run_cfg: TrainConfig) -> None:
    """One training run of the grid, which leaves its record (``run_test_lists``) as soon as it is done, so
    that an interrupted grid's finished runs need no weights either (a module-level function, so any
    executor can call it)."""
    train(run_cfg)
    run_test_lists(Path(run_cfg.out), PreparedDataset(run_cfg.data))


def run_test_lists(run_dir: Path, data: PreparedDataset) -> dict[str, np.ndarray]:
    """A finished run's ``_test_lists``, kept in its directory (``TEST_LISTS``) with the data's content hash
    and its metrics.json's digest, so that a summary reads them back rather than loading the weights and
    scoring the test lists again: a run's record (metrics.json, history.jsonl and this file, tens to hundreds
    of kB) is all ``--resume`` needs, and results can be kept without their weights. A record of other data,
    or of an earlier run in the same directory, is computed again from the weights."""
    path = run_dir / TEST_LISTS
    metrics_sha256 = file_digest(run_dir / "metrics.json")
    stamp = {"data_content_hash": data.manifest["content_hash"], "metrics_sha256": metrics_sha256}
    kept = {}
    if path.is_file():
        with safe_open(str(path), framework="np") as saved:
            kept = saved.metadata() or {}
            if kept == stamp:
                return {m: saved.get_tensor(m) for m in COMPARED}
    if not (run_dir / "best").is_dir():  # a record without weights cannot be scored again
        raise ValueError(
            f"{run_dir}: its record is of other data (content hash {kept.get('data_content_hash', '?')[:12]}, "
            f"the data's {stamp['data_content_hash'][:12]}) or of another run, and there are no weights to "
            "score the test lists with; remove the run's folder, or pass the data it was trained on"
        )
    lists = _test_lists(load_reranker(run_dir / "best").score, data)
    atomic_save_tensors({m: torch.from_numpy(v) for m, v in lists.items()}, path, metadata=stamp)
    return lists


def _test_lists(score_fn, data: PreparedDataset) -> dict[str, np.ndarray]:
    """NDCG@10 and MAP@10 of every test list, in the store's order."""
    per, _, _ = list_metrics(score_fn, data.batches("test", 512), ks=(10,))
    return {k: per[k].numpy() for k in ("ndcg@10", "map@10")}


COMPARED = ("ndcg@10", "map@10")
TEST_LISTS = "test_lists.safetensors"


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
    floor = wilcoxon_seeds(np.ones(seeds), np.zeros(seeds))["p"]  # every seed in favour: the smallest p
    lines = [
        "",
        f"## {title}",
        "",
        f"{note} Δ: mean difference with its 95% CI {SEEDS_AND_LISTS} (two-level paired bootstrap: {seeds} "
        f"seed(s) and the same {lists} test lists, resampled independently); p: its two-sided bootstrap p; "
        f"Holm: p adjusted over the {len(results)} comparisons of this table; t p: paired t-test "
        f"{SEEDS_ONLY}; Wilcoxon: exact signed-rank p over seeds (seeds in favour / seeds; with {seeds} "
        f"seed{'s' * (seeds != 1)} its smallest possible p is {floor:.3g}).",
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
    seeds = len({r["seed"] for r in rows})
    protocol = cfg.protocol
    lines = [
        f"# Principled learning: {', '.join(models)}",
        "",
        f"Test metrics, {seeds_interval(seeds, SEEDS_ONLY)}; Δ% against the same model's base (its interval and "
        f"tests over seeds and lists are in the tables below). λ1 = {protocol.p1_weight:g} (+P1), λ2 = "
        f"{protocol.p2_weight:g} (+P2, perturbation {protocol.perturbation}). Checkpoints are selected on valid "
        f"by {protocol.select_metric}; the selection criterion (listwise cross-entropy) and the weight average "
        "were chosen on MIND with test results in view (docs/principled_mind.md).",
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
                cell = mean_cell(values)
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


def metrics_figure(rows: list[dict], initial: dict, models: list[str]):
    """Bars of test NDCG@10 and MAP@10 per model and variant with their t intervals over seeds, the initial
    ranker as a dashed line; the y axis from zero or visibly broken (``relist.experiments.plots``)."""
    import matplotlib.pyplot as plt

    seeds = len({r["seed"] for r in rows})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(variants)
    for ax, metric in zip(axes, ("ndcg@10", "map@10")):
        tops, bottoms = [initial[metric]], [initial[metric]]
        for k, variant in enumerate(variants):
            groups = [_group(rows, m, variant, f"test_{metric}") for m in models]
            means = np.array([np.mean(g) if g else np.nan for g in groups])
            cis = np.nan_to_num([t_ci95(g) if len(g) > 1 else 0.0 for g in groups])
            ax.bar(np.arange(len(models)) + k * width, means, width, yerr=cis, label=variant, capsize=2)
            tops += list(means + cis)
            bottoms += list(means - cis)
        ax.axhline(initial[metric], color="black", linestyle="--", label="initial ranker")
        ax.set_xticks(np.arange(len(models)) + (len(variants) - 1) * width / 2, models)
        ax.set_title(f"test {metric} ({seeds_interval(seeds, 'over seeds')})", fontsize=9)
        metric_axis(ax, tops, bottoms, label=metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def obedience_figure(out: Path, rows: list[dict], models: list[str]):
    """P1 obedience on valid over training, one panel per model, the four variants in one colour each (the
    same in every panel), of the first seed; None when no run has a history."""
    import matplotlib.pyplot as plt

    first = min(r["seed"] for r in rows)
    curves = {}
    for model in models:
        for variant in VARIANTS:
            path = out / "runs" / model / _variant_dir(variant) / f"seed{first}" / "history.jsonl"
            if path.is_file():
                history = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
                curves[(model, variant)] = ([h["step"] for h in history],
                                            [h["valid"]["obedience_p1@full"] for h in history])  # fmt: skip
    shown = [m for m in models if any((m, v) in curves for v in VARIANTS)]
    if not shown:
        return None
    columns = min(3, len(shown))
    lines = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), sharey=True, squeeze=False)
    styles = {"base": ":", "+P1": "-", "+P2": "--", "+P1+P2": "-"}
    for ax, model in zip(axes.flat, shown):
        for k, variant in enumerate(VARIANTS):
            if (model, variant) in curves:
                steps, values = curves[(model, variant)]
                ax.plot(steps, values, label=variant, color=f"C{k}", linestyle=styles[variant], lw=1.6, marker=".")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("P1 obedience (valid, full list)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"seed {first}", x=0.99, ha="right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def _plots(out: Path, rows: list[dict], initial: dict, models: list[str]) -> list[str]:
    """metrics.png and obedience.png; returns the names of the files written."""
    return write_figures(
        out,
        {
            "metrics.png": lambda: metrics_figure(rows, initial, models),
            "obedience.png": lambda: obedience_figure(out, rows, models),
        },
        dpi=120,
    )
