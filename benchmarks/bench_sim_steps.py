"""Simulated user-steps per second: the batched simulator against a plain per-user Python loop.

A user-step is one request of one user: draw the candidates, let the policy order them, show the first
10, draw a click per position and a dwell time per click, update satisfaction, decide leaving and
returning. Setup: a catalogue of 100,000 items and 20,000 users (a synthetic ground truth of that size,
item features made as the synthetic source makes them), candidate lists of 10 drawn from the catalogue,
the logged order as the policy (so the figure is the simulator's own cost), batch 1024. Each figure is
the best of ``--repeats`` timed runs, since other processes on a shared machine only ever slow it down.

Measured for both response models: the synthetic ground truth and the learned factorised click model
(randomly initialised at this vocabulary: speed does not depend on the weights). The reference is the
same simulator driven one user at a time (batch 1) in a Python loop, measured in the same run; the
ratio is batched / per-user. Target on the project's 2-core machine: at least 100,000 user-steps/s.

    python benchmarks/bench_sim_steps.py [--batch 1024] [--items 100000] [--steps 200] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from relist.data.synthetic import SyntheticClickModel, SyntheticParams
from relist.metrics import logged_order_scores
from relist.sim.pool import synthetic_item_pool
from relist.sim.response import ClickModelConfig, FactorisedClickModel, TruthResponse
from relist.sim.session import SessionParams, Simulator


def batched_rate(sim: Simulator, batch: int, steps: int, repeats: int, seed: int = 0) -> float:
    """User-steps per second of ``steps`` lockstep requests of ``batch`` users; the best of ``repeats``."""
    users = sim.start(torch.arange(batch), seed)
    for _ in range(3):  # warm-up
        candidates = sim.candidates(users)
        sim.step(users, candidates, logged_order_scores(candidates))
    best = 0.0
    for _ in range(repeats):
        sync(sim.device)
        started = time.perf_counter()
        for _ in range(steps):
            candidates = sim.candidates(users)
            sim.step(users, candidates, logged_order_scores(candidates))
        sync(sim.device)
        best = max(best, batch * steps / (time.perf_counter() - started))
    return best


def per_user_rate(sim: Simulator, n_steps: int, repeats: int, seed: int = 0) -> float:
    """User-steps per second when each user is simulated alone, one request at a time; the best of ``repeats``."""
    keys = [torch.tensor([k]) for k in range(n_steps)]
    best = 0.0
    for _ in range(repeats):
        sync(sim.device)
        started = time.perf_counter()
        for key in keys:
            user = sim.start(key, seed)
            candidates = sim.candidates(user)
            sim.step(user, candidates, logged_order_scores(candidates))
        sync(sim.device)
        best = max(best, n_steps / (time.perf_counter() - started))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--list-len", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--loop-steps", type=int, default=300, help="user-steps of the per-user reference loop")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repetitions; the best is reported (others share the machine)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params = replace(SyntheticParams(), n_items=args.items, n_users=args.users)
    truth = SyntheticClickModel.sample(params, seed=0)
    pool = synthetic_item_pool(truth, width=args.list_len, device=device)
    learned = FactorisedClickModel(pool.schema, ClickModelConfig()).to(device).eval()
    session = SessionParams(ref_clicks=1.0, leave_bias=-1.0)
    print(
        f"load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other processes "
        "slow every figure down)"
    )
    print(
        f"pool: {args.items:,} items, {args.users:,} users; lists of {args.list_len}; batch {args.batch}; "
        f"device {device}; torch threads {torch.get_num_threads()}"
    )
    print(f"{'response model':<28}{'batched steps/s':>18}{'per-user steps/s':>18}{'ratio':>9}")
    for name, response in (
        ("synthetic ground truth", TruthResponse(truth, device)),
        ("learned factorised model", learned),
    ):
        sim = Simulator(response, pool, session, slate_size=args.list_len)
        with torch.no_grad():
            batched = batched_rate(sim, args.batch, args.steps, args.repeats)
            looped = per_user_rate(sim, args.loop_steps, args.repeats)
        print(f"{name:<28}{batched:>18,.0f}{looped:>18,.0f}{batched / looped:>8.0f}x")


if __name__ == "__main__":
    main()
