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


@torch.no_grad()
def mind_catalogue(data, response, pool, category_field: str = "category", chunk: int = 2048) -> Catalogue:
    """Every item of a prepared MIND dataset's lists, with the learned click model's item vectors and biases.

    Item-level dense features are averaged over the item's rows; user-item features (category affinity)
    are recomputed per user when a slate is shown. Users come from ``pool`` (the simulator's ``ListPool``)."""
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
    # every item id that histories hold (most MIND history items were never impressed in the subset):
    # sparse fields from the history columns of the same names, dense features unknown (zeros)
    hist_all = torch.from_numpy(np.array(data.user_hist))
    hist_names = [f.name for f in data.schema.user_hist]
    names = [f.name for f in data.schema.item_sparse]
    hist_sparse = torch.zeros(vocab, len(names), dtype=torch.long)
    for k, name in enumerate(names):
        if name in hist_names:
            hist_sparse[hist_all[:, 0], k] = hist_all[:, hist_names.index(name)]
    hist_dense = torch.zeros(vocab, dense.shape[1])
    hist_sparse[ids], hist_dense[ids] = sparse, dense  # impressed items keep their own fields
    known = hist_sparse[:, 0] > 0
    # item vector and prior of every id, impressed or not, encoded once: each as a one-item list of an
    # unknown user with no history; the impressed items' rows are those of their ids
    device = next(response.parameters()).device
    hist_vec, hist_bias = _encode_items(response, data.schema, hist_sparse, hist_dense, chunk, device)
    vec, bias = hist_vec[ids], hist_bias[ids]
    cat_col = names.index(category_field)
    return Catalogue(
        vec=vec.to(pool.device),
        bias=bias.to(pool.device),
        category=sparse[:, cat_col].to(pool.device),
        sparse=sparse.to(pool.device),
        dense=dense.to(pool.device),
        user_sparse=pool.user_sparse,
        user_hist=pool.user_hist,
        id_to_row=id_to_row.to(pool.device),
        affinity=_affinity_columns(data),
        schema=data.schema,
        hist_vec=hist_vec.to(pool.device),
        hist_bias=hist_bias.to(pool.device),
        hist_known=known.to(pool.device),
    )
