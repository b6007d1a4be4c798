"""`relist experiment last`: LAST against its baselines offline and in the simulator, and the paper's open questions.

Per seed: an evaluator, a generator and a principled re-ranker (``--principled-model`` with P1+P2) are
trained on the re-ranking data; then
- offline, on the test lists: NDCG/MAP on the labels and the mean evaluator score (the seed's own
  evaluator, which LAST also selects with) of the initial order, the re-ranker, generator greedy,
  best-of-K sampling (K pure samples + greedy, picked by the evaluator), LAST parallel, LAST serial, and
  LAST parallel with oracle selection (picks by test labels; for analysis only, labelled as such);
- online, through the A/B harness on the simulator (a different model family from the evaluator): every
  method behind the same initial ranker, same users and random numbers; clicks per request and per user
  with paired CIs over (seed, user) units, lifts against generator greedy;
- evaluator quality: evaluators trained on fractions of the train lists and the full one with Gaussian
  noise on its logits; LAST's lift over greedy (offline NDCG@10, the full evaluator's score as judge, and
  simulator clicks per request) against each evaluator's test AUC;
- offsets: activations vs pointer layers vs decoder vs all weights, and step-size lists (offline).
- delayed feedback: LAST against classic online learning, a copy of the generator fine-tuned on the clicks
  its own lists got, arriving ``D`` requests later (``--delays``), on the same simulated traffic.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relist.batch import rank, without_initial_score
from relist.config import option
from relist.data.store import PreparedDataset
from relist.last import OFFICIAL_STEPS, Last, LastConfig
from relist.metrics import group_auc, per_list_metrics
from relist.rankers.train import TrainRankerConfig, train_ranker
from relist.rerankers import load_reranker
from relist.rerankers.evaluator import load_evaluator
from relist.runtime import resolve_device
from relist.sim.abtest import markdown, simulate, summarise
from relist.sim.policies import LastStage, PolicyContext, RerankPolicy, _load_ranker, score_order
from relist.sim.store import load_simulator
from relist.stats import (
    SEEDS_AND_LISTS,
    SEEDS_AND_USERS,
    SEEDS_ONLY,
    crossed_bootstrap,
    format_interval,
    format_p,
    holm,
    nested_bootstrap,
    t_ci95,
)
from relist.train import (
    TrainConfig,
    TrainEvaluatorConfig,
    TrainGeneratorConfig,
    train,
    train_evaluator,
    train_generator,
)

log = logging.getLogger("relist")
OFFLINE = ("ndcg@5", "ndcg@10", "map@5", "map@10", "sim_clicks", "evaluator")
# the judges of the offline comparisons: test labels and the simulator's click model; never "evaluator",
# the score LAST selects its candidate by (greedy is one of the candidates, so LAST >= greedy there always)
JUDGED = ("ndcg@10", "sim_clicks")


@dataclass
class LastExperimentConfig:
    data: Path = option(
        help="prepared dataset with a ranker split (a LambdaMART initial ranker is trained into "
        "OUT/ranker) — or pass --ranker"
    )
    sim: Path = option(help="simulator directory (`relist sim train` on the same prepared dataset)")
    out: Path = option(help="output directory: results.csv, summary.md, online.md, plots, runs/")
    ranker: Path | None = option(None, help="a `relist train ranker` output to use instead of training one")
    seeds: int = option(5, help="seeds (models and simulated users)")
    seed: int = option(0, help="first seed")
    users: int = option(1000, help="simulated users per seed and policy")
    epochs: int = option(30, help="maximum epochs of each training run")
    principled_model: str = option("prm", help="the re-ranker trained with P1+P2 as the principled baseline")
    fractions: tuple[float, ...] = option((0.01, 0.1, 1.0), help="evaluator-quality sweep: shares of the train lists")
    noise: tuple[float, ...] = option(
        (0.5, 1.0, 2.0), help="evaluator-quality sweep: std of Gaussian noise on the full evaluator's logits"
    )
    delays: tuple[int, ...] = option(
        (0, 500, 2000),
        help="delayed-feedback study: delays D (requests) before a list's clicks reach the online learner",
    )
    sweep_seeds: int = option(
        0, help="run the evaluator-quality and offset studies on the first N seeds (0: all, -1: none)"
    )
    device: str = option("cpu", help="cpu, cuda or auto")
    threads: int = option(1, help="torch threads")
    overwrite: bool = option(False, help="replace OUT if it exists")


class NoisyEvaluator:
    """An evaluator made worse on purpose: N(0, std²) noise added to every logit it gives."""

    def __init__(self, evaluator, std: float, seed: int):
        self.evaluator, self.std = evaluator, std
        self.noise = torch.Generator().manual_seed(seed)

    def eval(self):
        return self

    def logits(self, batch):
        with torch.no_grad():
            logits = self.evaluator(batch)
        return logits + self.std * torch.randn(logits.shape, generator=self.noise).to(logits.device)

    def click_probability(self, batch):
        return torch.sigmoid(self.logits(batch)).masked_fill(~batch.mask, 0.0)


class DelayedFeedbackLearner:
    """Classic online learning, the alternative LAST avoids: serve the generator's greedy list, and fine-tune the
    generator on the clicks those lists got once ``delay`` more requests have been served.

    The feedback is drawn from the simulator's own click model on the list shown (top ``slate_size``), with
    this learner's random numbers; each update is one Adam step of the generator's own loss (reward-weighted
    cross-entropy, NDCG reward) on a batch of lists labelled with their clicks. The learner works on a copy:
    the generator passed in is not changed. It is the second stage of a ``RerankPolicy``: called with the
    initial ranker's top list (``init_score`` appended as the last dense feature), it returns the order served.
    """

    def __init__(self, generator, simulator, delay: int, seed: int, learning_rate: float = 1e-3):
        self.generator = copy.deepcopy(generator).train()
        self.simulator, self.delay = simulator, delay
        self.optimiser = torch.optim.Adam(self.generator.parameters(), lr=learning_rate)
        self.noise = torch.Generator().manual_seed(seed)
        self.pending: list[tuple[int, object]] = []  # (requests served when it was logged, labelled lists)
        self.served = 0
        self.updates = 0

    def __call__(self, top):
        with torch.no_grad():
            order, _ = self.generator.decode(top)
            shown = top.reorder(order)
            pool_view = without_initial_score(shown).truncate(self.simulator.slate_size)
            prob = self.simulator.response.respond(pool_view).prob
            clicks = (torch.rand(prob.shape, generator=self.noise).to(prob.device) < prob) & pool_view.mask
            label = torch.zeros_like(top.label)
            label.scatter_(1, order[:, : clicks.shape[1]], clicks.float())  # back to the items' columns
        self.served += top.size
        self.pending.append((self.served, dataclasses.replace(top, label=label)))
        while self.pending and self.pending[0][0] + self.delay <= self.served:
            _, logged = self.pending.pop(0)
            with torch.enable_grad():
                loss = self.generator.loss(logged)["loss"]
                self.optimiser.zero_grad(set_to_none=True)
                loss.backward()
                self.optimiser.step()
            self.updates += 1
        return order


def _ranker_dir(cfg: LastExperimentConfig) -> Path:
    if cfg.ranker is not None:
        return Path(cfg.ranker)

    ranker_dir = Path(cfg.out) / "ranker"
    if not (ranker_dir / "rerank" / "manifest.json").is_file():
        train_ranker(
            TrainRankerConfig(
                data=cfg.data, out=ranker_dir, model="lambdamart", seed=cfg.seed, overwrite=True, progress=False
            )
        )
    return ranker_dir


def offline(scores: torch.Tensor, batch, judge, simulator) -> dict[str, np.ndarray]:
    """Per test list, for the order ``scores`` give: NDCG/MAP on the labels, the simulator's expected
    clicks of its first ``slate_size`` items (``sim_clicks``: the simulator's click model, not the labels)
    and ``judge``'s mean click probability (``evaluator``: for LAST its own selector)."""
    metrics = per_list_metrics(scores.double(), batch.label.double(), batch.mask, ks=(5, 10))
    out = {k: metrics[k].cpu().numpy() for k in OFFLINE if k in metrics}
    shown = batch.reorder(rank(scores, batch.mask))
    with torch.no_grad():
        prob = judge.click_probability(shown)
        clicks = simulator.response.respond(without_initial_score(shown).truncate(simulator.slate_size)).prob
    out["evaluator"] = (prob.sum(1) / batch.lengths).cpu().numpy()
    out["sim_clicks"] = clicks.sum(1).cpu().numpy()
    return out


def means(per_list: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in per_list.items()}


def evaluator_auc(evaluator, batch) -> float:
    with torch.no_grad():
        logits = evaluator.logits(batch) if isinstance(evaluator, NoisyEvaluator) else evaluator(batch)
    return group_auc(logits, batch.label, batch.mask)


def run_experiment(cfg: LastExperimentConfig) -> dict:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ranker_dir = _ranker_dir(cfg)
    data_dir = ranker_dir / "rerank"
    data = PreparedDataset(data_dir)
    list_len = int(data.manifest["info"]["list_len"])
    test = data.batch(data.split("test"))
    sim = load_simulator(cfg.sim, device)
    fractions, noises = list(cfg.fractions), list(cfg.noise)
    k = len(OFFICIAL_STEPS)
    methods = {  # name -> LastConfig (None: not a generator method)
        "generator greedy": LastConfig(steps=()),
        f"best-of-{k} sampling": LastConfig(steps=(0.0,) * k),
        "LAST parallel": LastConfig(),
        "LAST serial": LastConfig(mode="serial", serial_steps=k),
    }
    oracle = LastConfig(select="oracle")
    delays = list(cfg.delays)
    rows, online_units, seeds, delayed_units, delayed_seeds, offline_lists = [], {}, [], {}, [], {}
    for s in range(cfg.seeds):
        seed = cfg.seed + s
        seeds.append(seed)
        run = out / "runs" / f"seed{seed}"
        common = dict(data=data_dir, seed=seed, epochs=cfg.epochs, device=cfg.device, overwrite=True, progress=False)
        train_evaluator(TrainEvaluatorConfig(out=run / "evaluator", **common))
        train_generator(TrainGeneratorConfig(out=run / "generator", **common))
        train(
            TrainConfig(
                out=run / cfg.principled_model, model=cfg.principled_model, p1_weight=1.0, p2_weight=1.0, **common
            )
        )
        evaluator = load_evaluator(run / "evaluator").to(device)
        generator = load_reranker(run / "generator" / "best").to(device)
        principled = load_reranker(run / cfg.principled_model / "best").to(device).eval()
        batch = test.to(device)

        def record(study: str, method: str, values: dict) -> None:
            if study == "offline":
                offline_lists.setdefault(method, []).append(values)
                values = means(values)
            rows.append({"seed": seed, "study": study, "method": method, **values})

        identity = -torch.arange(batch.list_len, dtype=torch.float32, device=device).expand(batch.size, -1)
        record("offline", "initial order", offline(identity, batch, evaluator, sim))
        record("offline", f"{cfg.principled_model} +P1+P2", offline(principled.score(batch), batch, evaluator, sim))
        for name, config in methods.items():
            result = Last(generator, evaluator, config)(batch, torch.Generator().manual_seed(seed))
            record("offline", name, offline(result.scores, batch, evaluator, sim))
        result = Last(generator, evaluator, oracle)(batch, torch.Generator().manual_seed(seed))
        record("offline", oracle.label, offline(result.scores, batch, evaluator, sim))

        # online: every method behind the same initial ranker, the same users and random numbers
        ctx = PolicyContext(seed=seed, device=device, simulator=sim)
        ranker = _load_ranker(str(ranker_dir), ctx)
        policies = {
            name: RerankPolicy(ranker, LastStage(Last(generator, evaluator, c), seed), list_len)
            for name, c in methods.items()
        }
        policies["initial order"] = ranker.score
        policies[f"{cfg.principled_model} +P1+P2"] = RerankPolicy(ranker, score_order(principled), list_len)
        for name, policy in policies.items():
            result = simulate(sim, policy, cfg.users, seed, 1024)
            for key, values in result.items():
                online_units.setdefault(name, {}).setdefault(key, []).append(values)
            record("online", name, {"clicks_per_request": float(result["clicks"].sum() / result["requests"].sum())})
        _write_csv(out / "results.csv", rows)

        # classic online learning from delayed feedback against LAST, on the same traffic (users in batches of 50)
        arms = {
            "generator greedy": RerankPolicy(
                ranker, LastStage(Last(generator, evaluator, methods["generator greedy"]), seed), list_len
            ),
            "LAST parallel": RerankPolicy(ranker, LastStage(Last(generator, evaluator, LastConfig()), seed), list_len),
        }
        for delay in delays:
            learner = DelayedFeedbackLearner(generator, sim, delay, seed)
            arms[f"online learning, delay {delay}"] = RerankPolicy(ranker, learner, list_len)
        for name, policy in arms.items():
            result = simulate(sim, policy, cfg.users, seed, 50)
            for key, values in result.items():
                delayed_units.setdefault(name, {}).setdefault(key, []).append(values)
            record(
                "delayed",
                name,
                {
                    "clicks_per_request": float(result["clicks"].sum() / result["requests"].sum()),
                    "requests": float(result["requests"].sum()),
                },
            )
        delayed_seeds.append(seed)
        _write_csv(out / "results.csv", rows)
        if cfg.sweep_seeds < 0 or (cfg.sweep_seeds and s >= cfg.sweep_seeds):
            continue
        greedy = Last(generator, evaluator, methods["generator greedy"])(batch)
        greedy_off = means(offline(greedy.scores, batch, evaluator, sim))
        greedy_policy = RerankPolicy(
            ranker, LastStage(Last(generator, evaluator, methods["generator greedy"]), seed), list_len
        )
        greedy_online = simulate(sim, greedy_policy, cfg.users // 2, seed, 1024)
        greedy_cpr = greedy_online["clicks"].sum() / greedy_online["requests"].sum()
        candidates = []
        for fraction in fractions:
            if fraction >= 1:
                candidates.append(("evaluator 100%", evaluator))
                continue
            train_evaluator(
                TrainEvaluatorConfig(out=run / f"evaluator_{fraction:g}", train_fraction=fraction, **common)
            )
            candidates.append(
                (f"evaluator {100 * fraction:g}%", load_evaluator(run / f"evaluator_{fraction:g}").to(device))
            )
        candidates += [(f"evaluator 100% + noise {std:g}", NoisyEvaluator(evaluator, std, seed)) for std in noises]
        for name, weak in candidates:
            last = Last(generator, weak, LastConfig())
            result = last(batch, torch.Generator().manual_seed(seed))
            values = means(offline(result.scores, batch, evaluator, sim))
            policy = RerankPolicy(ranker, LastStage(Last(generator, weak, LastConfig()), seed), list_len)
            online = simulate(sim, policy, cfg.users // 2, seed, 1024)
            record(
                "quality",
                name,
                {
                    "auc": evaluator_auc(weak, batch),
                    "lift_ndcg@10": values["ndcg@10"] - greedy_off["ndcg@10"],
                    "lift_evaluator": values["evaluator"] - greedy_off["evaluator"],
                    "lift_clicks_per_request": float(
                        online["clicks"].sum() / online["requests"].sum() / greedy_cpr - 1
                    ),
                },
            )
        for offsets in ("activations", "pointer", "decoder", "all"):
            for steps in (
                OFFICIAL_STEPS,
                (0.0,) * 4 + (2.0, 3.0, 4.0, 5.0),
                (0.0,) * 4 + (20.0, 30.0, 40.0, 50.0),
                (6.0, 7.0, 8.0, 9.0) * 2,
            ):
                result = Last(generator, evaluator, LastConfig(offsets=offsets, steps=steps))(
                    batch, torch.Generator().manual_seed(seed)
                )
                values = means(offline(result.scores, batch, evaluator, sim))
                record(
                    "offsets",
                    f"{offsets} steps={'/'.join(f'{v:g}' for v in steps)}",
                    {
                        "lift_ndcg@10": values["ndcg@10"] - greedy_off["ndcg@10"],
                        "lift_evaluator": values["evaluator"] - greedy_off["evaluator"],
                    },
                )
        _write_csv(out / "results.csv", rows)

    names = list(methods) + ["initial order", f"{cfg.principled_model} +P1+P2"]
    per_policy = {n: {key: np.concatenate(v) for key, v in online_units[n].items()} for n in names}
    online_rows = summarise(per_policy, np.repeat(seeds, cfg.users))
    online_md = markdown(
        online_rows,
        names,
        f"Simulator `{cfg.sim}`: {cfg.users} users x {len(seeds)} seeds; lifts are against generator greedy "
        "with intervals over users only (pooled over seeds; the models differ by seed, so the comparisons "
        f"{SEEDS_AND_USERS} above are the ones to read).",
    )
    if delayed_units:
        arms = list(delayed_units)
        per_arm = {n: {key: np.concatenate(v) for key, v in delayed_units[n].items()} for n in arms}
        delayed_rows = summarise(per_arm, np.repeat(delayed_seeds, cfg.users))
        online_md += "\n## Delayed feedback\n\n" + markdown(
            delayed_rows,
            arms,
            f"Online learning from delayed feedback vs LAST: {cfg.users} users x {len(delayed_seeds)} "
            "seeds, served in batches of 50 users; lifts against generator greedy, intervals over users only "
            "(pooled over seeds; see the comparisons over seeds and users above).",
        )
    (out / "online.md").write_text(online_md, encoding="utf-8")
    online = {n: {k: online_units[n][k] for k in ("clicks", "requests")} for n in names}
    delayed = {n: {k: delayed_units[n][k] for k in ("clicks", "requests")} for n in delayed_units}
    summary = _summary(rows, cfg, online_md, offline_lists, online, delayed)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    _plots(out, rows)
    (out / "online.json").write_text(json.dumps(online_rows, indent=1, default=float))
    return {"rows": rows, "summary": summary}


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _by(rows, study, method, key) -> list[float]:
    return [
        r[key]
        for r in sorted(rows, key=lambda r: r["seed"])
        if r["study"] == study and r["method"] == method and key in r
    ]


def _offline_comparisons(offline_lists: dict, methods: list[str], best_of: str) -> list[str]:
    """Each method against generator greedy and best-of-K, judged by the test labels and the simulator."""
    results = []
    for reference in ("generator greedy", best_of):
        for m in methods:
            if m == reference or m not in offline_lists or len(offline_lists[m]) != len(offline_lists[reference]):
                continue
            for metric in JUDGED:
                arm = np.stack([run[metric] for run in offline_lists[m]])
                ref = np.stack([run[metric] for run in offline_lists[reference]])
                results.append((m, reference, metric, crossed_bootstrap(arm, ref)))
    adjusted = holm([r[3]["p"] for r in results])
    n_seeds = len(offline_lists["generator greedy"])
    n_lists = len(offline_lists["generator greedy"][0]["ndcg@10"])
    lines = [
        "",
        "### Offline comparisons",
        "",
        f"Δ: mean difference with its 95% CI {SEEDS_AND_LISTS} ({n_seeds} seeds, the same {n_lists} test "
        f"lists); p: two-sided bootstrap p; Holm: adjusted over the {len(results)} comparisons of this table. "
        "Judged by the test labels (NDCG@10) and the simulator's expected clicks of the shown slate; never by "
        "the evaluator LAST selects with.",
        "",
        "| method | against | metric | Δ [95% CI] | p | Holm |",
        "|---|---|---|---|---|---|",
    ]
    for (m, reference, metric, two), h in zip(results, adjusted):
        lines.append(
            f"| {m} | {reference} | {metric} | {format_interval(two)} | {format_p(two['p'], two['resamples'])} | "
            f"{format_p(h, two['resamples'])} |"
        )
    return lines


def _online_comparisons(units: dict, reference: str, title: str) -> list[str]:
    """Clicks per request of each policy against ``reference``: nested bootstrap over seeds, then users."""
    results = []
    for name, outcome in units.items():
        if name == reference:
            continue
        two = nested_bootstrap(outcome["clicks"], units[reference]["clicks"], outcome["requests"],
                               units[reference]["requests"])  # fmt: skip
        results.append((name, two))
    adjusted = holm([r[1]["p"] for r in results])
    n_seeds, n_users = len(units[reference]["clicks"]), len(units[reference]["clicks"][0])
    lines = [
        "",
        f"### {title}",
        "",
        f"Δ clicks per request against `{reference}`, with its 95% CI {SEEDS_AND_USERS} (nested bootstrap: "
        f"{n_seeds} seeds, each with its own models and {n_users} users, resampled within the seed); p: "
        f"two-sided bootstrap p; Holm: adjusted over the {len(results)} comparisons of this table.",
        "",
        "| policy | Δ clicks / request [95% CI] | p | Holm |",
        "|---|---|---|---|",
    ]
    for (name, two), h in zip(results, adjusted):
        lines.append(
            f"| {name} | {format_interval(two, 5)} | {format_p(two['p'], two['resamples'])} | "
            f"{format_p(h, two['resamples'])} |"
        )
    return lines


def _summary(
    rows: list[dict], cfg: LastExperimentConfig, online_md: str, offline_lists: dict, online: dict, delayed: dict
) -> str:
    seeds = sorted({r["seed"] for r in rows})
    interval = "1 seed, no interval" if len(seeds) == 1 else f"mean ± 95% t interval {SEEDS_ONLY}"
    lines = [
        f"# LAST experiment ({len(seeds)} seeds: {', '.join(map(str, seeds))})",
        "",
        f"Offline, test lists: {interval}. `sim_clicks`: the simulator's expected clicks of the first "
        "slate items shown (its click model judges the order); `evaluator`: the seed's own evaluator's mean "
        "click probability, the score LAST selects by, shown for reference and never tested (greedy is one of "
        "LAST's candidates, so LAST is at least greedy on it by construction).",
        "",
        "| method | " + " | ".join(OFFLINE) + " |",
        "|---|" + "---|" * len(OFFLINE),
    ]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["study"] == "offline"))
    best_of = next(m for m in methods if m.startswith("best-of"))
    for m in methods:
        cells = []
        for key in OFFLINE:
            values = _by(rows, "offline", m, key)
            judged = len(values) > 1 and key != "evaluator"  # the selector's own score: a value, no interval
            cells.append(f"{np.mean(values):.4f} ± {t_ci95(values):.4f}" if judged else f"{np.mean(values):.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += _offline_comparisons(offline_lists, [m for m in methods if "oracle" not in m], best_of)
    lines += _online_comparisons(online, "generator greedy", "Online comparisons (the simulator's users)")
    if delayed:
        lines += _online_comparisons(
            delayed, "generator greedy", "Delayed feedback and LAST against greedy, over seeds"
        )
    lines += ["", "## Online (A/B harness on the simulator)", "", online_md]
    for study, keys, title in (
        (
            "quality",
            ("auc", "lift_ndcg@10", "lift_evaluator", "lift_clicks_per_request"),
            "Evaluator quality: LAST parallel's lift over generator greedy (judge = the full evaluator)",
        ),
        ("offsets", ("lift_ndcg@10", "lift_evaluator"), "Offsets and step sizes: lift over generator greedy"),
    ):
        names = list(dict.fromkeys(r["method"] for r in rows if r["study"] == study))
        if not names:
            continue
        lines += ["", f"## {title}", "", "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for m in names:
            lines.append(
                f"| {m} | "
                + " | ".join(
                    f"{np.mean(_by(rows, study, m, key)):+.4f}"
                    + ("" if key == "lift_evaluator" else f" ± {t_ci95(_by(rows, study, m, key)):.4f}")
                    for key in keys
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def _plots(out: Path, rows: list[dict]) -> None:
    import matplotlib  # imported only when plotting: it costs a second of start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = [r for r in rows if r["study"] == "quality"]
    if quality:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, key in zip(axes, ("lift_ndcg@10", "lift_evaluator", "lift_clicks_per_request")):
            for k, name in enumerate(dict.fromkeys(r["method"] for r in quality)):
                xs = [r["auc"] for r in quality if r["method"] == name]
                ys = [r[key] for r in quality if r["method"] == name]
                ax.scatter(xs, ys, label=name, color=f"C{k}")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("evaluator AUC (test)")
            ax.set_ylabel(f"LAST − greedy: {key.removeprefix('lift_')}")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "quality.png", dpi=110)
        plt.close(fig)
    offsets = [r for r in rows if r["study"] == "offsets"]
    if offsets:
        names = list(dict.fromkeys(r["method"] for r in offsets))
        means = [np.mean([r["lift_evaluator"] for r in offsets if r["method"] == n]) for n in names]
        errors = [t_ci95([r["lift_evaluator"] for r in offsets if r["method"] == n]) for n in names]
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.bar(range(len(names)), means, yerr=np.nan_to_num(errors), capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("evaluator score − greedy")
        fig.tight_layout()
        fig.savefig(out / "offsets.png", dpi=110)
        plt.close(fig)
    offline = [r for r in rows if r["study"] == "offline"]
    names = list(dict.fromkeys(r["method"] for r in offline))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("ndcg@10", "evaluator")):
        means = [np.mean(_by(rows, "offline", n, key)) for n in names]
        errors = [t_ci95(_by(rows, "offline", n, key)) for n in names]
        ax.bar(
            range(len(names)), means, yerr=np.nan_to_num(errors), capsize=3, color=[f"C{k}" for k in range(len(names))]
        )
        ax.set_xticks(range(len(names)), [n[:28] for n in names], rotation=40, ha="right", fontsize=7)
        ax.set_title(key)
        ax.set_ylim(bottom=min(means) * 0.95)
    fig.tight_layout()
    fig.savefig(out / "offline.png", dpi=110)
    plt.close(fig)
