"""The list batch: the one type every model and metric in relist consumes.

A batch holds B requests, each with up to L candidate items in their *input order* (for a prepared
dataset, the order the upstream system logged or the initial ranker produced). Lists shorter than L
are padded at the end; ``mask`` marks the real items. Item id 0 and every sparse id 0 mean padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

PER_ITEM_FIELDS = ("item_sparse", "item_dense", "label", "mask")
# the dense feature holding the initial ranker's score; always the last dense column (``initial_top``)
INITIAL_SCORE = "init_score"


@dataclass(frozen=True)
class ListBatch:
    """B lists of up to L items. Sparse column 0 of ``item_sparse`` is the item id."""

    item_sparse: Tensor  # (B, L, Fs) int64, 0 = padding
    item_dense: Tensor  # (B, L, Fd) float32
    label: Tensor  # (B, L) float32, 0 on padding
    mask: Tensor  # (B, L) bool, True for a real item
    user_sparse: Tensor  # (B, Fu) int64
    user_hist: Tensor  # (B, H, Fh) int64: the user's past positive items, 0 = padding
    list_id: Tensor  # (B,) int64: index of the list in its dataset

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def list_len(self) -> int:
        return self.mask.shape[1]

    @property
    def item_id(self) -> Tensor:
        return self.item_sparse[..., 0]  # (B, L)

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=1)  # (B,)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def to(self, device: torch.device | str) -> "ListBatch":
        return ListBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, rows: slice | Tensor | Sequence[int]) -> "ListBatch":
        """Select requests (rows); every field is indexed along the batch dimension."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return ListBatch(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def reorder(self, perm: Tensor) -> "ListBatch":
        """Permute the items of every list: position j of list b becomes item ``perm[b, j]``.

        Every per-item field moves together, so features, labels and mask stay aligned.
        ``perm`` is (B, L) and must be a permutation of 0..L-1 in each row; use ``rank`` to
        obtain one from scores that keeps padding at the end.
        """
        if perm.shape != self.mask.shape:
            raise ValueError(f"perm has shape {tuple(perm.shape)}, expected {tuple(self.mask.shape)}")
        perm = perm.to(device=self.device, dtype=torch.long)
        moved = {}
        for name in PER_ITEM_FIELDS:
            value = getattr(self, name)
            index = perm if value.dim() == 2 else perm.unsqueeze(-1).expand(-1, -1, value.shape[-1])
            moved[name] = value.gather(1, index)
        return dataclasses.replace(self, **moved)

    def truncate(self, max_len: int) -> "ListBatch":
        """Keep the first ``max_len`` positions of every list."""
        cut = {name: getattr(self, name)[:, :max_len] for name in PER_ITEM_FIELDS}
        return dataclasses.replace(self, **cut)


def rank(scores: Tensor, mask: Tensor) -> Tensor:
    """The order that sorts each list by descending score: (B, L) indices, padding last.

    Ties keep the input order (stable sort), so a constant scorer returns the input order.
    """
    masked = scores.masked_fill(~mask, float("-inf"))
    return torch.sort(masked, dim=1, descending=True, stable=True).indices


def initial_top(batch: ListBatch, scores: Tensor, list_len: int) -> tuple[ListBatch, Tensor]:
    """What a re-ranking stage receives: each list ordered by the initial ranker's ``scores`` (B, L), cut to
    ``list_len`` items, with each item's score appended as the last dense feature (``INITIAL_SCORE``, the
    layout of the re-ranking datasets ``relist train ranker`` writes). Also returns the order (B, L)."""
    order = rank(scores, batch.mask)
    top = batch.reorder(order).truncate(list_len)
    kept = scores.gather(1, order)[:, : top.list_len].masked_fill(~top.mask, 0.0)
    return dataclasses.replace(top, item_dense=torch.cat([top.item_dense, kept.unsqueeze(-1)], dim=-1)), order


def without_initial_score(batch: ListBatch) -> ListBatch:
    """``batch`` without the dense feature ``initial_top`` appended: the features the initial ranker saw."""
    return dataclasses.replace(batch, item_dense=batch.item_dense[..., :-1])


def collate(examples: Sequence[Mapping[str, np.ndarray | Tensor | int]], max_len: int | None = None) -> ListBatch:
    """Pad variable-length lists into one ``ListBatch``.

    Each example maps ``item_sparse`` (n, Fs), ``item_dense`` (n, Fd), ``label`` (n,) (optional),
    ``user_sparse`` (Fu,), ``user_hist`` (h, Fh) (optional) and ``list_id`` (optional) to arrays.
    Lists longer than ``max_len`` are cut to their first ``max_len`` items.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    sparse = [torch.as_tensor(np.asarray(e["item_sparse"]), dtype=torch.long) for e in examples]
    dense = [torch.as_tensor(np.asarray(e["item_dense"]), dtype=torch.float32) for e in examples]
    if max_len is not None:
        sparse, dense = [s[:max_len] for s in sparse], [d[:max_len] for d in dense]
    lengths = [s.shape[0] for s in sparse]
    if min(lengths) == 0:
        raise ValueError("collate got an empty list")
    size, width = len(examples), max(lengths)
    n_sparse, n_dense = sparse[0].shape[1], dense[0].shape[1]
    item_sparse = torch.zeros(size, width, n_sparse, dtype=torch.long)
    item_dense = torch.zeros(size, width, n_dense, dtype=torch.float32)
    label = torch.zeros(size, width, dtype=torch.float32)
    mask = torch.zeros(size, width, dtype=torch.bool)
    hists = [
        torch.as_tensor(np.asarray(e["user_hist"]), dtype=torch.long) if "user_hist" in e else None for e in examples
    ]
    hist_width = max((h.shape[0] for h in hists if h is not None), default=0)
    hist_fields = next((h.shape[1] for h in hists if h is not None and h.dim() == 2), 0)
    user_hist = torch.zeros(size, hist_width, hist_fields, dtype=torch.long)
    for b, (e, n) in enumerate(zip(examples, lengths)):
        item_sparse[b, :n] = sparse[b]
        item_dense[b, :n] = dense[b]
        mask[b, :n] = True
        if "label" in e:
            label[b, :n] = torch.as_tensor(np.asarray(e["label"]), dtype=torch.float32)[:n]
        if hists[b] is not None and hists[b].numel():
            user_hist[b, : hists[b].shape[0]] = hists[b]
    user_sparse = torch.stack([torch.as_tensor(np.asarray(e["user_sparse"]), dtype=torch.long) for e in examples])
    list_id = torch.tensor([int(e.get("list_id", b)) for b, e in enumerate(examples)], dtype=torch.long)
    return ListBatch(item_sparse, item_dense, label, mask, user_sparse, user_hist, list_id)


def concat(batches: Sequence[ListBatch]) -> ListBatch:
    """Stack batches of the same list length along the request dimension."""
    return ListBatch(
        **{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(ListBatch)}
    )
