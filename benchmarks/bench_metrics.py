"""The metrics `relist train ranker` reports against the time it takes to fit its ranker.

Fits LambdaMART on a prepared dataset's ``ranker`` split (the reference: what the command trains), scores
``valid`` and ``test`` once, then times the metrics the command computes after training: ``evaluate_lists``
of the ranker's scores and of the logged order on both splits, with the category metrics when the dataset
has categories. Prints the fit, scoring and metrics times and the ratio metrics / fit (lower is better),
best of ``--repeats`` for the metrics.

    python benchmarks/bench_metrics.py --data /tmp/mind [--repeats 3] [--n-estimators 500]
"""

from __future__ import annotations

import argparse
import time

from relist.data.store import PreparedDataset
from relist.metrics import evaluate_lists, logged_order_scores
from relist.rankers import RANKER_CONFIGS, get_ranker_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared dataset (from `relist data prepare`)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-estimators", type=int, default=None, help="LambdaMART boosting rounds")
    args = parser.parse_args()
    data = PreparedDataset(args.data)
    names = [f.name for f in data.schema.item_sparse]
    category_col = names.index("category") if "category" in names else None
    config = RANKER_CONFIGS["lambdamart"]()
    if args.n_estimators is not None:
        config.n_estimators = args.n_estimators
    ranker = get_ranker_class("lambdamart")(data.schema, config)
    started = time.perf_counter()
    ranker.fit(data, seed=0, progress=False)
    fit_seconds = time.perf_counter() - started

    started = time.perf_counter()
    batches = {split: list(data.batches(split, 512)) for split in ("valid", "test")}
    scores = {id(batch): ranker.score(batch) for split in batches for batch in batches[split]}
    score_seconds = time.perf_counter() - started

    def evaluation() -> None:
        for split in ("valid", "test"):
            for score_fn in (lambda batch: scores[id(batch)], logged_order_scores):
                evaluate_lists(score_fn, batches[split], category_col=category_col)

    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        evaluation()
        times.append(time.perf_counter() - started)
    n_lists = len(data.split("valid")) + len(data.split("test"))
    print(f"fit (LambdaMART on {len(data.split('ranker'))} lists): {fit_seconds:.2f} s")
    print(f"scoring {n_lists} valid and test lists: {score_seconds:.2f} s")
    print(f"metrics (2 orders x {n_lists} lists, categories: {category_col is not None}): {min(times):.3f} s")
    print(f"metrics / fit: {min(times) / fit_seconds:.3f}")


if __name__ == "__main__":
    main()
