"""Sessions: users request lists until they leave, and may come back for another session.

The batched simulator keeps a ``Users`` state (one row per simulated user) and advances it one request
at a time. For each request it shows the policy's first ``slate_size`` candidates, draws a click per
position from the response model, a dwell time per click, then updates the user's satisfaction and
decides whether the user leaves; a user who leaves may return for a new session.

Satisfaction ("temper", in the spirit of KuaiSim's leave model): starts at 0 in every session and
after each list becomes ``memory * s + (clicks - ref_clicks) / ref_clicks``: lists with fewer clicks than
the user expects lower it (relative to the expectation, so the same parameters suit data with different
click rates). After the d-th list of a session the user leaves with probability
``sigmoid(leave_bias - leave_sensitivity * s + fatigue * d)``: leaving rises as lists disappoint, and
even a feed the user loves does not hold them for ever (the fatigue term). At the end of a
session the user returns for another with probability ``sigmoid(return_bias + return_sensitivity * s)``,
up to ``max_sessions`` sessions (the horizon).

Dwell time of a click (seconds, a generative assumption: MIND logs no dwell time) is lognormal,
``exp(dwell_log_median + dwell_relevance * (a - mean a of the shown items) + dwell_sigma * z)``: users read
what appeals to them more for longer.

What is fitted and what is assumed (``relist.sim.fit`` does the fitting):
- ``ref_clicks``: fitted: the mean expected clicks of a list in the logged order.
- ``leave_bias``: fitted so that the mean number of requests per session under the logged order equals
  a target, by default the data's per-user list count corrected for subsampling (``fit``'s docstring).
- ``memory``, ``leave_sensitivity``, ``fatigue``, ``return_bias``, ``return_sensitivity``, ``max_sessions``
  and the dwell parameters: documented assumptions (defaults below), overridable.

Randomness comes only from ``relist.sim.rng`` keyed by (seed, user, request, slot), so outcomes are
reproducible and every policy meets the same users with the same random numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from relist.batch import ListBatch, rank
from relist.sim import rng


@dataclass
class SessionParams:
    ref_clicks: float = 0.5  # clicks per list that leave satisfaction unchanged (fitted)
    memory: float = 0.7  # how much of the previous satisfaction carries to the next list (assumed)
    leave_bias: float = -1.0  # log-odds of leaving after a list at neutral satisfaction (fitted)
    leave_sensitivity: float = (
        1.0  # satisfaction +1 (e.g. one list with twice the expected clicks) divides the odds of leaving by e (assumed)
    )
    fatigue: float = 0.1  # each list already seen in the session adds this to the log-odds of leaving (assumed)
    return_bias: float = 1.0  # log-odds of returning for another session at neutral satisfaction (assumed: 73%)
    return_sensitivity: float = 0.5  # (assumed)
    max_sessions: int = 3  # the horizon, in sessions (assumed)
    max_requests: int = 100  # safety cap on requests in one session
    dwell_log_median: float = math.log(60.0)  # median dwell of a click, seconds (assumed)
    dwell_sigma: float = 1.0  # (assumed)
    dwell_relevance: float = 0.3  # (assumed)

    def replace(self, **changes) -> "SessionParams":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class Users:
    """Per-user simulation state, one row per simulated user (all tensors (B,))."""

    seed: int
    key: Tensor  # int64 global user index: keys the random streams
    pop: Tensor  # int64 row in the pool's user population
    request: Tensor  # int64 requests made so far (over all sessions)
    depth: Tensor  # int64 requests in the current session
    session: Tensor  # int64 current session index
    satisfaction: Tensor  # float32
    done: Tensor  # bool: the user left and did not return
    clicks: Tensor  # float32 total clicks
    dwell: Tensor  # float32 total dwell seconds
    requests_done: Tensor  # int64 lists seen

    TENSORS = ("key", "pop", "request", "depth", "session", "satisfaction", "done", "clicks", "dwell", "requests_done")

    def __getitem__(self, rows) -> "Users":
        return dataclasses.replace(self, **{n: getattr(self, n)[rows] for n in self.TENSORS})

    def put(self, rows: Tensor, part: "Users") -> None:
        for n in self.TENSORS:
            getattr(self, n)[rows] = getattr(part, n)

    @property
    def size(self) -> int:
        return self.key.shape[0]


@dataclass
class Step:
    """What one request produced, per user row."""

    shown: ListBatch  # (B, S) the displayed lists
    prob: Tensor  # (B, S) click probabilities
    clicks: Tensor  # (B, S) bool
    dwell: Tensor  # (B, S) seconds, 0 where no click
    leave_prob: Tensor  # (B,)
    left: Tensor  # (B,) bool: the session ended after this list
    returned: Tensor  # (B,) bool: ...and the user came back for another
    done: Tensor  # (B,) bool: the user is gone for good


class Simulator:
    """Response model + request pool + session dynamics, batched over users on one device."""

    def __init__(self, response, pool, params: SessionParams | None = None, slate_size: int = 10):
        self.response, self.pool = response, pool
        self.params = params or SessionParams()
        self.slate_size = slate_size
        if slate_size < 1:
            raise ValueError(f"slate_size must be positive, got {slate_size}")

    @property
    def device(self) -> torch.device:
        return self.pool.device

    def start(self, keys: Tensor, seed: int, pop: Tensor | None = None) -> Users:
        """Fresh users for global indices ``keys`` (B,); each is drawn from the pool's population, or is the
        population row ``pop`` (B,) given."""
        keys = keys.to(device=self.device, dtype=torch.long)
        zeros = torch.zeros_like(keys)
        fzeros = torch.zeros(keys.shape, dtype=torch.float32, device=self.device)
        if pop is None:
            pop = rng.index(seed, self.pool.n_users, rng.USER, keys)
        return Users(
            seed,
            keys,
            pop.to(device=self.device, dtype=torch.long),
            zeros.clone(),
            zeros.clone(),
            zeros.clone(),
            fzeros.clone(),
            torch.zeros_like(keys, dtype=torch.bool),
            fzeros.clone(),
            fzeros.clone(),
            zeros.clone(),
        )

    def candidates(self, users: Users) -> ListBatch:
        """The candidate lists of every user's next request."""
        return self.pool.request(users.pop, rng.hash_keys(users.seed, users.key, users.request), users.seed)

    def step(self, users: Users, candidates: ListBatch, scores: Tensor) -> Step:
        """Show each user the top ``slate_size`` candidates by ``scores`` (B, C) and update ``users`` in place."""
        p, seed = self.params, users.seed
        if scores.shape != candidates.mask.shape:
            raise ValueError(f"policy scores have shape {tuple(scores.shape)}, expected {tuple(candidates.mask.shape)}")
        shown = candidates.reorder(rank(scores, candidates.mask)).truncate(self.slate_size)
        with torch.no_grad():
            prob, appeal = self.response.respond(shown)
        slot = torch.arange(shown.list_len, device=self.device)[None, :]
        key, req = users.key[:, None], users.request[:, None]
        clicks = (rng.uniform(seed, rng.CLICK, key, req, slot) < prob) & shown.mask
        n_real = shown.mask.sum(1, keepdim=True).clamp_min(1)
        centred = appeal - (appeal * shown.mask).sum(1, keepdim=True) / n_real
        log_dwell = (
            p.dwell_log_median
            + p.dwell_relevance * centred
            + p.dwell_sigma * rng.normal(seed, rng.DWELL, key, req, slot)
        )
        dwell = torch.exp(log_dwell) * clicks

        n_clicks = clicks.sum(1).float()
        users.satisfaction = p.memory * users.satisfaction + (n_clicks - p.ref_clicks) / max(p.ref_clicks, 1e-6)
        users.depth = users.depth + 1
        leave_prob = torch.sigmoid(p.leave_bias - p.leave_sensitivity * users.satisfaction + p.fatigue * users.depth)
        left = (rng.uniform(seed, rng.LEAVE, users.key, users.request) < leave_prob) | (users.depth >= p.max_requests)
        return_prob = torch.sigmoid(p.return_bias + p.return_sensitivity * users.satisfaction)
        returned = (
            left
            & (rng.uniform(seed, rng.RETURN, users.key, users.session) < return_prob)
            & (users.session + 1 < p.max_sessions)
        )
        done = users.done | (left & ~returned)
        users.clicks = users.clicks + n_clicks
        users.dwell = users.dwell + dwell.sum(1)
        users.requests_done = users.requests_done + 1
        users.request = users.request + 1
        users.session = users.session + returned.long()
        users.depth = torch.where(left, 0, users.depth)
        users.satisfaction = torch.where(left, 0.0, users.satisfaction)
        users.done = done
        return Step(shown, prob, clicks, dwell, leave_prob, left, returned, done)

    @property
    def max_steps(self) -> int:
        """Requests after which every user has left for good."""
        return self.params.max_sessions * self.params.max_requests

    def run(self, policy, keys: Tensor, seed: int, max_steps: int | None = None) -> Users:
        """Simulate users ``keys`` under ``policy`` (ListBatch -> scores) until every one of them is done."""

        def request(part: Users) -> None:
            candidates = self.candidates(part)
            with torch.no_grad():
                scores = policy(candidates)
            self.step(part, candidates, scores)

        users = self.start(keys, seed)
        roll_out(users, request, max_steps or self.max_steps)
        return users


def roll_out(state, request, max_steps: int) -> None:
    """The one rollout loop: advance the users of ``state`` (``Users``, or a state holding them that can be
    indexed by rows and ``put`` back) one request at a time, ``request(part)`` updating the rows still
    active, until every user is done or ``max_steps`` requests have passed."""
    users = state if isinstance(state, Users) else state.users
    for _ in range(max_steps):
        active = (~users.done).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        part = state[active]
        request(part)
        state.put(active, part)


def in_batches(n_users: int, batch_size: int, run: Callable[[Tensor], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``run(keys)`` over users 0..n_users-1 in batches of ``batch_size``, outcomes concatenated (batching
    never changes them: every draw is keyed by user)."""
    parts = [run(torch.arange(s, min(s + batch_size, n_users))) for s in range(0, n_users, batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def outcomes(users: Users) -> dict[str, Tensor]:
    """Per-user long-term outcomes as float64 tensors on the CPU."""
    return {
        "requests": users.requests_done.double().cpu(),
        "sessions": (users.session + 1).double().cpu(),
        "clicks": users.clicks.double().cpu(),
        "dwell": users.dwell.double().cpu(),
    }
