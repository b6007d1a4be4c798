"""Who requests lists and what can be shown to them: user populations and candidate sources.

A simulated request is a user (features and history) and a candidate list; a policy orders the
candidates and the simulator shows the first ``slate_size``. Two sources build such requests as a
``ListBatch`` (``label`` is zero: outcomes come from the simulator, never from logs):

- ``ListPool``: the users and the candidate lists of one split of a prepared dataset. Request t of a
  simulated user draws one of the split's logged candidate lists at random (keyed, so every policy
  gets the same candidates), so candidates stay sets that really were served together, at the time
  they were fresh. The user's own fields replace the list's; dense features that are shares of the
  user's history (``USER_ITEM_FEATURES``, e.g. MIND's ``category_affinity``) are recomputed for the new
  user from the (possibly cut) history the dataset keeps. All other dense features are item-level.
- ``ItemPool``: a catalogue of items with fixed features and a population of users; candidates are
  drawn uniformly from the catalogue (with replacement: at 100,000 items a repeat within a list of 10
  happens about once in 2,000 lists). Used by the speed benchmark and by synthetic simulators.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from relist.batch import ListBatch
from relist.data.store import PreparedDataset, Schema, SparseField
from relist.data.synthetic import taste_histories
from relist.sim import rng

# dense feature -> the sparse field whose history share it is (mind.py's definition)
USER_ITEM_FEATURES = {"category_affinity": "category", "subcategory_affinity": "subcategory"}
UNKNOWN = "<unknown>"  # the value mind.py gives fields that news.tsv does not cover


@dataclass
class ListPool:
    """Users and candidate lists of one dataset split, padded and held on a device."""

    schema: Schema
    item_sparse: Tensor  # (M, C, Fs)
    item_dense: Tensor  # (M, C, Fd)
    mask: Tensor  # (M, C)
    user_sparse: Tensor  # (N, Fu)
    user_hist: Tensor  # (N, H, Fh)
    affinity: tuple[tuple[int, int, int, int], ...] = ()  # (dense col, item col, hist col, unknown id or -1)

    @classmethod
    def from_dataset(
        cls, data: PreparedDataset, split: str, max_candidates: int | None = 100, device: torch.device | str = "cpu"
    ) -> "ListPool":
        index = data.split(split)
        if len(index) == 0:
            raise ValueError(f"{data.root}: split {split!r} is empty; the simulator needs users and lists from it")
        batch = data.batch(index, max_len=max_candidates).to(device)
        return cls(
            data.schema,
            batch.item_sparse,
            batch.item_dense,
            batch.mask,
            batch.user_sparse,
            batch.user_hist,
            _affinity_columns(data),
        )

    @property
    def n_users(self) -> int:
        return self.user_sparse.shape[0]

    @property
    def n_lists(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def request(self, users: Tensor, key: Tensor, seed: int) -> ListBatch:
        """Candidates for population users ``users`` (B,); ``key`` (B,) int64 picks the list."""
        lists = rng.index(seed, self.n_lists, rng.LIST, key)
        return self.compose(users, lists)

    def compose(self, users: Tensor, lists: Tensor) -> ListBatch:
        """List ``lists[b]`` shown to user ``users[b]``, user-item features recomputed for that user."""
        item_sparse = take(self.item_sparse, lists)
        item_dense = take(self.item_dense, lists)
        mask = take(self.mask, lists)
        user_hist = take(self.user_hist, users)
        if self.affinity:
            item_dense = item_dense.clone()
            for dense_col, item_col, hist_col, unknown in self.affinity:
                vocab = self.schema.item_sparse[item_col].vocab
                item_dense[..., dense_col] = (
                    history_share(item_sparse[..., item_col], user_hist[..., hist_col], unknown, vocab) * mask
                )
        return ListBatch(
            item_sparse=item_sparse,
            item_dense=item_dense,
            label=torch.zeros(mask.shape, device=mask.device),
            mask=mask,
            user_sparse=take(self.user_sparse, users),
            user_hist=user_hist,
            list_id=lists,
        )


def take(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for an index of any shape, through ``index_select`` (much cheaper than advanced indexing)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def history_share(item_value: Tensor, hist_value: Tensor, unknown: int = -1, vocab: int | None = None) -> Tensor:
    """(B, L): share of the user's history (B, H) with the item's value, among known, non-padding values.

    With a ``vocab`` smaller than L * H, through a per-user histogram of the history (B, vocab) instead
    of comparing every item with every history entry (B, L, H); the result is the same."""
    known = (hist_value > 0) & (hist_value != unknown)  # (B, H)
    n_known = known.sum(dim=1, keepdim=True).clamp_min(1).float()
    if vocab is not None and vocab < item_value.shape[1] * hist_value.shape[1]:
        counts = torch.zeros(hist_value.shape[0], vocab, device=hist_value.device)
        counts.scatter_add_(1, hist_value, known.float())  # padding and unknown values add 0
        return counts.gather(1, item_value) / n_known  # unknown and padding values counted 0
    hist_value = torch.where(known, hist_value, -1)  # matches no item value (ids are >= 0)
    equal = item_value[:, :, None] == hist_value[:, None, :]  # (B, L, H)
    return equal.sum(dim=2).float() / n_known


def unknown_ids(data: PreparedDataset) -> dict[str, int]:
    """Per item sparse field, the id that stands for "value unknown" (MIND's "<unknown>"), where there is one."""
    out = {}
    for f in data.schema.item_sparse[1:]:
        try:
            vocab = data.vocab(f.name)
        except KeyError:
            continue
        unknown = next((k for k, v in enumerate(vocab) if k > 0 and v == UNKNOWN), None)
        if unknown is not None:
            out[f.name] = unknown
    return out


def _affinity_columns(data: PreparedDataset) -> tuple[tuple[int, int, int, int], ...]:
    schema = data.schema
    item_names = [f.name for f in schema.item_sparse]
    hist_names = [f.name for f in schema.user_hist]
    unknown = unknown_ids(data)
    out = []
    for dense_col, name in enumerate(schema.item_dense):
        field = USER_ITEM_FEATURES.get(name)
        if field is None or field not in item_names or field not in hist_names:
            continue
        out.append((dense_col, item_names.index(field), hist_names.index(field), unknown.get(field, -1)))
    return tuple(out)


@dataclass
class ItemPool:
    """A catalogue of items and a population of users; candidates drawn uniformly from the catalogue."""

    schema: Schema
    items_sparse: Tensor  # (n_items, Fs): row k is item id k + 1's fields
    items_dense: Tensor  # (n_items, Fd)
    user_sparse: Tensor  # (N, Fu)
    user_hist: Tensor  # (N, H, Fh)
    width: int = 10

    @property
    def n_users(self) -> int:
        return self.user_sparse.shape[0]

    @property
    def device(self) -> torch.device:
        return self.items_sparse.device

    def request(self, users: Tensor, key: Tensor, seed: int) -> ListBatch:
        slots = torch.arange(self.width, device=self.device)
        items = rng.index(seed, self.items_sparse.shape[0], rng.ITEM, key[:, None], slots[None, :])  # (B, C)
        mask = torch.ones(items.shape, dtype=torch.bool, device=self.device)
        return ListBatch(
            item_sparse=take(self.items_sparse, items),
            item_dense=take(self.items_dense, items),
            label=torch.zeros(items.shape, device=self.device),
            mask=mask,
            user_sparse=take(self.user_sparse, users),
            user_hist=take(self.user_hist, users),
            list_id=key,
        )


def synthetic_item_pool(
    truth,
    width: int = 10,
    hist_len: int = 10,
    device: torch.device | str = "cpu",
    feature_noise: float = 0.3,
    seed: int = 0,
) -> ItemPool:
    """An ``ItemPool`` over a ``SyntheticClickModel``'s whole catalogue, item features made as the synthetic source
    makes them; histories are taste-biased as the source's are (``relist.data.synthetic.taste_histories``)."""
    p = truth.params
    g = torch.Generator().manual_seed(seed)
    dense = torch.cat(
        [
            truth.item_z + feature_noise * torch.randn(truth.item_z.shape, generator=g),
            torch.log(truth.item_popularity * p.n_items).unsqueeze(1),
        ],
        dim=1,
    )
    ids = torch.arange(p.n_items)
    sparse = torch.stack([ids + 1, truth.item_category + 1], dim=1)
    hist = taste_histories(truth, hist_len, g)
    users = torch.arange(p.n_users)
    schema = _synthetic_schema(p)
    return ItemPool(
        schema,
        sparse.to(device),
        dense.float().to(device),
        torch.stack([users + 1, truth.user_group + 1], dim=1).to(device),
        torch.stack([hist + 1, truth.item_category[hist] + 1], dim=2).to(device),
        width,
    )


def _synthetic_schema(p) -> Schema:
    return Schema(
        item_sparse=(SparseField("item_id", p.n_items + 1), SparseField("category", p.n_categories + 1)),
        item_dense=tuple(f"z{k}" for k in range(p.dim)) + ("log_popularity",),
        user_sparse=(SparseField("user_id", p.n_users + 1), SparseField("user_group", p.n_groups + 1)),
        user_hist=(SparseField("item_id", p.n_items + 1), SparseField("category", p.n_categories + 1)),
    )


def as_numpy(batch: ListBatch) -> dict[str, np.ndarray]:
    """The observation a gymnasium environment hands out: the batch's fields as NumPy arrays of their own
    (copies: the caller may keep or modify them)."""
    return {
        "item_sparse": batch.item_sparse.cpu().numpy().copy(),
        "item_dense": batch.item_dense.cpu().numpy().copy(),
        "mask": batch.mask.cpu().numpy().astype(np.int8),
        "user_sparse": batch.user_sparse.cpu().numpy().copy(),
        "user_hist": batch.user_hist.cpu().numpy().copy(),
    }
