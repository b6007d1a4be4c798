"""Item popularity and CTR features from the logs, without target leakage (the MIND and trivago sources).

The statistics come from the lists of one fitting split only (``ranker``, the initial ranker's part, or
``train`` where there is no ranker split). Rows of the other splits (the re-rankers' train, valid and test)
get statistics in which none of their own labels take part, so the three follow one distribution. Rows of
the statistics split itself get out-of-fold values (``STAT_FOLDS`` folds of lists): a row's own label never
enters its own features.

Why not leave-one-out over every training row: with LOO a row's click count is (item total - own label),
and a model that memorises the item total through its id embedding reads the label back (target leakage,
as the CatBoost paper describes); re-rankers trained on such rows learn the leak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

CTR_SMOOTHING = 20.0  # pseudo-impressions at the global CTR
STAT_SPLITS = ("ranker", "train")  # the first non-empty one provides the item statistics
STAT_FOLDS = 5


@dataclass
class ItemStatistics:
    impressions: np.ndarray  # (rows,) impressions of the row's item in the statistics it may see
    clicks: np.ndarray  # (rows,)
    ctr: np.ndarray  # (rows,) smoothed CTR
    history_count: np.ndarray  # (n_item_ids,) times each item is in the statistics split's histories
    stat_split: str | None
    global_ctr: float


def item_statistics(
    row_item: np.ndarray,
    label: np.ndarray,
    row_list: np.ndarray,
    n_item_ids: int,
    splits: Mapping[str, np.ndarray],
    seed: int,
    histories: Sequence[np.ndarray] = (),
) -> ItemStatistics:
    """Per row (item ``row_item`` of list ``row_list`` with ``label``): the impressions, clicks and smoothed CTR
    of its item (see the module docstring); per item id, its count in the histories (``histories[k]``: list
    k's history item ids) of the statistics split's lists."""
    n_lists = int(row_list.max()) + 1 if len(row_list) else 0
    stat_split = next((name for name in STAT_SPLITS if len(splits.get(name, ())) > 0), None)
    # fold of every list: -1 outside the statistics split, 0..STAT_FOLDS-1 inside it
    fold = np.full(n_lists, -1, dtype=np.int64)
    if stat_split is not None:
        members = splits[stat_split]
        fold[members] = np.random.default_rng([seed, 1]).integers(0, STAT_FOLDS, size=len(members))
    row_fold = fold[row_list]
    stat_rows = row_fold >= 0

    impressions = np.bincount(row_item[stat_rows], minlength=n_item_ids).astype(np.float64)
    clicks = np.bincount(row_item[stat_rows], weights=label[stat_rows], minlength=n_item_ids)
    global_ctr = clicks.sum() / max(impressions.sum(), 1.0)
    imp_row = impressions[row_item]
    click_row = clicks[row_item]
    prior_row = np.full(len(row_item), global_ctr)
    for f in range(STAT_FOLDS):
        in_fold = row_fold == f
        fold_imp = np.bincount(row_item[in_fold], minlength=n_item_ids).astype(np.float64)
        fold_click = np.bincount(row_item[in_fold], weights=label[in_fold], minlength=n_item_ids)
        imp_row[in_fold] -= fold_imp[row_item[in_fold]]
        click_row[in_fold] -= fold_click[row_item[in_fold]]
        prior_row[in_fold] = (clicks.sum() - fold_click.sum()) / max(impressions.sum() - fold_imp.sum(), 1.0)
    ctr_row = (click_row + CTR_SMOOTHING * prior_row) / (imp_row + CTR_SMOOTHING)
    stat_hist = [histories[k] for k in np.flatnonzero(fold >= 0)] if len(histories) else []
    hist_pop = np.bincount(np.concatenate(stat_hist) if stat_hist else np.zeros(0, np.int64), minlength=n_item_ids)
    return ItemStatistics(imp_row, click_row, ctr_row, hist_pop, stat_split, float(global_ctr))
