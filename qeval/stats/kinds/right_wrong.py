"""`right_wrong`: 0/1 per document (acc, exact_match), compared by the exact McNemar test.

Test: the discordant pairs against Binomial(b + c, 1/2) (`scipy.stats.binomtest`).
Interval: conditional on the d = b + c discordant documents, the Clopper-Pearson interval of the
share of wrong->right flips is the inversion of the exact binomial test at p = 1/2; the paired
difference of accuracies is (c - b) / n = d/n * (2 share - 1), so its interval follows.
MDE: an exact power calculation for a drop of delta on top of symmetric noise flips at the measured
discordance rate psi (the discordant count is Binomial(n, psi + delta), its wrong->right share
(psi/2) / (psi + delta)).
Units: absolute (an accuracy point is 0.01).
Simulated noise: symmetric flips at the task's measured flip rate; the planted regression turns
right answers wrong.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from scipy import stats

from qeval.stats.comparison import ALPHA, POWER, Comparison, undefined
from qeval.stats.kind import KINDS, Kind


@functools.lru_cache(maxsize=65536)
def exact_binomial(k: int, d: int, alpha: float) -> tuple[float, float, float]:
    """Two-sided exact binomial test of k successes in d at p = 1/2 and the Clopper-Pearson
    interval of the share (cached: a night of comparisons repeats the same small counts)."""
    res = stats.binomtest(k, d, 0.5)
    ci = res.proportion_ci(confidence_level=1 - alpha, method="exact")
    return float(res.pvalue), float(ci.low), float(ci.high)


@functools.lru_cache(maxsize=256)
def _critical(n: int, alpha: float) -> np.ndarray:
    """For d = 0..n discordant pairs: the largest k such that k (or fewer) flips one way rejects at
    level alpha (-1: none does). At p = 1/2 the two-sided exact p-value of k < d/2 is
    2 P(X <= k), X ~ Binomial(d, 1/2), so k is one below the alpha/2 quantile."""
    d = np.arange(n + 1)
    k = stats.binom.ppf(alpha / 2, d, 0.5) - 1
    # guard the quantile's floating point edge: step back while the tail is not below alpha/2
    bad = (k >= 0) & (2 * stats.binom.cdf(k, d, 0.5) >= alpha)
    k[bad] -= 1
    return k


def mcnemar_power(n: int, psi: float, delta: float, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided McNemar test against a drop of `delta` on top of noise flips
    at rate psi: the noise flips split evenly, the drop adds delta n right->wrong flips, so the
    discordant count is Binomial(n, psi + delta) and its wrong->right share psi/2 / (psi + delta)."""
    total = min(1.0, psi + delta)
    if total <= 0:
        return 0.0
    q = (psi / 2) / total
    d = np.arange(n + 1)
    k = _critical(n, alpha)
    reject = np.where(k >= 0, stats.binom.cdf(k, d, q), 0.0)
    return float((stats.binom.pmf(d, n, total) * reject).sum())


@functools.lru_cache(maxsize=1024)
def mcnemar_mde(n: int, psi: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest accuracy change (absolute) detected with probability `power` at this n and
    discordance rate psi (exact; bisection on the monotone power curve)."""
    if n <= 0:
        return math.nan
    if mcnemar_power(n, psi, 1.0, alpha) < power:
        return math.inf  # even every document flipping could not be told apart at this n
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if mcnemar_power(n, psi, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


class RightWrong(Kind):
    __slots__ = ()
    name = "right_wrong"
    test = "exact McNemar"
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
        if d == 0:
            p, lo, hi = 1.0, 0.0, 0.0
        else:
            p, share_lo, share_hi = exact_binomial(wr, d, alpha)
            lo, hi = d / n * (2 * share_lo - 1), d / n * (2 * share_hi - 1)
        rate = d / n if noise_rate is None else noise_rate
        e_lo, e_hi = (lo, hi) if sign > 0 else (-hi, -lo)
        return Comparison(metric, self.name, self.test, n, float(b.mean()), float(v.mean()), delta, lo, hi,
                          sign * delta, e_lo, e_hi, p, min_effect, self.mde(n, rate, alpha), alpha, rw, wr)

    def mde(self, n: int, spread: float, alpha: float = ALPHA) -> float:
        """`spread`: the discordance (flip) rate, rounded to 4 decimals so that nearby rates share
        one cached power calculation."""
        return mcnemar_mde(n, round(spread, 4), alpha)

    def mde_at(self, n: int, noise_rate: float, mde: float, alpha: float) -> float:
        """McNemar's exact power calculation again, at level `alpha` and discordance rate `noise_rate`."""
        return mcnemar_mde(n, noise_rate, alpha)

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
