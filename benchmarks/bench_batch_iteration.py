"""Batch iteration from the memory-mapped store against a plain in-memory tensor loop.

Prepares a synthetic dataset (default 200,000 lists of 10-30 items), then times one shuffled pass over
the train split in batches of 256, (a) through ``PreparedDataset.batches`` (memory-mapped ragged
arrays, padded per batch) and (b) indexing tensors already padded in memory (the reference).
Prints lists per second of both and the ratio store / in-memory (higher is better; 1.0 = free).

    python benchmarks/bench_batch_iteration.py [--lists 200000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lists", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="relist-bench-"))
    try:
        prepare(
            PrepareConfig(source="synthetic", out=workdir / "data", n_lists=args.lists, n_users=20_000, n_items=100_000)
        )
        data = PreparedDataset(workdir / "data")
        index = data.split("train")
        full = data.batch(index)  # the reference holds every list padded in memory
        tensors = [full.item_sparse, full.item_dense, full.label, full.mask, full.user_sparse, full.user_hist]

        def store_pass(seed: int) -> int:
            n = 0
            for batch in data.batches("train", args.batch_size, shuffle=True, seed=seed):
                n += batch.size
            return n

        def memory_pass(seed: int) -> int:
            order = torch.from_numpy(np.random.default_rng(seed).permutation(len(index)))
            n = 0
            for start in range(0, len(index), args.batch_size):
                rows = order[start : start + args.batch_size]
                parts = [t[rows] for t in tensors]
                n += parts[0].shape[0]
            return n

        best = {}
        for name, run in (("store", store_pass), ("memory", memory_pass)):
            times = []
            for r in range(args.repeats):
                started = time.perf_counter()
                n = run(r)
                times.append(time.perf_counter() - started)
            best[name] = n / min(times)
        print(f"{len(index):,} train lists, batch {args.batch_size}, best of {args.repeats}")
        print(f"memory-mapped store: {best['store']:,.0f} lists/s")
        print(f"in-memory tensors (reference): {best['memory']:,.0f} lists/s")
        print(f"ratio store / in-memory = {best['store'] / best['memory']:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
