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

from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from relist.batch import rank


def _as_tensor(x, dtype=None) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed tensor operations on one intra-op thread (then restore the setting): the metrics'
    tensors are small, so more threads only add their synchronisation, which on a machine busy with other
    work made every operation wait (5-10x slower on 2 shared cores) and gains little on an idle one."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _tie_groups(values: Tensor, real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort each row ascending with the real entries first: (order, first, last), where ``first`` and
    ``last`` are, for every sorted position, the first and last sorted positions of its run of equal
    values (real and padding entries never share a run)."""
    order = torch.sort(values, dim=1, stable=True).indices
    order = order.gather(1, torch.sort((~real).gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
    v, r = values.gather(1, order), real.gather(1, order)
    size, length = v.shape
    new = torch.ones_like(r)
    new[:, 1:] = (v[:, 1:] != v[:, :-1]) | (r[:, 1:] != r[:, :-1])
    end = torch.ones_like(r)
    end[:, :-1] = new[:, 1:]
    index = torch.arange(length, device=v.device).expand(size, length)
    first = torch.where(new, index, 0).cummax(dim=1).values
    last = torch.where(end, index, length - 1).flip(1).cummin(dim=1).values.flip(1)
    return order, first, last


def list_auc(scores, labels, mask) -> Tensor:
    """ROC AUC within each list (B,) (ties count 1/2); nan for a list without both a click and a non-click.

    Computed from ranks (Mann-Whitney): sort each list once, give tied items their average rank, and
    count how far the clicked items' ranks sum above their least possible value."""
    scores, labels, mask = _as_tensor(scores).double(), _as_tensor(labels), _as_tensor(mask).bool()
    pos = (labels > 0) & mask
    n_pos, n_neg = pos.sum(1).double(), (mask & ~pos).sum(1).double()
    if scores.shape[1] == 0:
        return torch.full(n_pos.shape, float("nan"), dtype=torch.float64, device=scores.device)
    order, first, last = _tie_groups(scores, mask)
    average_rank = (first + last).double() / 2 + 1  # among the real items, which come first
    rank_sum = (average_rank * pos.gather(1, order)).sum(1)
    wins = rank_sum - n_pos * (n_pos + 1) / 2
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
    with one_thread():
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
    """Each metric of ``evaluate`` per list: name -> (B,) tensor.

    Every metric at k is a prefix sum over the predicted order, so everything after the one sort of each
    list works on its first max(ks) positions only."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"cut-offs k must be positive integers, got {ks}")
    labels = labels.double().masked_fill(~mask, 0.0)
    size, length = labels.shape
    depth = ks[-1]
    cut = min(depth, length)

    def top(values: Tensor) -> Tensor:  # values in predicted order, first ``depth`` positions, zero beyond the list
        index = order if values.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, values.shape[-1])
        taken = values.gather(1, index)
        return taken if cut == depth else torch.nn.functional.pad(taken, (0, 0) * (values.dim() - 2) + (0, depth - cut))

    order = rank(scores, mask)[:, :cut]
    click, real = top(labels), top(mask)
    gold = labels.topk(cut, dim=1).values if cut else labels[:, :0]
    gold = torch.nn.functional.pad(gold, (0, depth - cut))
    discount = _discounts(depth, labels.device)
    dcg = torch.cumsum((2.0**click - 1.0) * discount, dim=1)  # (B, depth)
    idcg = torch.cumsum((2.0**gold - 1.0) * discount, dim=1)
    hit = (click > 0).double()
    hits = torch.cumsum(hit, dim=1)  # clicked (label > 0) items among the first i
    precision_at = hits / torch.arange(1, depth + 1, device=labels.device, dtype=torch.float64)
    ap_sum = torch.cumsum(precision_at * hit, dim=1)
    out: dict[str, Tensor] = {}
    for k in ks:
        i = k - 1
        out[f"ndcg@{k}"] = torch.where(idcg[:, i] > 0, dcg[:, i] / idcg[:, i].clamp_min(1e-300), 0.0)
        out[f"map@{k}"] = torch.where(hits[:, i] > 0, ap_sum[:, i] / hits[:, i].clamp_min(1.0), 0.0)
        out[f"clicks@{k}"] = hits[:, i]
        out[f"p@{k}"] = hits[:, i] / k
    if categories is not None:
        category = _as_tensor(categories).long().to(labels.device)
        if category.shape != labels.shape:
            raise ValueError(f"categories {tuple(category.shape)} must match labels {tuple(labels.shape)}")
        category = category.masked_fill(~mask, 0)
        out.update(_category_metrics(top(category), click, real, category, labels, ks, alpha, embeddings is None))
    if embeddings is not None:
        emb = _as_tensor(embeddings).double().to(labels.device)
        if emb.shape[:2] != labels.shape:
            raise ValueError(
                f"embeddings {tuple(emb.shape)} must be (lists, items, dim) for labels {tuple(labels.shape)}"
            )
        out.update(_ilad_embeddings(top(emb), real, ks))
    return out


def _earlier_same_category(category: Tensor, value: Tensor) -> Tensor:
    """For each position of each row, the sum of ``value`` over the earlier positions of the same category:
    one stable sort by category per row, then prefix sums within each run of equal categories."""
    order = torch.sort(category, dim=1, stable=True).indices
    cat, v = category.gather(1, order), value.gather(1, order)
    size, length = cat.shape
    start = torch.ones_like(cat, dtype=torch.bool)
    start[:, 1:] = cat[:, 1:] != cat[:, :-1]
    index = torch.arange(length, device=cat.device).expand(size, length)
    first = torch.where(start, index, 0).cummax(dim=1).values  # where each position's run begins
    before = torch.cumsum(v, dim=1) - v  # sum over all earlier sorted positions
    within = before - before.gather(1, first)
    return torch.empty_like(within).scatter_(1, order, within)


def _category_metrics(
    cat_top: Tensor,
    label_top: Tensor,
    real_top: Tensor,
    category: Tensor,
    labels: Tensor,
    ks: list[int],
    alpha: float,
    with_ilad: bool,
) -> dict[str, Tensor]:
    """alpha-NDCG, ERR-IA and (``with_ilad``) category ILAD at every k, as prefix sums down to the largest
    k. ``cat_top``, ``label_top`` and ``real_top`` are the first max(ks) positions in predicted order;
    ``category`` and ``labels`` the whole lists in input order."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    depth = ks[-1]
    device = cat_top.device
    real_top = real_top.double()
    discount = _discounts(depth, device)
    keep = 1.0 - alpha
    # alpha-DCG: a clicked item gains keep^(clicked items of its category ranked above it).
    relevant = (label_top > 0).double()
    dcg = torch.cumsum(relevant * keep ** _earlier_same_category(cat_top, relevant) * discount, dim=1)
    # The greedy ideal takes, at each position, a clicked item of a category picked least often so far. Each
    # category offers the gains 1, keep, keep^2, ... (one per clicked item), so the greedy order is all those
    # gains sorted in decreasing order.
    clicked = (labels > 0).double()
    gains = clicked * keep ** _earlier_same_category(category, clicked)
    cut = min(depth, gains.shape[1])
    gains = gains.topk(cut, dim=1).values if cut else gains
    ideal = torch.cumsum(torch.nn.functional.pad(gains, (0, depth - cut)) * discount, dim=1)
    # ERR-IA: an item of category c stops the user of intent c with probability r; they reach it with the
    # product of (1 - r) over the items of c above it.
    max_label = labels.max(dim=1, keepdim=True).values.clamp_min(1.0) if labels.shape[1] else 1.0
    r = (2.0**label_top - 1.0) / 2.0**max_label
    reach = torch.exp(_earlier_same_category(cat_top, torch.log1p(-r.clamp(max=1 - 1e-12))))
    position = torch.arange(1, depth + 1, device=device, dtype=torch.float64)
    err = torch.cumsum(r / position * reach, dim=1)
    n_intents = _intents(category, labels > 0)
    out = {}
    for k in ks:
        at = k - 1
        out[f"alpha_ndcg@{k}"] = torch.where(ideal[:, at] > 0, dcg[:, at] / ideal[:, at].clamp_min(1e-300), 0.0)
    for k in ks:
        out[f"err_ia@{k}"] = torch.where(n_intents > 0, err[:, k - 1] / n_intents.clamp_min(1.0), 0.0)
    if with_ilad:  # pairs of real items of different categories among the first k
        real_above = torch.cumsum(real_top, dim=1) - real_top
        different = real_top * (real_above - _earlier_same_category(cat_top, real_top))
        out.update(_ilad_from_pairs(torch.cumsum(different, dim=1), real_top, ks))
    return out


def _intents(category: Tensor, relevant: Tensor) -> Tensor:
    """The number of distinct categories among each list's clicked items (B,)."""
    if category.shape[1] == 0:
        return torch.zeros(category.shape[0], dtype=torch.float64, device=category.device)
    marked = torch.where(relevant, category, torch.full_like(category, -1)).sort(dim=1).values
    new = marked[:, 1:] != marked[:, :-1]
    return ((marked[:, :1] >= 0).sum(1) + (new & (marked[:, 1:] >= 0)).sum(1)).double()


def _ilad_from_pairs(distance_sum: Tensor, real: Tensor, ks: list[int]) -> dict[str, Tensor]:
    """ilad@k from the summed distance over the pairs of real items among the first i positions (B, depth)."""
    n_real = torch.cumsum(real, dim=1)
    n_pairs = n_real * (n_real - 1) / 2
    out = {}
    for k in ks:
        n, total = n_pairs[:, k - 1], distance_sum[:, k - 1]
        out[f"ilad@{k}"] = torch.where(n > 0, total / n.clamp_min(1.0), 0.0)
    return out


def _ilad_embeddings(emb: Tensor, real: Tensor, ks: list[int]) -> dict[str, Tensor]:
    """ilad@k with the cosine distance of ``emb`` (B, depth, D) in predicted order."""
    unit = torch.nn.functional.normalize(emb, dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)
    real = real.double()
    earlier = torch.tril(torch.ones(emb.shape[1], emb.shape[1], dtype=torch.float64, device=emb.device), -1)
    # each position's distance to the real items above it, if it is real itself
    to_above = real * (distance * earlier * real[:, None, :]).sum(dim=2)
    return _ilad_from_pairs(torch.cumsum(to_above, dim=1), real, ks)


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
        scores = score_fn(batch).double()  # the model runs with the threads it was given
        categories = batch.item_sparse[..., category_col] if category_col is not None else None
        with one_thread():
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
