"""Flat per-item feature rows for tree models, built from list batches.

Columns: the item's dense features; the item's and the user's sparse ids as categorical columns where
the vocabulary is small enough for trees (``max_categorical``); and user-item history matches: for
every history field that shares a name with an item sparse field, the share of the user's history
with the candidate's value (e.g. "how much of what this user clicked was in this category").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from relist.batch import ListBatch
from relist.data.store import Schema


@dataclass(frozen=True)
class TabularLayout:
    names: tuple[str, ...]
    categorical: tuple[int, ...]  # column indices holding categorical ids
    item_sparse_cols: tuple[int, ...]
    user_sparse_cols: tuple[int, ...]
    hist_pairs: tuple[tuple[int, int], ...]  # (item sparse column, history column) with the same name

    @classmethod
    def from_schema(cls, schema: Schema, max_categorical: int = 1000) -> "TabularLayout":
        names = [f"dense:{n}" for n in schema.item_dense]
        item_cols = tuple(k for k, f in enumerate(schema.item_sparse) if f.vocab <= max_categorical)
        user_cols = tuple(k for k, f in enumerate(schema.user_sparse) if f.vocab <= max_categorical)
        categorical = []
        for k in item_cols:
            categorical.append(len(names))
            names.append(f"item:{schema.item_sparse[k].name}")
        for k in user_cols:
            categorical.append(len(names))
            names.append(f"user:{schema.user_sparse[k].name}")
        hist_names = {f.name: k for k, f in enumerate(schema.user_hist)}
        pairs = tuple((k, hist_names[f.name]) for k, f in enumerate(schema.item_sparse) if f.name in hist_names)
        names += [f"history_share:{schema.item_sparse[k].name}" for k, _ in pairs]
        return cls(tuple(names), tuple(categorical), item_cols, user_cols, pairs)


def history_share(batch: ListBatch, pairs) -> torch.Tensor:
    """(B, L, len(pairs)): share of the user's history equal to the item's value in each paired field."""
    size, length = batch.mask.shape
    if not pairs or batch.user_hist.shape[1] == 0:
        return torch.zeros(size, length, len(pairs))
    hist_mask = batch.user_hist[..., 0] > 0  # (B, H)
    n_hist = hist_mask.sum(dim=1).clamp_min(1).float()  # (B,)
    shares = []
    for item_col, hist_col in pairs:
        item = batch.item_sparse[..., item_col]  # (B, L)
        hist = batch.user_hist[..., hist_col]  # (B, H)
        equal = (item[:, :, None] == hist[:, None, :]) & hist_mask[:, None, :]  # (B, L, H)
        shares.append(equal.sum(dim=2).float() / n_hist[:, None])
    return torch.stack(shares, dim=2)


def tabular(batch: ListBatch, layout: TabularLayout) -> torch.Tensor:
    """(B, L, F) float features in ``layout`` order."""
    size, length = batch.mask.shape
    parts = [batch.item_dense.float()]
    if layout.item_sparse_cols:
        parts.append(batch.item_sparse[..., list(layout.item_sparse_cols)].float())
    if layout.user_sparse_cols:
        user = batch.user_sparse[:, list(layout.user_sparse_cols)].float()
        parts.append(user[:, None, :].expand(size, length, -1))
    parts.append(history_share(batch, layout.hist_pairs))
    return torch.cat(parts, dim=2)


def flatten(batch: ListBatch, layout: TabularLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the real items: features (n, F), labels (n,), group sizes (B,)."""
    features = tabular(batch, layout)[batch.mask]
    return features.numpy(), batch.label[batch.mask].numpy(), batch.lengths.numpy()
