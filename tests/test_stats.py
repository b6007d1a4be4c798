"""The experiments' statistics: t intervals and paired comparisons."""

from __future__ import annotations

import numpy as np
import pytest

from relist.stats import paired_bootstrap, paired_t_p, t_ci95


def test_paired_bootstrap_finds_a_real_shift_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    mean, low, high = paired_bootstrap(base + 0.2 + rng.normal(scale=0.5, size=400), base)
    assert low > 0.1 and high < 0.3 and low < mean < high
    mean, low, high = paired_bootstrap(base + rng.normal(scale=0.5, size=400), base)
    assert low < 0 < high
    assert paired_bootstrap(base, base) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_interval_narrows_with_more_units():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 1600):
        diff = rng.normal(size=n)
        _, low, high = paired_bootstrap(diff, np.zeros(n))
        widths.append(high - low)
    assert widths[1] < widths[0] / 2.5  # about 1/sqrt(16) = 1/4


def test_t_interval_and_paired_t():
    assert np.isnan(t_ci95([1.0]))
    assert t_ci95([1.0, 2.0, 3.0]) == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)
    assert np.isnan(paired_t_p([1.0, 2.0], [1.0, 2.0]))
    assert (
        paired_t_p([1.1, 2.1, 3.2, 4.2], [1.0, 2.0, 3.0, 4.0])
        < 0.05
        < paired_t_p([1.1, 1.9, 3.2, 3.9], [1.0, 2.0, 3.0, 4.0])
    )


def test_paired_bootstrap_rejects_unequal_samples():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(np.zeros((2, 2)), np.zeros((2, 2)))
