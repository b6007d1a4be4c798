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

Headroom (``truth_headroom``): how far the truth says re-ranking can go on a split, over the same items of
every list. It scores the input order (the logged display, or for a ``relist train ranker`` re-ranking
dataset the initial ranker's order), the true-appeal order (by r(u, i): what a perfect pointwise model
gives), the greedy order under the redundancy penalty (each position takes the item whose click
probability is highest given the items above it), and the best order under the truth (exact, by dynamic
programming over the subsets of a list's items: the click probability at position p depends only on p and
on which items are above, not on their order, so the value of what is left depends only on the set already
placed; lists of up to ``EXACT_MAX_LEN`` items). Each order gets NDCG@k on the split's labels (what the
offline tables report) and its expected clicks in the first k positions under the truth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from relist.batch import ListBatch
from relist.config import option
from relist.data.store import ListTable, PreparedDataset, Schema, SparseField, random_splits
from relist.metrics import per_list_metrics


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


# ---- headroom under the truth -------------------------------------------------------------------------------
EXACT_MAX_LEN = 12  # 2^12 subsets per list: the exact best order is computed up to this list length
EXACT_VALUES = 1 << 24  # values per (lists, subsets, items) tensor of the exact search: longer batches go in parts
ORDERS = ("input", "true appeal", "greedy under the redundancy penalty", "best under the truth (exact)")


def _truth_ids(batch: ListBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based user and item indices of a batch of this source (ids are 1-based in the data)."""
    return (batch.user_sparse[:, 0] - 1).clamp_min(0), (batch.item_id - 1).clamp_min(0)


def expected_clicks(model: SyntheticClickModel, users, items, mask, order, k: int) -> torch.Tensor:
    """(B,) expected clicks in the first ``k`` positions when each list is shown in ``order`` (B, L)."""
    shown, shown_mask = items.gather(1, order), mask.gather(1, order)
    return model.click_prob(users, shown, shown_mask)[:, :k].sum(1)


def appeal_order(model: SyntheticClickModel, users, items, mask) -> torch.Tensor:
    """Each list by descending true relevance r(u, i), padding last."""
    relevance = model.relevance(users, items).masked_fill(~mask, float("-inf"))
    return relevance.argsort(dim=1, descending=True, stable=True)


def greedy_order(model: SyntheticClickModel, users, items, mask) -> torch.Tensor:
    """Position by position, the remaining item with the highest click probability given the items above
    (the examination factor is the same for every candidate at a position, so this is the highest
    sigmoid(r + c0 - kappa * same-category items above)). Greedy, not optimal in general."""
    p = model.params
    size, length = items.shape
    base = model.relevance(users, items) + p.intercept
    category = model.item_category[items]
    shown = torch.zeros(size, p.n_categories, device=items.device)
    left, taken = mask.clone(), torch.zeros_like(mask)
    order = torch.empty(size, length, dtype=torch.long, device=items.device)
    rows = torch.arange(size, device=items.device)
    first = length - torch.arange(length, device=items.device)  # once no real item is left: padding in order
    for position in range(length):
        value = (base - p.kappa * shown.gather(1, category)).masked_fill(~left, float("-inf"))
        pick = torch.where(left.any(1), value.argmax(1), ((~taken) * first).argmax(1))
        order[:, position] = pick
        shown[rows, category[rows, pick]] += left[rows, pick].float()
        left[rows, pick] = False
        taken[rows, pick] = True
    return order


def best_order(model: SyntheticClickModel, users, items, mask, k: int) -> torch.Tensor:
    """The order with the most expected clicks in the first ``k`` positions under the truth, exactly.

    V(S) = max over i not in S of [P(click on i at position |S| | the items S above) + V(S + i)], with V = 0
    once k items are placed or none is left; the click probability depends only on |S| and on how many items
    of S share i's category, so the recursion over subsets is exact. O(2^L L^2) per list: L <= EXACT_MAX_LEN."""
    p = model.params
    size, length = items.shape
    if length > EXACT_MAX_LEN:
        raise ValueError(f"the exact best order needs lists of at most {EXACT_MAX_LEN} items, got {length}")
    rows_at_once = max(1, EXACT_VALUES // ((1 << length) * length))
    if size > rows_at_once:
        parts = [slice(lo, lo + rows_at_once) for lo in range(0, size, rows_at_once)]
        return torch.cat([best_order(model, users[part], items[part], mask[part], k) for part in parts])
    device = items.device
    n_sets = 1 << length
    codes = torch.arange(n_sets, device=device)
    bit = 1 << torch.arange(length, device=device)
    member = (codes[:, None] & bit[None, :]) > 0  # (S, L)
    placed = member.sum(1)  # |S|
    category = model.item_category[items]
    same = (category[:, :, None] == category[:, None, :]).float()  # (B, L, L)
    above = torch.einsum("sj,bji->bsi", member.float(), same)  # (B, S, L): items of S sharing i's category
    examine = (1.0 + placed.float()) ** -p.eta  # (S,)
    base = model.relevance(users, items) + p.intercept  # (B, L)
    gain = examine[None, :, None] * torch.sigmoid(base[:, None, :] - p.kappa * above)  # (B, S, L)
    allowed = ~member[None, :, :] & mask[:, None, :]
    value = torch.zeros(size, n_sets, device=device)
    choice = torch.full((size, n_sets), -1, dtype=torch.long, device=device)
    for count in range(min(k, length) - 1, -1, -1):
        sets = codes[placed == count]
        following = sets[:, None] | bit[None, :]  # (n, L)
        total = (gain[:, sets, :] + value[:, following]).masked_fill(~allowed[:, sets, :], float("-inf"))
        best, pick = total.max(2)
        some = torch.isfinite(best)
        value[:, sets] = torch.where(some, best, torch.zeros_like(best))
        choice[:, sets] = torch.where(some, pick, torch.full_like(pick, -1))
    order = torch.empty(size, length, dtype=torch.long, device=device)
    state = torch.zeros(size, dtype=torch.long, device=device)
    rows = torch.arange(size, device=device)
    taken = torch.zeros(size, length, dtype=torch.bool, device=device)
    for position in range(length):
        pick = choice[rows, state] if position < k else torch.full((size,), -1, dtype=torch.long, device=device)
        # after the first k (or once no real item is left): the rest in input order, padding last
        rest = (~taken & mask).float() * 2 + (~taken).float() - torch.arange(length, device=device) / (2 * length)
        pick = torch.where(pick >= 0, pick, rest.argmax(1))
        order[:, position] = pick
        taken[rows, pick] = True
        state = state | bit[pick]
    return order


def find_truth(data: PreparedDataset) -> SyntheticClickModel:
    """The click model of a synthetic dataset, or of the synthetic dataset a re-ranking dataset was
    derived from (``relist train ranker`` records it as ``derived_from``)."""
    for root in (data.root, data.manifest.get("info", {}).get("derived_from")):
        if root is not None and (Path(root) / "truth.safetensors").is_file():
            return SyntheticClickModel.load(Path(root) / "truth.safetensors")
    raise FileNotFoundError(
        f"{data.root} has no truth.safetensors (nor does the dataset it was derived from): "
        "headroom needs a prepared synthetic dataset or a re-ranking dataset made from one"
    )


def _scores(order: torch.Tensor) -> torch.Tensor:
    """Scores (B, L) that rank each list into ``order``."""
    length = order.shape[1]
    return torch.empty(order.shape).scatter_(1, order, -torch.arange(length, dtype=torch.float32).expand_as(order))


def truth_headroom(
    data: PreparedDataset,
    split: str = "test",
    k: int = 10,
    model: SyntheticClickModel | None = None,
    batch_size: int = 1024,
) -> dict:
    """NDCG@k on the labels and expected clicks in the first k positions under the truth, of the input order,
    the true-appeal order, the greedy order under the redundancy penalty and (lists of at most
    ``EXACT_MAX_LEN`` items) the exact best order, over the same items of every list of ``split``.

    Returns ``{"split", "n_lists", "k", "input", "exact", "orders": {name: {"ndcg@k", "expected_clicks",
    "diff_vs_input" and "diff_vs_appeal": {metric: (mean difference, its 95% half-width over lists)}}}}``
    (differences against the input and the true-appeal order, list by list)."""
    model = model if model is not None else find_truth(data)
    input_name = "initial ranker" if "init_score" in data.schema.item_dense else "logged display"
    longest = int(np.diff(np.asarray(data.offsets))[data.split(split)].max()) if len(data.split(split)) else 0
    exact = longest <= EXACT_MAX_LEN
    names = ORDERS if exact else ORDERS[:3]
    per: dict[str, dict[str, list]] = {n: {f"ndcg@{k}": [], "expected_clicks": []} for n in names}
    for batch in data.batches(split, batch_size):
        users, items = _truth_ids(batch)
        mask = batch.mask
        identity = torch.arange(batch.list_len).expand(batch.size, -1)
        orders = {
            ORDERS[0]: identity,
            ORDERS[1]: appeal_order(model, users, items, mask),
            ORDERS[2]: greedy_order(model, users, items, mask),
        }
        if exact:
            orders[ORDERS[3]] = best_order(model, users, items, mask, k)
        for name, order in orders.items():
            ndcg = per_list_metrics(_scores(order), batch.label, mask, ks=(k,))[f"ndcg@{k}"]
            per[name][f"ndcg@{k}"].append(ndcg.numpy())
            per[name]["expected_clicks"].append(expected_clicks(model, users, items, mask, order, k).numpy())
    stacked = {n: {m: np.concatenate(v) for m, v in per[n].items()} for n in names}
    out = {"split": split, "n_lists": int(len(data.split(split))), "k": k, "input": input_name, "exact": exact}
    out["orders"] = {}
    for name in names:
        entry = {m: float(v.mean()) for m, v in stacked[name].items()}
        for key, reference in (("diff_vs_input", ORDERS[0]), ("diff_vs_appeal", ORDERS[1])):
            entry[key] = {m: _mean_and_half_width(v - stacked[reference][m]) for m, v in stacked[name].items()}
        out["orders"][name] = entry
    return out


def _mean_and_half_width(d: np.ndarray) -> tuple[float, float]:
    """The mean of per-list differences and the half-width of its 95% normal interval over lists."""
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), float(half)


def format_headroom(result: dict) -> str:
    """The headroom as a markdown table."""
    k = result["k"]
    lines = [
        f"Headroom under the truth on the {result['n_lists']:,} {result['split']} lists (the same items of each "
        f"list in every order; input order: {result['input']}). NDCG@{k} on the labels; expected clicks in the "
        f"first {k} positions under the true click model; differences with a 95% interval over lists (normal "
        "approximation). The labels were drawn under the logged display's own context, so NDCG on them cannot "
        "credit an order for the context effects; the expected clicks do.",
        "",
        f"| order | NDCG@{k} | Δ NDCG@{k} vs input | expected clicks | Δ vs input | Δ vs true appeal |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in result["orders"].items():
        shown = f"input ({result['input']})" if name == ORDERS[0] else name

        def diff(key: str, metric: str, skip: tuple[str, ...]) -> str:
            mean, half = entry[key][metric]
            width = f"{half:.4f}" if half >= 5e-5 else f"{half:.1e}"  # a tiny interval still shows
            return "-" if name in skip else f"{mean:+.4f} ± {width}"

        cells = [
            f"{entry[f'ndcg@{k}']:.4f}",
            diff("diff_vs_input", f"ndcg@{k}", ORDERS[:1]),
            f"{entry['expected_clicks']:.4f}",
            diff("diff_vs_input", "expected_clicks", ORDERS[:1]),
            diff("diff_vs_appeal", "expected_clicks", ORDERS[1:2]),
        ]
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    if not result["exact"]:
        lines += ["", f"The exact best order is not computed: lists longer than {EXACT_MAX_LEN} items."]
    return "\n".join(lines) + "\n"


@dataclass
class HeadroomConfig:
    data: Path = option(help="a prepared synthetic dataset, or a re-ranking dataset (rerank/) made from one")
    split: str = option("test", help="split to score")
    k: int = option(10, help="cut-off: NDCG@k and expected clicks in the first k positions")
    batch_size: int = option(1024, help="lists per batch")


def run_headroom(cfg: HeadroomConfig) -> dict:
    return truth_headroom(PreparedDataset(cfg.data), cfg.split, cfg.k, batch_size=cfg.batch_size)
