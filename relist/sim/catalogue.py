"""The catalogue a cascade retrieves from: every item's vector and prior in the user model's space, and
the users' clicked histories in the same space (see ``relist.sim.cascade`` for how the stages use it).

``synthetic_catalogue`` takes them from a synthetic ground truth; ``mind_catalogue`` from the learned
factorised click model of a MIND simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from relist.batch import ListBatch
from relist.sim.pool import _affinity_columns, history_share, take


@dataclass
class Catalogue:
    """The items a cascade retrieves from and the users who request, on one device."""

    vec: Tensor  # (n, d) item vectors of the user model
    bias: Tensor  # (n,) item priors
    category: Tensor  # (n,) int64 category (for the diversity score), 0-based
    sparse: Tensor  # (n, Fs) fields the response model reads (column 0: item id)
    dense: Tensor  # (n, Fd)
    user_sparse: Tensor  # (N, Fu) the user population
    user_hist: Tensor  # (N, H, Fh) clicked histories, column 0 the item id (0 = padding)
    id_to_row: Tensor  # (vocab,) item id -> catalogue row, -1 if absent
    affinity: tuple = ()  # as ``ListPool.affinity``: user-item dense features recomputed per user
    schema: object = None
    # vectors and priors of every item id a history may hold (row = item id), for the stages' user towers;
    # None: histories are read through the catalogue rows (items outside it are skipped)
    hist_vec: Tensor | None = None  # (vocab, d)
    hist_bias: Tensor | None = None  # (vocab,)
    hist_known: Tensor | None = None  # (vocab,) bool

    @property
    def n_items(self) -> int:
        return self.vec.shape[0]

    @property
    def n_users(self) -> int:
        return self.user_sparse.shape[0]

    @property
    def device(self) -> torch.device:
        return self.vec.device

    def item_keys(self) -> Tensor:
        """(n,) every row's item id (sparse column 0): the key of its stage-model errors."""
        return self.sparse[:, 0]

    def history_known(self, pop: Tensor) -> Tensor:
        """(B, H) whether each history entry has a vector for the user towers."""
        if self.hist_known is None:
            return self.history_rows(pop) >= 0
        return self.hist_known[take(self.user_hist, pop)[..., 0]]

    def history_rows(self, pop: Tensor) -> Tensor:
        """(B, H) catalogue rows of the users' history items, -1 for padding or items not in the catalogue."""
        ids = take(self.user_hist, pop)[..., 0]
        return torch.where(ids > 0, self.id_to_row[ids.clamp_max(self.id_to_row.shape[0] - 1)], -1)

    def shown(self, pop: Tensor, rows: Tensor) -> ListBatch:
        """The slate ``rows`` (B, S) shown to users ``pop`` (B,), as the response model reads it."""
        sparse, dense = take(self.sparse, rows), take(self.dense, rows)
        hist = take(self.user_hist, pop)
        mask = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
        if self.affinity:
            dense = dense.clone()
            for dense_col, item_col, hist_col, unknown in self.affinity:
                vocab = self.schema.item_sparse[item_col].vocab
                dense[..., dense_col] = history_share(sparse[..., item_col], hist[..., hist_col], unknown, vocab)
        return ListBatch(
            item_sparse=sparse,
            item_dense=dense,
            label=torch.zeros(rows.shape, device=rows.device),
            mask=mask,
            user_sparse=take(self.user_sparse, pop),
            user_hist=hist,
            list_id=torch.zeros_like(pop),
        )


def synthetic_catalogue(truth, pool) -> Catalogue:
    """The catalogue of a synthetic ground truth (``SyntheticClickModel``) over ``pool`` (``synthetic_item_pool``):
    relevance = scale <z_u, z_i> / sqrt(d) + b_i, so v = z_i sqrt(scale / sqrt(d)) and b = b_i."""
    p = truth.params
    device = pool.device
    factor = math.sqrt(p.scale / math.sqrt(p.dim))
    n = pool.items_sparse.shape[0]
    return Catalogue(
        vec=(truth.item_z * factor).float().to(device),
        bias=truth.item_bias.float().to(device),
        category=truth.item_category.long().to(device),
        sparse=pool.items_sparse,
        dense=pool.items_dense,
        user_sparse=pool.user_sparse,
        user_hist=pool.user_hist,
        id_to_row=torch.cat([torch.tensor([-1]), torch.arange(n)]).to(device),
        schema=pool.schema,
    )


@torch.no_grad()
def _encode_items(response, schema, sparse: Tensor, dense: Tensor, chunk: int, device) -> tuple[Tensor, Tensor]:
    """(item vectors (n, D), appeal biases (n,)) of the click model for items given as one-item lists of an
    unknown user with no history, ``chunk`` items at a time."""
    vecs, biases = [], []
    for start in range(0, sparse.shape[0], chunk):
        s, d = sparse[start : start + chunk].to(device), dense[start : start + chunk].to(device)
        m = s.shape[0]
        batch = ListBatch(
            item_sparse=s[:, None],
            item_dense=d[:, None],
            label=torch.zeros(m, 1, device=device),
            mask=torch.ones(m, 1, dtype=torch.bool, device=device),
            user_sparse=torch.zeros(m, len(schema.user_sparse), dtype=torch.long, device=device),
            user_hist=torch.zeros(m, 0, len(schema.user_hist), dtype=torch.long, device=device),
            list_id=torch.zeros(m, dtype=torch.long, device=device),
        )
        appeal, v = response.encode(batch)
        vecs.append(v[:, 0])
        biases.append(appeal[:, 0])
    return torch.cat(vecs), torch.cat(biases)


def neutral_dense(response) -> Tensor:
    """The raw dense values the click model standardises to zero (symlog(x) equal to its training mean): what an
    item whose dense features are unknown gets, so that they add nothing to its vector instead of the large
    constant that zeros become after standardisation."""
    mean = response.dense_mean
    return torch.sign(mean) * torch.expm1(mean.abs())


def dataset_people(data) -> tuple[Tensor, Tensor]:
    """(user_sparse (N, Fu), user_hist (N, H, Fh)): one row per person (user id) of a prepared dataset, with
    the history of that person's list that has the longest one."""
    users = np.asarray(data.user_sparse[:, 0])
    hist_len = np.diff(np.asarray(data.hist_offsets))
    order = np.lexsort((-hist_len, users))  # by user, longest history first
    first = order[np.r_[True, users[order][1:] != users[order][:-1]]]
    batch = data.batch(np.sort(first), max_len=1)
    return batch.user_sparse, batch.user_hist


@torch.no_grad()
def mind_catalogue(
    data, response, users: tuple[Tensor, Tensor], category_field: str = "category", chunk: int = 2048
) -> Catalogue:
    """Every item of a prepared MIND dataset's lists, with the learned click model's item vectors and biases,
    and the population ``users`` (user_sparse, user_hist) on their device.

    Item-level dense features are averaged over the item's rows; user-item features (category affinity)
    are recomputed per user when a slate is shown. Each item is encoded as the click model reads it in that
    role: a candidate with its own fields and dense features; a history entry with its history fields only
    (``neutral_dense`` makes the dense part exactly zero), which is the click model's own user tower, so the
    stages' user towers carry no constant from features that histories do not have."""
    user_sparse, user_hist = users
    device_out = user_sparse.device
    sparse_all = torch.from_numpy(np.array(data.item_sparse))
    dense_all = torch.from_numpy(np.array(data.item_dense, dtype=np.float32))
    ids, inverse = torch.unique(sparse_all[:, 0], return_inverse=True)
    keep = ids > 0
    n = len(ids)
    first = torch.full((n,), len(sparse_all), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(sparse_all)), "amin"
    )
    count = torch.zeros(n).index_add_(0, inverse, torch.ones(len(sparse_all)))
    dense = torch.zeros(n, dense_all.shape[1]).index_add_(0, inverse, dense_all) / count[:, None]
    sparse = sparse_all[first]
    sparse, dense, ids = sparse[keep], dense[keep], ids[keep]
    vocab = data.schema.item_sparse[0].vocab
    id_to_row = torch.full((vocab,), -1, dtype=torch.long)
    id_to_row[ids] = torch.arange(len(ids))
    # every item id that histories hold, read as the click model reads a history entry: its history fields
    # (the ones sharing an item field's table) and no dense features, which it never sees there
    hist_all = torch.from_numpy(np.array(data.user_hist))
    hist_names = [f.name for f in data.schema.user_hist]
    names = [f.name for f in data.schema.item_sparse]
    hist_sparse = torch.zeros(vocab, len(names), dtype=torch.long)
    for k, name in enumerate(names):
        if name in hist_names:
            hist_sparse[hist_all[:, 0], k] = hist_all[:, hist_names.index(name)]
    known = hist_sparse[:, 0] > 0
    device = next(response.parameters()).device
    neutral = neutral_dense(response).cpu()
    hist_vec, hist_bias = _encode_items(response, data.schema, hist_sparse, neutral.expand(vocab, -1), chunk, device)
    # the candidates as the click model reads candidates: their own fields and dense features
    vec, bias = _encode_items(response, data.schema, sparse, dense, chunk, device)
    cat_col = names.index(category_field)
    return Catalogue(
        vec=vec.to(device_out),
        bias=bias.to(device_out),
        category=sparse[:, cat_col].to(device_out),
        sparse=sparse.to(device_out),
        dense=dense.to(device_out),
        user_sparse=user_sparse,
        user_hist=user_hist,
        id_to_row=id_to_row.to(device_out),
        affinity=_affinity_columns(data),
        schema=data.schema,
        hist_vec=hist_vec.to(device_out),
        hist_bias=hist_bias.to(device_out),
        hist_known=known.to(device_out),
    )


def kmeans_groups(vec: Tensor, k: int, seed: int = 0, iterations: int = 25) -> Tensor:
    """(n,) int64 cluster of every item vector: FAISS k-means with ``k`` centroids, fitted once per catalogue
    (the item groups of CQR and the diversity score where the data's categories are missing)."""
    import faiss  # only k-means item groups need it

    x = np.ascontiguousarray(vec.detach().cpu().numpy(), dtype=np.float32)
    k = max(1, min(k, len(x)))
    kmeans = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, verbose=False)
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, 1)
    return torch.from_numpy(assigned[:, 0].astype(np.int64)).to(vec.device)


def category_share_unknown(catalogue: Catalogue, missing: tuple[int, ...]) -> float:
    """Share of the catalogue's items whose category id is one of ``missing`` (padding, "<unknown>")."""
    if not missing:
        return 0.0
    return float(torch.isin(catalogue.category, torch.tensor(missing, device=catalogue.device)).float().mean())
