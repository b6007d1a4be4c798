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


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its 95% percentile-bootstrap interval, resampling the paired units (e.g. lists)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or len(diff) == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length 1-d samples, got {np.shape(a)} and {np.shape(b)}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory for long samples
        stop = min(start + 1000, resamples)
        means[start:stop] = diff[rng.integers(0, len(diff), size=(stop - start, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def ratio_influence(num: np.ndarray, den: np.ndarray) -> tuple[float, np.ndarray]:
    """R = sum(num) / sum(den) over units (e.g. users), and each unit's influence on it (the delta method:
    the interval of R is the interval of the mean of the influences)."""
    ratio = num.sum() / den.sum()
    return float(ratio), (num - ratio * den) / den.mean()


def normal_interval(influence: np.ndarray, centre: float) -> tuple[float, float]:
    """The 95% normal interval around ``centre`` whose standard error is that of the mean of ``influence``."""
    se = influence.std(ddof=1) / np.sqrt(len(influence)) if len(influence) > 1 else float("nan")
    return centre - Z95 * se, centre + Z95 * se
