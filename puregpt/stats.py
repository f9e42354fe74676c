"""Is a difference between two sets of runs real, or seed noise? Welch's t-test, in pure Python.

`welch(a, b)` compares the means of two samples (say, the final validation losses of one config's
seeds and of another's) without assuming equal variances:

    d  = mean(a) - mean(b)
    se = sqrt(s_a^2 / n_a + s_b^2 / n_b)                  s^2: the sample variance (n - 1)
    t  = d / se
    df = se^4 / ((s_a^2/n_a)^2 / (n_a - 1) + (s_b^2/n_b)^2 / (n_b - 1))   Welch-Satterthwaite

and the p-value and the 95% interval d +/- q se (q = the 97.5% quantile of Student's t with df
degrees of freedom) come from the Student-t distribution, built here from the regularized
incomplete beta function:

    P(|T| > t) = I_x(df/2, 1/2),  x = df / (df + t^2)

evaluated by its continued fraction (modified Lentz), and inverted by bisection for quantiles.
tests/test_stats.py holds all of it to SciPy's (scipy.stats.ttest_ind(equal_var=False),
scipy.stats.t) within 1e-9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def mean(xs) -> float:
    xs = list(xs)
    if not xs:
        raise ValueError("the mean of no values")
    return math.fsum(xs) / len(xs)


def sample_var(xs) -> float:
    """The unbiased variance (divides by n - 1); NaN for a single value (no spread to see)."""
    xs = list(xs)
    if len(xs) < 2:
        return math.nan
    m = mean(xs)
    return math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def sample_std(xs) -> float:
    return math.sqrt(sample_var(xs))


# --- the Student-t distribution ----------------------------------------------------------------


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes' betacf), by the modified Lentz
    method: converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),  # the even step
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # the odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float, xc: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b). `xc` = 1 - x, when the caller knows
    it more precisely than 1 - x would compute it (x near 1)."""
    xc = 1.0 - x if xc is None else xc
    if x <= 0.0:
        return 0.0
    if xc <= 0.0:
        return 1.0
    # x^a (1-x)^b / (a B(a, b)), in logs to survive large a and b
    front = math.exp(a * math.log(x) + b * math.log(xc)
                     + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, xc) / b  # the symmetry I_x(a, b) = 1 - I_{1-x}(b, a)


def t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    t2 = t * t
    # x = df / (df + t^2) and 1 - x = t^2 / (df + t^2), each without cancellation
    return betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    tail = t_two_sided(t, df) / 2.0  # P(T >= |t|), by symmetry
    return tail if t < 0 else 1.0 - tail


def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t: the t with t_cdf(t, df) = p, by bisection on the tail
    (monotone, so bisection cannot miss; 200 halvings reach the last bit of a double)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    tail = 1.0 - p if p > 0.5 else p  # P(T >= q) for the positive quantile q
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) / 2.0 > tail:  # widen until the tail beyond hi is small enough
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        if t_two_sided(mid, df) / 2.0 > tail:
            lo = mid
        else:
            hi = mid
    q = (lo + hi) / 2.0
    return q if p > 0.5 else -q


# --- Welch's test ------------------------------------------------------------------------------


@dataclass
class Welch:
    diff: float  # mean(a) - mean(b)
    se: float  # its standard error
    t: float
    df: float
    p: float  # two-sided
    low: float  # the interval diff +/- q se (level `level`)
    high: float
    level: float = 0.95


def welch(a, b, level: float = 0.95) -> Welch:
    """Welch's two-sample t-test of mean(a) - mean(b), with its `level` confidence interval.
    Each sample needs two values at least (one value shows no spread). Zero spread in both:
    the difference is exact (se 0), so p is 0 (1 if the means are equal) and the interval is
    the point itself."""
    a, b = list(a), list(b)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least 2 values per sample, got {len(a)} and "
                         f"{len(b)}")
    va, vb = sample_var(a) / len(a), sample_var(b) / len(b)  # the squared standard errors
    diff, se = mean(a) - mean(b), math.sqrt(va + vb)
    if se == 0.0:
        return Welch(diff, 0.0, math.copysign(math.inf, diff) if diff else math.nan, math.nan,
                     0.0 if diff else 1.0, diff, diff, level)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = diff / se
    q = t_ppf(0.5 + level / 2.0, df)
    return Welch(diff, se, t, df, t_two_sided(t, df), diff - q * se, diff + q * se, level)
