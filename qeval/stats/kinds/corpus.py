"""`corpus`: an item a corpus aggregation reads (f1, mcc: (gold, pred); brier; median), compared by a
paired bootstrap over documents, each resample aggregated with lm-eval's own function.

Interval: the percentile interval of the resampled difference; the p-value the smallest two-sided
level at which it excludes 0, held to the interval. It needs `MIN_N_BOOTSTRAP` documents.
MDE: (z_{1-alpha/2} + z_power) standard errors, the standard error being the bootstrap
distribution's spread (already of the whole corpus: no 1/sqrt(n)).
Units: absolute, on a 0..1 scale like an accuracy (sacrebleu's 0..100 points: `corpus_points`).
Simulated noise: none (resampling a corpus aggregation a thousand times a night is not worth it).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from qeval.stats.comparison import ALPHA, MIN_N_BOOTSTRAP, Comparison, undefined, z_power
from qeval.stats.kind import KINDS, Kind

CORPUS_RESAMPLES = 1000  # each resample aggregates the whole corpus twice (sacrebleu, sklearn)


def corpus_aggregate(aggregation: str) -> Callable[[list], float]:
    """lm-eval's own aggregation function registered under `aggregation` (bleu, f1, ...)."""
    import lm_eval.api.metrics  # noqa: F401  (registers the aggregations)
    from lm_eval.api.registry import get_aggregation

    fn = get_aggregation(aggregation)
    if fn is None:
        raise KeyError(f"lm-eval has no aggregation {aggregation!r}")
    return fn


def _item(x):
    """A stored per-document item (JSON turned tuples into lists) back into lm-eval's tuple."""
    return tuple(_item(v) for v in x) if isinstance(x, list) else x


class Corpus(Kind):
    __slots__ = ()
    name = "corpus"
    test = "paired bootstrap over documents"
    unit = "absolute"
    default_min_effect = 0.01
    aggregations = ("f1", "matthews_corrcoef", "brier_score", "median")
    # `qeval bench-stats`: a corpus f1 whose 10% of predictions flip is covered 0.817 of the time at
    # n = 20 (the percentile bootstrap of a ratio of counts on few positives) and 0.967 at n = 60
    approximate_below = 60

    def compare(self, ref, var, *, metric, higher_is_better, min_effect, alpha, noise_rate, aggregation=None):
        # the comparison's kind: the one this aggregation maps to (bleu is `corpus_points` even when
        # called through `corpus`), so its row reads the same whichever way it was reached
        kind = "corpus_points" if aggregation in KINDS.get("corpus_points").aggregations else self.name
        test = f"paired bootstrap over documents ({aggregation or 'corpus'})"
        n = len(ref)
        if aggregation is None:
            return undefined(metric, kind, test, n, math.nan, math.nan, min_effect, alpha,
                             "the metric's aggregation is not recorded")
        agg = corpus_aggregate(aggregation)
        items_r, items_v = [_item(x) for x in ref], [_item(x) for x in var]
        ref_value = float(agg(items_r)) if n else math.nan
        value = float(agg(items_v)) if n else math.nan
        if n < MIN_N_BOOTSTRAP:
            return undefined(metric, kind, test, n, ref_value, value, min_effect, alpha,
                             f"fewer than {MIN_N_BOOTSTRAP} documents")
        if items_r == items_v:  # the same outputs on every document: nothing to resample
            return Comparison(metric, kind, test, n, ref_value, value, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
                              min_effect, 0.0, alpha)
        rng = np.random.default_rng(1234)  # seeded: the same data gives the same verdict every time
        diffs = np.empty(CORPUS_RESAMPLES)
        for i in range(CORPUS_RESAMPLES):
            idx = rng.integers(0, n, n)
            diffs[i] = float(agg([items_v[j] for j in idx])) - float(agg([items_r[j] for j in idx]))
        diffs = diffs[~np.isnan(diffs)]
        delta = value - ref_value
        if len(diffs) == 0 or np.all(diffs == diffs[0]):
            lo = hi = delta
            p = 1.0 if delta == 0 else 0.0
        else:
            lo, hi = (float(x) for x in np.quantile(diffs, [alpha / 2, 1 - alpha / 2]))
            p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
            p = min(p, alpha / 2) if (lo > 0 or hi < 0) else max(p, alpha)  # interval and p: one statement
        sign = 1 if higher_is_better else -1
        e_lo, e_hi = (lo, hi) if sign > 0 else (-hi, -lo)
        sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0
        mde = self.mde(n, sd if noise_rate is None else noise_rate, alpha)
        return Comparison(metric, kind, test, n, ref_value, value, delta, lo, hi, sign * delta, e_lo, e_hi, p,
                          min_effect, mde, alpha)

    def mde(self, n: int, spread: float, alpha: float = ALPHA) -> float:
        """`spread`: the standard error of the corpus aggregate's difference (the bootstrap's sd)."""
        return z_power(alpha) * spread


CORPUS = KINDS.add(Corpus.name, Corpus())
