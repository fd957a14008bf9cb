"""`mean`: any float per document (a mean that is not right/wrong), compared by a BCa bootstrap of
the paired mean difference (`scipy.stats.bootstrap(paired=True)`).

Interval: the BCa interval; the p-value from the bootstrap distribution (the smallest two-sided
level at which the percentile interval excludes 0), held to the interval so that "excludes 0" and
"p < alpha" stay one statement. It needs `MIN_N_BOOTSTRAP` documents.
MDE: (z_{1-alpha/2} + z_power) sd(differences) / sqrt(n) (the base `Kind.mde`).
Units: absolute.
Simulated noise: a normal jitter of `JITTER` on each value; no planted regression.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from qeval.stats.comparison import MIN_N_BOOTSTRAP, Comparison, undefined
from qeval.stats.kind import KINDS, Kind

BOOTSTRAP_RESAMPLES = 2000
JITTER = 1e-4  # a night's absolute noise on each value


class Mean(Kind):
    __slots__ = ()
    name = "mean"
    test = "BCa bootstrap of the paired mean"
    unit = "absolute"
    default_min_effect = 0.01

    def compare(self, ref, var, *, metric, higher_is_better, min_effect, alpha, noise_rate, aggregation=None):
        test = self.test
        b = np.asarray(ref, dtype=float)
        v = np.asarray(var, dtype=float)
        n = len(b)
        ref_value = float(b.mean()) if n else math.nan
        value = float(v.mean()) if n else math.nan
        if n < MIN_N_BOOTSTRAP:
            return undefined(metric, self.name, test, n, ref_value, value, min_effect, alpha,
                             f"fewer than {MIN_N_BOOTSTRAP} documents")
        diff = v - b
        if np.all(diff == diff[0]):
            lo = hi = float(diff[0])
            p = 1.0 if diff[0] == 0 else 0.0
        else:
            rng = np.random.default_rng(1234)  # seeded: the same data gives the same verdict every time
            res = stats.bootstrap((b, v), lambda x, y, axis=-1: (y - x).mean(axis=axis), paired=True,
                                  confidence_level=1 - alpha, n_resamples=BOOTSTRAP_RESAMPLES, method="BCa",
                                  random_state=rng)
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
            dist = res.bootstrap_distribution
            p = float(min(1.0, 2 * min((dist <= 0).mean(), (dist >= 0).mean())))
            # keep "interval excludes 0" and "p < alpha" one statement: the interval decides
            p = min(p, alpha / 2) if (lo > 0 or hi < 0) else max(p, alpha)
        sign = 1 if higher_is_better else -1
        e_lo, e_hi = (lo, hi) if sign > 0 else (-hi, -lo)
        sd = float(diff.std(ddof=1)) if noise_rate is None else noise_rate
        return Comparison(metric, self.name, test, n, ref_value, value, value - ref_value, lo, hi,
                          sign * (value - ref_value), e_lo, e_hi, p, min_effect, self.mde(n, sd, alpha), alpha)

    def simulates(self, values: list) -> bool:
        return True

    def night_noise(self, values, rate, rng):
        return values + rng.normal(0, JITTER, values.shape)


MEAN = KINDS.add(Mean.name, Mean())
