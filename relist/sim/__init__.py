"""User simulation: click response models, sessions with leaving and returning, and the A/B harness.

``load_simulator(SIM)`` opens a directory written by ``relist sim train`` or ``relist sim truth``;
``Simulator.run(policy, users, seed)`` simulates users until they leave; ``relist.sim.env`` holds the
gymnasium interfaces and ``relist.sim.abtest`` the harness behind ``relist abtest``.
"""

from relist.sim.check import check_simulator
from relist.sim.session import SessionParams, Simulator, outcomes
from relist.sim.store import load_simulator

__all__ = ["SessionParams", "Simulator", "check_simulator", "load_simulator", "outcomes"]
