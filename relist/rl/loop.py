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

import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from relist.config import load_yaml, option, to_mapping
from relist.io import atomic_save_tensors, atomic_write_text, seal
from relist.rl.agents import (
    METHODS,
    AgentConfig,
    MultiStageAgent,
    method_config,
    unwrap,
)
from relist.rl.replay import Replay
from relist.sim.cascade_env import (
    CascadeEnv,
    CascadeEnvConfig,
    build_env,
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


@dataclass
class RLTrainConfig:
    env: Path = option(help="environment YAML (relist.sim.cascade_env.CascadeEnvConfig fields)")
    out: Path = option(
        help="output directory: metrics.json (final evaluation, the hand-set weights', learning curve), "
        "actors.safetensors (cem: fusion.safetensors)"
    )
    method: str = option(
        "unexrl",
        help="agent (cem: the cross-entropy method over fixed fusion weights, with the same request budget)",
        choices=("cem", *METHODS),
    )
    seed: int = option(0, help="random seed")
    steps: int = option(300, help="training steps (requests of every parallel user, per process)")
    n_envs: int = option(128, help="simulated users in parallel per process")
    updates_per_step: int = option(1, help="gradient updates per step")
    eval_every: int = option(100, help="steps between evaluations")
    eval_users: int = option(0, help="users per evaluation (0: every evaluation person once)")
    cem_population: int = option(12, help="cem: candidates per iteration")
    cem_users: int = option(32, help="cem: training users scoring each candidate")
    threads: int = option(1, help="torch threads per process")
    overwrite: bool = option(False, help="replace OUT if it exists")
    progress: bool = option(True, help="show a progress bar")


def _in_sync(agent: MultiStageAgent) -> bool:
    """Whether every process holds the same actor and critic weights (what DDP promises)."""
    if not torch.distributed.is_initialized():
        return True
    flat = torch.cat([p.detach().reshape(-1) for p in [*agent.actors.parameters(), *agent.critics.parameters()]])
    gathered = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


class _Progress:
    """A progress bar over training steps (or CEM's requests), with the latest evaluation beside it."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled or None, leave=False)

    def __call__(self, done: int, evaluation: dict | None = None) -> None:
        if evaluation is not None:
            self.bar.set_postfix(session_dwell=f"{evaluation['session_dwell']:.1f}", refresh=False)
        self.bar.update(max(0, min(done, self.bar.total) - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def train_rl(cfg: RLTrainConfig) -> dict | None:
    """`relist rl train`: one agent on the environment of ``cfg.env``; rank 0 writes ``OUT/metrics.json``
    and ``OUT/actors.safetensors`` (``OUT/fusion.safetensors`` for cem) and returns the metrics (other ranks
    under torchrun return None). The metrics hold the trained policy's final evaluation and the hand-set
    weights' on the same evaluation users and random numbers (``handset``)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(cfg.out)
    if rank == 0 and out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if cfg.method == "cem" and world > 1:
        raise ValueError("method cem runs in one process: start it without torchrun")
    agent_cfg = method_config(cfg.method) if cfg.method != "cem" else None
    env_cfg = load_yaml(CascadeEnvConfig, cfg.env)
    env, info = build_env(env_cfg, cfg.seed)
    loop = LoopConfig(
        steps=cfg.steps,
        n_envs=cfg.n_envs,
        updates_per_step=cfg.updates_per_step,
        eval_every=cfg.eval_every,
        eval_users=cfg.eval_users,
    )
    if cfg.method == "cem":
        return _train_cem(cfg, env, info, env_cfg, loop)
    bar = _Progress(loop.steps, cfg.method, "step", cfg.progress and rank == 0)
    try:
        agent, curve = train_agent(env, agent_cfg, loop, cfg.seed, progress=bar)
    finally:
        bar.close()
    in_sync = _in_sync(agent)
    weights = {
        f"{k}.{n}": p.detach().clone() for k, a in agent.actors.items() for n, p in unwrap(a).state_dict().items()
    }
    if torch.distributed.is_initialized():
        # every rank done with the group, and its DDP modules (whose reducers hold the group) gone, before the
        # group is destroyed: a reducer outliving its group aborted a process at exit now and then
        torch.distributed.barrier()
        del agent
        gc.collect()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(weights, out / "actors.safetensors")
    result = {
        "method": cfg.method,
        "world_size": world,
        "ranks_in_sync": in_sync,
        "env": info,
        "env_config": to_mapping(env_cfg),
        "curve": curve,
        "final": curve[-1],
        "handset": evaluate(env, None, loop, cfg.seed),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "agent": asdict(agent_cfg),
    }
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
    seal(out, ["actors.safetensors", "metrics.json"])
    return result


def _train_cem(cfg: RLTrainConfig, env: CascadeEnv, info: dict, env_cfg: CascadeEnvConfig, loop: LoopConfig) -> dict:
    """`relist rl train --method cem`: CEM with the RL methods' request budget (``steps x n_envs``), as
    `relist experiment unexrl` runs it; writes ``OUT/fusion.safetensors`` (one (1, m) tensor per stage)."""
    from relist.rl.cem import CEMConfig, cem_curve, train_cem

    budget = cfg.steps * cfg.n_envs
    cem = CEMConfig(iterations=10**6, population=cfg.cem_population, users=cfg.cem_users, budget=budget)
    bar = _Progress(budget, "cem", "request", cfg.progress)
    try:
        weights, history = train_cem(env, cem, cfg.seed, progress=lambda entry: bar(entry["requests"]))
    finally:
        bar.close()
    curve = cem_curve(env, history, loop, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(
        {str(s): w.detach().clone().contiguous() for s, w in enumerate(weights)}, out / "fusion.safetensors"
    )
    result = {
        "method": "cem",
        "world_size": 1,
        "ranks_in_sync": True,
        "env": info,
        "env_config": to_mapping(env_cfg),
        "curve": curve,
        "final": curve[-1],
        "handset": evaluate(env, None, loop, cfg.seed),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "cem": asdict(cem),
        "history": history,
    }
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
    seal(out, ["fusion.safetensors", "metrics.json"])
    return result
