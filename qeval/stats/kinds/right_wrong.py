"""`right_wrong`: 0/1 per document (acc, exact_match), compared by Tango's score test for the paired
difference of accuracies.

Test and interval (Tango 1998, Stat Med 17:891): with b right->wrong and c wrong->right flips among
n documents, the score statistic for a true difference delta = p(wrong->right) - p(right->wrong) is
    Z(delta) = (c - b - n delta) / sqrt(n (2 q(delta) + delta (1 - delta)))
where q(delta) is the maximum-likelihood right->wrong rate under that delta (a closed-form root of a
quadratic). The interval is every delta with |Z(delta)| < z_{1-alpha/2}; the p-value is the same
test at delta = 0, where Z is McNemar's statistic (c - b) / sqrt(b + c), so "p < alpha" and "the
interval excludes 0" are one statement. Unlike the interval it replaced (Clopper-Pearson on the
discordant split, conditional on d = b + c), it does not treat d as fixed: its coverage is nominal
over the draws of d too (the old one covered 52% at n = 60 with 30% one-way flips), and d = 0 gives
a width of about 2 z^2 / n rather than [0, 0].
Continuity correction: |c - b - n delta| is shrunk by `CONTINUITY` = 1/4 (a quarter of Yates's 1/2).
Without it one-way flips (a binomial: Tango's interval is then Wilson's) cover 93% at some rates and
n (30, 60, 100, 300, 1000); with 1/4 every one-way rate on a 0.25-point grid covers >= 94.3% at those
n, exactly enumerated (docs/statistics.md, `qeval bench-stats`).
McNemar's exact p (the discordant split against Binomial(b + c, 1/2)) stays as an extra field,
`Comparison.mcnemar_p`: a column only, never the verdict.
MDE: the exact power of this score test (not an approximation of it) for a drop of delta on top of
symmetric noise flips at the measured discordance rate psi (the discordant count is Binomial(n,
psi + delta), its wrong->right share (psi/2) / (psi + delta)).
Units: absolute (an accuracy point is 0.01).
Simulated noise: symmetric flips at the task's measured flip rate; the planted regression turns
right answers wrong.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from scipy import optimize, stats

from qeval.stats.comparison import ALPHA, POWER, Comparison, undefined
from qeval.stats.kind import KINDS, Kind

CONTINUITY = 0.25  # subtracted from |c - b - n delta|: see the module docstring for why 1/4


def score_z(rw: int, wr: int, n: int, delta: float, cc: float = CONTINUITY) -> float:
    """Tango's score statistic for a true difference `delta` (variant - reference accuracy) given
    rw right->wrong and wr wrong->right flips of n; decreasing in delta."""
    a = 2 * n
    bq = -wr - rw + (2 * n - wr + rw) * delta
    cq = -rw * delta * (1 - delta)
    q = (math.sqrt(max(bq * bq - 4 * a * cq, 0.0)) - bq) / (2 * a)  # ML right->wrong rate under delta
    var = n * (2 * q + delta * (1 - delta))
    num = wr - rw - n * delta
    num = math.copysign(max(abs(num) - cc, 0.0), num)
    if var <= 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def score_p(rw: int, wr: int, alpha: float = ALPHA, cc: float = CONTINUITY) -> float:
    """The two-sided p-value of the score test at delta = 0: McNemar's statistic with the correction."""
    d = rw + wr
    if d == 0:
        return 1.0
    return float(2 * stats.norm.sf(max(abs(wr - rw) - cc, 0.0) / math.sqrt(d)))


@functools.lru_cache(maxsize=65536)
def tango(rw: int, wr: int, n: int, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(p, lo, hi): the score test at 0 and the 1 - alpha interval of the accuracy difference (cached:
    a night of comparisons repeats the same counts). The bounds are searched on the side of 0 the
    p-value decides, so the interval excludes 0 exactly when p < alpha, whatever the float rounding."""
    z = float(stats.norm.ppf(1 - alpha / 2))
    p = score_p(rw, wr, alpha)
    est = (wr - rw) / n
    eps = 1e-12
    f_lo = lambda x: score_z(rw, wr, n, x) - z  # noqa: E731  root: the lower bound (f decreasing)
    f_hi = lambda x: score_z(rw, wr, n, x) + z  # noqa: E731  root: the upper bound
    excluded = p < alpha

    def root(f, a, b, edge):
        if f(a) * f(b) > 0:  # no sign change on the bracket: the bound is its edge
            return edge
        return float(optimize.brentq(f, a, b, xtol=1e-13))

    if excluded and est > 0:  # the lower bound lies in (0, est]
        lo, hi = root(f_lo, 0.0, est, 0.0), root(f_hi, est, 1 - eps, 1.0)
        lo = max(lo, math.ulp(0.0))
    elif excluded:  # est < 0: the upper bound lies in [est, 0)
        lo, hi = root(f_lo, -1 + eps, est, -1.0), root(f_hi, est, 0.0, 0.0)
        hi = min(hi, -math.ulp(0.0))
    else:  # 0 inside: each bound on its own side of 0
        lo, hi = root(f_lo, -1 + eps, min(est, 0.0), -1.0), root(f_hi, max(est, 0.0), 1 - eps, 1.0)
    return p, lo, hi


@functools.lru_cache(maxsize=65536)
def mcnemar_exact_p(rw: int, wr: int) -> float:
    """McNemar's exact p: the discordant split against Binomial(rw + wr, 1/2) (an extra column)."""
    d = rw + wr
    return 1.0 if d == 0 else float(stats.binomtest(wr, d, 0.5).pvalue)


@functools.lru_cache(maxsize=256)
def _critical(n: int, alpha: float) -> np.ndarray:
    """For d = 0..n discordant pairs: the largest number k of wrong->right flips at which a drop
    (d - k right->wrong) rejects at level alpha (-1: none does). The score test at 0 rejects when
    (d - 2k - CONTINUITY) / sqrt(d) > z_{1-alpha/2}."""
    d = np.arange(n + 1, dtype=float)
    z = float(stats.norm.ppf(1 - alpha / 2))
    k = np.ceil((d - CONTINUITY - z * np.sqrt(d)) / 2) - 1
    k = np.where(d > 0, k, -1)
    # the float edge: step back while k does not reject by the p-value itself (score_p's rule)
    bad = (k >= 0) & (2 * stats.norm.sf((d - 2 * k - CONTINUITY) / np.sqrt(np.maximum(d, 1))) >= alpha)
    k[bad] -= 1
    return k


def paired_power(n: int, psi: float, delta: float, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided score test at 0 (McNemar's statistic with the correction; the
    test the verdict uses) against a drop of `delta` on top of noise flips at rate psi: the noise
    flips split evenly, the drop adds delta n right->wrong flips, so the discordant count is
    Binomial(n, psi + delta) and its wrong->right share psi/2 / (psi + delta)."""
    total = min(1.0, psi + delta)
    if total <= 0:
        return 0.0
    q = (psi / 2) / total
    d = np.arange(n + 1)
    k = _critical(n, alpha)
    reject = np.where(k >= 0, stats.binom.cdf(k, d, q), 0.0)
    return float((stats.binom.pmf(d, n, total) * reject).sum())


@functools.lru_cache(maxsize=1024)
def paired_mde(n: int, psi: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest accuracy change (absolute) the score test detects with probability `power` at
    this n and discordance rate psi (exact; bisection on the monotone power curve)."""
    if n <= 0:
        return math.nan
    if paired_power(n, psi, 1.0, alpha) < power:
        return math.inf  # even every document flipping could not be told apart at this n
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if paired_power(n, psi, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


class RightWrong(Kind):
    __slots__ = ()
    name = "right_wrong"
    test = "Tango score test"
    unit = "absolute"
    default_min_effect = 0.01
    plant = "drop"

    def compare(self, ref, var, *, metric, higher_is_better, min_effect, alpha, noise_rate, aggregation=None):
        b = np.asarray(ref, dtype=float)
        v = np.asarray(var, dtype=float)
        n = len(b)
        if n == 0:
            return undefined(metric, self.name, self.test, 0, math.nan, math.nan, min_effect, alpha,
                             "no common documents")
        rw = int(((b == 1) & (v == 0)).sum())
        wr = int(((b == 0) & (v == 1)).sum())
        d = rw + wr
        sign = 1 if higher_is_better else -1
        delta = (wr - rw) / n
        p, lo, hi = tango(rw, wr, n, alpha)
        rate = d / n if noise_rate is None else noise_rate
        e_lo, e_hi = (lo, hi) if sign > 0 else (-hi, -lo)
        return Comparison(metric, self.name, self.test, n, float(b.mean()), float(v.mean()), delta, lo, hi,
                          sign * delta, e_lo, e_hi, p, min_effect, self.mde(n, rate, alpha), alpha, rw, wr,
                          mcnemar_p=mcnemar_exact_p(rw, wr))

    def mde(self, n: int, spread: float, alpha: float = ALPHA) -> float:
        """`spread`: the discordance (flip) rate, rounded to 4 decimals so that nearby rates share
        one cached power calculation."""
        return paired_mde(n, round(spread, 4), alpha)

    def mde_at(self, n: int, noise_rate: float, mde: float, alpha: float, power: float = POWER) -> float:
        """The score test's exact power calculation again, at level `alpha`, `power` and discordance
        rate `noise_rate`."""
        return paired_mde(n, noise_rate, alpha, power)

    def closest_noise(self, n: int, flip_rates: Sequence[float], mdes: Sequence[float]) -> tuple[float, float]:
        """The exact MDE at the lowest flip rate any variant shows against the baseline (0: none flips)."""
        rates = [float(r) for r in flip_rates if not math.isnan(r) and r > 0]
        rate = min(rates) if rates else 0.0
        return rate, self.mde(n, rate)

    def simulates(self, values: list) -> bool:
        return True

    def night_rate(self, flip_rate: float) -> float | None:
        return float(flip_rate)

    def night_noise(self, values, rate, rng):
        """Symmetric flips: rate*n/2 expected each way, whatever the accuracy."""
        n = len(values)
        right, wrong = np.flatnonzero(values == 1), np.flatnonzero(values == 0)
        out = values.copy()
        if len(right):
            out[right[rng.random(len(right)) < min(1.0, rate * n / 2 / len(right))]] = 0
        if len(wrong):
            out[wrong[rng.random(len(wrong)) < min(1.0, rate * n / 2 / len(wrong))]] = 1
        return out

    def plant_regression(self, noisy, size, rng):
        """`size` right answers (a whole number of documents) turned wrong, in place."""
        right = np.flatnonzero(noisy == 1)
        noisy[rng.choice(right, min(int(size), len(right)), replace=False)] = 0
        return noisy


RIGHT_WRONG = KINDS.add(RightWrong.name, RightWrong())
