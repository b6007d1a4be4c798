"""Collect experience from a cascade environment and train a ``MultiStageAgent``; evaluate any cascade policy.

Experience: ``n_envs`` simulated users request in lockstep; a user who leaves for good is replaced by a
new one (users are numbered in order of arrival, so every random draw is keyed and a seed replays the
same run). A transition is one request: every stage's observation and action, the request's reward
(dwell seconds or clicks), whether the user left for good, and the next request's first observation
(for CIC) and stage observations as they were collected (for the stale methods). Training users are
drawn from the environment's training people only. The first ``warmup`` steps act uniformly at random.
Every ``eval_every`` steps the deterministic policy is evaluated on the evaluation people (held out:
never met in training; the same users and random numbers for every method of a seed): the learning
curve, against the simulated requests used for training (``steps x n_envs``, the budget every method
of ``relist experiment unexrl`` gets).

Under ``torchrun`` (WORLD_SIZE > 1) every process is an environment worker with its own users (keys
offset by rank) and its own replay buffer, and a learner whose actors and critics are wrapped in
DistributedDataParallel, so gradients are averaged over the processes; rank 0 evaluates.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from relist.rl.agents import (
    AgentConfig,
    MultiStageAgent,
)
from relist.rl.replay import Replay
from relist.sim.cascade_env import (
    CascadeEnv,
    default_actions,
    session_metrics,
)

log = logging.getLogger("relist")
RANK_STRIDE = 10_000_000  # user keys of rank r start at r * RANK_STRIDE


@dataclass
class LoopConfig:
    steps: int = 300  # lockstep requests of the n_envs users
    n_envs: int = 128
    warmup: int = 20
    updates_per_step: int = 1
    buffer: int = 100_000
    eval_every: int = 100
    eval_users: int = 0  # 0: every evaluation person once
    eval_seed: int = 10_000


def user_groups(env: CascadeEnv, n_groups: int = 4) -> Tensor:
    """(N,) group of every population user: quantile bucket of its history length (CQR's user groups)."""
    everyone = torch.arange(env.cascade.catalogue.n_users, device=env.device)
    length = env.cascade.catalogue.history_known(everyone).sum(1).float()
    edges = torch.quantile(length, torch.linspace(0, 1, n_groups + 1, device=env.device)[1:-1])
    return torch.bucketize(length, edges)


def greedy_policy(agent: MultiStageAgent):
    policy = agent.policy()

    def act(stage: int, obs: Tensor) -> Tensor:
        with torch.no_grad():
            return policy(stage, obs)

    return act


def evaluate_users(env: CascadeEnv, policy, cfg: LoopConfig, seed: int) -> dict:
    """Per-user outcomes of the evaluation users (``cfg.eval_users``; 0: every evaluation person once) under
    ``policy``, with the seed's common random numbers (eval seed ``cfg.eval_seed + seed``)."""
    return env.evaluate(policy, cfg.eval_users or env.n_eval_people, cfg.eval_seed + seed)


def evaluate(env: CascadeEnv, policy, cfg: LoopConfig, seed: int) -> dict[str, float]:
    """``session_metrics`` of ``evaluate_users``."""
    return session_metrics(evaluate_users(env, policy, cfg, seed))


def train_agent(
    env: CascadeEnv,
    config: AgentConfig,
    loop: LoopConfig,
    seed: int,
    progress: Callable[[int, dict | None], None] | None = None,
) -> tuple[MultiStageAgent, list[dict]]:
    """Train one agent; returns it and its learning curve (rank 0's evaluations; empty on other ranks).
    ``progress(step, evaluation or None)`` is called on rank 0 after every step and evaluation (it only
    reports: the run is the same with or without it)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    progress = progress if rank == 0 else None
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    cascade = env.cascade
    agent = MultiStageAgent(cascade, config, default_actions(cascade, 1), torch.Generator().manual_seed(seed))
    agent.generator = generator  # exploration and sampling differ per rank; the initial weights do not
    if world > 1:
        agent.distribute()
    agent.start_training()
    groups = user_groups(env)
    n_cat = int(cascade.catalogue.category.max()) + 1
    replay = Replay(
        loop.buffer, cascade.context_dim, sum(cascade.obs_dims), sum(cascade.action_dims), device=env.device
    )
    next_key = rank * RANK_STRIDE + loop.n_envs
    state = env.start(torch.arange(loop.n_envs) + rank * RANK_STRIDE, seed)
    pending: dict | None = None  # the previous step's transitions, waiting for their next observations
    curve, rewards_seen = [], []
    started = time.perf_counter()
    for step in range(loop.steps + 1):
        if rank == 0 and (step % loop.eval_every == 0 or step == loop.steps):
            metrics = evaluate(env, greedy_policy(agent), loop, seed)
            curve.append(
                {
                    "step": step,
                    "requests": step * loop.n_envs * world,
                    "seconds": time.perf_counter() - started,
                    **metrics,
                }
            )
            log.info(
                "step %d: session dwell %.1f, session length %.2f",
                step,
                metrics["session_dwell"],
                metrics["session_length"],
            )
            if progress is not None:
                progress(step, curve[-1])
        if step == loop.steps:
            break
        pop, ctx = env.first(state)
        if step < loop.warmup:
            acts = [
                (torch.rand(pop.shape[0], m, generator=generator) * 2 - 1).to(env.device) if s in agent.acting else None
                for s, m in enumerate(cascade.action_dims)
            ]
            policy = lambda s, obs: acts[s] if acts[s] is not None else agent.default[s].expand(obs.shape[0], -1)  # noqa: E731
        else:
            noisy = agent.policy(noise=config.explore_noise)

            def policy(s, obs):
                with torch.no_grad():
                    return noisy(s, obs)

        request = env.step(state, policy)
        obs, act = torch.cat(request.out.obs, 1), torch.cat(request.out.actions, 1)
        if pending is not None:  # the previous requests' next observations are this step's observations
            slots = pending.pop("slots")
            replay.add(**pending, next_obs=obs[slots])
        shown_category = cascade.catalogue.category[request.out.slate[:, 0]]
        done = request.step.done
        next_pop, next_ctx = env.first(state)
        transition = dict(
            pop=pop,
            ctx=ctx,
            obs=obs,
            act=act,
            reward=request.reward,
            cell=groups[pop] * n_cat + shown_category,
            done=done.float(),
            next_pop=next_pop,
            next_ctx=next_ctx,
        )
        if done.any():
            replay.add(**{k: v[done] for k, v in transition.items()}, next_obs=torch.zeros_like(obs[done]))
        alive = (~done).nonzero().squeeze(1)
        pending = {k: v[alive] for k, v in transition.items()}
        pending["slots"] = alive
        rewards_seen.append(request.reward)
        if step + 1 == loop.warmup:
            agent.reward_scale = float(torch.cat(rewards_seen).mean().clamp_min(1e-6))
        gone = done.nonzero().squeeze(1)
        if gone.numel():  # new users take the places of those who left for good
            fresh = env.start(torch.arange(next_key, next_key + gone.numel()), seed)
            next_key += gone.numel()
            state.put(gone, fresh)
        if step + 1 >= loop.warmup and replay.size >= config.batch_size:
            for _ in range(loop.updates_per_step):
                agent.update(replay.sample(config.batch_size, generator), replay)
        if progress is not None:
            progress(step + 1, None)
    agent.replay = replay  # kept for inspection (tests, diagnostics)
    return agent, curve


def fixed_policy(weights: list[Tensor]):
    """A policy that gives every request the same fusion weights (CEM's candidates, random weights)."""
    return lambda s, obs: weights[s].to(obs.device).expand(obs.shape[0], -1)
