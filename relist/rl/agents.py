"""One actor-critic for the methods of UNEX-RL's table (arXiv 2401.06470, AAAI'24), switch by switch.

Every stage s of the cascade has an observation o_s and a fusion-weight action a_s in [-1, 1]^{m_s}.
An *acting* stage has a deterministic actor a_s = pi_s(o_s) (DDPG-style, tanh output); the others keep the
hand-set default weights. Critics:

- ``critic="global"``: one Q_g(o_1..o_N, a_1..a_N) for all actors (centralised training, decentralised
  execution); the actors climb dQ_g/da_s.
- ``critic="local"``: each acting stage its own Q_s(o_s, a_s) (independent learners; with one acting stage
  this is plain DDPG, or TD3 with ``twin``).

UNEX-RL's three parts, each a switch:

- ``cic`` (cascading information chain): on every update the downstream observations are rebuilt from the
  stored first observation and the *current* upstream actions: for the actor loss, a_1 = pi_1(o_1),
  o_2 = C(o_1, a_1), a_2 = pi_2(o_2), ... through ``Cascade.forward``; for the critic's target, the same
  chain with the target actors from the next request's first observation. Without it (CTDE), o_s for
  s > 1 are the stale copies stored when the transition was collected. The critic's own input (o, a) is
  the stored one: the cascade is deterministic, so rebuilding o from the stored actions returns the
  stored o exactly (tested), and the rebuild is skipped.
- ``sg`` (stop-gradient on the cascading path). The cascading path is a_s -> o_{s+1}: what stage s keeps
  is what stage s+1 observes. In the actor loss of the CIC chain, with SG (the paper's choice: the path
  through the discrete top-K selections is long and its gradient noisy, so the paper stops it for
  variance), each o_{s+1} is a constant with respect to a_1..a_s, so actor s learns only from
  dQ/da_s, its own action's direct slope in the critic; upstream actors get no gradient from what their
  choice does to the downstream observations and, through the downstream actors, to a_{s+1}..a_N. In
  relist that is literal: top-K selection has no gradient, and the observations carry none. Without SG
  (``sg=False``) we give the path one: the mean scores in o_{s+1} carry a straight-through gradient
  through a softmax over stage s's fused scores (``Cascade.forward(relaxed=True)``: values unchanged,
  gradients as if the stage kept a soft mixture of its candidates), and the actor loss differentiates
  through it, so dQ/do_{s+1} do_{s+1}/da_s and dQ/da_{s+1} dpi_{s+1}/do_{s+1} do_{s+1}/da_s reach
  actor s (our construction; the paper does not spell out the path it cuts). ``chain`` builds the path
  either way; the tests check that the matching actor's gradient through the later stages is zero with
  SG and not without.
- ``cqr`` (category-quantile rescaling): rewards replaced by their quantile within their (user group,
  item group) cell among the replay buffer's rewards (``relist.rl.replay.quantile_rescale``). User group:
  quartile of history length (activity); item group: the group of the first shown item, the data's
  category or, where categories are missing (96% of MIND's catalogue), a k-means cluster of the click
  model's item vectors (``CascadeEnvConfig.item_groups``; a deviation: the paper's groups are not
  available). Without CQR, rewards are divided by a fixed scale (the default weights' mean reward).

``twin`` adds TD3's clipped double Q, target-policy smoothing and delayed actor updates.

``critic_obs`` (a deviation, off by default): the paper's global critic reads every stage's observation,
Q_g(o_1..o_N, a_1..a_N). In a deterministic cascade o_{s+1} = C(o_1, a_1..a_s), so Q_g(o_1, a_1..a_N)
(``critic_obs="first"``) holds the same information; the difference is the actors' gradient. With every
observation as input and the cascading path stopped (SG), dQ_g/da_1 is a partial derivative *holding the
downstream observations fixed*, yet matching's action acts on the reward only through those observations
(the candidates it hands on), so the critic is free to explain the effect by o_2..o_N and the upstream
actor follows whatever residual slope is left. On the synthetic environment this made every global-critic
method (CTDE, UNEX-RL, with or without CQR) fall below the hand-set weights within 300 steps while
independent DDPG improved; reading o_1 only, the same learners improved (docs/unexrl_mind.md). CIC still
matters with ``critic_obs="first"``: the actor loss and the critic's target evaluate Q_g at the actions
the current (target) actors take on the rebuilt o_2..o_N, and SG still cuts a_1 -> o_2 -> pi_2.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from relist.nn import mlp
from relist.rl.replay import Batch, Replay, quantile_rescale
from relist.sim.cascade import Cascade


@dataclass
class AgentConfig:
    acting: str = "all"  # "all" stages, or "last" (single-agent)
    critic: str = "global"  # "global" or "local"
    cic: bool = True
    sg: bool = True
    cqr: bool = True
    twin: bool = False  # TD3
    hidden: int = 64
    actor_lr: float = 1e-3
    critic_lr: float = 1e-3
    gamma: float = 0.9
    tau: float = 0.01
    batch_size: int = 256
    explore_noise: float = 0.3
    target_noise: float = 0.2
    noise_clip: float = 0.5
    policy_delay: int = 2  # with twin only
    critic_warmup: int = 50  # updates of the critics alone before the actors follow their gradients
    warm_start: bool = True  # actors start at the hand-set weights (False: near zero weights, a near-random order)
    critic_obs: str = "all"  # global critic's observations: "all" stages' (the paper) or the "first" only
    action_l2: float = 1.0  # penalty on the actors' pre-tanh outputs beyond +-2 (keeps them off tanh's flat tails)


# the paper's table: method -> switches (CEM is ``relist.rl.cem``)
METHODS: dict[str, dict] = {
    "ddpg": dict(acting="last", critic="local", cic=False, sg=True, cqr=False),
    "td3": dict(acting="last", critic="local", cic=False, sg=True, cqr=False, twin=True),
    "iddpg": dict(acting="all", critic="local", cic=False, sg=True, cqr=False),
    "unexrl_ctde": dict(acting="all", critic="global", cic=False, sg=True, cqr=True),
    "unexrl": dict(acting="all", critic="global", cic=True, sg=True, cqr=True),
    "unexrl_no_sg": dict(acting="all", critic="global", cic=True, sg=False, cqr=True),
    "unexrl_no_cqr": dict(acting="all", critic="global", cic=True, sg=True, cqr=False),
    # not in the paper: UNEX-RL with the global critic on the first observation only (see ``critic_obs``)
    "unexrl_q1": dict(acting="all", critic="global", cic=True, sg=True, cqr=True, critic_obs="first"),
}


def method_config(name: str, **overrides) -> AgentConfig:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(['cem', *METHODS])}")
    return replace(AgentConfig(**METHODS[name]), **overrides)


class Actor(nn.Module):
    """o -> tanh(MLP(o)); starts near ``start`` (the hand-set weights): small last layer, bias atanh(start)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, start: Tensor | None = None):
        super().__init__()
        self.net = mlp([obs_dim, hidden, hidden, act_dim])
        if start is not None:
            last = self.net[-1]
            with torch.no_grad():
                last.weight.mul_(0.1)
                last.bias.copy_(torch.atanh(start.reshape(-1).clamp(-0.9, 0.9)))

    def forward(self, obs: Tensor) -> Tensor:
        return torch.tanh(self.net(obs))

    def pre_activation(self, obs: Tensor) -> Tensor:
        return self.net(obs)


class Critic(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.net = mlp([in_dim, 2 * hidden, 2 * hidden, 1])

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return self.net(torch.cat([obs, act], dim=1)).squeeze(1)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, tau)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


class MultiStageAgent(nn.Module):
    """Actors, critics and their targets for a ``Cascade`` (see the module docstring)."""

    def __init__(
        self,
        cascade: Cascade,
        config: AgentConfig,
        default: list[Tensor],
        generator: torch.Generator,
        reward_scale: float = 1.0,
    ):
        super().__init__()
        if config.critic_obs not in ("all", "first"):
            raise ValueError(f"critic_obs must be 'all' or 'first', got {config.critic_obs!r}")
        if config.acting not in ("all", "last") or config.critic not in ("global", "local"):
            raise ValueError(
                f"acting must be 'all' or 'last' and critic 'global' or 'local', got {config.acting!r}, "
                f"{config.critic!r}"
            )
        self.cascade, self.config, self.generator, self.reward_scale = cascade, config, generator, reward_scale
        self.default = [d[:1] for d in default]  # (1, m_s) hand-set weights of non-acting stages
        n = cascade.n_stages
        self.acting = list(range(n)) if config.acting == "all" else [n - 1]
        self.obs_dims, self.act_dims = cascade.obs_dims, cascade.action_dims
        h = config.hidden
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            self.actors = nn.ModuleDict(
                {
                    str(s): Actor(
                        self.obs_dims[s], self.act_dims[s], h, self.default[s].cpu() if config.warm_start else None
                    )
                    for s in self.acting
                }
            )
            n_q = 2 if config.twin else 1
            if config.critic == "global":
                width = (sum(self.obs_dims) if config.critic_obs == "all" else self.obs_dims[0]) + sum(self.act_dims)
                self.critics = nn.ModuleList(nn.ModuleDict({"g": Critic(width, h)}) for _ in range(n_q))
            else:
                self.critics = nn.ModuleList(
                    nn.ModuleDict({str(s): Critic(self.obs_dims[s] + self.act_dims[s], h) for s in self.acting})
                    for _ in range(n_q)
                )
        self.updates = 0
        self.to(cascade.catalogue.device)
        self.default = [d.to(cascade.catalogue.device) for d in self.default]

    def distribute(self) -> None:
        """Wrap actors and critics in DistributedDataParallel (gradients averaged over the processes)."""
        self.actors = nn.ModuleDict({k: DDP(v) for k, v in self.actors.items()})
        self.critics = nn.ModuleList(nn.ModuleDict({k: DDP(v) for k, v in q.items()}) for q in self.critics)

    def start_training(self) -> None:
        """Targets and optimisers (after ``distribute``, so every process starts from the same weights)."""
        self.target_actors = copy.deepcopy(nn.ModuleDict({k: unwrap(v) for k, v in self.actors.items()}))
        self.target_critics = copy.deepcopy(
            nn.ModuleList(nn.ModuleDict({k: unwrap(v) for k, v in q.items()}) for q in self.critics)
        )
        for p in [*self.target_actors.parameters(), *self.target_critics.parameters()]:
            p.requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actors.parameters(), lr=self.config.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critics.parameters(), lr=self.config.critic_lr)

    # ------------------------------------------------------------------ acting

    def policy(self, noise: float = 0.0, target: bool = False, train: bool = False):
        """(stage, observation) -> action: the actors (plain, or the DDP-wrapped ones when ``train``), default
        weights for non-acting stages, optional Gaussian exploration noise; clipped to [-1, 1]."""
        actors = self.target_actors if target else self.actors

        def act(stage: int, obs: Tensor) -> Tensor:
            if stage not in self.acting:
                return self.default[stage].expand(obs.shape[0], -1)
            actor = actors[str(stage)]
            a = (actor if train else unwrap(actor))(obs)
            if noise > 0:
                a = a + noise * torch.randn(a.shape, generator=self.generator).to(a.device)
            return a.clamp(-1.0, 1.0)

        return act

    def chain(self, pop: Tensor, ctx: Tensor):
        """The cascading information chain of the current (trained) actors from first observations ``ctx``:
        every stage's observation rebuilt from the upstream actions, with the cascading path's gradient
        stopped (``sg``) or relaxed (see the module docstring)."""
        return self.cascade(pop, ctx, self.policy(train=True), relaxed=not self.config.sg)

    def _global_obs(self, obs: list[Tensor]) -> Tensor:
        return torch.cat(obs, 1) if self.config.critic_obs == "all" else obs[0]

    def split(self, x: Tensor, dims: list[int]) -> list[Tensor]:
        return list(x.split(dims, dim=1))

    # ------------------------------------------------------------------ learning

    def _rewards(self, batch: Batch, replay: Replay) -> Tensor:
        if self.config.cqr:
            ref_reward, ref_cell = replay.rewards()
            return quantile_rescale(batch.reward, batch.cell, ref_reward, ref_cell)
        return batch.reward / self.reward_scale

    def _next_value(self, batch: Batch) -> Tensor:
        c = self.config
        next_obs = self.split(batch.next_obs, self.obs_dims)
        policy = self.policy(target=True)
        smooth = c.target_noise if c.twin else 0.0

        def target_act(stage: int, obs: Tensor) -> Tensor:
            a = policy(stage, obs)
            if smooth > 0 and stage in self.acting:
                eps = (smooth * torch.randn(a.shape, generator=self.generator)).clamp(-c.noise_clip, c.noise_clip)
                a = (a + eps.to(a.device)).clamp(-1.0, 1.0)
            return a

        if c.critic == "global":
            if c.cic:  # rebuild the next request's chain under the target actors
                out = self.cascade(batch.next_pop, batch.next_ctx, target_act)
                obs, acts = out.obs, out.actions
            else:
                obs, acts = next_obs, [target_act(s, o) for s, o in enumerate(next_obs)]
            x, a = self._global_obs(obs), torch.cat(acts, 1)
            return torch.stack([q["g"](x, a) for q in self.target_critics]).amin(0)  # (B,)
        values = []
        for s in self.acting:
            a = target_act(s, next_obs[s])
            values.append(torch.stack([q[str(s)](next_obs[s], a) for q in self.target_critics]).amin(0))
        return torch.stack(values, 1)  # (B, acting)

    def update(self, batch: Batch, replay: Replay) -> dict[str, float]:
        c = self.config
        obs, acts = self.split(batch.obs, self.obs_dims), self.split(batch.act, self.act_dims)
        reward = self._rewards(batch, replay)
        with torch.no_grad():
            next_value = self._next_value(batch)
            keep = c.gamma * (1.0 - batch.done)
            target = (
                reward + keep * next_value if next_value.dim() == 1 else reward[:, None] + keep[:, None] * next_value
            )
        if c.critic == "global":
            x, a = self._global_obs(obs), torch.cat(acts, 1)
            critic_loss = sum(((q["g"](x, a) - target) ** 2).mean() for q in self.critics)
        else:
            critic_loss = sum(
                ((q[str(s)](obs[s], acts[s]) - target[:, k]) ** 2).mean()
                for q in self.critics
                for k, s in enumerate(self.acting)
            )
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        self.updates += 1
        out = {"critic_loss": float(critic_loss.detach()), "reward": float(reward.mean())}
        if self.updates <= c.critic_warmup or (c.twin and self.updates % c.policy_delay):
            return out
        first = self.critics[0]
        if c.critic == "global":
            if c.cic:  # the chain of current actors, rebuilt from the first observation
                chain = self.chain(batch.pop, batch.ctx)
                x, a = self._global_obs(chain.obs), torch.cat(chain.actions, 1)
            else:
                x = self._global_obs(obs)
                a = torch.cat([self.policy(train=True)(s, o) for s, o in enumerate(obs)], 1)
            actor_loss = -first["g"](x, a).mean()
        else:
            actor_loss = -sum(first[str(s)](obs[s], self.policy(train=True)(s, obs[s])).mean() for s in self.acting)
        if c.action_l2 > 0:  # on the buffer's observations: the same regulariser for every method
            actor_loss = actor_loss + c.action_l2 * sum(
                (unwrap(self.actors[str(s)]).pre_activation(obs[s]).abs() - 2.0).relu().pow(2).mean()
                for s in self.acting
            )
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        soft_update(self.target_actors, nn.ModuleDict({k: unwrap(v) for k, v in self.actors.items()}), c.tau)
        for t, q in zip(self.target_critics, self.critics):
            soft_update(t, nn.ModuleDict({k: unwrap(v) for k, v in q.items()}), c.tau)
        out["actor_loss"] = float(actor_loss.detach())
        return out
