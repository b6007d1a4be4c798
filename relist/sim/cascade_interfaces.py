"""PettingZoo and Gymnasium interfaces to the cascade, so other RL libraries can train their own stage agents.

- ``CascadeAECEnv`` (``pettingzoo.AECEnv``): one agent per stage (``matching``, ``preranking``, ...). The
  stages act in cascade order within a request (unidirectional execution, which is why this is an
  agent-environment-cycle env and not a parallel one): each stage observes the candidates its upstream
  stages let through, then sets its fusion weights; after the last stage the user answers, and every
  agent receives the request's reward (dwell seconds or clicks). An episode is one simulated user until
  they leave for good (all agents terminate together).
- ``CascadeGymEnv`` (``gymnasium.Env``): the single-agent case: one stage acts (by default the last),
  the others keep the hand-set weights; one step is one request.

Both simulate one user at a time on top of a ``CascadeEnv``; users are numbered in order of arrival and
every draw is keyed, so the same seed gives the same episodes. ``users="train"`` (the default) draws
training people; ``users="eval"`` visits the held-out evaluation people in order (for evaluating an agent
trained elsewhere on the same people ``relist experiment unexrl`` evaluates on). Observations are float32 vectors
(``Cascade.obs_dims``), actions fusion weights in [-1, 1].
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from pettingzoo import AECEnv

from relist.sim.cascade_env import CascadeEnv, EnvState, default_actions


def _spaces(env: CascadeEnv, stage: int) -> tuple[spaces.Box, spaces.Box]:
    c = env.cascade
    return (
        spaces.Box(-np.inf, np.inf, (c.obs_dims[stage],), np.float32),
        spaces.Box(-1.0, 1.0, (c.action_dims[stage],), np.float32),
    )


class _OneUser:
    """One simulated user at a time; stage observations computed as the stages act."""

    def __init__(self, env: CascadeEnv, seed: int, users: str = "train"):
        if users not in env.people:
            raise ValueError(f"users must be one of {sorted(env.people)}, got {users!r}")
        self.env, self.seed, self.next_user, self.users = env, seed, 0, users
        self.state: EnvState | None = None

    def new_user(self, seed: int | None) -> None:
        if seed is not None:
            self.seed, self.next_user = seed, 0
        self.state = self.env.start(torch.tensor([self.next_user]), self.seed, self.users)
        self.next_user += 1

    def observation(self, stage: int, actions: list[torch.Tensor]) -> np.ndarray:
        """Stage ``stage``'s observation given the upstream ``actions`` (the rest keep default weights)."""
        pop, ctx = self.env.first(self.state)
        filler = default_actions(self.env.cascade, 1)
        with torch.no_grad():
            out = self.env.cascade(pop, ctx, actions[:stage] + filler[stage:])
        return out.obs[stage][0].cpu().numpy().astype(np.float32)

    def request(self, actions: list[torch.Tensor]) -> tuple[float, bool, dict]:
        req = self.env.step(self.state, actions)
        info = {
            "clicks": int(req.step.clicks.sum()),
            "shown_items": self.env.cascade.catalogue.sparse[req.out.slate[0], 0].cpu().numpy(),
            "session_end": bool(req.step.left[0]),
        }
        return float(req.reward[0]), bool(req.step.done[0]), info


class CascadeAECEnv(AECEnv):
    """One agent per stage, acting in cascade order (see the module docstring)."""

    metadata = {"render_modes": [], "name": "relist_cascade_v0", "is_parallelizable": False}

    def __init__(self, env: CascadeEnv, seed: int = 0, users: str = "train"):
        super().__init__()
        self.user = _OneUser(env, seed, users)
        self.possible_agents = list(env.cascade.names)
        self._spaces = {name: _spaces(env, s) for s, name in enumerate(self.possible_agents)}

    @functools.lru_cache(maxsize=None)
    def observation_space(self, agent: str) -> spaces.Box:
        return self._spaces[agent][0]

    @functools.lru_cache(maxsize=None)
    def action_space(self, agent: str) -> spaces.Box:
        return self._spaces[agent][1]

    def reset(self, seed: int | None = None, options: dict | None = None) -> None:
        self.user.new_user(seed)
        self.agents = list(self.possible_agents)
        self.rewards = {a: 0.0 for a in self.agents}
        self._cumulative_rewards = {a: 0.0 for a in self.agents}
        self.terminations = {a: False for a in self.agents}
        self.truncations = {a: False for a in self.agents}
        self.infos = {a: {} for a in self.agents}
        self._start_request()

    def _start_request(self) -> None:
        self._actions: list[torch.Tensor] = []
        self._obs = {a: np.zeros(self.observation_space(a).shape, np.float32) for a in self.possible_agents}
        self._obs[self.possible_agents[0]] = self.user.observation(0, [])
        self.agent_selection = self.possible_agents[0]

    def observe(self, agent: str) -> np.ndarray:
        return self._obs[agent].copy()

    def step(self, action) -> None:
        agent = self.agent_selection
        if self.terminations[agent] or self.truncations[agent]:
            self._was_dead_step(action)
            return
        self._cumulative_rewards[agent] = 0.0
        self.rewards = {a: 0.0 for a in self.agents}
        weights = np.clip(np.asarray(action, dtype=np.float32).reshape(-1), -1.0, 1.0)
        self._actions.append(torch.as_tensor(weights, device=self.user.env.device)[None, :])
        stage = self.possible_agents.index(agent)
        if stage + 1 < len(self.possible_agents):  # the next stage observes what this one let through
            nxt = self.possible_agents[stage + 1]
            self._obs[nxt] = self.user.observation(stage + 1, self._actions)
            self.agent_selection = nxt
        else:  # the user answers the slate
            reward, done, info = self.user.request(self._actions)
            self.rewards = {a: reward for a in self.agents}
            self.infos = {a: dict(info) for a in self.agents}
            if done:
                self.terminations = {a: True for a in self.agents}
                self.agent_selection = self.possible_agents[0]
            else:
                self._start_request()
        self._accumulate_rewards()

    def render(self) -> None:
        return None

    def close(self) -> None:
        pass


class CascadeGymEnv(gym.Env):
    """Single-agent: stage ``stage`` (default the last) acts, the others keep the hand-set weights."""

    metadata = {"render_modes": []}

    def __init__(self, env: CascadeEnv, stage: int = -1, seed: int = 0, users: str = "train"):
        self.user = _OneUser(env, seed, users)
        self.stage = stage % env.cascade.n_stages
        self.observation_space, self.action_space = _spaces(env, self.stage)
        self._default = default_actions(env.cascade, 1)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.user.new_user(seed)
        return self.user.observation(self.stage, self._default), {}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.user.state is None:
            raise RuntimeError("call reset() before step()")
        actions = list(self._default)
        weights = np.clip(np.asarray(action, dtype=np.float32).reshape(-1), -1.0, 1.0)
        actions[self.stage] = torch.as_tensor(weights, device=self.user.env.device)[None, :]
        reward, done, info = self.user.request(actions)
        obs = (
            self.user.observation(self.stage, self._default)
            if not done
            else np.zeros(self.observation_space.shape, np.float32)
        )
        return obs, reward, done, False, info
