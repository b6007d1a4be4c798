"""The cross-entropy method over every stage's fusion weights (the CEM baseline of UNEX-RL's table).

One weight vector per stage, the same for every request (no state): a Gaussian over the concatenated
weights, ``population`` candidates per iteration, each scored by the session dwell of ``users`` simulated
users (common random numbers within an iteration, fresh users every iteration), the ``elite`` best refit
the Gaussian. Weights are clipped to the actions' range [-1, 1]; the mean is the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from relist.rl.loop import fixed_policy
from relist.sim.cascade_env import CascadeEnv, default_actions, session_metrics


@dataclass
class CEMConfig:
    iterations: int = 8
    population: int = 12
    elite: int = 3
    users: int = 128
    init_std: float = 0.5
    min_std: float = 0.05


def train_cem(
    env: CascadeEnv, cfg: CEMConfig, seed: int, objective: str = "session_dwell"
) -> tuple[list[Tensor], list[dict]]:
    """The fitted weights (one (1, m_s) tensor per stage) and the curve of the mean's training score."""
    g = torch.Generator().manual_seed(seed)
    dims = env.cascade.action_dims
    mean = torch.cat([d[0] for d in default_actions(env.cascade, 1)]).cpu()
    std = torch.full_like(mean, cfg.init_std)
    curve = []
    requests = 0
    for it in range(cfg.iterations):
        samples = (mean + std * torch.randn(cfg.population, mean.numel(), generator=g)).clamp(-1.0, 1.0)
        samples[0] = mean  # the current mean is always scored
        scores = []
        for theta in samples:
            out = env.evaluate(fixed_policy(_split(theta, dims)), cfg.users, seed * 1000 + it)
            requests += int(out["requests"].sum())
            scores.append(session_metrics(out)[objective])
        scores = torch.tensor(scores)
        curve.append(
            {"iteration": it, "requests": requests, "mean_score": float(scores[0]), "best_score": float(scores.max())}
        )
        elite = samples[scores.topk(cfg.elite).indices]
        mean, std = elite.mean(0), elite.std(0).clamp_min(cfg.min_std)
    return _split(mean, dims), curve


def _split(theta: Tensor, dims: list[int]) -> list[Tensor]:
    return [t[None, :] for t in theta.split(dims)]
