"""`loglikelihood_ratio`: [log-likelihood, count] per document (perplexities, bits per byte), compared
by a paired t-test on the per-document log-likelihood differences.

Test and interval: the aggregate (perplexity = exp(-sum ll / sum count), bits per byte =
-sum ll / sum count / ln 2) of a variant over the *same* documents differs from the reference's by
exactly sum(d_i) / sum(count) in log space, with d_i the per-document log-likelihood change. The t
interval of mean(d_i) therefore is an interval of the log-ratio of the two aggregates, reported as a
relative change (var / ref - 1). It needs `MIN_N_T` documents.
Coverage: approximate below `approximate_below` documents (skewed heavy-tailed changes).
MDE: (z_{1-alpha/2} + z_power) sd(d_i) / sqrt(n), in the relative units of the min effect.
Units: relative (0.005 = 0.5%).
Simulated noise: every log-likelihood jittered by a relative `JITTER`; the planted regression is a
relative rise of the aggregate, spread over documents by a Gamma(2).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy import stats

from qeval.stats.comparison import MIN_N_T, Comparison, undefined
from qeval.stats.kind import KINDS, Kind

JITTER = 1e-4  # a night's relative noise on each log-likelihood
# log-space aggregate -> metric value, by aggregation (or, for old records, metric); default exp
FROM_LOG = {"bits_per_byte": lambda x: x / math.log(2)}


@functools.lru_cache(maxsize=1024)
def _t_quantile(df: int, alpha: float) -> float:
    return float(stats.t.ppf(1 - alpha / 2, df))


def _rel(log_change: float, log_ref: float, metric: str) -> float:
    """A change of the log-space aggregate as the relative change of the metric's value: a
    perplexity is exp(aggregate), so exp(change) - 1; bits per byte is linear in it."""
    if metric in FROM_LOG:
        return log_change / log_ref if log_ref else math.nan
    return math.expm1(log_change)


def _delta_from_log(log_change: float, log_ref: float, to_value) -> float:
    return to_value(log_ref + log_change) - to_value(log_ref)


class LoglikelihoodRatio(Kind):
    __slots__ = ()
    name = "loglikelihood_ratio"
    test = "paired t on per-document log-likelihoods"
    unit = "relative"
    default_min_effect = 0.005
    aggregations = ("perplexity",  # per document: a log-likelihood; exp(-mean)
                    "weighted_perplexity",  # per document: (log-likelihood, words or bytes)
                    "bits_per_byte")
    plant = "rise"
    # The t interval leans on the mean of the per-document changes being normal. With a skewed heavy
    # tail (a centred lognormal(0, 1): a few documents get much worse) it covers 0.86 at n = 20, 0.89
    # at 60, 0.90 at 100 and 0.92 from 150 (`qeval bench-stats`, 1,000 trials each): below 150
    # documents the report marks its interval "approximate at this n".
    approximate_below = 150

    def compare(self, ref, var, *, metric, higher_is_better, min_effect, alpha, noise_rate, aggregation=None):
        test = self.test
        n = len(ref)
        if n == 0:
            return undefined(metric, self.name, test, 0, math.nan, math.nan, min_effect, alpha, "no common documents")
        # "perplexity" aggregates one log-likelihood per document (exp(-mean)): a weight of 1 each
        ref = [(r, 1.0) if np.ndim(r) == 0 else r for r in ref]
        var = [(r, 1.0) if np.ndim(r) == 0 else r for r in var]
        bl = np.array([r[0] for r in ref], dtype=float)
        vl = np.array([r[0] for r in var], dtype=float)
        w = np.array([r[1] for r in ref], dtype=float)
        W = w.sum()
        log_kind = aggregation if aggregation in FROM_LOG else metric
        to_value = FROM_LOG.get(log_kind, math.exp)
        log_ref, log_var = -bl.sum() / W, -vl.sum() / W
        ref_value, value = to_value(log_ref), to_value(log_var)
        if n < MIN_N_T:
            return undefined(metric, self.name, test, n, ref_value, value, min_effect, alpha,
                             f"fewer than {MIN_N_T} documents")
        d = -(vl - bl)  # per-document increase of negative log-likelihood; sum(d)/W = log_var - log_ref
        scale = n / W
        sd = float(d.std(ddof=1))
        if sd == 0:  # every document moved by the same amount: no noise at all
            p = 1.0 if d[0] == 0 else 0.0
            lo = hi = float(d.mean()) * scale
        else:
            # the one-sample t-test of scipy.stats.ttest_1samp, from the t distribution directly: a
            # nightly runs thousands of these in the gate benchmark, and the wrapper costs 10x the test
            se = sd / math.sqrt(n)
            t = float(d.mean()) / se
            p = float(2 * stats.t.sf(abs(t), n - 1))
            half = _t_quantile(n - 1, alpha) * se
            lo, hi = (float(d.mean()) - half) * scale, (float(d.mean()) + half) * scale
        rel = _rel(log_var - log_ref, log_ref, log_kind)
        rel_lo, rel_hi = _rel(lo, log_ref, log_kind), _rel(hi, log_ref, log_kind)
        sign = 1 if higher_is_better else -1
        e_lo, e_hi = (rel_lo, rel_hi) if sign > 0 else (-rel_hi, -rel_lo)
        dlo, dhi = _delta_from_log(lo, log_ref, to_value), _delta_from_log(hi, log_ref, to_value)
        sd_n = sd if noise_rate is None else noise_rate
        # the MDE in log-likelihood per document, to the aggregate's log space (scale), to relative units
        mde = abs(_rel(self.mde(n, sd_n, alpha) * scale, log_ref, log_kind))
        return Comparison(metric, self.name, test, n, ref_value, value, value - ref_value, dlo, dhi,
                          sign * rel, e_lo, e_hi, p, min_effect, mde, alpha)

    def simulates(self, values: list) -> bool:
        # a bare log-likelihood per document (LAMBADA's perplexity) has no count column to jitter against
        return bool(values) and isinstance(values[0], list)

    def night_noise(self, values, rate, rng):
        out = values.copy()
        out[:, 0] *= 1 + rng.normal(0, JITTER, len(values))
        return out

    def plant_regression(self, noisy, size, rng):
        """The aggregate rises by exactly `size` (relative): per-document log-likelihood changes
        drawn from a Gamma(2) around that mean, so documents disagree as they do in reality."""
        g = rng.gamma(2.0, 0.5, len(noisy))
        g *= noisy[:, 1].sum() / (g * noisy[:, 1]).sum()
        noisy[:, 0] -= noisy[:, 1] * math.log1p(size) * g
        return noisy


LOGLIKELIHOOD_RATIO = KINDS.add(LoglikelihoodRatio.name, LoglikelihoodRatio())
