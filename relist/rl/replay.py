"""Replay buffer of cascade transitions and the category-quantile rescaling of rewards (CQR).

A transition keeps what CIC needs to rebuild every stage's observation (the user row ``pop`` and the first
stage's observation ``ctx``, now and at the next request) next to the observations the stages actually
saw when it was collected (the stale copies CTDE and the independent learners use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FIELDS = ("pop", "ctx", "obs", "act", "reward", "cell", "done", "next_pop", "next_ctx", "next_obs")


@dataclass
class Batch:
    pop: Tensor  # (B,) population rows
    ctx: Tensor  # (B, D_1) first observation
    obs: Tensor  # (B, sum D_s) every stage's observation when collected
    act: Tensor  # (B, sum m_s) every stage's action
    reward: Tensor  # (B,) raw reward
    cell: Tensor  # (B,) (user group, item group) cell for CQR
    done: Tensor  # (B,) float: the user left for good
    next_pop: Tensor
    next_ctx: Tensor
    next_obs: Tensor  # (B, sum D_s) observations of the next request as collected
    index: Tensor | None = None  # rows in the buffer


class Replay:
    """A ring buffer of transitions on one device (the environment's)."""

    def __init__(self, capacity: int, ctx_dim: int, obs_dim: int, act_dim: int, device: torch.device | str = "cpu"):
        self.capacity, self.size, self.head = capacity, 0, 0
        self.device = torch.device(device)
        self.data = {
            "pop": torch.zeros(capacity, dtype=torch.long),
            "ctx": torch.zeros(capacity, ctx_dim),
            "obs": torch.zeros(capacity, obs_dim),
            "act": torch.zeros(capacity, act_dim),
            "reward": torch.zeros(capacity),
            "cell": torch.zeros(capacity, dtype=torch.long),
            "done": torch.zeros(capacity),
            "next_pop": torch.zeros(capacity, dtype=torch.long),
            "next_ctx": torch.zeros(capacity, ctx_dim),
            "next_obs": torch.zeros(capacity, obs_dim),
        }
        self.data = {k: v.to(self.device) for k, v in self.data.items()}

    def add(self, **values: Tensor) -> None:
        n = values["pop"].shape[0]
        rows = (self.head + torch.arange(n, device=self.device)) % self.capacity
        for name in FIELDS:
            self.data[name][rows] = values[name].detach().to(self.device, self.data[name].dtype)
        self.head = (self.head + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        index = torch.randint(0, self.size, (n,), generator=generator).to(self.device)
        return Batch(**{name: self.data[name][index] for name in FIELDS}, index=index)

    def rewards(self) -> tuple[Tensor, Tensor]:
        return self.data["reward"][: self.size], self.data["cell"][: self.size]


def quantile_rescale(reward: Tensor, cell: Tensor, ref_reward: Tensor, ref_cell: Tensor) -> Tensor:
    """CQR (UNEX-RL): each reward replaced by its quantile among the reference rewards of its own cell,
    r~ = Phi(r | G_u, G_i), as the mid-rank (share below + half the share equal); a cell without reference
    rewards gives 0.5. One sort of the reference by (cell, reward), then binary searches."""
    ref_reward, reward = ref_reward.double(), reward.double()
    span = float(torch.cat([ref_reward.abs(), reward.abs()]).max()) * 2.0 + 1.0
    keys, _ = (ref_cell.double() * span + ref_reward).sort()
    query = cell.double() * span + reward
    below = torch.searchsorted(keys, query, side="left")
    upto = torch.searchsorted(keys, query, side="right")
    start = torch.searchsorted(keys, cell.double() * span - span / 2, side="left")
    end = torch.searchsorted(keys, cell.double() * span + span / 2, side="left")
    n = (end - start).double()
    quantile = ((below - start).double() + 0.5 * (upto - below).double()) / n.clamp_min(1)
    return torch.where(n > 0, quantile, 0.5).float()
