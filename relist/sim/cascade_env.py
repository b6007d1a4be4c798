"""Simulated users in front of a cascade: batched steps, evaluation, and the environments the RL code uses.

``CascadeEnv`` joins a ``Cascade`` (which items reach the user) and a ``Simulator`` (what the user does:
clicks, dwell, leaving, returning; ``relist.sim.session``). One step is one request of every active user:
the stage agents' actions go through the cascade, its last stage's order is shown, the session model
answers. The reward of a request is its dwell seconds (``reward="dwell"``) or clicks.

Environments are described by ``CascadeEnvConfig`` (a YAML file for ``relist experiment unexrl --env``):

- ``source: sim`` - a simulator directory from ``relist sim train`` (MIND): its learned click model, a
  catalogue of every item in the prepared dataset's lists and, as users, every person of the dataset
  (``users: all``, one row per person) or the simulator's pool split (``users: simulator``);
- ``source: synthetic`` - a synthetic ground truth of ``n_items`` items (up to 10**6) and ``n_users`` users.

Session calibration (as ``relist.sim.fit`` does for the logged order): ``ref_clicks`` is set to the
expected clicks of a slate under the default fusion weights, and ``leave_bias`` so that the default
weights give ``session_requests`` requests per session (for ``source: sim``, by default the simulator's
own fitted target, i.e. MIND's per-user list count corrected for subsampling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from relist.config import option
from relist.data.store import PreparedDataset
from relist.data.synthetic import SyntheticClickModel, SyntheticParams
from relist.runtime import resolve_device
from relist.sim import rng
from relist.sim.cascade import Cascade, CascadeConfig, CascadeOutput
from relist.sim.catalogue import (
    category_share_unknown,
    dataset_people,
    kmeans_groups,
    mind_catalogue,
    synthetic_catalogue,
)
from relist.sim.fit import bisect_leave_bias
from relist.sim.pool import synthetic_item_pool, unknown_ids
from relist.sim.response import TruthResponse
from relist.sim.session import SessionParams, Simulator, Step, Users, in_batches, outcomes, roll_out
from relist.sim.store import load_simulator, read_config

REWARDS = ("dwell", "clicks")


@dataclass
class CascadeEnvConfig:
    """The cascade environment; ``relist.config.load_yaml(CascadeEnvConfig, "env.yaml")`` reads one."""

    source: str = option("synthetic", help="the catalogue and users", choices=("synthetic", "sim"))
    sim: str = option("", help="simulator directory (source sim: a `relist sim train` output)")
    sizes: tuple[int, ...] = option((500, 100, 10), help="items each stage keeps, matching first")
    matching: str = option("auto", help="matching search (auto: a FAISS IVF index on large catalogues)")
    n_items: int = option(5000, help="synthetic catalogue size")
    n_users: int = option(2000, help="synthetic population")
    users: str = option(
        "all",
        help="source sim: every person of the prepared dataset, or the simulator's own pool split",
        choices=("all", "simulator"),
    )
    eval_share: float = option(0.5, help="share of the people held out for evaluation (never seen in training)")
    split_seed: int | None = option(
        None,
        help="seed of the split of people into training and evaluation users (empty: each run's own seed, so that "
        "each seed holds out its own people)",
    )
    item_groups: str = option(
        "auto",
        help="item groups of CQR and the diversity score: the data's categories, k-means clusters of the item "
        "vectors, or auto (k-means where over half the items have no category)",
        choices=("auto", "category", "kmeans"),
    )
    n_item_groups: int = option(16, help="k-means clusters (item_groups kmeans)")
    session_requests: float = option(
        0.0, help="target requests per session under the hand-set weights (0: the simulator's, or 4)"
    )
    max_sessions: int = option(3, help="sessions per user (the horizon)")
    reward: str = option("dwell", help="reward of a request", choices=REWARDS)
    seed: int | None = option(
        None,
        help="world seed: the stage models' errors and the synthetic truth (empty: each run's own seed, so "
        "that seeds vary the world)",
    )
    device: str = option("cpu", help="cpu, cuda, cuda:N or auto")


def default_actions(cascade: Cascade, size: int) -> list[Tensor]:
    """Hand-set fusion weights: relevance 1, prior 0.5, diversity 0.25 (what an untuned system would use)."""
    base = {"relevance": 1.0, "prior": 0.5, "diversity": 0.25}
    return [
        torch.tensor([base[h] for h in heads], device=cascade.catalogue.device).expand(size, -1)
        for heads in cascade.heads
    ]


class Request(NamedTuple):
    out: CascadeOutput
    reward: Tensor  # (B,)
    step: Step


@dataclass
class EnvState:
    users: Users
    last_clicks: Tensor  # (B,) clicks on the previous list of the session

    def __getitem__(self, rows) -> "EnvState":
        return EnvState(self.users[rows], self.last_clicks[rows])

    def put(self, rows: Tensor, part: "EnvState") -> None:
        self.users.put(rows, part.users)
        self.last_clicks[rows] = part.last_clicks


def split_people(person: Tensor, eval_share: float, seed: int) -> dict[str, Tensor]:
    """Population rows of training and evaluation users, split by person (``person`` (N,): each row's user id),
    so that no one is in both: ``eval_share`` of the people, drawn with ``seed``, are evaluation users."""
    if not 0.0 < eval_share < 1.0:
        raise ValueError(f"eval_share must lie strictly between 0 and 1, got {eval_share}")
    ids = torch.unique(person.cpu())
    if len(ids) < 2:
        raise ValueError(f"the population has {len(ids)} person; training and evaluation need at least 2")
    shuffled = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    n_eval = min(max(1, round(eval_share * len(ids))), len(ids) - 1)
    held_out = torch.isin(person.cpu(), shuffled[:n_eval])
    rows = torch.arange(len(person))
    return {"train": rows[~held_out].to(person.device), "eval": rows[held_out].to(person.device)}


class CascadeEnv:
    """A cascade and the session model, batched over users (see the module docstring).

    ``people`` holds the population rows of the training users and of the evaluation users (disjoint people,
    ``split_people``); without it every row is both. Training draws users from its rows at random (keyed);
    evaluation visits its rows in order, so ``evaluate`` over as many users as there are evaluation rows
    meets each of them once (each evaluation person once where the population has one row per person, as
    ``users: all`` and the synthetic source have)."""

    def __init__(
        self, cascade: Cascade, sim: Simulator, reward: str = "dwell", people: dict[str, Tensor] | None = None
    ):
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
        self.cascade, self.sim, self.reward = cascade, sim, reward
        everyone = torch.arange(cascade.catalogue.n_users, device=self.device)
        self.people = people or {"train": everyone, "eval": everyone}

    @property
    def device(self) -> torch.device:
        return self.cascade.catalogue.device

    @property
    def n_eval_people(self) -> int:
        """Evaluation rows (people, where the population has one row per person)."""
        return len(self.people["eval"])

    def start(self, keys: Tensor, seed: int, users: str = "train") -> EnvState:
        """Fresh users for keys ``keys`` (B,): training users drawn at random, or evaluation users in order."""
        rows = self.people[users]
        keys = keys.to(self.device)
        if users == "eval":
            pop = rows[keys % len(rows)]
        else:
            pop = rows[rng.index(seed, len(rows), rng.USER, keys)]
        users_state = self.sim.start(keys, seed, pop)
        return EnvState(users_state, torch.zeros(users_state.size, device=self.device))

    def first(self, state: EnvState) -> tuple[Tensor, Tensor]:
        """The first stage's observation: population rows (B,) and context (B, D_1)."""
        return state.users.pop, self.cascade.context(state.users.pop, state.users, state.last_clicks)

    def step(self, state: EnvState, actions) -> Request:
        """One request of every user in ``state`` (updated in place); ``actions`` as ``Cascade.forward`` takes them."""
        pop, ctx = self.first(state)
        with torch.no_grad():
            out = self.cascade(pop, ctx, actions)
        shown = self.cascade.catalogue.shown(pop, out.slate)
        order = -torch.arange(shown.list_len, device=self.device, dtype=torch.float32).expand(shown.size, -1)
        step = self.sim.step(state.users, shown, order)
        clicks = step.clicks.sum(1).float()
        state.last_clicks = torch.where(step.left, 0.0, clicks)
        reward = step.dwell.sum(1) if self.reward == "dwell" else clicks
        return Request(out, reward, step)

    @torch.no_grad()
    def evaluate(
        self,
        policy: Callable[[int, Tensor], Tensor] | None,
        n_users: int,
        seed: int,
        batch_size: int = 1024,
        users: str = "eval",
    ) -> dict[str, Tensor]:
        """Per-user outcomes of ``n_users`` users (keys 0..n_users-1) until they leave for good (``policy``: stage,
        obs -> action; None for the default weights), with each user's population row (``pop``). The same seed
        gives every policy the same users and random numbers."""

        def request(part: EnvState) -> None:
            self.step(part, policy if policy is not None else default_actions(self.cascade, part.users.size))

        def run(keys: Tensor) -> dict[str, Tensor]:
            state = self.start(keys, seed, users)
            roll_out(state, request, self.sim.max_steps)
            return {**outcomes(state.users), "pop": state.users.pop.cpu()}

        return in_batches(n_users, batch_size, run)


def session_metrics(out: dict[str, Tensor]) -> dict[str, float]:
    """Session dwell (seconds per session), session length (requests per session), clicks per request and
    dwell per user."""
    sessions, requests = out["sessions"].sum(), out["requests"].sum()
    return {
        "session_dwell": float(out["dwell"].sum() / sessions),
        "session_length": float(requests / sessions),
        "clicks_per_request": float(out["clicks"].sum() / requests),
        "dwell_per_user": float(out["dwell"].mean()),
    }


def calibrate_sessions(
    env: CascadeEnv, target: float, n_users: int = 512, seed: int = 12345, iterations: int = 9
) -> dict:
    """Set ``ref_clicks`` to the default weights' expected clicks per slate and ``leave_bias`` so that the default
    weights give ``target`` requests per session (bisection; common random numbers make it monotone)."""
    sim = env.sim
    state = env.start(torch.arange(n_users), seed)
    with torch.no_grad():
        out = env.cascade(*env.first(state), default_actions(env.cascade, n_users))
        prob = sim.response.respond(env.cascade.catalogue.shown(state.users.pop, out.slate)).prob
    sim.params = sim.params.replace(ref_clicks=float(prob.sum(1).mean()))
    one, full = replace(sim.params, max_sessions=1), sim.params

    def session_length(bias: float) -> float:
        sim.params = replace(one, leave_bias=bias)
        return float(env.evaluate(None, n_users, seed, users="train")["requests"].mean())

    sim.params = replace(full, leave_bias=bisect_leave_bias(session_length, target, iterations))
    return {
        "ref_clicks": sim.params.ref_clicks,
        "leave_bias": sim.params.leave_bias,
        "target_requests_per_session": target,
    }


def world_seed(cfg: CascadeEnvConfig, run_seed: int) -> int:
    """The seed of the stage models' errors (and the synthetic truth): the configuration's, or the run's own."""
    return cfg.seed if cfg.seed is not None else run_seed


def build_env(cfg: CascadeEnvConfig, run_seed: int = 0) -> tuple[CascadeEnv, dict]:
    """The environment ``cfg`` describes for a run of seed ``run_seed`` (which draws the world unless ``cfg.seed``
    fixes it), with its sessions calibrated on training users; and a description of it."""
    device = resolve_device(cfg.device)
    seed = world_seed(cfg, run_seed)
    cascade_cfg = CascadeConfig(sizes=tuple(cfg.sizes), matching=cfg.matching, seed=seed)
    missing_categories: tuple[int, ...] = ()  # category ids that mean "no category"
    if cfg.source == "synthetic":
        truth = SyntheticClickModel.sample(
            replace(SyntheticParams(), n_items=cfg.n_items, n_users=cfg.n_users), seed=seed
        )
        pool = synthetic_item_pool(truth, width=cfg.sizes[-1], device=device, seed=seed)
        catalogue = synthetic_catalogue(truth, pool)
        sim = Simulator(TruthResponse(truth, device), pool, SessionParams(max_sessions=cfg.max_sessions), cfg.sizes[-1])
        target = cfg.session_requests or 4.0
    elif cfg.source == "sim":
        if not cfg.sim:
            raise ValueError("source 'sim' needs sim: a directory written by `relist sim train`")
        sim = load_simulator(cfg.sim, device)
        if not hasattr(sim.response, "encode"):
            raise ValueError(f"{cfg.sim}: the cascade needs a learned simulator (`relist sim train`), not a truth one")
        sim = Simulator(sim.response, sim.pool, sim.params.replace(max_sessions=cfg.max_sessions), cfg.sizes[-1])
        data = PreparedDataset(read_config(cfg.sim)["data"])
        if cfg.users == "all":
            users = tuple(t.to(device) for t in dataset_people(data))
        else:
            users = (sim.pool.user_sparse, sim.pool.user_hist)
        catalogue = mind_catalogue(data, sim.response, users)
        unknown = unknown_ids(data).get("category")
        missing_categories = (0,) if unknown is None else (0, unknown)  # padding, "<unknown>"
        metrics = (
            json.loads((Path(cfg.sim) / "metrics.json").read_text())
            if (Path(cfg.sim) / "metrics.json").is_file()
            else {}
        )
        target = cfg.session_requests or metrics.get("session_fit", {}).get("target_requests_per_session", 4.0)
    else:
        raise ValueError(f"source must be 'synthetic' or 'sim', got {cfg.source!r}")
    missing = category_share_unknown(catalogue, missing_categories)
    use_kmeans = cfg.item_groups == "kmeans" or (cfg.item_groups == "auto" and missing > 0.5)
    if use_kmeans:  # one k-means per catalogue (fixed seed): the groups do not change with the run
        catalogue = replace(catalogue, category=kmeans_groups(catalogue.vec, cfg.n_item_groups, seed=0))
    split = cfg.split_seed if cfg.split_seed is not None else run_seed
    people = split_people(catalogue.user_sparse[:, 0], cfg.eval_share, split)
    env = CascadeEnv(Cascade(catalogue, cascade_cfg), sim, cfg.reward, people)
    fitted = calibrate_sessions(env, target)
    info = {
        "source": cfg.source,
        "world_seed": seed,
        "split_seed": split,
        "n_items": catalogue.n_items,
        "n_users": catalogue.n_users,
        "train_people": int(len(torch.unique(catalogue.user_sparse[people["train"], 0]))),
        "eval_people": int(len(torch.unique(catalogue.user_sparse[people["eval"], 0]))),
        "item_groups": f"k-means, {int(catalogue.category.max()) + 1} clusters of the item vectors "
        f"({missing:.0%} of the items have no category)"
        if use_kmeans
        else f"the data's categories ({int(torch.unique(catalogue.category).numel())})",
        "sizes": list(cfg.sizes),
        "stages": list(env.cascade.names),
        "session": fitted,
    }
    return env, info
