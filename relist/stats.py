"""Statistics: every interval and test relist reports is computed here (t intervals over seeds, paired
comparisons, the bootstrap over units, and the delta-method intervals of ratio metrics in A/B tests)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# scipy.stats is imported inside the functions that need it: it costs half a second of start-up
def t_ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% t interval of the mean of ``values`` (nan with fewer than two)."""
    from scipy import stats

    if len(values) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


def paired_t_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the paired t-test of ``a`` against ``b`` (nan when they are equal or too short)."""
    from scipy import stats

    if len(a) < 2 or np.allclose(a, b):
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def ratio_influence(num: np.ndarray, den: np.ndarray) -> tuple[float, np.ndarray]:
    """R = sum(num) / sum(den) over units (e.g. users), and each unit's influence on it (the delta method:
    the interval of R is the interval of the mean of the influences)."""
    ratio = num.sum() / den.sum()
    return float(ratio), (num - ratio * den) / den.mean()


def normal_interval(influence: np.ndarray, centre: float) -> tuple[float, float]:
    """The 95% normal interval around ``centre`` whose standard error is that of the mean of ``influence``."""
    se = influence.std(ddof=1) / np.sqrt(len(influence)) if len(influence) > 1 else float("nan")
    return centre - Z95 * se, centre + Z95 * se


# ---- comparisons of two arms: the two-level bootstrap, Wilcoxon over seeds, Holm --------------------------
SEEDS_AND_LISTS = "over seeds and lists"
SEEDS_AND_USERS = "over seeds and users"
SEEDS_ONLY = "over seeds only (training variance only)"


def _bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p: twice the smaller share of replicates on either side of 0, at most 1; a
    replicate exactly at 0 (common when most units do not differ) counts half to each side. nan when a
    replicate is not finite (a resample whose denominator sums to 0): no p is better than a wrong one."""
    if not np.isfinite(replicates).all():
        return float("nan")
    at_zero = float(np.mean(replicates == 0))
    below, above = float(np.mean(replicates < 0)) + at_zero / 2, float(np.mean(replicates > 0)) + at_zero / 2
    return min(1.0, 2.0 * min(below, above))


def crossed_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """The difference of two arms scored on the *same* units by every seed (offline: every seed's model on
    the same test lists), (S, N) arrays paired by seed and by list. Each replicate resamples the S seeds
    and, independently, one set of N lists used for every seed; the statistic is the mean of a - b.

    Returns ``mean``, the 95% percentile interval ``low`` / ``high``, the two-sided bootstrap ``p`` and the
    number of ``resamples`` (the resolution of p). With
    one seed it is the bootstrap over lists alone. Per-seed noise that is independent across lists (not
    what offline metrics of seeds that share lists mostly have) makes it conservative."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"crossed_bootstrap needs two (seeds, units) arrays of one shape, got {a.shape} and {b.shape}")
    diff = a - b
    if not np.isfinite(diff).all():
        raise ValueError("crossed_bootstrap: the per-unit values hold nan or inf (drop undefined units first)")
    n_seeds, n_units = diff.shape
    rng = np.random.default_rng(seed)
    replicates = np.empty(resamples)
    chunk = max(1, min(resamples, 4_000_000 // max(n_units, 1)))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=r) / n_seeds  # (r, S) weights
        units = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=r) / n_units  # (r, N)
        replicates[start : start + r] = np.einsum("rs,sn,rn->r", seeds, diff, units)
    low, high = np.percentile(replicates, [2.5, 97.5])
    p = _bootstrap_p(replicates)
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "p": p, "resamples": resamples}


def nested_bootstrap(
    a: list[np.ndarray],
    b: list[np.ndarray],
    a_den: list[np.ndarray] | None = None,
    b_den: list[np.ndarray] | None = None,
    resamples: int = 2_000,
    seed: int = 0,
) -> dict[str, float]:
    """The difference of two arms where each seed draws its own units (online: each seed its own simulated
    users), both arms meeting the same users within a seed. ``a[s]``, ``b[s]``: per-unit outcomes of seed s
    (paired by unit). Each replicate resamples seeds, then units within each resampled seed; a seed's value
    is its units' mean, or with ``a_den``/``b_den`` the ratio of sums (clicks per request = clicks /
    requests), and the statistic is the mean over the resampled seeds of a - b.

    Returns ``mean``, ``low``, ``high`` (95% percentile interval), ``p`` (two-sided bootstrap) and
    ``resamples``. Resampling
    units within resampled seeds counts the within-seed noise twice when it dominates the between-seed
    variance, so the interval is then conservative (see the tests for where its coverage was measured)."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"nested_bootstrap needs the same number (> 0) of seeds per arm, got {len(a)} and {len(b)}")
    if (a_den is None) != (b_den is None):
        raise ValueError("nested_bootstrap: give both arms' denominators (a ratio) or neither (a mean)")
    if a_den is None:
        a_den = [np.ones_like(x, dtype=np.float64) for x in a]
        b_den = [np.ones_like(x, dtype=np.float64) for x in b]
    parts = [np.stack([a[s], a_den[s], b[s], b_den[s]]).astype(np.float64) for s in range(len(a))]
    if any(p.ndim != 2 or p.shape[1] == 0 for p in parts):
        raise ValueError("nested_bootstrap: every seed needs the same positive number of units in both arms")

    def value(p: np.ndarray) -> float:
        return p[0].sum() / p[1].sum() - p[2].sum() / p[3].sum()

    observed = float(np.mean([value(p) for p in parts]))
    rng = np.random.default_rng(seed)
    n_seeds = len(parts)
    chosen = rng.integers(0, n_seeds, size=(resamples, n_seeds))  # the seeds of each replicate
    values = np.empty(chosen.shape)
    for s, p in enumerate(parts):  # the units of every slot that drew seed s, resampled independently
        slots = np.flatnonzero(chosen.reshape(-1) == s)
        n = p.shape[1]
        chunk = max(1, 2_000_000 // n)
        for start in range(0, len(slots), chunk):
            part = slots[start : start + chunk]
            sums = p[:, rng.integers(0, n, size=(len(part), n))].sum(axis=2)  # (4, slots)
            values.reshape(-1)[part] = sums[0] / sums[1] - sums[2] / sums[3]
    replicates = values.mean(axis=1)
    low, high = np.percentile(replicates, [2.5, 97.5])
    p = _bootstrap_p(replicates)
    return {"mean": observed, "low": float(low), "high": float(high), "p": p, "resamples": resamples}


def seeds_only_t(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of the per-seed differences a - b, its 95% t interval and the paired t-test's p: over seeds
    only, so it holds the training variance and misses the variance of the units the seeds share."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    half = t_ci95(diff)
    return {"mean": float(diff.mean()), "low": float(diff.mean() - half), "high": float(diff.mean() + half),
            "p": paired_t_p(a, b)}  # fmt: skip


def wilcoxon_seeds(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Wilcoxon signed-rank test of per-seed values a against b, with its exact two-sided p (scipy's exact
    distribution, which assumes no two |differences| tie: rare for means over many lists), and the count of
    seeds where a is above b. With 5 seeds the smallest possible p is 0.0625; use 10 or more for a verdict."""
    from scipy import stats

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    favour, n = int((diff > 0).sum()), len(diff)
    nonzero = diff[diff != 0]
    if len(nonzero) == 0:
        return {"p": 1.0, "favour": favour, "n": n}
    p = float(stats.wilcoxon(nonzero, method="exact").pvalue)
    return {"p": p, "favour": favour, "n": n}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (nan entries stay nan and do not count)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for k, index in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[index]))
        out[index] = running
    return out.tolist()


def format_p(p: float, resamples: int) -> str:
    """A bootstrap p for a table (``resamples``: the bootstrap's, in its result): below the resolution of
    ``resamples`` replicates it reads "< 1/resamples"."""
    return f"< {1 / resamples:.0e}" if p == 0 else f"{p:.3g}"


def format_interval(result: dict[str, float], digits: int = 4) -> str:
    """'+0.0018 [-0.0010, +0.0046]'."""
    return f"{result['mean']:+.{digits}f} [{result['low']:+.{digits}f}, {result['high']:+.{digits}f}]"
