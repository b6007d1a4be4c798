"""The RL `relist` commands (merged into the command table of `relist.cli`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from relist.config import option
from relist.experiments.unexrl import ALL_METHODS, UnexrlExperimentConfig


@dataclass
class RLTrainConfig:
    env: Path = option(help="environment YAML (relist.sim.cascade_env.CascadeEnvConfig fields)")
    out: Path = option(help="output directory: metrics.json (final evaluation, learning curve), actors.safetensors")
    method: str = option("unexrl", help="agent: " + ", ".join(m for m in ALL_METHODS if m != "cem"))
    seed: int = option(0, help="random seed")
    steps: int = option(300, help="training steps (requests of every parallel user, per process)")
    n_envs: int = option(128, help="simulated users in parallel per process")
    updates_per_step: int = option(1, help="gradient updates per step")
    eval_every: int = option(100, help="steps between evaluations")
    eval_users: int = option(500, help="users per evaluation")
    threads: int = option(1, help="torch threads per process")
    overwrite: bool = option(False, help="replace OUT if it exists")


def _in_sync(agent) -> bool:
    """Whether every process holds the same actor and critic weights (what DDP promises)."""
    if not torch.distributed.is_initialized():
        return True
    flat = torch.cat([p.detach().reshape(-1) for p in [*agent.actors.parameters(), *agent.critics.parameters()]])
    gathered = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def run_rl_train(cfg: RLTrainConfig) -> None:
    from safetensors.torch import save_file

    from relist.rl.agents import method_config, unwrap
    from relist.rl.loop import LoopConfig, train_agent
    from relist.sim.cascade_env import CascadeEnvConfig, build_env

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(cfg.out)
    if rank == 0 and out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    agent_cfg = method_config(cfg.method)
    env, info = build_env(CascadeEnvConfig.from_yaml(cfg.env))
    loop = LoopConfig(steps=cfg.steps, n_envs=cfg.n_envs, updates_per_step=cfg.updates_per_step,
                      eval_every=cfg.eval_every, eval_users=cfg.eval_users)
    agent, curve = train_agent(env, agent_cfg, loop, cfg.seed)
    in_sync = _in_sync(agent)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    weights = {f"{k}.{n}": p.detach().contiguous() for k, a in agent.actors.items() for n, p in unwrap(a).state_dict().items()}
    save_file(weights, str(out / "actors.safetensors"))
    result = {"method": cfg.method, "world_size": world, "ranks_in_sync": in_sync, "env": info, "curve": curve,
              "final": curve[-1], "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "agent": asdict(agent_cfg)}
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(out / "metrics.json")
    last = curve[-1]
    print(f"{cfg.method}: session dwell {last['session_dwell']:.1f} s, session length {last['session_length']:.2f} "
          f"after {last['requests']} requests on {world} process(es); wrote {out}/metrics.json, actors.safetensors")


def run_experiment_unexrl(cfg: UnexrlExperimentConfig) -> None:
    from relist.experiments.unexrl import run_experiment

    result = run_experiment(cfg)
    print(result["summary"])
    print(f"wrote {cfg.out}/results.csv, curves.csv, summary.md, curves.png, stages.png, env.json")


COMMANDS: dict = {
    ("rl", "train"): (RLTrainConfig, run_rl_train, "train one cascade agent (UNEX-RL or a baseline); runs under torchrun", ()),
    ("experiment", "unexrl"): (UnexrlExperimentConfig, run_experiment_unexrl,
                               "UNEX-RL's table on a simulated cascade: methods x seeds, learning curves, 3/4/5 stages", ()),
}
