"""The cross-entropy method over every stage's fusion weights (the CEM baseline of UNEX-RL's table).

One weight vector per stage, the same for every request (no state): a Gaussian over the concatenated
weights, ``population`` candidates per iteration, each scored by the session dwell of ``users`` simulated
training users (common random numbers within an iteration, fresh users every iteration), the ``elite``
best refit the Gaussian. Weights are clipped to the actions' range [-1, 1]; the mean is the result.

``budget`` bounds the simulated user-requests CEM may use, counting every request of every session it
plays out to score a candidate (the unit the RL methods' ``steps x n_envs`` is counted in): scoring stops
once the budget is spent, mid-iteration if need be (the Gaussian is then refit on the candidates scored,
when there are at least ``elite`` of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from relist.rl.loop import LoopConfig, evaluate, fixed_policy
from relist.sim.cascade_env import CascadeEnv, default_actions, session_metrics


@dataclass
class CEMConfig:
    iterations: int = 8  # at most (the budget may end it sooner)
    population: int = 12
    elite: int = 3
    users: int = 128
    init_std: float = 0.5
    min_std: float = 0.05
    budget: int = 0  # simulated user-requests (0: no bound)


def train_cem(
    env: CascadeEnv,
    cfg: CEMConfig,
    seed: int,
    objective: str = "session_dwell",
    progress: Callable[[dict], None] | None = None,
) -> tuple[list[Tensor], list[dict]]:
    """The fitted weights (one (1, m_s) tensor per stage) and the history of the search: per iteration, the
    requests used so far, the mean's and the best candidate's training score, and the mean after the refit
    (``weights``, the fusion CEM would return if it stopped there). ``progress`` gets each history entry as
    it is made (it only reports)."""
    g = torch.Generator().manual_seed(seed)
    dims = env.cascade.action_dims
    mean = torch.cat([d[0] for d in default_actions(env.cascade, 1)]).cpu()
    std = torch.full_like(mean, cfg.init_std)
    history = []
    requests = 0
    for it in range(cfg.iterations):
        if cfg.budget and requests >= cfg.budget:
            break
        samples = (mean + std * torch.randn(cfg.population, mean.numel(), generator=g)).clamp(-1.0, 1.0)
        samples[0] = mean  # the current mean is always scored
        scores = []
        for theta in samples:
            if cfg.budget and requests >= cfg.budget:
                break
            out = env.evaluate(fixed_policy(_split(theta, dims)), cfg.users, seed * 1000 + it, users="train")
            requests += int(out["requests"].sum())
            scores.append(session_metrics(out)[objective])
        scores = torch.tensor(scores)
        if len(scores) >= cfg.elite:
            elite = samples[: len(scores)][scores.topk(cfg.elite).indices]
            mean, std = elite.mean(0), elite.std(0).clamp_min(cfg.min_std)
        history.append(
            {
                "iteration": it,
                "requests": requests,
                "mean_score": float(scores[0]),
                "best_score": float(scores.max()),
                "weights": mean.tolist(),
            }
        )
        if progress is not None:
            progress(history[-1])
    return _split(mean, dims), history


def weights_of(entry: dict, env: CascadeEnv) -> list[Tensor]:
    """The per-stage weights of one entry of ``train_cem``'s history."""
    return _split(torch.tensor(entry["weights"]), env.cascade.action_dims)


def cem_curve(env: CascadeEnv, history: list[dict], loop: LoopConfig, seed: int) -> list[dict]:
    """CEM's learning curve at the RL methods' evaluation points (every ``loop.eval_every`` steps of
    ``loop.n_envs`` requests): the fusion CEM held once it had used that many requests, evaluated on the
    evaluation users; the last point is the fusion it returned."""
    curve = []
    for step in sorted({*range(0, loop.steps + 1, loop.eval_every), loop.steps}):
        done = history if step == loop.steps else [h for h in history if h["requests"] <= step * loop.n_envs]
        weights = weights_of(done[-1], env) if done else default_actions(env.cascade, 1)
        used = done[-1]["requests"] if done else 0
        curve.append({"step": step, "requests": used, **evaluate(env, fixed_policy(weights), loop, seed)})
    return curve


def _split(theta: Tensor, dims: list[int]) -> list[Tensor]:
    return [t[None, :] for t in theta.split(dims)]
