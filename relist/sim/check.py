"""``check_simulator``: the simulator's contract, checked on a few users (as TorchRL's check_env_specs)."""

from __future__ import annotations

import dataclasses

import torch

from relist.sim import rng
from relist.sim.policies import RandomPolicy
from relist.sim.session import Simulator, outcomes


def _scores(candidates, seed: int) -> torch.Tensor:
    rows = torch.arange(candidates.size, device=candidates.device)[:, None]
    slots = torch.arange(candidates.list_len, device=candidates.device)[None, :]
    return rng.uniform(seed, rng.POLICY, rows, slots)


def check_simulator(sim: Simulator, seed: int = 0, n_users: int = 16) -> None:
    """Raise ``AssertionError`` naming the broken promise: shapes, ranges, padding, determinism, batching."""
    users = sim.start(torch.arange(n_users), seed)
    candidates = sim.candidates(users)
    size, width = candidates.mask.shape
    assert size == n_users, f"{size} candidate lists for {n_users} users"
    assert candidates.item_sparse.shape[:2] == (size, width) and candidates.item_dense.shape[:2] == (size, width)
    assert candidates.user_sparse.shape[0] == size and candidates.user_hist.shape[0] == size
    assert candidates.mask[:, 0].all(), "every candidate list needs a real first item"
    assert (candidates.item_id[~candidates.mask] == 0).all(), "padding must carry item id 0"
    # padding first in the scores must still be shown last
    scores = _scores(candidates, seed).masked_fill(~candidates.mask, 1e9)
    step = sim.step(users, candidates, scores)
    shown = step.shown
    assert shown.list_len <= sim.slate_size, f"showed {shown.list_len} items, slate size is {sim.slate_size}"
    real = shown.mask
    assert (real[:, 1:] <= real[:, :-1]).all(), "padding was shown before a real item"
    assert step.prob.shape == real.shape, f"click probabilities {tuple(step.prob.shape)} for slates {tuple(real.shape)}"
    assert ((step.prob >= 0) & (step.prob <= 1)).all(), "click probabilities outside [0, 1]"
    assert (step.prob[~real] == 0).all(), "padding has a click probability"
    assert not step.clicks[~real].any(), "a click on padding"
    assert ((step.dwell >= 0) & ((step.dwell > 0) == step.clicks)).all(), "dwell must be positive exactly on clicks"
    assert ((step.leave_prob > 0) & (step.leave_prob < 1)).all(), "leave probabilities outside (0, 1)"
    assert (step.returned <= step.left).all() and (step.done == (step.left & ~step.returned)).all()

    def run(keys: torch.Tensor, run_seed: int) -> dict:
        return outcomes(sim.run(RandomPolicy(7), keys, run_seed))

    keys = torch.arange(n_users)
    first, again = run(keys, seed), run(keys, seed)
    for name in first:
        assert torch.equal(first[name], again[name]), f"same seed, different {name}"
    halves = [run(keys[: n_users // 2], seed), run(keys[n_users // 2 :], seed)]
    for name in first:
        assert torch.equal(first[name], torch.cat([h[name] for h in halves])), (
            f"{name} depends on how users are batched"
        )
    other = run(keys, seed + 1)
    assert any(not torch.equal(first[n], other[n]) for n in first), "a different seed gave identical outcomes"
    assert (first["requests"] >= first["sessions"]).all() and (first["sessions"] <= sim.params.max_sessions).all()


def replace_params(sim: Simulator, **changes) -> Simulator:
    """A simulator sharing ``sim``'s response model and pool with some session parameters changed."""
    return Simulator(sim.response, sim.pool, dataclasses.replace(sim.params, **changes), sim.slate_size)
