"""``check_cascade``: is the cascade environment sound enough for its RL results to mean anything?

A cascade's stage models are meant to be imperfect, not reversed. Before any UNEX-RL table, this checks
on evaluation users (their first request) that

- every stage's relevance score ranks its own candidates roughly as the click model's appeal does
  (``relevance_appeal_spearman``, one per stage: the mean over users of the Spearman correlation over the
  stage's candidates under the hand-set fusion; matching's candidates are a fixed sample of the catalogue);
- trusting relevance beats distrusting it: the mean appeal of the shown top-10 under the hand-set fusion
  (``appeal_handset``) is above that under "relevance -1, prior +1 at every stage" (``appeal_flipped``;
  diversity keeps its hand-set weight), with the best possible top-10 of the whole catalogue
  (``appeal_best``) for scale, and the same holds for session dwell (``dwell_handset``, ``dwell_flipped``);
- training and evaluation users are different people (``users_disjoint``: no person among 20,000 training
  draws is among the evaluation users met).

A failed check (a negative correlation, a flipped fusion that wins) says the environment, not the agents,
would be what a result measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from relist.config import load_yaml, option
from relist.sim.cascade_env import CascadeEnv, CascadeEnvConfig, build_env, default_actions, session_metrics

EVAL_SEED = 10_000  # the evaluation seed of run seed s is EVAL_SEED + s (as in ``relist.rl.loop``)


@dataclass
class CheckCascadeConfig:
    env: Path = option(help="environment YAML (relist.sim.cascade_env.CascadeEnvConfig fields)")
    seed: int = option(0, help="run seed: draws the world unless the environment file fixes its seed")
    users: int = option(0, help="evaluation users (0: every evaluation person once)")
    threads: int = option(1, help="torch threads")


def spearman_rows(x: Tensor, y: Tensor) -> Tensor:
    """(B,) Spearman correlation of each row of x (B, K) with the same row of y (ties broken by position)."""
    rx = x.argsort(1).argsort(1).double()
    ry = y.argsort(1).argsort(1).double()
    rx, ry = rx - rx.mean(1, keepdim=True), ry - ry.mean(1, keepdim=True)
    return (rx * ry).sum(1) / (rx.norm(dim=1) * ry.norm(dim=1)).clamp_min(1e-12)


def flipped_actions(env: CascadeEnv, size: int) -> list[Tensor]:
    """Relevance -1 and prior +1 at every stage (diversity keeps its hand-set weight)."""
    actions = []
    for heads, hand in zip(env.cascade.heads, default_actions(env.cascade, 1)):
        w = hand[0].clone()
        w[heads.index("relevance")], w[heads.index("prior")] = -1.0, 1.0
        actions.append(w[None, :].expand(size, -1))
    return actions


def _appeal(env: CascadeEnv, pop: Tensor, rows: Tensor) -> Tensor:
    return env.sim.response.appeal(env.cascade.catalogue.shown(pop, rows))


@torch.no_grad()
def best_appeal(env: CascadeEnv, pop: Tensor, k: int, chunk_items: int = 4096) -> Tensor:
    """(B,) mean appeal of each user's best ``k`` items of the whole catalogue."""
    n = env.cascade.catalogue.n_items
    best = None
    for start in range(0, n, chunk_items):
        rows = torch.arange(start, min(start + chunk_items, n), device=env.device).expand(len(pop), -1)
        appeal = _appeal(env, pop, rows)
        best = appeal if best is None else torch.cat([best, appeal], 1)
        best = best.topk(min(k, best.shape[1]), dim=1).values
    return best.mean(1)


@torch.no_grad()
def check_cascade(env: CascadeEnv, seed: int = 0, n_users: int = 0, batch: int = 128, sample: int = 2000) -> dict:
    """The checks of the module docstring on ``n_users`` evaluation users (0: every evaluation person once)."""
    cascade, cat = env.cascade, env.cascade.catalogue
    n_users = n_users or env.n_eval_people
    eval_seed = EVAL_SEED + seed
    k = cascade.config.sizes[-1]
    g = torch.Generator().manual_seed(seed)
    matching_candidates = torch.randperm(cat.n_items, generator=g)[: min(sample, cat.n_items)].to(env.device)
    rho = [[] for _ in range(cascade.n_stages)]
    appeal = {"handset": [], "flipped": [], "best": []}
    for start in range(0, n_users, batch):
        keys = torch.arange(start, min(start + batch, n_users))
        state = env.start(keys, eval_seed, "eval")
        pop, ctx = env.first(state)
        hand = cascade(pop, ctx, default_actions(cascade, len(pop)))
        flip = cascade(pop, ctx, flipped_actions(env, len(pop)))
        for s in range(cascade.n_stages):
            rows = matching_candidates.expand(len(pop), -1) if s == 0 else hand.stages[s - 1].rows
            relevance = cascade.scores(pop, rows, s)[..., cascade.heads[s].index("relevance")]
            rho[s].append(spearman_rows(relevance, _appeal(env, pop, rows)))
        appeal["handset"].append(_appeal(env, pop, hand.slate).mean(1))
        appeal["flipped"].append(_appeal(env, pop, flip.slate).mean(1))
        appeal["best"].append(best_appeal(env, pop, k))
    flipped = flipped_actions(env, 1)
    dwell_hand = session_metrics(env.evaluate(None, n_users, eval_seed))["session_dwell"]
    dwell_flip = session_metrics(env.evaluate(lambda s, obs: flipped[s].expand(obs.shape[0], -1), n_users, eval_seed))[
        "session_dwell"
    ]
    # the people training and evaluation actually meet (training draws at random from its side; CEM and the
    # RL loop key their users from 0 up), not the split's own bookkeeping
    person = cat.user_sparse[:, 0]
    met_train = env.start(torch.arange(max(20_000, 4 * len(env.people["train"]))), seed, "train").users.pop
    met_eval = env.start(torch.arange(n_users), eval_seed, "eval").users.pop
    train_ids, eval_ids = set(person[met_train].tolist()), set(person[met_eval].tolist())
    return {
        "stages": list(cascade.names),
        "relevance_appeal_spearman": [round(float(torch.cat(r).mean()), 4) for r in rho],
        "appeal_handset": round(float(torch.cat(appeal["handset"]).mean()), 4),
        "appeal_flipped": round(float(torch.cat(appeal["flipped"]).mean()), 4),
        "appeal_best": round(float(torch.cat(appeal["best"]).mean()), 4),
        "dwell_handset": round(dwell_hand, 2),
        "dwell_flipped": round(dwell_flip, 2),
        "users_disjoint": not (train_ids & eval_ids),
        "train_people": len(train_ids),
        "eval_people": len(eval_ids),
        "eval_users": n_users,
        "world_seed": cascade.config.seed,
    }


def passed(check: dict) -> bool:
    """Whether every check holds: positive alignment at every stage, flipped below hand-set, disjoint users."""
    return (
        all(r > 0 for r in check["relevance_appeal_spearman"])
        and check["appeal_flipped"] < check["appeal_handset"]
        and check["dwell_flipped"] < check["dwell_handset"]
        and check["users_disjoint"]
    )


def run_check(cfg: CheckCascadeConfig) -> dict:
    """`relist sim check-cascade`: build the environment for run seed ``cfg.seed`` and check it."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    env, info = build_env(load_yaml(CascadeEnvConfig, cfg.env), cfg.seed)
    return {**check_cascade(env, cfg.seed, cfg.users), "item_groups": info["item_groups"], "env": str(cfg.env)}
