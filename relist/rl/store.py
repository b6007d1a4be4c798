"""Reading back what `relist rl train` wrote: the trained cascade policy, on the environment it learned in.

An RL run directory holds ``metrics.json`` (the run's configuration, the environment's settings and its
evaluations) and ``actors.safetensors`` (one actor per acting stage, keys ``STAGE.PARAMETER``); a CEM run
holds ``fusion.safetensors`` instead (one (1, m) weight vector per stage, keyed by stage). Both are sealed
(checksums verified on loading).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from relist.config import from_mapping
from relist.io import CorruptFileError, load_tensors, read_json, verify
from relist.rl.agents import Actor
from relist.sim.cascade_env import CascadeEnv, CascadeEnvConfig, build_env, default_actions

METRICS = "metrics.json"
ACTORS = "actors.safetensors"
FUSION = "fusion.safetensors"


@dataclass
class TrainedPolicy:
    """A cascade policy as `relist rl train` left it: ``policy(stage, observations)`` gives each request's
    fusion weights (the actors' for their stages, the hand-set weights elsewhere; CEM's fixed weights)."""

    method: str
    env: CascadeEnv
    metrics: dict
    actors: nn.ModuleDict | None = None  # stage (as text) -> Actor; None for CEM
    fusion: list[Tensor] | None = None  # CEM: (1, m_s) per stage

    @torch.no_grad()
    def __call__(self, stage: int, obs: Tensor) -> Tensor:
        if self.fusion is not None:
            return self.fusion[stage].to(obs.device).expand(obs.shape[0], -1)
        if str(stage) in self.actors:
            return self.actors[str(stage)](obs).clamp(-1.0, 1.0)
        return default_actions(self.env.cascade, 1)[stage].to(obs.device).expand(obs.shape[0], -1)


def load_agent(directory: str | Path, env: CascadeEnv | None = None) -> TrainedPolicy:
    """The policy in a `relist rl train` output directory. Without ``env`` the environment is rebuilt from
    the settings and seed the run recorded (the same world, users and calibration)."""
    directory = Path(directory)
    if not (directory / METRICS).is_file():
        raise FileNotFoundError(f"{directory} is not a `relist rl train` output (no {METRICS})")
    verify(directory)
    metrics = read_json(directory / METRICS)
    if not isinstance(metrics, dict) or "method" not in metrics or "config" not in metrics:
        raise CorruptFileError(f"{directory / METRICS}: not the metrics of a `relist rl train` run")
    if env is None:
        if "env_config" not in metrics:
            raise ValueError(f"{directory}: written before runs recorded their environment; pass env=")
        settings = from_mapping(CascadeEnvConfig, metrics["env_config"], f"{directory / METRICS}: env_config")
        env, _ = build_env(settings, int(metrics["config"]["seed"]))
    method = metrics["method"]
    if method == "cem":
        tensors = load_tensors(directory / FUSION)
        fusion = [tensors[str(s)].to(env.device) for s in range(env.cascade.n_stages) if str(s) in tensors]
        if len(fusion) != env.cascade.n_stages:
            raise CorruptFileError(f"{directory / FUSION}: expected {env.cascade.n_stages} stages' weights")
        return TrainedPolicy(method, env, metrics, fusion=fusion)
    tensors = load_tensors(directory / ACTORS)
    stages = sorted({int(key.partition(".")[0]) for key in tensors})
    hidden = int(metrics["agent"]["hidden"])
    actors = nn.ModuleDict()
    for s in stages:
        if not 0 <= s < env.cascade.n_stages:
            raise CorruptFileError(f"{directory / ACTORS}: stage {s} is not a stage of the environment")
        actor = Actor(env.cascade.obs_dims[s], env.cascade.action_dims[s], hidden)
        own = {key.partition(".")[2]: value for key, value in tensors.items() if key.partition(".")[0] == str(s)}
        try:
            actor.load_state_dict(own)
        except RuntimeError as err:
            raise CorruptFileError(f"{directory / ACTORS}: stage {s} does not fit this environment ({err})") from None
        actors[str(s)] = actor.to(env.device).eval()
    return TrainedPolicy(method, env, metrics, actors=actors)
