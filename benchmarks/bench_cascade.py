"""Cascade user-requests per second: the indexed cascade against a naive one, measured in the same run.

A user-request is one request of one simulated user through the whole cascade (matching keeps 500 of the
catalogue, pre-ranking 100, ranking 10, by default) and the session model's answer to the 10 shown
(clicks, dwell, leaving). Setup: a synthetic catalogue of 100,000 items and 20,000 users, batch 1024,
the default fusion weights as every stage's action.

- indexed (``relist.sim.cascade``): matching through a FAISS IVF inner-product index over the matching
  tower's item vectors; every stage's view of every item built once when the cascade is built.
- naive: the same stage models computed the plain way: exact matching scores against the whole pool,
  then top-k; every later stage's view of an item (its vector plus the stage's error) built for every
  candidate of every request, and the user towers over every history item of every request.

Both return the same scores for the same items; the script also prints the indexed matching's recall of
the naive (exact) matching set and the overlap of the shown slates. Each figure is the best of
``--repeats`` timed runs (other processes on a shared machine only ever slow it down).

    python benchmarks/bench_cascade.py [--batch 1024] [--items 100000] [--steps 10] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from relist.data.synthetic import SyntheticClickModel, SyntheticParams
from relist.sim.cascade import Cascade, CascadeConfig
from relist.sim.cascade_env import CascadeEnv, default_actions
from relist.sim.catalogue import synthetic_catalogue
from relist.sim.pool import synthetic_item_pool, take
from relist.sim.response import TruthResponse
from relist.sim.session import SessionParams, Simulator


class NaiveCascade(Cascade):
    """The same stage models without an index or precomputed item views (per-request work)."""

    def view(self, rows, stage):
        cat = self.catalogue
        raw = torch.cat([take(cat.vec, rows), take(cat.bias, rows)[..., None]], dim=-1)
        return raw + self.noise[stage] * self.spread * take(self.errors[stage], take(cat.item_keys(), rows))

    def user_vector(self, pop, stage):
        rows = self.catalogue.history_rows(pop)
        valid = rows >= 0
        view = self.view(rows.clamp_min(0), stage)[..., :-1]
        return (view * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)

    def _match(self, pop, weight):
        u = self.user_vector(pop, 0) / self.rel_scale[0]
        on_prior = weight[:, :1] / self.rel_scale[0] + weight[:, 1:2] / self.prior_scale[0]
        query = torch.cat([weight[:, :1] * u, on_prior], dim=1)
        return (query @ self.item_views[0].T).topk(self.config.sizes[0], dim=1).indices  # exact, whole pool

    def scores(self, pop, rows, stage):
        view = self.view(rows, stage)  # every candidate of every request
        u = self.user_vector(pop, stage)
        rel = (torch.einsum("bkd,bd->bk", view[..., :-1], u) + view[..., -1]) / self.rel_scale[stage]
        prior = view[..., -1] / self.prior_scale[stage]
        if stage == 0:
            return torch.stack([rel, prior], dim=2)
        return torch.stack([rel, prior, self._diversity(rows, rel + prior)], dim=2)


def measure(
    env: CascadeEnv, batch: int, steps: int, repeats: int, seed: int = 0
) -> tuple[float, float, dict[str, float]]:
    """Best user-requests per second (wall clock) over ``repeats`` runs of ``steps`` requests of ``batch`` users,
    the best per second of this process's CPU time (what an idle machine would give with one thread: other
    processes do not inflate it), and the time shares of the best wall-clock run."""
    actions = default_actions(env.cascade, batch)
    best, best_cpu, shares = 0.0, 0.0, {}
    for r in range(repeats + 1):  # the first run warms up
        state = env.start(torch.arange(batch), seed)
        timings: dict[str, float] = {}
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            pop, ctx = env.first(state)
            with torch.no_grad():
                out = env.cascade(pop, ctx, actions, timings=timings)
            t = time.perf_counter()
            shown = env.cascade.catalogue.shown(pop, out.slate)
            order = -torch.arange(shown.list_len, dtype=torch.float32).expand(batch, -1)
            env.sim.step(state.users, shown, order)
            timings["user response"] = timings.get("user response", 0.0) + time.perf_counter() - t
        total = time.perf_counter() - started
        rate = batch * steps / total
        if r > 0:
            best_cpu = max(best_cpu, batch * steps / (time.process_time() - cpu))
        if r > 0 and rate > best:
            best = rate
            timings["context"] = total - sum(timings.values())
            shares = {k: v / total for k, v in timings.items()}
    return best, best_cpu, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--sizes", default="500,100,10")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nprobe", type=int, default=64)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch and FAISS thread counts to measure")
    args = parser.parse_args()
    import faiss

    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(threads[0])
    faiss.omp_set_num_threads(threads[0])
    sizes = tuple(int(x) for x in args.sizes.split(","))
    truth = SyntheticClickModel.sample(replace(SyntheticParams(), n_items=args.items, n_users=args.users), seed=0)
    pool = synthetic_item_pool(truth, width=sizes[-1])
    catalogue = synthetic_catalogue(truth, pool)
    sim = Simulator(TruthResponse(truth), pool, SessionParams(ref_clicks=3.0, leave_bias=-1.0), sizes[-1])
    started = time.perf_counter()
    fast = Cascade(catalogue, CascadeConfig(sizes=sizes, matching="ivf", nprobe=args.nprobe))
    build = time.perf_counter() - started
    naive = NaiveCascade(catalogue, CascadeConfig(sizes=sizes, matching="exact"))
    print(
        f"load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other processes "
        "slow every figure down)"
    )
    print(
        f"catalogue {args.items:,} items, {args.users:,} users; stages {' -> '.join(map(str, sizes))}; batch "
        f"{args.batch}; "
        f"index build + item towers {build:.1f} s (once)"
    )
    # agreement: same users, same actions
    state = CascadeEnv(fast, sim).start(torch.arange(args.batch), 0)
    pop, ctx = CascadeEnv(fast, sim).first(state)
    acts = default_actions(fast, args.batch)
    with torch.no_grad():
        a, b = fast(pop, ctx, acts), naive(pop, ctx, acts)
    hit = (a.stages[0].rows[:, :, None] == b.stages[0].rows[:, None, :]).any(2).float().mean()
    slate = (a.slate[:, :, None] == b.slate[:, None, :]).any(2).float().mean()
    print(
        f"IVF matching recall of the exact top-{sizes[0]}: {hit:.4f} (nprobe {args.nprobe}); shown-slate "
        f"overlap {slate:.4f}"
    )
    print(f"{'version':<18}{'threads':>8}{'user-requests/s':>17}{'per CPU-second':>16}   time shares")
    for n in threads:
        torch.set_num_threads(n)
        faiss.omp_set_num_threads(n)
        rates = []
        for name, cascade in (("indexed cascade", fast), ("naive cascade", naive)):
            rate, cpu_rate, shares = measure(CascadeEnv(cascade, sim), args.batch, args.steps, args.repeats)
            rates.append((rate, cpu_rate))
            print(
                f"{name:<18}{n:>8}{rate:>17,.0f}{cpu_rate:>16,.0f}   "
                + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items())
            )
        print(
            f"ratio indexed / naive at {n} thread(s): {rates[0][0] / rates[1][0]:.1f}x wall clock, "
            f"{rates[0][1] / rates[1][1]:.1f}x per CPU-second"
        )


if __name__ == "__main__":
    main()
