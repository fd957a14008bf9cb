"""Training noise: one arm's score over several training seeds, and whether two arms differ beyond it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from qeval.stats.comparison import ALPHA

@dataclass(frozen=True)
class SeedSpread:
    """One arm's score over several training seeds: mean, min..max, and the t interval of the mean."""

    n: int
    mean: float
    lo: float  # interval of the mean (NaN with one seed: training noise not measured)
    hi: float
    min: float
    max: float


def seed_spread(values: list[float], alpha: float = ALPHA) -> SeedSpread:
    """The spread of a score across training seeds (`scipy.stats.t` interval of their mean)."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return SeedSpread(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(v.mean())
    if len(v) < 2:
        return SeedSpread(1, mean, math.nan, math.nan, mean, mean)
    half = float(stats.t.ppf(1 - alpha / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return SeedSpread(len(v), mean, mean - half, mean + half, float(v.min()), float(v.max()))


def seeds_differ(a: list[float], b: list[float], alpha: float = ALPHA) -> bool | None:
    """Whether two arms' values over training seeds (a score, a peak memory) differ by more than
    their seed-to-seed noise: Welch's t-test (`scipy.stats.ttest_ind`, unequal variances) at
    `alpha`. None when either arm has fewer than two seeds (the noise is not measured).

    The verdicts' one rule for "no clear winner". Not the overlap of the two 95% intervals: with
    two seeds each interval is the mean +- 12.7 x sd / sqrt(2), so two arms 13 noise-sds apart
    (LoRA vs QLoRA peak training memory, 1.50 vs 1.17 GiB with ~30 MiB between seeds) "overlapped"
    in one cold run and not in the next; overlapping intervals is also a far stricter test than
    its 5% suggests."""
    x = np.array([v for v in a if v is not None and not math.isnan(v)], dtype=float)
    y = np.array([v for v in b if v is not None and not math.isnan(v)], dtype=float)
    if len(x) < 2 or len(y) < 2:
        return None
    if x.std(ddof=1) == 0 and y.std(ddof=1) == 0:
        return bool(x.mean() != y.mean())  # no noise at all: any difference is real
    p = stats.ttest_ind(x, y, equal_var=False).pvalue
    return bool(p < alpha)
