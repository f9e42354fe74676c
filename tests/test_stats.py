"""Welch's t-test and the Student-t distribution of puregpt.stats, against SciPy (the oracle) on
fixed and random inputs, within 1e-9; and the cases SciPy does not decide for us (one seed, no
spread)."""

import math
import random

import pytest

from puregpt import stats

TOL = 1e-9


def close(x, y, tol=TOL):
    return abs(x - y) <= tol * max(1.0, abs(y))


@pytest.mark.oracle
@pytest.mark.parametrize("df", [1, 1.5, 2, 3.7, 5, 10, 30, 100, 1000, 1e5])
def test_t_cdf_and_quantiles_equal_scipys(df):
    import scipy.stats
    for t in (-200.0, -12.7, -3.0, -1.0, -0.1, 0.0, 0.05, 0.7, 2.0, 4.3, 8.0, 100.0):
        assert close(stats.t_cdf(t, df), scipy.stats.t.cdf(t, df)), (t, df)
        assert close(stats.t_two_sided(t, df), 2 * scipy.stats.t.sf(abs(t), df)), (t, df)
    for p in (1e-12, 1e-6, 0.001, 0.025, 0.1, 0.4, 0.5, 0.6, 0.9, 0.975, 0.999, 1 - 1e-9):
        assert close(stats.t_ppf(p, df), scipy.stats.t.ppf(p, df)), (p, df)


@pytest.mark.oracle
def test_betainc_equals_scipys():
    import scipy.special
    rng = random.Random(1)
    for _ in range(300):
        a, b, x = rng.uniform(0.05, 60), rng.uniform(0.05, 60), rng.random()
        assert close(stats.betainc(a, b, x), scipy.special.betainc(a, b, x)), (a, b, x)


def _check_welch(a, b):
    import scipy.stats
    w = stats.welch(a, b)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert close(w.t, ref.statistic) and close(w.df, ref.df), (a, b)
    assert close(w.p, ref.pvalue), (w.p, ref.pvalue, a, b)
    assert close(w.low, ci.low) and close(w.high, ci.high), (w, ci, a, b)
    assert close(w.diff, sum(a) / len(a) - sum(b) / len(b))


@pytest.mark.oracle
def test_welch_equals_scipy_on_fixed_inputs():
    _check_welch([2.31, 2.29, 2.35], [2.40, 2.38, 2.45])  # three seeds each, a clear gap
    _check_welch([2.31, 2.29, 2.35], [2.30, 2.36, 2.28])  # noise
    _check_welch([1.0, 2.0], [1.5, 1.6, 1.7, 1.8, 1.9])  # unequal sizes and spreads
    _check_welch([5.0, 5.0, 5.0, 5.1], [4.0, 6.0])  # almost no spread on one side
    _check_welch([1e-3, 2e-3, 1.5e-3], [10.0, 20.0, 30.0])  # wildly different scales


@pytest.mark.oracle
def test_welch_equals_scipy_on_random_inputs():
    rng = random.Random(0)
    for _ in range(300):
        na, nb = rng.randint(2, 10), rng.randint(2, 10)
        a = [rng.gauss(2.0, rng.uniform(1e-3, 1.0)) for _ in range(na)]
        b = [rng.gauss(2.0 + rng.uniform(-1, 1), rng.uniform(1e-3, 1.0)) for _ in range(nb)]
        _check_welch(a, b)


def test_mean_and_sample_std():
    assert stats.mean([1.0, 2.0, 6.0]) == 3.0
    assert math.isclose(stats.sample_std([1.0, 2.0, 6.0]), math.sqrt(7.0), rel_tol=1e-15)
    assert math.isnan(stats.sample_std([1.0]))  # one seed: no spread to measure
    with pytest.raises(ValueError):
        stats.mean([])


def test_one_value_per_sample_is_refused_and_no_spread_is_exact():
    with pytest.raises(ValueError, match="at least 2 values"):
        stats.welch([1.0], [1.0, 2.0])
    w = stats.welch([2.0, 2.0], [3.0, 3.0, 3.0])  # no spread: the difference is exact
    assert (w.diff, w.low, w.high, w.p, w.t) == (-1.0, -1.0, -1.0, 0.0, -math.inf)
    same = stats.welch([2.0, 2.0], [2.0, 2.0])
    assert same.p == 1.0 and same.low == same.high == 0.0


def test_quantile_refuses_probabilities_outside_0_1():
    for p in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="0 < p < 1"):
            stats.t_ppf(p, 3)
