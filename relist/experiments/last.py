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
- evaluator quality (the paper's open question), a ladder: evaluators trained on fractions of the train
  lists, the full one with Gaussian noise on its logits and, given ``--truth``, the true click model itself
  (the oracle ceiling); LAST's lift over greedy (offline NDCG@10 and the judges' expected clicks, online
  clicks per request) against each evaluator's test AUC and its order agreement (how often it ranks two
  orders of the same items as the judge does: what LAST's selection and gradient rely on);
- offsets: activations vs pointer layers vs decoder vs all weights, and step-size lists (offline).
- delayed feedback: LAST against classic online learning, a copy of the generator fine-tuned on the clicks
  its own lists got, arriving ``D`` requests later (``--delays``), on the same simulated traffic.

On a synthetic world, ``--truth`` (a ``relist sim truth`` simulator of the same world) adds the true click
model as a judge: offline (``truth_clicks``), online (its own users) and as the ladder's oracle evaluator.

Each seed is one task of ``relist.grid`` (``--jobs N`` worker processes or ``--ray-address``), on
``--threads`` torch threads wherever it runs, so the results do not depend on the executor. A finished
seed leaves its record (``runs/seedN/record.safetensors``: its rows and per-list and per-user outcomes,
stamped with the data, the simulators and the settings), so ``--resume`` runs only the seeds without one. LAST's step
sizes (K = their number), offsets, scale and discount, the serial rounds, the principled baseline's λ and
perturbation, model sizes and the studies' settings are options (``relist.experiments.protocol``; one
protocol file serves this experiment and ``relist experiment principled``); the defaults are the official
code's settings. Writes ``results.csv``, ``summary.md``, ``online.md``, ``online.json`` (the online tables'
rows by judge: ``online``, and ``online_truth`` and ``delayed`` where they ran), ``offline.png``, and
``quality.png`` and ``offsets.png`` only when those studies ran; ``run_experiment`` returns the names written.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from relist.batch import rank, without_initial_score
from relist.config import option
from relist.data.store import PreparedDataset
from relist.experiments.plots import metric_axis, wrap_label, write_figures
from relist.experiments.protocol import LastStudy, PrincipledStudy, TrainingProtocol, model_settings, parse_steps
from relist.grid import run_tasks
from relist.io import atomic_save_tensors, atomic_write_text, file_digest
from relist.last import Last, LastConfig
from relist.metrics import group_auc, per_list_metrics
from relist.rankers.train import TrainRankerConfig, train_ranker
from relist.rerankers import load_reranker
from relist.rerankers.evaluator import load_evaluator
from relist.runtime import resolve_device
from relist.sim.abtest import markdown, simulate, summarise
from relist.sim.policies import LastStage, PolicyContext, RerankPolicy, _load_ranker, score_order
from relist.sim.store import WEIGHTS, load_simulator, read_config
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
from relist.tables import mean_cell, seeds_interval
from relist.train import (
    TrainConfig,
    TrainEvaluatorConfig,
    TrainGeneratorConfig,
    train,
    train_evaluator,
    train_generator,
)

log = logging.getLogger("relist")
OFFLINE = ("ndcg@5", "ndcg@10", "map@5", "map@10", "sim_clicks", "truth_clicks", "evaluator")
# the judges of the offline comparisons: test labels, the simulator's click model and (--truth) the true one;
# never "evaluator", the score LAST selects its candidate by (greedy is one of the candidates, so LAST >=
# greedy there always)
JUDGED = ("ndcg@10", "sim_clicks", "truth_clicks")
ORACLE_EVALUATOR = "true click model (oracle ceiling)"
ORDER_PERMUTATIONS = 8  # random orders per test list of the order-agreement measure
RECORD = "record.safetensors"
RECORD_VERSION = 2  # raised whenever what a seed computes changes, so older records are not read as current
KEYS = ("seed", "study", "method")  # a results row's identity; the rest are its values


@dataclass
class LastExperimentConfig:
    data: Path = option(
        help="prepared dataset with a ranker split (a LambdaMART initial ranker is trained into "
        "OUT/ranker) — or pass --ranker"
    )
    sim: Path = option(help="simulator directory (`relist sim train` on the same prepared dataset)")
    out: Path = option(help="output directory: results.csv, summary.md, online.md, plots, runs/")
    ranker: Path | None = option(None, help="a `relist train ranker` output to use instead of training one")
    truth: Path | None = option(
        None,
        help="a `relist sim truth` simulator of the same synthetic world: the true click model also judges "
        "every method (offline and online) and is the evaluator-quality ladder's oracle rung",
    )
    max_steps: int = option(0, help="cap on optimiser steps of each training run (0: none)")
    device: str = option("cpu", help="cpu, cuda or auto")
    threads: int = option(1, help="torch threads of each seed's runs")
    jobs: int = option(1, help="seeds at once, in local worker processes (each on --threads torch threads)")
    ray_address: str = option("", help="run the seeds on this Ray cluster instead (local: a local one)")
    overwrite: bool = option(False, help="replace OUT if it exists")
    resume: bool = option(False, help="keep the seeds OUT holds a record of and run the others")
    protocol: TrainingProtocol = option(
        TrainingProtocol(), flatten=True, help="the settings both studies share (a protocol file's top level)"
    )
    last: LastStudy = option(LastStudy(), flatten=True, help="this study's settings (a protocol file's last: section)")
    principled: PrincipledStudy = option(
        PrincipledStudy(),
        help="experiment principled's settings (a protocol file's principled: section; not used by this command)",
    )


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


class ClickModelEvaluator:
    """A simulator's click model (e.g. the synthetic world's truth) in the evaluator's place: the ladder's
    oracle rung. It sees the list as shown, without the initial ranker's score, and counts the clicks of
    the simulator's slate only (its first ``slate_size`` positions; 0 after them), as that judge does."""

    def __init__(self, simulator):
        self.simulator = simulator

    def eval(self):
        return self

    def click_probability(self, batch):
        return slate_click_probability(self.simulator, batch)


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
                data=cfg.data,
                out=ranker_dir,
                model="lambdamart",
                seed=cfg.protocol.seed,
                overwrite=True,
                progress=False,
            )
        )
    return ranker_dir


def slate_click_probability(simulator, shown) -> torch.Tensor:
    """(B, L) ``simulator``'s click probability of each item as shown: its slate (the first ``slate_size``
    items) is what the simulator's user sees, so every position after it, and padding, gets 0."""
    view = without_initial_score(shown).truncate(simulator.slate_size)
    prob = simulator.response.respond(view).prob.masked_fill(~view.mask, 0.0)
    return torch.nn.functional.pad(prob, (0, shown.mask.shape[1] - prob.shape[1]))


def expected_clicks(simulator, shown) -> torch.Tensor:
    """(B,) expected clicks of ``simulator``'s click model on its slate as shown."""
    return slate_click_probability(simulator, shown).sum(1)


def offline(scores: torch.Tensor, batch, judge, simulator, truth=None) -> dict[str, np.ndarray]:
    """Per test list, for the order ``scores`` give: NDCG/MAP on the labels, the simulator's expected
    clicks of its first ``slate_size`` items (``sim_clicks``: the simulator's click model, not the labels),
    the same under ``truth`` (``truth_clicks``, when given) and ``judge``'s mean click probability
    (``evaluator``: for LAST its own selector)."""
    metrics = per_list_metrics(scores.double(), batch.label.double(), batch.mask, ks=(5, 10))
    out = {k: metrics[k].cpu().numpy() for k in OFFLINE if k in metrics}
    shown = batch.reorder(rank(scores, batch.mask))
    with torch.no_grad():
        prob = judge.click_probability(shown)
        out["sim_clicks"] = expected_clicks(simulator, shown).cpu().numpy()
        if truth is not None:
            out["truth_clicks"] = expected_clicks(truth, shown).cpu().numpy()
    out["evaluator"] = (prob.sum(1) / batch.lengths).cpu().numpy()
    return out


OFFLINE_CHUNK = 1024  # test lists per LAST call: its candidates (and weight offsets, one set per row) grow with it


def last_scores(last: Last, batch, seed: int, chunk: int = OFFLINE_CHUNK) -> torch.Tensor:
    """``last``'s scores (B, L) of every list of ``batch``, ``chunk`` lists at a time so that memory stays
    bounded on a large test split; the chunks draw in turn from one random generator seeded ``seed`` (one
    chunk: exactly one call on the whole batch)."""
    noise = torch.Generator().manual_seed(seed)
    rows = torch.arange(batch.size, device=batch.device)
    return torch.cat([last(batch[part], noise).scores for part in rows.split(chunk)])


def means(per_list: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in per_list.items()}


def evaluator_auc(evaluator, batch) -> float:
    """Group AUC of the evaluator's click probabilities on the lists as stored (monotone in its logits)."""
    with torch.no_grad():
        return group_auc(evaluator.click_probability(batch), batch.label, batch.mask)


def order_agreement(evaluator, reference, batch, seed: int, permutations: int = ORDER_PERMUTATIONS) -> float:
    """How often ``evaluator`` ranks two orders of the same items as ``reference`` (a simulator) does.

    Each test list is shown in ``permutations`` random orders; over every pair of them, the share where the
    evaluator's summed click probability and the reference's expected clicks (first ``slate_size`` items)
    move the same way; a tie of the evaluator counts a half, a tie of the reference is left out. 0.5: blind
    to the order (or as often wrong as right), 1: always agrees. This is what LAST relies on: it compares
    orders of one list, which AUC over items does not measure."""
    noise = torch.Generator().manual_seed(seed)
    own, judged = [], []
    with torch.no_grad():
        for _ in range(permutations):
            keys = torch.rand(batch.mask.shape, generator=noise).to(batch.device).masked_fill(~batch.mask, 2.0)
            shown = batch.reorder(keys.argsort(dim=1))
            own.append(evaluator.click_probability(shown).sum(1))
            judged.append(expected_clicks(reference, shown))
    own, judged = torch.stack(own, 1).double(), torch.stack(judged, 1).double()  # (B, R)
    pair = torch.triu(torch.ones(permutations, permutations, dtype=torch.bool, device=own.device), diagonal=1)
    d_own = (own[:, :, None] - own[:, None, :])[:, pair]
    d_judged = (judged[:, :, None] - judged[:, None, :])[:, pair]
    counted = d_judged != 0
    score = torch.where(d_own == 0, 0.5, (torch.sign(d_own) == torch.sign(d_judged)).double())
    return float(score[counted].mean()) if counted.any() else float("nan")


def methods_of(study: LastStudy) -> tuple[dict[str, LastConfig], LastConfig]:
    """The compared generator methods (name -> LAST settings) and the oracle-selection variant."""
    k = len(study.steps)
    shared = {"offsets": study.offsets, "scale": study.scale, "gamma": study.gamma}
    methods = {
        "generator greedy": LastConfig(steps=(), **shared),
        f"best-of-{k} sampling": LastConfig(steps=(0.0,) * k, **shared),
        "LAST parallel": LastConfig(steps=study.steps, **shared),
        "LAST serial": LastConfig(
            mode="serial", serial_steps=study.serial_steps or k, serial_step=study.serial_step, **shared
        ),
    }
    return methods, LastConfig(steps=study.steps, select="oracle", **shared)


@dataclass(frozen=True)
class SeedTask:
    """One seed of the experiment: its models are trained and every study it takes part in is run."""

    cfg: LastExperimentConfig
    ranker_dir: Path
    seed: int
    sweeps: bool  # the evaluator-quality and offset studies


def run_experiment(cfg: LastExperimentConfig) -> dict:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it or --resume to continue)")
    study, protocol = cfg.last, cfg.protocol
    model_settings(protocol.model_args)  # malformed model settings fail before any work
    if cfg.truth is not None and read_config(cfg.truth)["kind"] != "truth":
        raise ValueError(f"--truth {cfg.truth}: not a `relist sim truth` simulator (its kind is not 'truth')")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ranker_dir = _ranker_dir(cfg)
    if cfg.truth is not None:
        world = PreparedDataset(ranker_dir / "rerank").manifest["info"].get("parent_content_hash")
        if read_config(cfg.truth)["data_content_hash"] != world:
            raise ValueError(f"--truth {cfg.truth} is the truth of another dataset than the ranker's ({ranker_dir})")
    seeds = [protocol.seed + s for s in range(protocol.seeds)]
    tasks = [
        SeedTask(cfg, ranker_dir, seed, not (study.sweep_seeds < 0 or (study.sweep_seeds and s >= study.sweep_seeds)))
        for s, seed in enumerate(seeds)
    ]
    kept = {t.seed: read_record(t) for t in tasks} if cfg.resume else {}
    pending = [t for t in tasks if kept.get(t.seed) is None]
    if cfg.resume:
        log.info("resume: %d of %d seeds have a record; running %s", len(tasks) - len(pending), len(tasks),
                 [t.seed for t in pending] or "none")  # fmt: skip
    # every seed on the executor asked for; each seed's runs use --threads threads, so results do not depend on it
    fresh = iter(
        run_tasks(run_seed, pending, jobs=cfg.jobs, ray_address=cfg.ray_address or None, threads=max(cfg.threads, 1))
    )
    done = [kept.get(t.seed) or next(fresh) for t in tasks]
    rows, offline_lists = [], {}
    units = {part: {} for part in ONLINE_PARTS}
    for result in done:
        rows += result["rows"]
        for method, values in result["offline"].items():
            offline_lists.setdefault(method, []).append(values)
        for part in ONLINE_PARTS:
            for name, outcome in result[part].items():
                for key, values in outcome.items():
                    units[part].setdefault(name, {}).setdefault(key, []).append(values)
    _write_csv(out / "results.csv", rows)

    methods, _ = methods_of(study)
    baseline = f"{study.principled_model} +P1+P2"
    names = list(methods) + ["initial order", baseline]
    by_user = np.repeat(seeds, study.users)
    note = (
        "lifts are against generator greedy with intervals over users only (pooled over seeds; the models differ "
        f"by seed, so the comparisons {SEEDS_AND_USERS} above are the ones to read)."
    )
    online_rows = summarise(_pooled(units["online"], names), by_user)
    tables = {"online": online_rows}  # online.json: each judge's rows, as online.md shows them
    online_md = markdown(online_rows, names, f"Simulator `{cfg.sim}`: {study.users} users x {len(seeds)} seeds; {note}")
    if units["online_truth"]:
        truth_rows = tables["online_truth"] = summarise(_pooled(units["online_truth"], names), by_user)
        online_md += "\n## The true click model's users\n\n" + markdown(
            truth_rows, names, f"Simulator `{cfg.truth}`: {study.users} users x {len(seeds)} seeds; {note}"
        )
    if units["delayed"]:
        arms = list(units["delayed"])
        delayed_rows = tables["delayed"] = summarise(_pooled(units["delayed"], arms), by_user)
        online_md += "\n## Delayed feedback\n\n" + markdown(
            delayed_rows,
            arms,
            f"Online learning from delayed feedback vs LAST: {study.users} users x {len(seeds)} "
            f"seeds, served in batches of {study.delayed_batch} users; lifts against generator greedy, intervals "
            "over users only (pooled over seeds; see the comparisons over seeds and users above).",
        )
    (out / "online.md").write_text(online_md, encoding="utf-8")
    online = {
        part: {n: {k: units[part][n][k] for k in ("clicks", "requests")} for n in units[part]} for part in ONLINE_PARTS
    }
    summary = _summary(rows, cfg, online_md, offline_lists, online)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    (out / "online.json").write_text(json.dumps(tables, indent=1, default=float))
    written = ["results.csv", "summary.md", "online.md", "online.json", *_plots(out, rows)]
    return {"rows": rows, "summary": summary, "written": written}


ONLINE_PARTS = ("online", "online_truth", "delayed")  # per-user outcomes: the simulator's, the truth's, delayed


def _pooled(units: dict, names: list[str]) -> dict:
    """Each policy's per-user outcomes with its seeds' users concatenated, in seed order."""
    return {n: {key: np.concatenate(v) for key, v in units[n].items()} for n in names}


def _simulator_identity(path: Path | None) -> dict:
    """What makes a simulator directory the same simulator wherever it lies: its config without the dataset's
    path (the dataset's content hash stays) and its weights' digest."""
    if path is None:
        return {}
    config = {k: v for k, v in read_config(path).items() if k not in ("data", "build")}  # where, how it was run
    weights = Path(path) / WEIGHTS
    return {"config": config, "weights": file_digest(weights) if weights.is_file() else ""}


def seed_stamp(task: SeedTask) -> str:
    """The identity of one seed's results: the data's content hash, the simulators, the seed, whether it runs
    the sweeps, and every setting of the study except how many seeds there are (so seeds can be added)."""
    cfg = task.cfg
    protocol = {k: v for k, v in dataclasses.asdict(cfg.protocol).items() if k not in ("seeds", "seed")}
    study = {k: v for k, v in dataclasses.asdict(cfg.last).items() if k != "sweep_seeds"}
    data = PreparedDataset(task.ranker_dir / "rerank")
    stamp = {
        "record_version": RECORD_VERSION,
        "data_content_hash": data.manifest["content_hash"],
        "sim": _simulator_identity(cfg.sim),
        "truth": _simulator_identity(cfg.truth),
        "seed": task.seed,
        "sweeps": task.sweeps,
        "max_steps": cfg.max_steps,
        "device": resolve_device(cfg.device).type,  # "auto" is where it ran
        "threads": cfg.threads,
        "protocol": protocol,
        "last": study,
    }
    return json.dumps(stamp, sort_keys=True, default=str)


def _stamp_changes(then: str | None, now: str) -> str:
    """The stamp's top-level fields that differ, for the log (e.g. ``data_content_hash`` when the data were
    prepared on a machine whose floating-point kernels differ, see docs/confirmation.md)."""
    try:
        old, new = json.loads(then or "{}"), json.loads(now)
    except json.JSONDecodeError:
        return "settings (an unreadable stamp)"
    changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))
    return "data or settings (" + ", ".join(changed) + ")"


def _record_path(task: SeedTask) -> Path:
    return Path(task.cfg.out) / "runs" / f"seed{task.seed}" / RECORD


def write_record(task: SeedTask, result: dict) -> None:
    """The seed's result (rows in the metadata, per-list and per-user arrays as tensors), stamped."""
    names = [
        (part, name, key)
        for part in ("offline", *ONLINE_PARTS)
        for name, outcome in result[part].items()
        for key in outcome
    ]
    tensors = {str(k): torch.from_numpy(np.ascontiguousarray(result[p][n][key])) for k, (p, n, key) in enumerate(names)}
    metadata = {"stamp": seed_stamp(task), "rows": json.dumps(result["rows"]), "order": json.dumps(names)}
    atomic_save_tensors(tensors, _record_path(task), metadata=metadata)


def read_record(task: SeedTask) -> dict | None:
    """The seed's result from its record, or None when there is none or it is of other data or settings."""
    path = _record_path(task)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="np") as saved:
        metadata = saved.metadata() or {}
        stamp = seed_stamp(task)
        if metadata.get("stamp") != stamp:
            changes = _stamp_changes(metadata.get("stamp"), stamp)
            log.info("%s: a record of other %s; the seed runs again", path, changes)
            return None
        result = {"rows": json.loads(metadata["rows"]), "offline": {}, **{part: {} for part in ONLINE_PARTS}}
        for k, (part, method, key) in enumerate(json.loads(metadata["order"])):  # in the order they ran
            result[part].setdefault(method, {})[key] = saved.get_tensor(str(k))
    return result


def open_seed_folder(run: Path, stamp: str, resume: bool) -> bool:
    """Make the seed's folder ``run`` ready for its training runs and say whether they may resume: only with
    ``resume`` asked and the folder stamped with these settings. Otherwise the folder is emptied first, so a
    run trained under other settings is never resumed later under these (the stamp is written before any
    training, and an interrupted study is resumed with the stamp it wrote)."""
    stamp_path = run / "stamp.json"
    resume = resume and stamp_path.is_file() and stamp_path.read_text(encoding="utf-8") == stamp
    if run.exists() and not resume:
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp_path, stamp)
    return resume


def run_seed(task: SeedTask) -> dict:
    """Train one seed's evaluator, generator and principled re-ranker into OUT/runs/seedN and run the studies:
    offline on the test lists, online on the simulator, delayed feedback and (``task.sweeps``) evaluator
    quality and offsets. Returns the seed's rows and its per-list and per-user outcomes (a module-level
    function, so any executor can call it)."""
    cfg, seed = task.cfg, task.seed
    study, protocol = cfg.last, cfg.protocol
    device = resolve_device(cfg.device)
    data_dir = task.ranker_dir / "rerank"
    data = PreparedDataset(data_dir)
    list_len = int(data.manifest["info"]["list_len"])
    batch = data.batch(data.split("test")).to(device)
    sim = load_simulator(cfg.sim, device)
    truth = load_simulator(cfg.truth, device) if cfg.truth is not None else None
    methods, oracle = methods_of(study)
    parallel = methods["LAST parallel"]
    settings = model_settings(protocol.model_args)
    run = Path(cfg.out) / "runs" / f"seed{seed}"
    resume = open_seed_folder(run, seed_stamp(task), cfg.resume)
    common = dict(
        data=data_dir,
        seed=seed,
        epochs=study.epochs,
        max_steps=cfg.max_steps,
        batch_size=protocol.batch_size,
        learning_rate=protocol.learning_rate,
        patience=protocol.patience,
        device=cfg.device,
        overwrite=not resume,
        resume=resume,
        progress=False,
    )
    train_evaluator(TrainEvaluatorConfig(out=run / "evaluator", model_args=settings.get("evaluator", ""), **common))
    train_generator(TrainGeneratorConfig(out=run / "generator", model_args=settings.get("generator", ""), **common))
    baseline = f"{study.principled_model} +P1+P2"
    train(
        TrainConfig(
            out=run / study.principled_model,
            model=study.principled_model,
            model_args=settings.get(study.principled_model, ""),
            p1_weight=protocol.p1_weight,
            p2_weight=protocol.p2_weight,
            perturbation=protocol.perturbation,
            cs_gradient=protocol.cs_gradient,
            select_metric=protocol.select_metric,
            ema_decay=protocol.ema_decay,
            use_user=protocol.use_user,
            **common,
        )
    )
    evaluator = load_evaluator(run / "evaluator").to(device)
    generator = load_reranker(run / "generator" / "best").to(device)
    principled = load_reranker(run / study.principled_model / "best").to(device).eval()
    rows, offline_lists = [], {}
    units = {part: {} for part in ONLINE_PARTS}

    def record(name: str, method: str, values: dict) -> None:
        if name == "offline":  # the judged per-list values are kept (in float32: a seed's record stays small)
            offline_lists[method] = {k: v.astype(np.float32) for k, v in values.items() if k in JUDGED}
            values = means(values)
        rows.append({"seed": seed, "study": name, "method": method, **values})

    def stage(config: LastConfig, evaluator_=evaluator) -> LastStage:
        return LastStage(Last(generator, evaluator_, config), seed)

    identity = -torch.arange(batch.list_len, dtype=torch.float32, device=device).expand(batch.size, -1)
    record("offline", "initial order", offline(identity, batch, evaluator, sim, truth))
    record("offline", baseline, offline(principled.score(batch), batch, evaluator, sim, truth))
    for name, config in methods.items():
        scores = last_scores(Last(generator, evaluator, config), batch, seed)
        record("offline", name, offline(scores, batch, evaluator, sim, truth))
    scores = last_scores(Last(generator, evaluator, oracle), batch, seed)
    record("offline", oracle.label, offline(scores, batch, evaluator, sim, truth))

    # online: every method behind the same initial ranker, the same users and random numbers
    ctx = PolicyContext(seed=seed, device=device, simulator=sim)
    ranker = _load_ranker(str(task.ranker_dir), ctx)

    def policies() -> dict:  # new for each simulator: a policy's random numbers start afresh with its users
        made = {name: RerankPolicy(ranker, stage(c), list_len) for name, c in methods.items()}
        made["initial order"] = ranker.score
        made[baseline] = RerankPolicy(ranker, score_order(principled), list_len)
        return made

    for part, simulator in (("online", sim), ("online_truth", truth)):
        if simulator is None:
            continue
        for name, policy in policies().items():
            outcome = simulate(simulator, policy, study.users, seed, 1024)
            units[part][name] = outcome
            record(part, name, {"clicks_per_request": float(outcome["clicks"].sum() / outcome["requests"].sum())})

    # classic online learning from delayed feedback against LAST, on the same traffic (users in small batches)
    arms = {
        "generator greedy": RerankPolicy(ranker, stage(methods["generator greedy"]), list_len),
        "LAST parallel": RerankPolicy(ranker, stage(parallel), list_len),
    }
    for delay in study.delays:
        learner = DelayedFeedbackLearner(generator, sim, delay, seed, study.delayed_learning_rate)
        arms[f"online learning, delay {delay}"] = RerankPolicy(ranker, learner, list_len)
    for name, policy in arms.items():
        outcome = simulate(sim, policy, study.users, seed, study.delayed_batch)
        units["delayed"][name] = outcome
        record(
            "delayed",
            name,
            {
                "clicks_per_request": float(outcome["clicks"].sum() / outcome["requests"].sum()),
                "requests": float(outcome["requests"].sum()),
            },
        )
    if task.sweeps:
        _sweeps(task, record, batch, evaluator, generator, sim, truth, ranker, list_len, common, run)
    result = {"rows": rows, "offline": offline_lists, **units}
    write_record(task, result)
    return result


def _sweeps(task, record, batch, evaluator, generator, sim, truth, ranker, list_len, common, run) -> None:
    """The evaluator-quality ladder and the offset study of one seed: LAST's lift over generator greedy."""
    cfg, seed, study = task.cfg, task.seed, task.cfg.last
    device = batch.device
    methods, _ = methods_of(study)
    parallel = methods["LAST parallel"]
    quality_users = study.quality_users or max(1, study.users // 2)
    greedy = last_scores(Last(generator, evaluator, methods["generator greedy"]), batch, seed)
    greedy_off = means(offline(greedy, batch, evaluator, sim, truth))
    simulators = {"": sim, "truth_": truth} if truth is not None else {"": sim}
    greedy_cpr = {}
    for prefix, simulator in simulators.items():
        greedy_policy = RerankPolicy(
            ranker, LastStage(Last(generator, evaluator, methods["generator greedy"]), seed), list_len
        )
        outcome = simulate(simulator, greedy_policy, quality_users, seed, 1024)
        greedy_cpr[prefix] = outcome["clicks"].sum() / outcome["requests"].sum()
    settings = model_settings(cfg.protocol.model_args)
    candidates = []  # (name, a function making the evaluator): every use of a noisy one draws the same noise
    for fraction in study.fractions:
        if fraction >= 1:
            candidates.append(("evaluator 100%", lambda: evaluator))
            continue
        train_evaluator(
            TrainEvaluatorConfig(
                out=run / f"evaluator_{fraction:g}",
                train_fraction=fraction,
                model_args=settings.get("evaluator", ""),
                **common,
            )
        )
        weak = load_evaluator(run / f"evaluator_{fraction:g}").to(device)
        candidates.append((f"evaluator {100 * fraction:g}%", lambda weak=weak: weak))
    candidates += [
        (f"evaluator 100% + noise {std:g}", lambda std=std: NoisyEvaluator(evaluator, std, seed)) for std in study.noise
    ]
    if truth is not None:
        candidates.append((ORACLE_EVALUATOR, lambda: ClickModelEvaluator(truth)))
    reference = truth if truth is not None else sim  # the order agreement's judge
    judged = ("ndcg@10", "sim_clicks", "truth_clicks", "evaluator")
    for name, make in candidates:
        scores = last_scores(Last(generator, make(), parallel), batch, seed)
        values = means(offline(scores, batch, evaluator, sim, truth))
        quality = {
            "auc": evaluator_auc(make(), batch),
            "order_agreement": order_agreement(make(), reference, batch, seed),
            **{f"lift_{m}": values[m] - greedy_off[m] for m in judged if m in values},
        }
        for prefix, simulator in simulators.items():
            policy = RerankPolicy(ranker, LastStage(Last(generator, make(), parallel), seed), list_len)
            online = simulate(simulator, policy, quality_users, seed, 1024)
            cpr = online["clicks"].sum() / online["requests"].sum()
            quality[f"lift_{prefix}clicks_per_request"] = float(cpr / greedy_cpr[prefix] - 1)
        record("quality", name, quality)
    for offsets in study.offset_kinds:
        for text in study.offset_steps:
            steps = parse_steps(text)
            config = dataclasses.replace(parallel, offsets=offsets, steps=steps)
            scores = last_scores(Last(generator, evaluator, config), batch, seed)
            values = means(offline(scores, batch, evaluator, sim, truth))
            record(
                "offsets",
                f"{offsets} steps={'/'.join(f'{v:g}' for v in steps)}",
                {
                    "lift_ndcg@10": values["ndcg@10"] - greedy_off["ndcg@10"],
                    "lift_evaluator": values["evaluator"] - greedy_off["evaluator"],
                },
            )


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
    """Each method against generator greedy and best-of-K, judged by the test labels and the simulators."""
    results = []
    judges = [m for m in JUDGED if m in offline_lists["generator greedy"][0]]
    for reference in ("generator greedy", best_of):
        for m in methods:
            if m == reference or m not in offline_lists or len(offline_lists[m]) != len(offline_lists[reference]):
                continue
            for metric in judges:
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
        "Judged by the test labels (NDCG@10) and the simulator's (and, where given, the true click model's) "
        "expected clicks of the shown slate; never by the evaluator LAST selects with.",
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


def _summary(rows: list[dict], cfg: LastExperimentConfig, online_md: str, offline_lists: dict, online: dict) -> str:
    seeds = sorted({r["seed"] for r in rows})
    interval = seeds_interval(len(seeds), SEEDS_ONLY)
    columns = [k for k in OFFLINE if any(k in r for r in rows if r["study"] == "offline")]
    lines = [
        f"# LAST experiment ({len(seeds)} seeds: {', '.join(map(str, seeds))})",
        "",
        f"Offline, test lists: {interval}. `sim_clicks`: the simulator's expected clicks of the first "
        "slate items shown (its click model judges the order); "
        + ("`truth_clicks`: the same under the true click model; " if "truth_clicks" in columns else "")
        + "`evaluator`: the seed's own evaluator's mean click probability, the score LAST selects by, shown for "
        "reference and never tested (greedy is one of LAST's candidates, so LAST is at least greedy on it by "
        "construction).",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["study"] == "offline"))
    best_of = next(m for m in methods if m.startswith("best-of"))
    for m in methods:
        cells = []
        for key in columns:
            values = _by(rows, "offline", m, key)
            judged = len(values) > 1 and key != "evaluator"  # the selector's own score: a value, no interval
            cells.append(f"{np.mean(values):.4f} ± {t_ci95(values):.4f}" if judged else f"{np.mean(values):.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += _offline_comparisons(offline_lists, [m for m in methods if "oracle" not in m], best_of)
    lines += _online_comparisons(online["online"], "generator greedy", "Online comparisons (the simulator's users)")
    if online["online_truth"]:
        lines += _online_comparisons(
            online["online_truth"], "generator greedy", "Online comparisons (the true click model's users)"
        )
    if online["delayed"]:
        lines += _online_comparisons(
            online["delayed"], "generator greedy", "Delayed feedback and LAST against greedy, over seeds"
        )
    lines += ["", "## Online (A/B harness on the simulator)", "", online_md]
    judge = "the true click model" if cfg.truth is not None else "the simulator's click model"
    for study, title, note in (
        (
            "quality",
            "Evaluator quality: LAST parallel's lift over generator greedy",
            "`auc`: the evaluator's group AUC on the test labels; `order_agreement`: how often it ranks two random "
            f"orders of a test list's items as {judge} does (0.5: blind to the order); lifts in NDCG@10 and "
            "the judges' expected clicks (offline), `evaluator` the full evaluator's score (on the 100% rung the "
            "score LAST maximised, so no evidence), `clicks_per_request` relative (online). ",
        ),
        (
            "offsets",
            "Offsets and step sizes: lift over generator greedy",
            "`lift_evaluator` is the score LAST maximised (no evidence); ",
        ),
    ):
        names = list(dict.fromkeys(r["method"] for r in rows if r["study"] == study))
        if not names:
            continue
        keys = [k for k in dict.fromkeys(k for r in rows if r["study"] == study for k in r) if k not in KEYS]
        n = len({r["seed"] for r in rows if r["study"] == study})
        lines += [
            "",
            f"## {title}",
            "",
            f"{note}{seeds_interval(n, SEEDS_ONLY)}.",
            "",
            "| variant | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for m in names:
            cells = [mean_cell(_by(rows, study, m, key), signed=key.startswith("lift_")) for key in keys]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def offline_figure(rows: list[dict]):
    """Bars of each offline method's test NDCG@10 and evaluator score (mean over seeds, t interval), every
    label whole (wrapped), oracle-selection rows hatched and grey, the y axis from zero or visibly broken."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["method"] for r in rows if r["study"] == "offline"))
    seeds = len({r["seed"] for r in rows if r["study"] == "offline"})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key in zip(axes, ("ndcg@10", "evaluator")):
        values = [_by(rows, "offline", n, key) for n in names]
        means = np.array([np.mean(v) for v in values])
        errors = np.array([t_ci95(v) if len(v) > 1 and key != "evaluator" else 0.0 for v in values])
        bars = ax.bar(range(len(names)), means, yerr=errors, capsize=3, color=[f"C{k}" for k in range(len(names))])
        for bar, name in zip(bars, names):
            if "oracle" in name:  # not deployable: it selects by the test labels
                bar.set_facecolor("lightgrey")
                bar.set_hatch("//")
                bar.set_edgecolor("black")
        ax.set_xticks(range(len(names)), [wrap_label(n) for n in names], rotation=40, ha="right", fontsize=7)
        for tick, name in zip(ax.get_xticklabels(), names):
            if "oracle" in name:
                tick.set_fontstyle("italic")
        ax.set_title(f"{key} ({seeds_interval(seeds, 'over seeds')})", fontsize=9)
        metric_axis(ax, means + errors, means - errors, label=key)
    if any("oracle" in n for n in names):
        fig.text(0.01, 0.01, "hatched grey: oracle selection by the test labels (an analysis, not deployable)",
                 fontsize=7)  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


LADDER_LIFTS = (
    ("lift_ndcg@10", "NDCG@10 (test labels)"),
    ("lift_sim_clicks", "expected clicks (simulator)"),
    ("lift_truth_clicks", "expected clicks (true click model)"),
    ("lift_clicks_per_request", "clicks / request, relative (simulator)"),
    ("lift_truth_clicks_per_request", "clicks / request, relative (true click model)"),
)


def quality_figure(rows: list[dict]):
    """The evaluator-quality ladder: LAST parallel's lift over greedy under each judge (columns, titled by
    the judge) against each evaluator's test AUC (top row) and order agreement (bottom row); a small point
    per seed, a large one for the mean. None without the evaluator-quality study."""
    import matplotlib.pyplot as plt

    quality = [r for r in rows if r["study"] == "quality"]
    if not quality:
        return None
    lifts = [(key, label) for key, label in LADDER_LIFTS if any(key in r for r in quality)]
    qualities = [q for q in ("auc", "order_agreement") if any(q in r for r in quality)]
    names = list(dict.fromkeys(r["method"] for r in quality))
    fig, axes = plt.subplots(
        len(qualities), len(lifts), figsize=(3.4 * len(lifts), 3.2 * len(qualities)), squeeze=False
    )
    for i, x_key in enumerate(qualities):
        for j, (y_key, label) in enumerate(lifts):
            ax = axes[i][j]
            for k, name in enumerate(names):
                mine = [r for r in quality if r["method"] == name and x_key in r and y_key in r]
                xs, ys = [r[x_key] for r in mine], [r[y_key] for r in mine]
                marker = "*" if name == ORACLE_EVALUATOR else "o"
                ax.scatter(xs, ys, color=f"C{k}", marker=marker, s=14, alpha=0.5)
                ax.scatter([np.mean(xs)], [np.mean(ys)], color=f"C{k}", marker=marker, s=70, label=wrap_label(name))
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("evaluator AUC (test)" if x_key == "auc" else "order agreement with the judge")
            if i == 0:
                ax.set_title(wrap_label(label, 30), fontsize=9)
            if j == 0:
                ax.set_ylabel("LAST − greedy")
    # one legend below the panels, so that it hides no point
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(labels), 4)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    rows_of_legend = -(-len(labels) // columns)
    fig.tight_layout(rect=(0, 0.035 * rows_of_legend + 0.02, 1, 1))
    return fig


def offsets_figure(rows: list[dict]):
    """LAST's evaluator-score lift over greedy per offset kind and step list (bars from zero); None without
    the offset study."""
    import matplotlib.pyplot as plt

    offsets = [r for r in rows if r["study"] == "offsets"]
    if not offsets:
        return None
    names = list(dict.fromkeys(r["method"] for r in offsets))
    values = [[r["lift_evaluator"] for r in offsets if r["method"] == n] for n in names]
    means = [np.mean(v) for v in values]
    errors = [t_ci95(v) if len(v) > 1 else 0.0 for v in values]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(range(len(names)), means, yerr=errors, capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("evaluator score − greedy")
    ax.set_title(seeds_interval(len({r["seed"] for r in offsets}), "over seeds"), fontsize=9)
    fig.tight_layout()
    return fig


def _plots(out: Path, rows: list[dict]) -> list[str]:
    """offline.png, and quality.png and offsets.png when those studies ran; returns the names written."""
    return write_figures(
        out,
        {
            "offline.png": lambda: offline_figure(rows),
            "quality.png": lambda: quality_figure(rows),
            "offsets.png": lambda: offsets_figure(rows),
        },
        dpi=110,
    )
