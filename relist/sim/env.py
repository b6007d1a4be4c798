"""Gymnasium interfaces over the batched simulator, so that other RL libraries can plug in.

- ``ListEnv`` (``gymnasium.Env``): the single-list task. An episode is one request: the observation is
  a user and their candidate list, the action is one score per candidate (higher is shown earlier; the
  first ``slate_size`` are shown), the reward is the number of clicks, and the episode ends.
- ``SessionVecEnv`` (``gymnasium.vector.VectorEnv``): the session task for ``num_envs`` users at once.
  An episode is a user's whole stay: requests until they leave, and further sessions while they
  return. Reward per step: clicks (default) or dwell seconds of the list. ``terminated`` marks a user
  who is gone for good; ``info["session_end"]`` a session that ended (whether or not they return).
  Autoreset follows gymnasium's default ``NEXT_STEP`` mode: the step after a termination starts a new
  user in that slot, ignores its action and returns reward 0.

Observations are dicts of NumPy arrays with the fields of a ``ListBatch`` (``item_sparse``,
``item_dense``, ``mask``, ``user_sparse``, ``user_hist``) plus ``depth``, the requests already made in the
session. Users are numbered in order of arrival (0, 1, ...), and every random draw is keyed by
(seed, user, request), so the same seed gives the same episodes.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from relist.batch import ListBatch
from relist.sim.pool import as_numpy
from relist.sim.session import Simulator, Users

REWARDS = ("clicks", "dwell")


def observation_space(sim: Simulator) -> spaces.Dict:
    """The single-user observation space of ``sim``'s requests."""
    pool = sim.pool
    schema = pool.schema
    width = pool.width
    hist = pool.user_hist.shape[1]
    top = lambda fields: max((f.vocab for f in fields), default=1)  # noqa: E731
    return spaces.Dict(
        {
            "item_sparse": spaces.Box(0, top(schema.item_sparse), (width, len(schema.item_sparse)), np.int64),
            "item_dense": spaces.Box(-np.inf, np.inf, (width, len(schema.item_dense)), np.float32),
            "mask": spaces.Box(0, 1, (width,), np.int8),
            "user_sparse": spaces.Box(0, top(schema.user_sparse), (len(schema.user_sparse),), np.int64),
            "user_hist": spaces.Box(0, max(top(schema.user_hist), 1), (hist, len(schema.user_hist)), np.int64),
            "depth": spaces.Box(0, sim.params.max_requests, (), np.int64),
        }
    )


def _observe(candidates: ListBatch, users: Users) -> dict[str, np.ndarray]:
    obs = as_numpy(candidates)
    obs["depth"] = users.depth.cpu().numpy().copy()
    return obs


class ListEnv(gym.Env):
    """One request per episode: score the candidates, get the clicks on the shown slate."""

    metadata = {"render_modes": []}

    def __init__(self, sim: Simulator, seed: int = 0):
        self.sim, self._seed, self._next_user = sim, seed, 0
        self.observation_space = observation_space(sim)
        self.action_space = spaces.Box(-np.inf, np.inf, (sim.pool.width,), np.float32)
        self._users: Users | None = None
        self._candidates: ListBatch | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._seed, self._next_user = seed, 0
        self._users = self.sim.start(torch.tensor([self._next_user]), self._seed)
        self._next_user += 1
        self._candidates = self.sim.candidates(self._users)
        return {k: np.array(v[0]) for k, v in _observe(self._candidates, self._users).items()}, {}

    def step(self, action) -> tuple[dict, float, bool, bool, dict[str, Any]]:
        if self._users is None:
            raise RuntimeError("call reset() before step()")
        scores = torch.as_tensor(np.asarray(action, dtype=np.float32), device=self.sim.device).reshape(1, -1)
        obs = {k: np.array(v[0]) for k, v in _observe(self._candidates, self._users).items()}
        step = self.sim.step(self._users, self._candidates, scores)
        info = {
            "clicks": step.clicks[0].cpu().numpy(),
            "click_prob": step.prob[0].cpu().numpy(),
            "shown_items": step.shown.item_id[0].cpu().numpy(),
        }
        self._users = None
        return obs, float(step.clicks.sum()), True, False, info


class SessionVecEnv(VectorEnv):
    """``num_envs`` simulated users in lockstep, each until they leave for good (see the module docstring)."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, sim: Simulator, num_envs: int, reward: str = "clicks", seed: int = 0):
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")
        if num_envs < 1:
            raise ValueError(f"num_envs must be positive, got {num_envs}")
        self.sim, self.num_envs, self.reward, self._seed = sim, num_envs, reward, seed
        self.single_observation_space = observation_space(sim)
        self.single_action_space = spaces.Box(-np.inf, np.inf, (sim.pool.width,), np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._users: Users | None = None
        self._candidates: ListBatch | None = None
        self._autoreset = torch.zeros(num_envs, dtype=torch.bool, device=sim.device)
        self._next_user = num_envs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self._seed = seed
        self._users = self.sim.start(torch.arange(self.num_envs), self._seed)
        self._next_user = self.num_envs
        self._autoreset.zero_()
        self._candidates = self.sim.candidates(self._users)
        return _observe(self._candidates, self._users), {}

    def step(self, actions) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        if self._users is None:
            raise RuntimeError("call reset() before step()")
        device = self.sim.device
        scores = torch.as_tensor(np.asarray(actions, dtype=np.float32), device=device)
        reward = torch.zeros(self.num_envs, device=device)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool, device=device)
        session_end = torch.zeros(self.num_envs, dtype=torch.bool, device=device)
        restart = self._autoreset.nonzero().squeeze(1)
        if restart.numel():
            keys = torch.arange(self._next_user, self._next_user + restart.numel())
            self._next_user += restart.numel()
            self._users.put(restart, self.sim.start(keys, self._seed))
        active = (~self._autoreset).nonzero().squeeze(1)
        if active.numel():
            part = self._users[active]
            step = self.sim.step(part, self._candidates[active], scores[active])
            self._users.put(active, part)
            reward[active] = step.clicks.sum(1).float() if self.reward == "clicks" else step.dwell.sum(1)
            terminated[active] = step.done
            session_end[active] = step.left
        self._autoreset = terminated.clone()
        self._candidates = self.sim.candidates(self._users)
        info = {"session_end": session_end.cpu().numpy(), "user": self._users.key.cpu().numpy()}
        return (
            _observe(self._candidates, self._users),
            reward.cpu().numpy(),
            terminated.cpu().numpy(),
            np.zeros(self.num_envs, dtype=bool),
            info,
        )
