"""Reinforcement learning over the stages of a cascade: UNEX-RL and its baselines.

``relist.rl.agents.MultiStageAgent`` is one actor-critic for every method of the UNEX-RL paper's table
(arXiv 2401.06470): single-stage DDPG and TD3, independent DDPG per stage, CTDE with a global critic and
UNEX-RL with the cascading information chain, stop-gradient and category-quantile rescaling, each
switchable. ``relist.rl.cem`` is the cross-entropy method over fixed fusion weights;
``relist.rl.loop`` collects experience from a ``relist.sim.cascade_env.CascadeEnv`` and trains;
``relist.rl.store.load_agent`` reads back the policy `relist rl train` wrote.
"""

from relist.rl.agents import METHODS, AgentConfig, MultiStageAgent

__all__ = ["METHODS", "AgentConfig", "MultiStageAgent"]
