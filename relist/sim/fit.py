"""Fitting the session parameters that the logs say something about.

What a prepared dataset tells about sessions is how many lists each user was shown (the per-user list
count) and, through the response model, how many clicks a logged list gets. It carries no timestamps
inside the log window, so it cannot split a user's lists into visits: a simulated *session* is a user's
run of requests over the log's window (6 days for MIND-small), and *returning* means coming back for
the next such window. With that reading:

- ``ref_clicks`` = the mean expected clicks of a list shown in the logged order (so the logged order
  leaves an average user's satisfaction where it started);
- the target requests per session = the mean number of lists per user in the full log;
- ``leave_bias`` is set by bisection so that simulating the logged order reproduces that target (with
  common random numbers the session length falls monotonically as ``leave_bias`` rises).

Subsampled logs: a dataset that keeps a random fraction q of a log's impressions (the MIND 5k subset
keeps 5,000 of MIND-small's 156,965 training impressions, q = 0.0319) thins every user's count, and
users whose impressions were all dropped vanish. ``requests_per_user`` undoes that under the
assumption that a user's count N in the full log is geometric on 1, 2, ... with mean m: each
impression survives with probability q, so among the users still seen
``E[K | K >= 1] = q m / (1 - E[(1 - q)^N])`` with ``E[x^N] = x / (m - (m - 1) x)``; m is solved for by
bisection. (On the 5k subset, 4,637 users with 1.078 lists each give m of about 3.45 (`relist sim train` prints
3.454), near MIND-small's published 156,965 impressions / 50,000 users = 3.14.)
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from relist.batch import rank
from relist.data.store import PreparedDataset
from relist.metrics import logged_order_scores
from relist.sim.session import Simulator

log = logging.getLogger("relist")


def _observed_mean(m: float, q: float) -> float:
    x = 1.0 - q
    pgf = x / (m - (m - 1.0) * x)  # E[x^N] for N geometric on {1, 2, ...} with mean m
    return q * m / max(1.0 - pgf, 1e-300)


def thinned_geometric_mean(observed_mean: float, log_fraction: float) -> float:
    """The mean m of a geometric count on {1, 2, ...} whose q-thinned counts, among users still seen, average
    ``observed_mean`` (see the module docstring)."""
    if not 0.0 < log_fraction <= 1.0:
        raise ValueError(f"log_fraction must be in (0, 1], got {log_fraction}")
    if log_fraction == 1.0:
        return observed_mean
    lo, hi = 1.0, 1e6
    if _observed_mean(hi, log_fraction) < observed_mean:
        raise ValueError(
            f"{observed_mean:.3f} lists per user cannot come from a {log_fraction} sample under the geometric model"
        )
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if _observed_mean(mid, log_fraction) < observed_mean else (lo, mid)
    return (lo * hi) ** 0.5


def requests_per_user(data: PreparedDataset, log_fraction: float = 1.0) -> dict:
    """Lists per user in the data, and the mean per user in the full log it was sampled from."""
    users = np.asarray(data.user_sparse[:, 0])
    counts = np.bincount(np.unique(users, return_inverse=True)[1])
    observed = float(counts.mean())
    histogram = {int(k): int(v) for k, v in zip(*np.unique(counts, return_counts=True))}
    return {
        "n_users": int(len(counts)),
        "observed_mean": observed,
        "log_fraction": log_fraction,
        "fitted_mean": thinned_geometric_mean(observed, log_fraction),
        "count_histogram": histogram,
    }


@torch.no_grad()
def expected_logged_clicks(sim: Simulator, n_users: int = 4096, seed: int = 0) -> float:
    """Mean expected clicks of the first request's list in the logged order, over simulated users."""
    users = sim.start(torch.arange(n_users), seed)
    candidates = sim.candidates(users)

    shown = candidates.reorder(rank(logged_order_scores(candidates), candidates.mask)).truncate(sim.slate_size)
    return float(sim.response.respond(shown).prob.sum(1).mean())


def mean_session_length(sim: Simulator, policy, n_users: int, seed: int) -> float:
    one = Simulator(sim.response, sim.pool, sim.params.replace(max_sessions=1), sim.slate_size)
    return float(one.run(policy, torch.arange(n_users), seed).requests_done.float().mean())


def calibrate_leave_bias(
    sim: Simulator, target: float, n_users: int = 2048, seed: int = 0, iterations: int = 12
) -> float:
    """The ``leave_bias`` at which the logged order's mean requests per session is ``target``."""

    def session_length(bias: float) -> float:
        sim.params = sim.params.replace(leave_bias=bias)
        return mean_session_length(sim, logged_order_scores, n_users, seed)

    bias = bisect_leave_bias(session_length, target, iterations)
    sim.params = sim.params.replace(leave_bias=bias)
    return bias


def bisect_leave_bias(session_length: Callable[[float], float], target: float, iterations: int) -> float:
    """The one bisection of ``leave_bias``: the value at which ``session_length(bias)`` (mean requests per
    session, which falls monotonically as the bias rises under common random numbers) is ``target``."""
    if target < 1.0:
        raise ValueError(f"a session has at least one request; target {target} is below 1")
    lo, hi = -12.0, 12.0  # long sessions at lo, about one request at hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if session_length(mid) > target else (lo, mid)
    return (lo + hi) / 2


def fit_session(
    sim: Simulator, data: PreparedDataset, log_fraction: float = 1.0, target: float | None = None, seed: int = 0
) -> dict:
    """Fit ``ref_clicks`` and ``leave_bias`` of ``sim.params`` in place; returns what was fitted and from what."""
    counts = requests_per_user(data, log_fraction)
    target = counts["fitted_mean"] if target is None else target
    sim.params = sim.params.replace(ref_clicks=expected_logged_clicks(sim, seed=seed))
    bias = calibrate_leave_bias(sim, min(target, sim.params.max_requests), seed=seed)
    achieved = mean_session_length(sim, logged_order_scores, 2048, seed + 1)  # on other users than the fit
    log.info(
        "session fit: ref_clicks %.3f, leave_bias %.3f, %.2f requests per session (target %.2f)",
        sim.params.ref_clicks,
        bias,
        achieved,
        target,
    )
    return {
        "requests_per_user": counts,
        "target_requests_per_session": target,
        "ref_clicks": sim.params.ref_clicks,
        "leave_bias": bias,
        "logged_requests_per_session": achieved,
    }
