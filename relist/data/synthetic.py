"""Synthetic lists from a known ground-truth click model, any size, seeded.

The click model (``SyntheticClickModel``) is the truth that simulators and tests compare against:

    relevance  r(u, i) = scale * <z_u, z_i> / sqrt(d) + b_i
    P(click at display position p) = (1 + p) ** -eta * sigmoid(r(u, i) + c0 - kappa * s_p)

where z_u = (centre of u's group) + noise, z_i = (centre of i's category) + noise, b_i an item bias,
eta the position-bias exponent and s_p the number of items of the same category shown above
position p (a within-list context effect: redundancy lowers the click rate, so diverse orders pay).

Each logged list draws a user, a length, and distinct candidates by item popularity. The logged
(display) order is either "random" (the default: a uniformly shuffled display, so the clicks are
free of the logging order's position bias and offline metrics of any order are unbiased) or
"production" (sorted by a noisy production score r + N(0, production_noise^2); realistic, but then
position bias makes the logged order look better offline than it is). Observed item features are z_i
plus noise and log popularity; the user's history holds items the user liked before. The model's
parameters are saved next to the data (``truth.safetensors``) so a simulator can use the very same truth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from relist.data.store import ListTable, Schema, SparseField, random_splits


@dataclass(frozen=True)
class SyntheticParams:
    n_users: int = 2000
    n_items: int = 5000
    n_categories: int = 20
    n_groups: int = 16
    dim: int = 8
    scale: float = 2.0
    intercept: float = -1.5  # c0
    eta: float = 0.2  # position-bias exponent (mild, as in a scrolled feed: position 10 is examined 62% as often as 1)
    kappa: float = 0.35  # penalty per same-category item shown above
    feature_noise: float = 0.3
    production_noise: float = 1.0
    popularity_exponent: float = 0.8


class SyntheticClickModel:
    """The ground truth: latent factors, biases, categories and the click probability of a shown list."""

    def __init__(self, params: SyntheticParams, tensors: dict[str, torch.Tensor]):
        self.params = params
        self.user_z = tensors["user_z"]  # (n_users, d)
        self.user_group = tensors["user_group"]  # (n_users,)
        self.item_z = tensors["item_z"]  # (n_items, d)
        self.item_bias = tensors["item_bias"]  # (n_items,)
        self.item_category = tensors["item_category"]  # (n_items,)
        self.item_popularity = tensors["item_popularity"]  # (n_items,) sums to 1

    @classmethod
    def sample(cls, params: SyntheticParams, seed: int) -> "SyntheticClickModel":
        g = torch.Generator().manual_seed(seed)
        p = params
        group_centres = torch.randn(p.n_groups, p.dim, generator=g)
        category_centres = torch.randn(p.n_categories, p.dim, generator=g)
        user_group = torch.randint(0, p.n_groups, (p.n_users,), generator=g)
        item_category = torch.randint(0, p.n_categories, (p.n_items,), generator=g)
        user_z = group_centres[user_group] + 0.6 * torch.randn(p.n_users, p.dim, generator=g)
        item_z = category_centres[item_category] + 0.6 * torch.randn(p.n_items, p.dim, generator=g)
        item_bias = 0.5 * torch.randn(p.n_items, generator=g)
        rank = torch.randperm(p.n_items, generator=g).double()
        popularity = (rank + 1.0) ** -p.popularity_exponent
        tensors = {
            "user_z": user_z,
            "user_group": user_group,
            "item_z": item_z,
            "item_bias": item_bias,
            "item_category": item_category,
            "item_popularity": (popularity / popularity.sum()).float(),
        }
        return cls(params, tensors)

    def relevance(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """r(u, i) for users (B,) and items (B, L) -> (B, L)."""
        p = self.params
        affinity = torch.einsum("bd,bld->bl", self.user_z[users], self.item_z[items])
        return p.scale * affinity / math.sqrt(p.dim) + self.item_bias[items]

    def click_prob(self, users: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Click probability of each position when ``items`` (B, L) are shown in that order; 0 on padding."""
        p = self.params
        category = self.item_category[items]  # (B, L)
        length = items.shape[1]
        above = torch.tril(torch.ones(length, length, dtype=torch.bool, device=items.device), diagonal=-1)  # j < i
        same = (category[:, :, None] == category[:, None, :]) & above & mask[:, None, :]
        redundancy = same.sum(dim=2).float()  # (B, L)
        examine = (1.0 + torch.arange(length, dtype=torch.float32, device=items.device)) ** -p.eta
        prob = examine * torch.sigmoid(self.relevance(users, items) + p.intercept - p.kappa * redundancy)
        return prob * mask

    def save(self, path: str | Path) -> None:
        tensors = {k: v.contiguous() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        save_file(tensors, str(path), metadata={k: str(v) for k, v in asdict(self.params).items()})

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticClickModel":
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        types = {k: type(v) for k, v in asdict(SyntheticParams()).items()}
        params = SyntheticParams(**{k: types[k](v) for k, v in meta.items()})
        return cls(params, load_file(str(path)))


@dataclass
class SyntheticConfig:
    n_lists: int = 20000
    min_len: int = 10
    max_len: int = 30
    hist_len: int = 10
    logged_order: str = "random"  # or "production"
    params: SyntheticParams = SyntheticParams()


def _distinct_candidates(model: SyntheticClickModel, lengths: torch.Tensor, g: torch.Generator):
    """Distinct items per list drawn by popularity: (B, max_len) ids and the achieved lengths."""
    size, width = len(lengths), int(lengths.max())
    draws = torch.multinomial(model.item_popularity, size * width * 2, replacement=True, generator=g).view(size, -1)
    ordered, _ = draws.sort(dim=1)
    duplicate = torch.zeros_like(ordered, dtype=torch.bool)
    duplicate[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    priority = torch.rand(ordered.shape, generator=g).masked_fill(duplicate, 2.0)
    keep = priority.argsort(dim=1)[:, :width]
    items = ordered.gather(1, keep)
    lengths = torch.minimum(lengths, (~duplicate).sum(dim=1))
    return items, lengths


def taste_histories(model: SyntheticClickModel, hist_len: int, g: torch.Generator) -> torch.Tensor:
    """(n_users, hist_len) item indices, oldest first: each user's top items among 50 popularity draws, by
    relevance plus Gumbel noise (what the user liked before)."""
    n_users = model.params.n_users
    pool = torch.multinomial(model.item_popularity, n_users * 50, replacement=True, generator=g).view(n_users, 50)
    gumbel = -torch.log(-torch.log(torch.rand(pool.shape, generator=g).clamp_min(1e-12)))
    taste = model.relevance(torch.arange(n_users), pool) + gumbel
    return pool.gather(1, taste.topk(hist_len, dim=1).indices.flip(1))


def generate(
    config: SyntheticConfig, seed: int, fractions: dict[str, float], chunk: int = 50_000
) -> tuple[ListTable, SyntheticClickModel]:
    p = config.params
    if not 1 <= config.min_len <= config.max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {config.min_len} and {config.max_len}")
    if config.logged_order not in ("random", "production"):
        raise ValueError(f"logged_order must be 'random' or 'production', got {config.logged_order!r}")
    if config.n_lists < 1:
        raise ValueError(f"n_lists must be positive, got {config.n_lists}")
    model = SyntheticClickModel.sample(p, seed)
    g = torch.Generator().manual_seed(seed + 1)

    # Observed item features: noisy latent factors and log popularity, fixed per item.
    item_features = torch.cat(
        [
            model.item_z + p.feature_noise * torch.randn(p.n_items, p.dim, generator=g),
            torch.log(model.item_popularity * p.n_items).unsqueeze(1),
        ],
        dim=1,
    )

    hist_items = taste_histories(model, config.hist_len, g)

    parts = {k: [] for k in ("lengths", "sparse", "dense", "label", "users")}
    for start in range(0, config.n_lists, chunk):
        size = min(chunk, config.n_lists - start)
        users = torch.randint(0, p.n_users, (size,), generator=g)
        lengths = torch.randint(config.min_len, config.max_len + 1, (size,), generator=g)
        items, lengths = _distinct_candidates(model, lengths, g)
        mask = torch.arange(items.shape[1])[None, :] < lengths[:, None]
        if config.logged_order == "production":
            production = model.relevance(users, items) + p.production_noise * torch.randn(items.shape, generator=g)
        else:
            production = torch.rand(items.shape, generator=g)
        order = production.masked_fill(~mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
        items = items.gather(1, order)
        clicks = torch.bernoulli(model.click_prob(users, items, mask), generator=g)
        flat = items[mask]
        parts["lengths"].append(lengths)
        parts["users"].append(users)
        parts["sparse"].append(torch.stack([flat + 1, model.item_category[flat] + 1], dim=1))
        parts["dense"].append(item_features[flat])
        parts["label"].append(clicks[mask])

    lengths = torch.cat(parts["lengths"]).numpy()
    users = torch.cat(parts["users"])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hist = hist_items[users]  # (n_lists, H)
    user_hist = torch.stack([hist + 1, model.item_category[hist] + 1], dim=2).reshape(-1, 2).numpy()
    schema = Schema(
        item_sparse=(SparseField("item_id", p.n_items + 1), SparseField("category", p.n_categories + 1)),
        item_dense=tuple(f"z{k}" for k in range(p.dim)) + ("log_popularity",),
        user_sparse=(SparseField("user_id", p.n_users + 1), SparseField("user_group", p.n_groups + 1)),
        user_hist=(SparseField("item_id", p.n_items + 1), SparseField("category", p.n_categories + 1)),
    )
    table = ListTable(
        offsets=offsets,
        item_sparse=torch.cat(parts["sparse"]).numpy(),
        item_dense=torch.cat(parts["dense"]).numpy().astype(np.float32),
        label=torch.cat(parts["label"]).numpy().astype(np.float32),
        user_sparse=torch.stack([users + 1, model.user_group[users] + 1], dim=1).numpy(),
        hist_offsets=np.arange(len(lengths) + 1, dtype=np.int64) * config.hist_len,
        user_hist=user_hist,
        schema=schema,
        splits=random_splits(len(lengths), fractions, seed),
        info={
            "ground_truth": "truth.safetensors",
            "params": asdict(p),
            "min_len": config.min_len,
            "max_len": config.max_len,
            "hist_len": config.hist_len,
            "logged_order": config.logged_order,
        },
    )
    return table, model
