"""relist.metrics against plain per-list Python references written from the module docstring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from relist.batch import collate
from relist.metrics import auc, evaluate, evaluate_lists, list_auc, one_thread, per_list_metrics

KS = (1, 3, 5, 10)


# --------------------------------------------------------------------------- references (one list, loops)


def predicted_order(scores):
    """Indices of the real items by descending score; Python's sort is stable, so ties keep input order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def ref_ndcg(scores, labels, k):
    click = [labels[i] for i in predicted_order(scores)]
    gold = sorted(labels, reverse=True)
    dcg = sum((2.0 ** click[i] - 1.0) / math.log2(i + 2) for i in range(min(k, len(click))))
    idcg = sum((2.0 ** gold[i] - 1.0) / math.log2(i + 2) for i in range(min(k, len(gold))))
    return dcg / idcg if idcg > 0 else 0.0


def ref_map(scores, labels, k):
    click = [labels[i] for i in predicted_order(scores)]
    hits, total = 0, 0.0
    for i in range(min(k, len(click))):
        if click[i] > 0:
            hits += 1
            total += hits / (i + 1)
    return total / hits if hits else 0.0


def ref_clicks(scores, labels, k):
    click = [labels[i] for i in predicted_order(scores)]
    return float(sum(1 for c in click[:k] if c > 0))


def ref_precision(scores, labels, k):
    return ref_clicks(scores, labels, k) / k


def ref_alpha_ndcg(scores, labels, cats, k, alpha):
    order = predicted_order(scores)
    seen = {}
    dcg = 0.0
    for pos, i in enumerate(order[:k]):
        if labels[i] > 0:
            dcg += (1.0 - alpha) ** seen.get(cats[i], 0) / math.log2(pos + 2)
            seen[cats[i]] = seen.get(cats[i], 0) + 1
    # Greedy ideal: at each position the clicked item with the largest marginal gain.
    remaining = [cats[i] for i in range(len(labels)) if labels[i] > 0]
    seen = {}
    ideal = 0.0
    for pos in range(min(k, len(labels))):
        if not remaining:
            break
        best = max(range(len(remaining)), key=lambda j: (1.0 - alpha) ** seen.get(remaining[j], 0))
        c = remaining.pop(best)
        ideal += (1.0 - alpha) ** seen.get(c, 0) / math.log2(pos + 2)
        seen[c] = seen.get(c, 0) + 1
    return dcg / ideal if ideal > 0 else 0.0


def ref_err_ia(scores, labels, cats, k):
    """0/1 labels: R = (2^1 - 1) / 2^1 = 1/2 for a clicked item of the intent, 0 otherwise."""
    order = predicted_order(scores)
    max_label = max(max(labels), 1.0)
    intents = sorted({cats[i] for i in range(len(labels)) if labels[i] > 0})
    if not intents:
        return 0.0
    total = 0.0
    for c in intents:
        err, reach = 0.0, 1.0
        for pos, i in enumerate(order[:k]):
            r = (2.0 ** labels[i] - 1.0) / 2.0**max_label if cats[i] == c else 0.0
            err += reach * r / (pos + 1)
            reach *= 1.0 - r
        total += err / len(intents)
    return total


def ref_ilad(scores, k, distance):
    top = predicted_order(scores)[:k]
    pairs = [(a, b) for x, a in enumerate(top) for b in top[x + 1 :]]
    if not pairs:
        return 0.0
    return sum(distance(a, b) for a, b in pairs) / len(pairs)


def ref_ilad_categories(scores, cats, k):
    return ref_ilad(scores, k, lambda a, b: float(cats[a] != cats[b]))


def ref_ilad_embeddings(scores, emb, k):
    def distance(a, b):
        u, v = emb[a], emb[b]
        dot = sum(x * y for x, y in zip(u, v))
        nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(y * y for y in v))
        return 1.0 - dot / (nu * nv)

    return ref_ilad(scores, k, distance)


def reference(lists, ks=KS, alpha=0.5, with_categories=True, with_embeddings=False):
    """Per-list reference metrics: name -> list of values, one per list."""
    out = {}
    for lst in lists:
        s, y = lst["scores"], lst["labels"]
        for k in ks:
            values = {
                f"ndcg@{k}": ref_ndcg(s, y, k),
                f"map@{k}": ref_map(s, y, k),
                f"clicks@{k}": ref_clicks(s, y, k),
                f"p@{k}": ref_precision(s, y, k),
            }
            if with_categories:
                values[f"alpha_ndcg@{k}"] = ref_alpha_ndcg(s, y, lst["cats"], k, alpha)
                values[f"err_ia@{k}"] = ref_err_ia(s, y, lst["cats"], k)
            if with_embeddings:
                values[f"ilad@{k}"] = ref_ilad_embeddings(s, lst["emb"], k)
            elif with_categories:
                values[f"ilad@{k}"] = ref_ilad_categories(s, lst["cats"], k)
            for name, v in values.items():
                out.setdefault(name, []).append(v)
    return out


# --------------------------------------------------------------------------- random inputs


def random_lists(seed, n_lists=40, width=8, graded=False, n_categories=3, first_category=1):
    """Lists of 1..width items with tied integer scores; some click-less lists; some shorter than k."""
    rng = np.random.default_rng(seed)
    lists = []
    for b in range(n_lists):
        n = int(rng.integers(1, width + 1))
        scores = [float(v) for v in rng.integers(0, 4, size=n)]  # few values: many ties
        if graded:
            labels = [float(v) for v in rng.choice([0, 0, 0, 1, 2, 3], size=n)]
        else:
            labels = [float(v) for v in (rng.random(n) < 0.35)]
        if b % 5 == 0:
            labels = [0.0] * n  # no click at all
        lists.append(
            {
                "scores": scores,
                "labels": labels,
                "cats": [int(v) for v in rng.integers(first_category, first_category + n_categories, size=n)],
                "emb": [[float(x) for x in rng.normal(size=5)] for _ in range(n)],
            }
        )
    return lists


def pad(lists, width, seed):
    """(B, width) tensors; padding holds garbage (large scores, clicks, categories) that must be ignored."""
    rng = np.random.default_rng(seed + 1000)
    size = len(lists)
    scores = torch.as_tensor(rng.integers(10, 20, size=(size, width)), dtype=torch.float64)
    labels = torch.ones(size, width, dtype=torch.float64)
    cats = torch.as_tensor(rng.integers(1, 4, size=(size, width)), dtype=torch.long)
    emb = torch.as_tensor(rng.normal(size=(size, width, 5)), dtype=torch.float64)
    mask = torch.zeros(size, width, dtype=torch.bool)
    for b, lst in enumerate(lists):
        n = len(lst["scores"])
        scores[b, :n] = torch.tensor(lst["scores"], dtype=torch.float64)
        labels[b, :n] = torch.tensor(lst["labels"], dtype=torch.float64)
        cats[b, :n] = torch.tensor(lst["cats"])
        emb[b, :n] = torch.tensor(lst["emb"], dtype=torch.float64)
        mask[b, :n] = True
    return scores, labels, mask, cats, emb


def assert_same(got: dict, expected: dict):
    assert set(got) == set(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(
            np.asarray(got[name], dtype=np.float64), np.asarray(values), rtol=1e-9, atol=1e-12, err_msg=name
        )


# --------------------------------------------------------------------------- per-list metrics vs reference


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_per_list_metrics_match_reference_with_categories(seed, alpha):
    lists = random_lists(seed)
    scores, labels, mask, cats, _ = pad(lists, width=8, seed=seed)
    got = per_list_metrics(scores, labels, mask, KS, categories=cats, alpha=alpha)
    assert_same({k: v.numpy() for k, v in got.items()}, reference(lists, alpha=alpha))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_per_list_metrics_match_reference_with_embeddings(seed):
    lists = random_lists(seed)
    scores, labels, mask, cats, emb = pad(lists, width=8, seed=seed)
    got = per_list_metrics(scores, labels, mask, KS, categories=cats, embeddings=emb)
    assert_same({k: v.numpy() for k, v in got.items()}, reference(lists, with_embeddings=True))
    # embeddings alone: only ilad joins the relevance metrics
    got = per_list_metrics(scores, labels, mask, KS, embeddings=emb)
    expected = reference(lists, with_categories=False, with_embeddings=True)
    assert_same({k: v.numpy() for k, v in got.items()}, expected)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_ndcg_and_map_with_graded_labels(seed):
    lists = random_lists(seed, graded=True)
    scores, labels, mask, _, _ = pad(lists, width=8, seed=seed)
    got = per_list_metrics(scores, labels, mask, KS)
    expected = reference(lists, with_categories=False)
    for k in KS:
        np.testing.assert_allclose(got[f"ndcg@{k}"].numpy(), expected[f"ndcg@{k}"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got[f"map@{k}"].numpy(), expected[f"map@{k}"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_evaluate_means_and_auc_match_reference(seed):
    lists = random_lists(seed, n_lists=30, width=12)
    scores, labels, mask, cats, _ = pad(lists, width=12, seed=seed)
    # float32 numpy inputs are accepted too
    got = evaluate(scores.float().numpy(), labels.float().numpy(), mask.numpy(), ks=KS, categories=cats.numpy())
    expected = {name: float(np.mean(v)) for name, v in reference(lists).items()}
    flat_scores = [s for lst in lists for s in lst["scores"]]
    flat_labels = [y for lst in lists for y in lst["labels"]]
    expected["auc_pooled"] = roc_auc_score(flat_labels, flat_scores)
    within = [
        roc_auc_score(lst["labels"], lst["scores"]) for lst in lists if 0 < sum(lst["labels"]) < len(lst["labels"])
    ]
    expected["auc"] = float(np.mean(within))  # group AUC: lists with both a click and a non-click
    assert len(within) < len(lists) and set(got) == set(expected)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name


def test_ks_are_deduplicated_and_any_k_works():
    lists = random_lists(7, n_lists=10, width=4)
    scores, labels, mask, _, _ = pad(lists, width=4, seed=7)
    got = per_list_metrics(scores, labels, mask, ks=(2, 2, 7))
    assert set(got) == {f"{m}@{k}" for m in ("ndcg", "map", "clicks", "p") for k in (2, 7)}
    expected = reference(lists, ks=(2, 7), with_categories=False)
    assert_same({k: v.numpy() for k, v in got.items()}, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("graded", [False, True])
def test_category_metrics_on_long_lists_match_reference(seed, graded):
    """Lists longer than every k, many categories (0 among them, the padding's own), graded labels for
    ERR-IA, and a k beyond the widest list."""
    ks = (1, 2, 5, 10, 64)
    lists = random_lists(seed, n_lists=25, width=50, graded=graded, n_categories=7, first_category=0)
    scores, labels, mask, cats, emb = pad(lists, width=50, seed=seed)
    got = per_list_metrics(scores, labels, mask, ks, categories=cats, alpha=0.3)
    assert_same({k: v.numpy() for k, v in got.items()}, reference(lists, ks=ks, alpha=0.3))
    got = per_list_metrics(scores, labels, mask, ks, categories=cats, embeddings=emb, alpha=0.3)
    assert_same({k: v.numpy() for k, v in got.items()}, reference(lists, ks=ks, alpha=0.3, with_embeddings=True))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_at_its_bounds_matches_reference(alpha):
    """alpha 0: every click gains 1 (alpha-NDCG is binary NDCG); alpha 1: only a category's first click gains."""
    lists = random_lists(11, n_lists=30, width=12)
    scores, labels, mask, cats, _ = pad(lists, width=12, seed=11)
    got = per_list_metrics(scores, labels, mask, KS, categories=cats, alpha=alpha)
    assert_same({k: v.numpy() for k, v in got.items()}, reference(lists, alpha=alpha))
    if alpha == 0.0:
        for k in KS:
            np.testing.assert_allclose(got[f"alpha_ndcg@{k}"].numpy(), got[f"ndcg@{k}"].numpy(), rtol=1e-12)


def test_alpha_outside_the_unit_interval_raises():
    scores, labels, mask, cats, _ = pad(random_lists(0, n_lists=3), width=8, seed=0)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            per_list_metrics(scores, labels, mask, KS, categories=cats, alpha=alpha)


def test_categories_of_the_wrong_shape_raise():
    scores, labels, mask, cats, _ = pad(random_lists(0, n_lists=3), width=8, seed=0)
    with pytest.raises(ValueError, match="categories"):
        per_list_metrics(scores, labels, mask, KS, categories=cats[:, :5])


# --------------------------------------------------------------------------- AUC vs scikit-learn


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(6, 9)).astype(np.float64)  # heavy ties
    labels = (rng.random((6, 9)) < 0.3).astype(np.float64)
    mask = rng.random((6, 9)) < 0.8
    labels[~mask] = 1.0  # padding labels must not count
    expected = roc_auc_score(labels[mask], scores[mask])
    assert auc(scores, labels, mask) == pytest.approx(expected, rel=1e-12)
    assert auc(torch.as_tensor(scores), torch.as_tensor(labels), torch.as_tensor(mask)) == pytest.approx(
        expected, rel=1e-12
    )
    # without a mask every pair counts
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels.ravel(), scores.ravel()), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_continuous_scores_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=500)
    labels = (rng.random(500) < 0.2 + 0.3 * (scores > 0)).astype(np.float64)
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_list_auc_matches_sklearn_per_list(seed):
    """Within-list AUC with heavy ties and garbage padding, nan where a list lacks a click or a non-click."""
    lists = random_lists(seed, n_lists=40, width=30)
    scores, labels, mask, _, _ = pad(lists, width=30, seed=seed)
    got = list_auc(scores, labels, mask).numpy()
    for b, lst in enumerate(lists):
        y = lst["labels"]
        if 0 < sum(v > 0 for v in y) < len(y):
            assert got[b] == pytest.approx(roc_auc_score(np.asarray(y) > 0, lst["scores"]), rel=1e-12), b
        else:
            assert math.isnan(got[b]), b


def test_list_auc_padding_ties_and_infinite_scores():
    scores = torch.tensor([[1.0, 1.0, 0.0, 1.0], [float("inf"), 2.0, float("inf"), 5.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    # list 0: the click ties one non-click (1/2) and beats the other (1); list 1: the inf click ties the
    # inf non-click (1/2), the other click loses (0); padding never counts
    np.testing.assert_allclose(list_auc(scores, labels, mask).numpy(), [0.75, 0.25])


def test_auc_by_hand():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # one tie between the negative and a positive counts one half: (0.5 + 1) / 2
    assert auc([1.0, 1.0, 2.0], [0, 1, 1]) == pytest.approx(0.75)
    assert auc([3.0, 2.0, 1.0], [1, 0, 0]) == pytest.approx(1.0)
    assert auc([3.0, 2.0, 1.0], [0, 1, 1]) == pytest.approx(0.0)
    assert math.isnan(auc([1.0, 2.0], [0, 0]))
    assert math.isnan(auc([1.0, 2.0], [1, 1]))


# --------------------------------------------------------------------------- hand-computed values


def one_list(scores, labels, **kwargs):
    s = torch.tensor([scores], dtype=torch.float64)
    y = torch.tensor([labels], dtype=torch.float64)
    m = torch.ones_like(s, dtype=torch.bool)
    return {k: float(v[0]) for k, v in per_list_metrics(s, y, m, **kwargs).items()}


def test_binary_list_by_hand():
    # logged order (descending scores) shows labels 0, 1, 0, 1
    got = one_list([4.0, 3.0, 2.0, 1.0], [0, 1, 0, 1], ks=(1, 2, 4))
    dcg = 1 / math.log2(3) + 1 / math.log2(5)  # clicks at positions 2 and 4
    idcg = 1 + 1 / math.log2(3)  # ideal: clicks at 1 and 2
    assert got["ndcg@4"] == pytest.approx(dcg / idcg)
    assert got["ndcg@4"] == pytest.approx(0.650921, abs=1e-6)
    assert got["ndcg@1"] == 0.0
    assert got["ndcg@2"] == pytest.approx((1 / math.log2(3)) / idcg)
    assert got["map@4"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert got["map@2"] == pytest.approx(0.5)  # one click in the top 2, precision 1/2 there
    assert got["map@1"] == 0.0
    assert got["clicks@4"] == 2.0 and got["p@4"] == 0.5
    assert got["clicks@2"] == 1.0 and got["p@2"] == 0.5
    # reversing the scores puts the clicks at positions 1 and 3
    got = one_list([1.0, 2.0, 3.0, 4.0], [0, 1, 0, 1], ks=(4,))
    assert got["ndcg@4"] == pytest.approx((1 + 1 / math.log2(4)) / idcg)
    assert got["map@4"] == pytest.approx((1 + 2 / 3) / 2)


def test_ties_keep_input_order_by_hand():
    # all scores tied: the input order is the predicted order
    got = one_list([1.0, 1.0, 1.0], [0, 0, 1], ks=(1, 3))
    assert got["clicks@1"] == 0.0
    assert got["ndcg@3"] == pytest.approx((1 / 2) / 1)
    assert got["map@3"] == pytest.approx(1 / 3)


def test_graded_list_by_hand():
    got = one_list([3.0, 2.0, 1.0], [2, 0, 1], ks=(3,))
    dcg = 3 + 0 + 1 / 2
    idcg = 3 + 1 / math.log2(3)
    assert got["ndcg@3"] == pytest.approx(dcg / idcg)


def test_k_beyond_list_length_by_hand():
    got = one_list([2.0, 1.0], [0, 1], ks=(5,))
    assert got["p@5"] == pytest.approx(1 / 5)  # divided by k, not by the list length
    assert got["clicks@5"] == 1.0
    assert got["ndcg@5"] == pytest.approx(1 / math.log2(3))
    assert got["map@5"] == pytest.approx(1 / 2)


def test_diversity_by_hand():
    # three clicked items in predicted order with categories A, A, B; alpha = 0.5
    got = one_list([3.0, 2.0, 1.0], [1, 1, 1], ks=(3,), categories=torch.tensor([[1, 1, 2]]), alpha=0.5)
    dcg = 1 + 0.5 / math.log2(3) + 1 / math.log2(4)
    ideal = 1 + 1 / math.log2(3) + 0.5 / math.log2(4)  # A, B, A
    assert got["alpha_ndcg@3"] == pytest.approx(dcg / ideal)
    # intents A and B, R = 1/2: A gets 1/2 at 1 and 1/2 * 1/2 / 2 at 2; B gets 1/2 / 3 at 3
    assert got["err_ia@3"] == pytest.approx(((0.5 + 0.125) + 0.5 / 3) / 2)
    assert got["ilad@3"] == pytest.approx(2 / 3)
    # label-aware: an unclicked item of a new category gains nothing
    got = one_list([3.0, 2.0, 1.0], [1, 0, 1], ks=(3,), categories=torch.tensor([[1, 2, 1]]), alpha=0.5)
    assert got["alpha_ndcg@3"] == pytest.approx((1 + 0.5 / math.log2(4)) / (1 + 0.5 / math.log2(3)))


def test_ilad_embeddings_by_hand():
    emb = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]], dtype=torch.float64)
    got = one_list([3.0, 2.0, 1.0], [0, 1, 0], ks=(2, 3), embeddings=emb)
    assert got["ilad@2"] == pytest.approx(1.0)  # orthogonal
    assert got["ilad@3"] == pytest.approx((1.0 + 2.0 + 1.0) / 3)


def test_lists_without_clicks_count_as_zero_in_the_mean():
    scores = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = evaluate(scores, labels, mask, ks=(1,))
    assert got["ndcg@1"] == pytest.approx(0.5)
    assert got["map@1"] == pytest.approx(0.5)
    assert got["p@1"] == pytest.approx(0.5)


def test_padding_never_counts_even_with_high_scores_and_labels():
    scores = torch.tensor([[1.0, 0.0, 9.0, 9.0]])
    labels = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False, False]])
    got = evaluate(scores, labels, mask, ks=(1, 4))
    assert got["clicks@4"] == 1.0
    assert got["ndcg@1"] == 0.0
    assert got["ndcg@4"] == pytest.approx(1 / math.log2(3))
    assert got["auc"] == 0.0


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        evaluate(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))


# --------------------------------------------------------------------------- evaluate_lists over batches


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_lists_over_batches_equals_one_padded_batch(seed):
    rng = np.random.default_rng(seed)
    examples = []
    for b in range(37):
        n = int(rng.integers(1, 16))
        labels = (rng.random(n) < 0.3).astype(np.float32) if b % 4 else np.zeros(n, np.float32)
        examples.append(
            {
                "item_sparse": np.stack([rng.integers(1, 100, n), rng.integers(1, 5, n)], axis=1),
                "item_dense": rng.integers(0, 4, size=(n, 2)).astype(np.float32),  # tied scores
                "label": labels,
                "user_sparse": np.array([b + 1]),
                "list_id": b,
            }
        )

    def score_fn(batch):
        return batch.item_dense[..., 0] - 0.5 * batch.item_dense[..., 1]

    # batches of different widths, each padded only to its own longest list
    cuts = [0, 5, 6, 20, 37]
    batches = [collate(examples[a:b]) for a, b in zip(cuts, cuts[1:])]
    assert len({batch.list_len for batch in batches}) > 1
    whole = collate(examples)
    for category_col in (None, 1):
        got = evaluate_lists(score_fn, batches, ks=KS, category_col=category_col)
        cats = whole.item_sparse[..., 1] if category_col is not None else None
        expected = evaluate(score_fn(whole), whole.label, whole.mask, ks=KS, categories=cats)
        assert set(got) == set(expected)
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name
    # and both agree with the reference
    lists = [
        {
            "scores": [float(x[0] - 0.5 * x[1]) for x in e["item_dense"]],
            "labels": [float(v) for v in e["label"]],
            "cats": [int(c) for c in e["item_sparse"][:, 1]],
        }
        for e in examples
    ]
    for name, values in reference(lists).items():
        assert got[name] == pytest.approx(float(np.mean(values)), rel=1e-9, abs=1e-12), name


def test_evaluate_lists_without_batches_raises():
    with pytest.raises(ValueError):
        evaluate_lists(lambda b: b.label, [])


def test_cutoffs_must_be_positive():
    scores = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="positive"):
        evaluate(scores, torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), ks=(0, 5))


def test_clicks_count_clicked_items_with_graded_labels():
    labels = torch.tensor([[2.0, 0.0, 1.0]])
    out = evaluate(torch.tensor([[3.0, 2.0, 1.0]]), labels, torch.ones(1, 3, dtype=torch.bool), ks=(3,))
    assert out["clicks@3"] == 2.0 and out["p@3"] == pytest.approx(2 / 3)


def test_metrics_run_on_one_thread_and_give_the_model_its_own():
    """The metrics' own operations run on one intra-op thread; the scoring model keeps the caller's setting,
    which is restored afterwards (also when a metric raises)."""
    before = torch.get_num_threads()
    seen = []

    def score_fn(batch):
        seen.append(torch.get_num_threads())
        return batch.item_dense[..., 0]

    lists = random_lists(3, n_lists=6, width=5)
    examples = [
        {
            "item_sparse": np.ones((len(lst["scores"]), 1), dtype=np.int64),
            "item_dense": np.asarray(lst["scores"], dtype=np.float32)[:, None],
            "label": np.asarray(lst["labels"], dtype=np.float32),
            "user_sparse": np.array([1]),
            "list_id": b,
        }
        for b, lst in enumerate(lists)
    ]
    try:
        torch.set_num_threads(2)
        evaluate_lists(score_fn, [collate(examples[:3]), collate(examples[3:])], ks=(1,))
        assert seen == [2, 2] and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            evaluate(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), ks=(0,))
        assert torch.get_num_threads() == 2
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
