"""List metrics, vectorised over lists (no Python loop over lists).

Definitions follow the re-ranking literature as LibRerank reports them (REFERENCE.md §2.2). For one
list, ``click`` are the labels in the predicted order (descending score; ties keep the input order)
and ``gold`` the labels sorted descending:

- ndcg@k  = sum_{i<=k} (2^click_i - 1) / log2(i + 1), divided by the same over gold; 0 when that is 0.
- map@k   = sum over clicked positions i <= k of (clicks in the first i) / i, divided by the number of
            clicks in the top k (LibRerank's normalisation, not by all relevant items); 0 with none.
- clicks@k = clicked items (label > 0) in the top k; p@k = clicks@k / k.
- auc     = group AUC, as the re-ranking literature reports it: the ROC AUC within each list (ties
            counted one half), averaged over the lists that hold both a click and a non-click.
- auc_pooled = ROC AUC over every real (item, label) pair of the evaluated lists together (it mixes
            lists, so a model can score well by ranking whole lists rather than items within them).
Means are over all lists, lists without a click included (they score 0; not for auc), padding never counted.

With ``categories`` (one id per item, 0 = padding):
- alpha_ndcg@k (Clarke et al. 2008): the gain of a clicked item of category c is (1 - alpha)^n, n the
  number of clicked items of c ranked above it; discount 1/log2(i + 1); normalised by a greedy ideal
  order of the list's own items. Label-aware, unlike LAST's code, which ignores the labels.
- err_ia@k (Chapelle et al. 2009), intents = the categories of the list's clicked items, uniform
  weights: sum_c P(c) sum_i R_ic / i * prod_{j<i} (1 - R_jc) with R_ic = (2^label - 1) / 2^max_label
  for items of category c and 0 otherwise.
- ilad@k: mean pairwise distance among the top k: 1 - cosine of ``embeddings`` if given, otherwise the
  share of pairs of different category.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from relist.batch import rank


def _as_tensor(x, dtype=None) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def _discounts(width: int, device) -> Tensor:
    return 1.0 / torch.log2(torch.arange(width, device=device, dtype=torch.float64) + 2.0)


def auc(scores, labels, mask=None) -> float:
    """ROC AUC over the real (item, label) pairs; ties between a positive and a negative count 1/2."""
    scores, labels = _as_tensor(scores).double(), _as_tensor(labels).double()
    if mask is not None:
        keep = _as_tensor(mask).bool()
        scores, labels = scores[keep], labels[keep]
    scores, labels = scores.reshape(-1), labels.reshape(-1) > 0
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average ranks over ties: rank of a value = (first index + last index) / 2 + 1 in sorted order.
    values, inverse, tie_counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(tie_counts, 0).double()
    avg_rank = ends - (tie_counts.double() - 1) / 2
    ranks = avg_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def list_auc(scores, labels, mask, chunk_elements: int = 4_000_000) -> Tensor:
    """ROC AUC within each list (B,) (ties count 1/2); nan for a list without both a click and a non-click."""
    scores, labels, mask = _as_tensor(scores).double(), _as_tensor(labels), _as_tensor(mask).bool()
    pos, neg = (labels > 0) & mask, (labels <= 0) & mask
    n_pos, n_neg = pos.sum(1).double(), neg.sum(1).double()
    size, length = scores.shape
    wins = torch.zeros(size, dtype=torch.float64, device=scores.device)
    step = max(1, chunk_elements // max(length * length, 1))
    for lo in range(0, size, step):
        s, p, n = scores[lo : lo + step], pos[lo : lo + step], neg[lo : lo + step]
        diff = s[:, :, None] - s[:, None, :]  # (b, i, j): positive i against negative j
        pairs = p[:, :, None] & n[:, None, :]
        wins[lo : lo + step] = (((diff > 0).double() + 0.5 * (diff == 0).double()) * pairs).sum((1, 2))
    return torch.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg).clamp_min(1), float("nan"))


def group_auc(scores, labels, mask) -> float:
    """Mean within-list AUC over the lists that have both a click and a non-click (nan if none has)."""
    per_list = list_auc(scores, labels, mask)
    defined = per_list[~torch.isnan(per_list)]
    return float(defined.mean()) if defined.numel() else float("nan")


def grouped_auc(scores, labels, groups) -> float:
    """``group_auc`` of flat (item, label) arrays whose lists are given by ``groups`` (one id per item)."""
    scores, labels, groups = _as_tensor(scores).double(), _as_tensor(labels), _as_tensor(groups).long()
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(len(order)) - starts[inverse[order]]
    shape = (len(counts), int(counts.max()) if len(counts) else 0)
    padded = torch.zeros(shape, dtype=torch.float64)
    label = torch.zeros(shape, dtype=labels.dtype)
    mask = torch.zeros(shape, dtype=torch.bool)
    rows = inverse[order]
    padded[rows, column], label[rows, column], mask[rows, column] = scores[order], labels[order], True
    return group_auc(padded, label, mask)


def evaluate(
    scores, labels, mask, ks: Iterable[int] = (1, 3, 5, 10), categories=None, embeddings=None, alpha: float = 0.5
) -> dict[str, float]:
    """Metrics of ranking each list by ``scores``: (B, L) scores, labels and mask; see the module doc."""
    scores, labels, mask = _as_tensor(scores).double(), _as_tensor(labels).double(), _as_tensor(mask).bool()
    if scores.shape != labels.shape or scores.shape != mask.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)}, labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must match"
        )
    per_list = per_list_metrics(scores, labels, mask, ks, categories, embeddings, alpha)
    out = {name: float(values.mean()) for name, values in per_list.items()}
    out["auc"] = group_auc(scores, labels, mask)
    out["auc_pooled"] = auc(scores, labels, mask)
    return out


def per_list_metrics(
    scores: Tensor,
    labels: Tensor,
    mask: Tensor,
    ks: Iterable[int] = (1, 3, 5, 10),
    categories=None,
    embeddings=None,
    alpha: float = 0.5,
) -> dict[str, Tensor]:
    """Each metric of ``evaluate`` per list: name -> (B,) tensor."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"cut-offs k must be positive integers, got {ks}")
    labels = labels.double().masked_fill(~mask, 0.0)
    size, length = labels.shape
    width = max(length, max(ks))
    pad = width - length
    order = rank(scores, mask)
    click = labels.gather(1, order)
    gold = labels.sort(dim=1, descending=True).values
    real_sorted = mask.gather(1, order)
    if pad:
        click = torch.nn.functional.pad(click, (0, pad))
        gold = torch.nn.functional.pad(gold, (0, pad))
        real_sorted = torch.nn.functional.pad(real_sorted, (0, pad))
    discount = _discounts(width, labels.device)
    dcg = torch.cumsum((2.0**click - 1.0) * discount, dim=1)  # (B, W)
    idcg = torch.cumsum((2.0**gold - 1.0) * discount, dim=1)
    hit = (click > 0).double()
    hits = torch.cumsum(hit, dim=1)
    precision_at = hits / torch.arange(1, width + 1, device=labels.device, dtype=torch.float64)
    ap_sum = torch.cumsum(precision_at * hit, dim=1)
    clicks = hits  # clicked (label > 0) items among the first i
    out: dict[str, Tensor] = {}
    for k in ks:
        i = k - 1
        out[f"ndcg@{k}"] = torch.where(idcg[:, i] > 0, dcg[:, i] / idcg[:, i].clamp_min(1e-300), 0.0)
        out[f"map@{k}"] = torch.where(hits[:, i] > 0, ap_sum[:, i] / hits[:, i].clamp_min(1.0), 0.0)
        out[f"clicks@{k}"] = clicks[:, i]
        out[f"p@{k}"] = clicks[:, i] / k
    if categories is not None:
        category = _as_tensor(categories).long().to(labels.device).masked_fill(~mask, 0)
        cat_sorted = category.gather(1, order)
        if pad:
            cat_sorted = torch.nn.functional.pad(cat_sorted, (0, pad))
        label_sorted = click
        out.update(_alpha_ndcg(cat_sorted, label_sorted, category, labels, ks, alpha))
        intents = _intents(cat_sorted, label_sorted > 0)
        for k in ks:
            out[f"err_ia@{k}"] = _err_ia(cat_sorted, label_sorted, k, intents)
    if embeddings is not None or categories is not None:
        for k in ks:
            if embeddings is not None:
                emb = _as_tensor(embeddings).double().to(labels.device)
                emb_sorted = emb.gather(1, order.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
                if pad:
                    emb_sorted = torch.nn.functional.pad(emb_sorted, (0, 0, 0, pad))
                out[f"ilad@{k}"] = _ilad_embeddings(emb_sorted[:, :k], real_sorted[:, :k])
            else:
                out[f"ilad@{k}"] = _ilad_categories(cat_sorted[:, :k], real_sorted[:, :k])
    return out


def _same_above(cat: Tensor, relevant: Tensor) -> Tensor:
    """For each position, how many relevant items of the same category are ranked above it."""
    width = cat.shape[1]
    above = torch.tril(torch.ones(width, width, dtype=torch.bool, device=cat.device), diagonal=-1)
    same = (cat[:, :, None] == cat[:, None, :]) & above
    return (same.double() * relevant[:, None, :]).sum(dim=2)


def _alpha_ndcg(
    cat_sorted: Tensor, label_sorted: Tensor, category: Tensor, labels: Tensor, ks: list[int], alpha: float
) -> dict[str, Tensor]:
    """alpha-NDCG@k for every k at once: the metric's DCG and its greedy ideal are prefix sums, so both are
    computed once up to the largest k (and only over those positions)."""
    depth = min(max(ks), cat_sorted.shape[1])
    cat, relevant = cat_sorted[:, :depth], (label_sorted[:, :depth] > 0).double()
    discount = _discounts(depth, cat.device)
    gain = relevant * (1.0 - alpha) ** _same_above(cat, relevant)
    dcg = torch.cumsum(gain * discount, dim=1)  # (B, depth)
    # Greedy ideal over the list's own clicked items: at each position take the largest marginal gain.
    rel = labels > 0
    taken = torch.zeros_like(rel)
    seen = torch.zeros(category.shape, dtype=torch.float64, device=category.device)  # same-category picks so far
    steps = []
    for i in range(min(depth, category.shape[1])):
        marginal = torch.where(rel & ~taken, (1.0 - alpha) ** seen, torch.zeros_like(seen))
        best = marginal.argmax(dim=1, keepdim=True)
        best_gain = marginal.gather(1, best).squeeze(1)
        steps.append(best_gain * discount[i])
        picked = best_gain > 0
        taken.scatter_(1, best, picked[:, None] | taken.gather(1, best))
        seen += ((category == category.gather(1, best)) & picked[:, None]).double()
    ideal = torch.cumsum(torch.stack(steps, dim=1), dim=1)
    out = {}
    for k in ks:
        at, best = min(k, depth) - 1, ideal[:, min(k, ideal.shape[1]) - 1]
        out[f"alpha_ndcg@{k}"] = torch.where(best > 0, dcg[:, at] / best.clamp_min(1e-300), 0.0)
    return out


def _intents(cat_sorted: Tensor, relevant: Tensor) -> Tensor:
    """The number of distinct categories among each list's clicked items (B,)."""
    marked = torch.where(relevant, cat_sorted, torch.full_like(cat_sorted, -1)).sort(dim=1).values
    new = marked[:, 1:] != marked[:, :-1]
    return ((marked[:, :1] >= 0).sum(1) + (new & (marked[:, 1:] >= 0)).sum(1)).double()


def _err_ia(cat_sorted: Tensor, label_sorted: Tensor, k: int, n_intents: Tensor) -> Tensor:
    cat, lab = cat_sorted[:, :k], label_sorted[:, :k]
    max_label = label_sorted.max(dim=1, keepdim=True).values.clamp_min(1.0)
    r = (2.0**lab - 1.0) / 2.0**max_label  # (B, k): stop probability of an item for its own category
    width = cat.shape[1]
    above = torch.tril(torch.ones(width, width, dtype=torch.bool, device=cat.device), diagonal=-1)
    same = (cat[:, :, None] == cat[:, None, :]) & above
    # log prod_{j<i, same category} (1 - R_j): the chance the user of intent c reaches position i.
    log_continue = (same.double() * torch.log1p(-r.clamp(max=1 - 1e-12))[:, None, :]).sum(dim=2)
    position = torch.arange(1, width + 1, device=cat.device, dtype=torch.float64)
    err_per_item = r / position * torch.exp(log_continue)  # contribution to ERR of the item's own intent
    # Intents: categories of the clicked items of the whole list, each weighted 1 / number of intents.
    return torch.where(n_intents > 0, err_per_item.sum(dim=1) / n_intents.clamp_min(1.0), 0.0)


def _ilad_pairs(distance: Tensor, real: Tensor) -> Tensor:
    pair = real[:, :, None] & real[:, None, :]
    pair &= ~torch.eye(real.shape[1], dtype=torch.bool, device=real.device)
    n_pairs = pair.sum(dim=(1, 2)).double()
    total = (distance * pair).sum(dim=(1, 2))
    return torch.where(n_pairs > 0, total / n_pairs.clamp_min(1.0), 0.0)


def _ilad_embeddings(emb: Tensor, real: Tensor) -> Tensor:
    unit = torch.nn.functional.normalize(emb, dim=-1)
    return _ilad_pairs(1.0 - unit @ unit.transpose(1, 2), real)


def _ilad_categories(cat: Tensor, real: Tensor) -> Tensor:
    return _ilad_pairs((cat[:, :, None] != cat[:, None, :]).double(), real)


def logged_order_scores(batch) -> Tensor:
    """Scores that reproduce the input order: earlier positions score higher."""
    length = batch.mask.shape[1]
    return -torch.arange(length, dtype=torch.float32, device=batch.mask.device).expand(batch.mask.shape)


def list_metrics(
    score_fn, batches, ks: Iterable[int] = (1, 3, 5, 10), category_col: int | None = None
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Per-list metrics over many batches of different widths, in batch order: (name -> (n_lists,),
    the real items' scores, their labels). ``score_fn(batch) -> (B, L)`` scores; ``category_col`` names
    the item sparse column holding categories, which turns on the diversity metrics. ``auc`` is each
    list's own, nan for a list without both a click and a non-click."""
    per: dict[str, list[Tensor]] = {}
    flat_scores, flat_labels = [], []
    for batch in batches:
        scores = score_fn(batch).double()
        categories = batch.item_sparse[..., category_col] if category_col is not None else None
        for name, values in per_list_metrics(scores, batch.label.double(), batch.mask, ks, categories).items():
            per.setdefault(name, []).append(values.cpu())
        per.setdefault("auc", []).append(list_auc(scores, batch.label, batch.mask).cpu())  # nan: no AUC
        flat_scores.append(scores[batch.mask].cpu())
        flat_labels.append(batch.label[batch.mask].cpu())
    if not per:
        raise ValueError("list_metrics got no batches")
    return {name: torch.cat(values) for name, values in per.items()}, torch.cat(flat_scores), torch.cat(flat_labels)


def evaluate_lists(
    score_fn, batches, ks: Iterable[int] = (1, 3, 5, 10), category_col: int | None = None
) -> dict[str, float]:
    """Means of ``list_metrics`` over every list (group AUC over the lists that have one), and the pooled
    AUC over every (item, label) pair."""
    per, scores, labels = list_metrics(score_fn, batches, ks, category_col)
    out = {name: float(values.nanmean()) for name, values in per.items()}
    out["auc_pooled"] = auc(scores, labels)
    return out


def log_loss(prob, labels, mask=None, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of click probabilities over the real (item, label) pairs."""
    prob, labels = _as_tensor(prob).double(), _as_tensor(labels).double()
    if mask is not None:
        keep = _as_tensor(mask).bool()
        prob, labels = prob[keep], labels[keep]
    prob = prob.clamp(eps, 1.0 - eps)
    return float(-(labels * prob.log() + (1.0 - labels) * (1.0 - prob).log()).mean())


def calibration_bins(prob, labels, mask=None, n_bins: int = 15, strategy: str = "quantile") -> dict[str, Tensor]:
    """Reliability bins: mean predicted probability, observed click rate and count per non-empty bin.

    ``quantile`` bins hold equal numbers of predictions (the adaptive binning that suits click rates of a
    few percent, where equal-width bins would put almost everything into the first); ``uniform`` bins
    split [0, 1] into equal widths.
    """
    prob, labels = _as_tensor(prob).double(), _as_tensor(labels).double()
    if mask is not None:
        keep = _as_tensor(mask).bool()
        prob, labels = prob[keep], labels[keep]
    prob, labels = prob.reshape(-1), labels.reshape(-1)
    if strategy == "quantile":  # edges at quantiles of the predictions; ties share a bin
        edges = torch.quantile(prob, torch.linspace(0, 1, n_bins + 1, dtype=prob.dtype, device=prob.device)[1:-1])
        bin_of = torch.searchsorted(edges, prob, right=True)
    elif strategy == "uniform":
        bin_of = (prob * n_bins).long().clamp(0, n_bins - 1)
    else:
        raise ValueError(f"strategy must be 'quantile' or 'uniform', got {strategy!r}")
    count = torch.bincount(bin_of, minlength=n_bins).double()
    pred = torch.bincount(bin_of, weights=prob, minlength=n_bins)
    obs = torch.bincount(bin_of, weights=labels, minlength=n_bins)
    keep = count > 0
    return {"predicted": pred[keep] / count[keep], "observed": obs[keep] / count[keep], "count": count[keep]}


def expected_calibration_error(prob, labels, mask=None, n_bins: int = 15, strategy: str = "quantile") -> float:
    """ECE: the count-weighted mean of |mean predicted - observed rate| over ``calibration_bins``."""
    bins = calibration_bins(prob, labels, mask, n_bins, strategy)
    weight = bins["count"] / bins["count"].sum()
    return float((weight * (bins["predicted"] - bins["observed"]).abs()).sum())
