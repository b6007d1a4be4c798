"""`relist rl train`: one cascade agent (UNEX-RL, a baseline, or CEM over fixed fusion weights) on the
environment of an env.yaml, with the hand-set weights evaluated on the same users; under ``torchrun`` every
process collects and learns (``relist.rl.loop``)."""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from relist.config import load_yaml, option, to_mapping
from relist.io import atomic_save_tensors, atomic_write_text, seal
from relist.rl.agents import METHODS, MultiStageAgent, method_config, unwrap
from relist.rl.cem import CEMConfig, cem_curve, train_cem
from relist.rl.loop import LoopConfig, evaluate, train_agent
from relist.sim.cascade_env import CascadeEnv, CascadeEnvConfig, build_env

log = logging.getLogger("relist")


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
        **_common_metrics(cfg, env, info, env_cfg, loop, curve),
        "agent": asdict(agent_cfg),
    }
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
    seal(out, ["actors.safetensors", "metrics.json"])
    return result


def _train_cem(cfg: RLTrainConfig, env: CascadeEnv, info: dict, env_cfg: CascadeEnvConfig, loop: LoopConfig) -> dict:
    """`relist rl train --method cem`: CEM with the RL methods' request budget (``steps x n_envs``), as
    `relist experiment unexrl` runs it; writes ``OUT/fusion.safetensors`` (one (1, m) tensor per stage)."""

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
        **_common_metrics(cfg, env, info, env_cfg, loop, curve),
        "cem": asdict(cem),
        "history": history,
    }
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))
    seal(out, ["fusion.safetensors", "metrics.json"])
    return result


def _common_metrics(cfg: RLTrainConfig, env: CascadeEnv, info: dict, env_cfg, loop: LoopConfig, curve: list) -> dict:
    """What every method's metrics.json holds: the environment, the curve and its end, the hand-set weights
    on the same evaluation users, and the configuration."""
    return {
        "env": info,
        "env_config": to_mapping(env_cfg),
        "curve": curve,
        "final": curve[-1],
        "handset": evaluate(env, None, loop, cfg.seed),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
