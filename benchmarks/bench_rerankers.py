"""Re-ranker training speed on MIND: throughput per model, and the overhead of principled training.

    python benchmarks/bench_rerankers.py --data /tmp/mind            # prepared MIND (relist data prepare mind)

1. Training throughput (lists per second: forward + backward + Adam step, batch 128) of every registered
   re-ranker at list length 10 and 30.
2. Principled overhead at list length 30 for PRM, SetRank and MiDNN: time per epoch of +P1+P2 over base,
   measured in the same run with the variants interleaved: the paper's loss (gradients through every
   presentation), ``cs_gradient="input"`` (the extra presentations are targets without gradient), and the
   naive way (the three presentations stacked into one batch and run through the whole model) as the
   reference.
3. Time per epoch through the one Trainer (batches read from the store, steps, validation with obedience,
   checkpoint), base against +P1+P2, at list length 30, interleaved. The issue's target (at most 2.0×)
   is stated per epoch; section 2 is the stricter per-step figure. Needs ``--rerank30``: a re-ranking
   dataset with lists of 30, from ``relist train ranker --data /tmp/mind --list-len 30 --out /tmp/r30``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from relist.batch import concat, rank
from relist.data.store import PreparedDataset
from relist.principled import PrincipledConfig, PrincipledObjective, perturb
from relist.rerankers import REGISTRY, build_reranker


def batches(data: PreparedDataset, length: int, size: int, count: int, seed: int):
    index = data.split("train")
    index = index[data.lengths(index) >= length]  # full lists, so every step does the same work
    rng = np.random.default_rng(seed)
    return [data.batch(rng.choice(index, size, replace=False), max_len=length) for _ in range(count)]


def step_time(step, work, repeats: int) -> float:
    for batch in work[:2]:  # warm-up
        step(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        for batch in work:
            step(batch)
    return (time.perf_counter() - started) / (repeats * len(work))


def trainer_step(model, objective):
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def step(batch):
        loss = objective(batch, generator)["loss"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def naive_step(model):
    """+P1+P2 without sharing: the three presentations stacked and run through the whole model."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    config = PrincipledConfig(p1_weight=1, p2_weight=1)

    def step(batch):
        with torch.no_grad():
            first = model(batch)
        p1 = rank(first, batch.mask)
        p2 = perturb(batch.mask, config, generator)
        stacked = concat([batch, batch.reorder(p1), batch.reorder(p2)])
        logits = model(stacked)
        loss = logits.square().mean()  # the losses' arithmetic is negligible; the forward passes are the cost
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared MIND dataset")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="batches per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(sorted(REGISTRY)))
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--rerank30", default="", help="re-ranking dataset with lists of 30 (section 3)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run in section 3")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = PreparedDataset(args.data)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")

    if not args.skip_throughput:
        print("\n1. training throughput, lists per second")
        print(f"{'model':<12}{'L=10':>12}{'L=30':>12}")
        work = {L: batches(data, L, args.batch_size, args.steps, seed=L) for L in (10, 30)}
        for name in args.models.split(","):
            cells = []
            for length in (10, 30):
                model = build_reranker(name, data.schema)
                seconds = step_time(trainer_step(model, PrincipledObjective(model)), work[length], args.repeats)
                cells.append(args.batch_size / seconds)
            print(f"{name:<12}" + "".join(f"{c:>12.0f}" for c in cells))

    print("\n2. principled overhead at L=30 (time per step of +P1+P2 / base, interleaved in one run)")
    print(
        f"{'model':<10}{'base ms':>10}{'+P1+P2 ms':>11}{'ratio':>8}{'input-grad ms':>15}{'ratio':>8}"
        f"{'naive ms':>10}{'naive ratio':>13}"
    )
    work = batches(data, 30, args.batch_size, args.steps, seed=30)
    for name in ("prm", "setrank", "midnn"):
        times = {"base": [], "p": [], "input": [], "naive": []}
        for _ in range(args.repeats):  # interleave so that machine noise hits all three alike
            model = build_reranker(name, data.schema)
            times["base"].append(step_time(trainer_step(model, PrincipledObjective(model)), work, 1))
            model = build_reranker(name, data.schema)
            both = PrincipledObjective(model, PrincipledConfig(p1_weight=1, p2_weight=1))
            times["p"].append(step_time(trainer_step(model, both), work, 1))
            model = build_reranker(name, data.schema)
            targets = PrincipledObjective(model, PrincipledConfig(p1_weight=1, p2_weight=1, cs_gradient="input"))
            times["input"].append(step_time(trainer_step(model, targets), work, 1))
            model = build_reranker(name, data.schema)
            times["naive"].append(step_time(naive_step(model), work, 1))
        base, principled, inputs, naive = (float(np.median(times[k])) * 1000 for k in ("base", "p", "input", "naive"))
        print(
            f"{name:<10}{base:>10.1f}{principled:>11.1f}{principled / base:>8.2f}{inputs:>15.1f}{inputs / base:>8.2f}"
            f"{naive:>10.1f}{naive / base:>13.2f}"
        )

    if args.rerank30:
        epoch_overhead(args)


def epoch_overhead(args) -> None:
    import tempfile

    from relist.train import TrainConfig, train

    rerank = PreparedDataset(args.rerank30)
    print(
        f"\n3. time per epoch through the Trainer at L={rerank.counts['list_len']['max']} "
        f"({rerank.counts['splits']['train']['n_lists']} training lists, validation every epoch)"
    )
    print(f"{'model':<10}{'base s/epoch':>14}{'+P1+P2 s/epoch':>16}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("prm", "setrank", "midnn"):
            times = {"base": [], "p": []}
            for repeat in range(args.repeats):
                for variant, weights in (("base", 0.0), ("p", 1.0)):
                    config = TrainConfig(
                        data=args.rerank30,
                        out=f"{tmp}/{name}-{variant}",
                        model=name,
                        seed=repeat,
                        epochs=args.epochs,
                        patience=10**6,
                        p1_weight=weights,
                        p2_weight=weights,
                        progress=False,
                        overwrite=True,
                    )
                    times[variant].append(train(config, rerank)["train_seconds"] / args.epochs)
            base, principled = float(np.median(times["base"])), float(np.median(times["p"]))
            print(f"{name:<10}{base:>14.2f}{principled:>16.2f}{principled / base:>8.2f}")


if __name__ == "__main__":
    main()
