"""The one paired comparison: a variant against a reference on the same documents.

Every verdict qeval prints goes through `compare_pair`: the `*` in the accuracy table, the flips and
p-value of divergence.csv, "lost"/"regained" in the adapter table, the nightly gate. A comparison
never decides significance anywhere else, so two tables can not disagree on the same pair.

Which test applies depends on how a metric aggregates its per-document values, not on its name:

| kind                 | per-document value        | test                                              |
|----------------------|---------------------------|---------------------------------------------------|
| `right_wrong`        | 0/1 (acc, exact_match)    | exact McNemar: the discordant pairs against       |
|                      |                           | Binomial(b + c, 1/2) (`scipy.stats.binomtest`)    |
| `loglikelihood_ratio`| [loglikelihood, count]    | paired t on the per-document log-likelihood       |
|                      | (perplexities, bpb)       | differences (`scipy.stats.ttest_1samp`)           |
| `mean`               | any float                 | BCa bootstrap of the paired mean difference       |
|                      |                           | (`scipy.stats.bootstrap(paired=True)`)            |
| `corpus`,            | an item the corpus        | paired bootstrap over documents, each resample    |
| `corpus_points`      | aggregation reads (f1,    | aggregated with lm-eval's own function            |
|                      | mcc: (gold, pred); bleu,  | (percentile interval of the difference)           |
|                      | ter, chrf: (ref, pred))   |                                                   |

The kind is chosen by lm-eval's aggregation function of the metric (`AGGREGATION`, stored with
every metric), never by the metric's name: `perplexity` (LAMBADA: one log-likelihood a document)
and `weighted_perplexity` / `bits_per_byte` (rolling: (log-likelihood, count)) are log-likelihood
ratios; `mean` is right/wrong when every value is 0 or 1, else a mean.

Intervals are built by inverting the same test that gives the p-value, so "the 95% interval
excludes 0" and "p < 0.05" are the same statement:

- McNemar: conditional on the d = b + c discordant documents, the Clopper-Pearson interval of the
  share of wrong->right flips is the inversion of the exact binomial test at p = 1/2; the paired
  difference of accuracies is (c - b) / n = d/n * (2 share - 1), so its interval follows.
- log-likelihood ratios: the aggregate (perplexity = exp(-sum ll / sum count), bits per byte =
  -sum ll / sum count / ln 2) of a variant over the *same* documents differs from the reference's
  by exactly sum(d_i) / sum(count) in log space, with d_i the per-document log-likelihood change.
  The t interval of mean(d_i) therefore is an interval of the log-ratio of the two aggregates,
  reported as a relative change (var / ref - 1). It needs `MIN_N_T` documents.
- mean: the BCa interval, and a p-value from the bootstrap distribution (the smallest two-sided
  level at which the percentile interval excludes 0). It needs `MIN_N_BOOTSTRAP` documents.

Practical significance: every kind has a default minimum meaningful effect (`DEFAULT_MIN_EFFECT`,
absolute for means, relative for log-likelihood ratios). A change counts only when it is both
significant and larger than that ("better"/"worse"); significant but smaller is "below min effect".

Minimum detectable effect (`mde`): the smallest true change the test finds with probability
`POWER` at level alpha and this n: for McNemar an exact power calculation for a drop of delta on
top of symmetric noise flips at the measured discordance rate psi (the discordant count is
Binomial(n, psi + delta), its wrong->right share (psi/2) / (psi + delta)); for the t-test
(z_{1-alpha/2} + z_power) sd(d_i) / sqrt(n), in the relative units of the min effect.

Extending: register a `Kind` with `KINDS.add(name, Kind(...))` and map lm-eval's aggregation
name to it in `AGGREGATION`. An aggregation qeval does not know is compared as `corpus` (its own
function, resampled over documents).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
from scipy import stats

from qeval.core.registry import Registry

ALPHA = 0.05
POWER = 0.8
MIN_N_T = 10  # the t interval on fewer documents leans too hard on normality
MIN_N_BOOTSTRAP = 20  # BCa needs enough documents for its acceleration estimate to mean anything
BOOTSTRAP_RESAMPLES = 2000

BETTER, WORSE, NOISE, SMALL, UNDEFINED = "better", "worse", "within noise", "below min effect", "undefined"


@dataclass(frozen=True)
class Comparison:
    """`delta` and the interval are in the metric's units (variant - reference); `effect` and its
    interval are on the scale of `min_effect` (absolute for means, relative for ratios) and
    oriented so that positive is better."""

    metric: str
    kind: str
    test: str
    n: int
    ref_value: float
    value: float
    delta: float
    ci_lo: float
    ci_hi: float
    effect: float
    effect_lo: float
    effect_hi: float
    p_value: float
    min_effect: float
    mde: float
    alpha: float = ALPHA
    right_to_wrong: int | None = None
    wrong_to_right: int | None = None
    reason: str = ""  # why a comparison is undefined

    @property
    def defined(self) -> bool:
        return not math.isnan(self.p_value)

    @property
    def significant(self) -> bool:
        return self.defined and self.p_value < self.alpha

    @property
    def meaningful(self) -> bool:
        return self.defined and abs(self.effect) > self.min_effect

    @property
    def verdict(self) -> str:
        return verdict_at(self, self.p_value)

    @property
    def flips(self) -> int | None:
        return None if self.right_to_wrong is None else self.right_to_wrong + self.wrong_to_right

    @property
    def flip_rate(self) -> float:
        return math.nan if self.flips is None or not self.n else self.flips / self.n

    def as_row(self) -> dict:
        """The columns every frame shows for a comparison."""
        return {"test": self.test, "pairs": self.n, "delta_lo": self.ci_lo, "delta_hi": self.ci_hi,
                "effect": self.effect, "p_value": self.p_value, "min_effect": self.min_effect, "mde": self.mde,
                "significant": self.significant, "meaningful": self.meaningful, "verdict": self.verdict,
                "flips": self.flips, "flips_right_to_wrong": self.right_to_wrong,
                "flips_wrong_to_right": self.wrong_to_right, "flip_rate": self.flip_rate,
                "mcnemar_p": self.p_value if self.kind == "right_wrong" else math.nan}


def verdict_at(c: Comparison, p: float, level: float | None = None) -> str:
    """The verdict with p-value `p` (the raw one, or one adjusted for multiple testing, then
    `level` is the FDR level it is held against; default the comparison's alpha)."""
    if math.isnan(p):
        return UNDEFINED
    if p >= (c.alpha if level is None else level):
        return NOISE
    if abs(c.effect) <= c.min_effect:
        return SMALL
    return BETTER if c.effect > 0 else WORSE


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Kind:
    """How one aggregation compares: `compare(ref_values, var_values, ...)` -> Comparison, the
    default minimum meaningful effect, and the unit that effect is in."""

    compare: Callable[..., Comparison]
    default_min_effect: float
    unit: str  # "absolute" | "relative"
    test: str


KINDS: Registry[Kind] = Registry("comparison kind")

# lm-eval's aggregation function (the name it registers it under: `aggregation:` in a task's
# metric_list, or the metric's default) -> qeval's comparison kind. "mean" (and None: an aggregation
# qeval does not know, e.g. a task's own `!function`) decide between right_wrong and mean by the
# per-document values (0/1 or not). Corpus aggregations compute one number from all documents at
# once, so they are compared by a paired bootstrap over documents with that same aggregation.
AGGREGATION = {
    "mean": None, "nanmean": None,
    "perplexity": "loglikelihood_ratio",  # per document: a log-likelihood; exp(-mean)
    "weighted_perplexity": "loglikelihood_ratio",  # per document: (log-likelihood, words or bytes)
    "bits_per_byte": "loglikelihood_ratio",
    "f1": "corpus", "matthews_corrcoef": "corpus", "brier_score": "corpus", "median": "corpus",
    "bleu": "corpus_points", "chrf": "corpus_points", "chrf++": "corpus_points", "ter": "corpus_points",
}
# Records written before the aggregation was stored name only the metric: lm-eval's own defaults
# for the metrics qeval's shipped tasks used (lm_eval.api.registry's metric -> aggregation map).
LEGACY_AGGREGATION = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                      "bits_per_byte": "bits_per_byte", "perplexity": "perplexity"}
_FROM_LOG = {"bits_per_byte": lambda x: x / math.log(2)}  # log-space aggregate -> metric value; default exp


def aggregation_of(metric: str, aggregation: str | None) -> str | None:
    """The stored aggregation, or for an old record the default of its metric (by the part of a
    metric id before the filter: `exact_match,strict-match` -> exact_match)."""
    return aggregation or LEGACY_AGGREGATION.get(metric.split(",")[0].split("/")[-1])


def kind_of(metric: str, values: list, aggregation: str | None = None) -> str:
    """The registry key for `metric` (aggregated by lm-eval's `aggregation`) given its per-document values."""
    agg = AGGREGATION.get(aggregation_of(metric, aggregation) or "")
    if agg:
        return agg
    if aggregation and aggregation not in AGGREGATION:
        return "corpus"  # an aggregation qeval does not know: resample documents, aggregate as lm-eval does
    if values and isinstance(values[0], (list, tuple)):
        return "loglikelihood_ratio"
    if all(float(v) in (0.0, 1.0) for v in values):
        return "right_wrong"
    return "mean"


def default_min_effect(kind: str) -> float:
    return KINDS.get(kind).default_min_effect


def compare_pair(base_samples: list[dict], var_samples: list[dict], metric: str, higher_is_better: bool,
                 min_effect: float | Mapping[str, float] | None = None, alpha: float = ALPHA,
                 noise_rate: float | None = None, aggregation: str | None = None,
                 task: str | None = None) -> Comparison:
    """Compare `metric` of a variant with a reference on the documents both measured (by task and
    doc_id: a group's samples carry their subtask; a document whose hash differs is an error, not a
    pair). `min_effect`: see `compare_values`. `noise_rate`: the discordance rate the MDE assumes
    (default: the one measured here). `aggregation`: lm-eval's aggregation of the metric (stored
    with it). `task`: only the samples of this subtask of a group (default: all)."""
    def key(s):
        return s.get("task"), s["doc_id"]

    def mine(s):
        return metric in s and (task is None or s.get("task") == task)

    base = {key(s): s for s in base_samples if mine(s)}
    pairs = [(base[key(s)], s) for s in var_samples if key(s) in base and mine(s)]
    for b, v in pairs:
        if b.get("doc_hash") != v.get("doc_hash"):
            raise ValueError(f"document {b['doc_id']} differs between baseline and variant")
    return compare_values([b[metric] for b, _ in pairs], [v[metric] for _, v in pairs], metric, higher_is_better,
                          min_effect, alpha, noise_rate, aggregation=aggregation)


def compare_values(ref, var, metric: str, higher_is_better: bool,
                   min_effect: float | Mapping[str, float] | None = None, alpha: float = ALPHA,
                   noise_rate: float | None = None, kind: str | None = None,
                   aggregation: str | None = None) -> Comparison:
    """`compare_pair` on per-document values already aligned (ref[i] and var[i] are one document).
    `kind`: the registry key when the caller knows it (default: `kind_of` the values and aggregation).
    `min_effect`: a number; or a plan's `thresholds.min_effect` mapping (metric name or kind ->
    number; the metric's own entry wins), resolved here once the kind is known; None: the kind's
    default."""
    aggregation = aggregation_of(metric, aggregation)
    name = kind or kind_of(metric, list(ref) + list(var), aggregation)
    k = KINDS.get(name)
    if isinstance(min_effect, Mapping):
        min_effect = min_effect.get(metric, min_effect.get(name))
    me = k.default_min_effect if min_effect is None else float(min_effect)
    return k.compare(ref, var, metric=metric, higher_is_better=higher_is_better, min_effect=me, alpha=alpha,
                     noise_rate=noise_rate, aggregation=aggregation)


def _undefined(metric, kind, test, n, ref_value, value, min_effect, alpha, reason, **kw) -> Comparison:
    nan = math.nan
    return Comparison(metric, kind, test, n, ref_value, value, value - ref_value if n else nan, nan, nan, nan, nan,
                      nan, nan, min_effect, nan, alpha, reason=reason, **kw)


# ----------------------------------------------------------------------------- right / wrong: McNemar

def _mcnemar(ref, var, *, metric, higher_is_better, min_effect, alpha, noise_rate, **_) -> Comparison:
    b = np.asarray(ref, dtype=float)
    v = np.asarray(var, dtype=float)
    n = len(b)
    test = "exact McNemar"
    if n == 0:
        return _undefined(metric, "right_wrong", test, 0, math.nan, math.nan, min_effect, alpha, "no common documents")
    rw = int(((b == 1) & (v == 0)).sum())
    wr = int(((b == 0) & (v == 1)).sum())
    d = rw + wr
    sign = 1 if higher_is_better else -1
    delta = (wr - rw) / n
    if d == 0:
        p, lo, hi = 1.0, 0.0, 0.0
    else:
        p, share_lo, share_hi = _exact_binomial(wr, d, alpha)
        lo, hi = d / n * (2 * share_lo - 1), d / n * (2 * share_hi - 1)
    rate = d / n if noise_rate is None else noise_rate
    e_lo, e_hi = (lo, hi) if sign > 0 else (-hi, -lo)
    return Comparison(metric, "right_wrong", test, n, float(b.mean()), float(v.mean()), delta, lo, hi, sign * delta,
                      e_lo, e_hi, p, min_effect, mcnemar_mde(n, round(rate, 4), alpha), alpha, rw, wr)


@functools.lru_cache(maxsize=65536)
def _exact_binomial(k: int, d: int, alpha: float) -> tuple[float, float, float]:
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


# ----------------------------------------------------------------------------- log-likelihood ratios

def _loglik_ratio(ref, var, *, metric, higher_is_better, min_effect, alpha, noise_rate, aggregation=None) -> Comparison:
    test = "paired t on per-document log-likelihoods"
    n = len(ref)
    if n == 0:
        return _undefined(metric, "loglikelihood_ratio", test, 0, math.nan, math.nan, min_effect, alpha,
                          "no common documents")
    # "perplexity" aggregates one log-likelihood per document (exp(-mean)): a weight of 1 each
    ref = [(r, 1.0) if np.ndim(r) == 0 else r for r in ref]
    var = [(r, 1.0) if np.ndim(r) == 0 else r for r in var]
    bl = np.array([r[0] for r in ref], dtype=float)
    vl = np.array([r[0] for r in var], dtype=float)
    w = np.array([r[1] for r in ref], dtype=float)
    W = w.sum()
    log_kind = aggregation if aggregation in _FROM_LOG else metric
    to_value = _FROM_LOG.get(log_kind, math.exp)
    log_ref, log_var = -bl.sum() / W, -vl.sum() / W
    ref_value, value = to_value(log_ref), to_value(log_var)
    if n < MIN_N_T:
        return _undefined(metric, "loglikelihood_ratio", test, n, ref_value, value, min_effect, alpha,
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
    z = _z(alpha)
    mde = abs(_rel(z * sd_n / math.sqrt(n) * scale, log_ref, log_kind))
    return Comparison(metric, "loglikelihood_ratio", test, n, ref_value, value, value - ref_value, dlo, dhi,
                      sign * rel, e_lo, e_hi, p, min_effect, mde, alpha)


@functools.lru_cache(maxsize=1024)
def _t_quantile(df: int, alpha: float) -> float:
    return float(stats.t.ppf(1 - alpha / 2, df))


@functools.lru_cache(maxsize=64)
def _z(alpha: float, power: float = POWER) -> float:
    """z_{1-alpha/2} + z_power: the normal-approximation MDE is this many standard errors."""
    return float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))


def _rel(log_change: float, log_ref: float, metric: str) -> float:
    """A change of the log-space aggregate as the relative change of the metric's value: a
    perplexity is exp(aggregate), so exp(change) - 1; bits per byte is linear in it."""
    if metric in _FROM_LOG:
        return log_change / log_ref if log_ref else math.nan
    return math.expm1(log_change)


def _delta_from_log(log_change: float, log_ref: float, to_value) -> float:
    return to_value(log_ref + log_change) - to_value(log_ref)


# ----------------------------------------------------------------------------- continuous means: BCa

def _bca_mean(ref, var, *, metric, higher_is_better, min_effect, alpha, noise_rate, **_) -> Comparison:
    test = "BCa bootstrap of the paired mean"
    b = np.asarray(ref, dtype=float)
    v = np.asarray(var, dtype=float)
    n = len(b)
    ref_value = float(b.mean()) if n else math.nan
    value = float(v.mean()) if n else math.nan
    if n < MIN_N_BOOTSTRAP:
        return _undefined(metric, "mean", test, n, ref_value, value, min_effect, alpha,
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
    mde = _z(alpha) * sd / math.sqrt(n)
    return Comparison(metric, "mean", test, n, ref_value, value, value - ref_value, lo, hi, sign * (value - ref_value),
                      e_lo, e_hi, p, min_effect, mde, alpha)


# ----------------------------------------------------------------------------- corpus metrics: paired bootstrap

CORPUS_RESAMPLES = 1000  # each resample aggregates the whole corpus twice (sacrebleu, sklearn)


def corpus_aggregate(aggregation: str) -> Callable[[list], float]:
    """lm-eval's own aggregation function registered under `aggregation` (bleu, f1, ...)."""
    import lm_eval.api.metrics  # noqa: F401  (registers the aggregations)
    from lm_eval.api.registry import get_aggregation

    fn = get_aggregation(aggregation)
    if fn is None:
        raise KeyError(f"lm-eval has no aggregation {aggregation!r}")
    return fn


def _corpus(ref, var, *, metric, higher_is_better, min_effect, alpha, noise_rate, aggregation=None) -> Comparison:
    """Paired bootstrap over documents: the same resampled documents for both models, each side
    aggregated with the metric's own corpus aggregation; the interval is the percentile interval
    of the difference, the p-value the smallest two-sided level at which it excludes 0."""
    test = f"paired bootstrap over documents ({aggregation or 'corpus'})"
    kind = "corpus_points" if aggregation in ("bleu", "chrf", "chrf++", "ter") else "corpus"
    n = len(ref)
    if aggregation is None:
        return _undefined(metric, kind, test, n, math.nan, math.nan, min_effect, alpha,
                          "the metric's aggregation is not recorded")
    agg = corpus_aggregate(aggregation)
    items_r, items_v = [_item(x) for x in ref], [_item(x) for x in var]
    ref_value = float(agg(items_r)) if n else math.nan
    value = float(agg(items_v)) if n else math.nan
    if n < MIN_N_BOOTSTRAP:
        return _undefined(metric, kind, test, n, ref_value, value, min_effect, alpha,
                          f"fewer than {MIN_N_BOOTSTRAP} documents")
    if items_r == items_v:  # the same outputs on every document: nothing to resample
        return Comparison(metric, kind, test, n, ref_value, value, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, min_effect,
                          0.0, alpha)
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
    mde = _z(alpha) * (sd if noise_rate is None else noise_rate)
    return Comparison(metric, kind, test, n, ref_value, value, delta, lo, hi, sign * delta, e_lo, e_hi, p,
                      min_effect, mde, alpha)


def _item(x):
    """A stored per-document item (JSON turned tuples into lists) back into lm-eval's tuple."""
    return tuple(_item(v) for v in x) if isinstance(x, list) else x


KINDS.add("right_wrong", Kind(_mcnemar, 0.01, "absolute", "exact McNemar"))
KINDS.add("loglikelihood_ratio", Kind(_loglik_ratio, 0.005, "relative", "paired t on per-document log-likelihoods"))
KINDS.add("mean", Kind(_bca_mean, 0.01, "absolute", "BCa bootstrap of the paired mean"))
# f1, mcc, brier: 0..1 like an accuracy; bleu, chrf, ter: sacrebleu's 0..100 points
KINDS.add("corpus", Kind(_corpus, 0.01, "absolute", "paired bootstrap over documents"))
KINDS.add("corpus_points", Kind(_corpus, 1.0, "absolute", "paired bootstrap over documents"))


# ----------------------------------------------------------------------------- multiple testing

FDR_METHOD = "Benjamini-Hochberg FDR"


def mde_at(kind: str, n: int, noise_rate: float, mde: float, alpha: float) -> float:
    """The MDE of `kind`'s test at a stricter level `alpha` (the per-test level a gate under FDR
    control needs for a single regression), from its MDE `mde` at ALPHA: McNemar's exact power
    calculation again at discordance rate `noise_rate`; for the t and bootstrap intervals the MDE
    scales with z_{1-alpha/2} + z_power (to first order in the relative change)."""
    if kind == "right_wrong":
        return mcnemar_mde(n, noise_rate, alpha)
    return mde * _z(alpha) / _z(ALPHA)


def fdr_adjust(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (`scipy.stats.false_discovery_control`); NaN stays NaN
    and does not count as a test."""
    idx = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    out = [math.nan] * len(p_values)
    if idx:
        adj = stats.false_discovery_control(np.array([p_values[i] for i in idx]), method="bh")
        for i, a in zip(idx, adj):
            out[i] = float(a)
    return out


def fdr_verdicts(comparisons: list[Comparison], q: float) -> list[tuple[float, str]]:
    """(BH-adjusted p, verdict at FDR level q) for each comparison of one family (a nightly run:
    every cell and metric it compared)."""
    adjusted = fdr_adjust([c.p_value for c in comparisons])
    return [(a, verdict_at(c, a, q)) for c, a in zip(comparisons, adjusted)]


# ----------------------------------------------------------------------------- recovery

def recovery(value: float, base: float, higher_is_better: bool) -> float:
    """value / baseline (perplexity: baseline / value): 1.0 = nothing lost. A score of 0 recovers 0
    (a perplexity of 0, a perfect score, recovers inf); a baseline of 0 leaves it undefined (NaN),
    which `recovery_fails` treats as failing."""
    if value is None or base is None or math.isnan(value) or math.isnan(base):
        return math.nan
    if higher_is_better:
        return math.nan if base == 0 else value / base
    if value == 0:
        return math.nan if base == 0 else math.inf
    return base / value


def recovery_undefined(value: float, base: float, higher_is_better: bool) -> bool:
    """True where a baseline exists but recovery can not be computed (baseline 0)."""
    if value is None or base is None or math.isnan(value) or math.isnan(base):
        return False
    return math.isnan(recovery(value, base, higher_is_better))


def recovery_fails(rec: float, limit: float) -> bool:
    """A gate on recovery: an undefined recovery fails, never passes."""
    return math.isnan(rec) or rec < limit


# ----------------------------------------------------------------------------- training noise

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


# ----------------------------------------------------------------------------- plain verdicts (report summary)

def recovery_interval(base: float, delta_lo: float, delta_hi: float, higher_is_better: bool) -> tuple[float, float]:
    """The paired 95% interval of a difference (variant - baseline, in the metric's units, as
    `Comparison.ci_lo/ci_hi`) as an interval of recovery (`recovery`: 1.0 = nothing lost), low end
    first; (NaN, NaN) where the comparison is undefined."""
    if any(x is None or math.isnan(float(x)) for x in (base, delta_lo, delta_hi)):
        return math.nan, math.nan
    ends = sorted(recovery(base + float(d), base, higher_is_better) for d in (delta_lo, delta_hi))
    return ends[0], ends[1]


NO_LOSS, SMALL_LOSS, UNCLEAR_LOSS, LARGE_LOSS, NOT_TESTED = (
    "no loss detectable at this n", "small loss", "loss of unclear size at this n", "large loss", "not tested")


@dataclass(frozen=True)
class LossVerdicts:
    """A format's plain verdict from its tasks' paired recovery intervals (`recovery_interval`).

    Per task, with [lo, hi] the 95% interval of recovery (the inversion of the paired test, so
    hi < 1 exactly when the loss is significant at `ALPHA`): no loss detectable when hi >= 1; small
    loss when hi < 1 and lo >= `large_below` (the whole interval loses less than 1 - large_below);
    large loss when hi < `large_below` (even the interval's best end loses more); otherwise a loss
    whose size this n can not resolve. A format takes its worst task's verdict; tasks whose
    comparison is undefined (too few documents, no stored outputs) are left out."""

    large_below: float = 0.95  # recovery below 95% = large: 5 points of a 100-point score, ppl x1.053

    ORDER = (NOT_TESTED, NO_LOSS, SMALL_LOSS, UNCLEAR_LOSS, LARGE_LOSS)  # worst last

    def of_task(self, lo: float, hi: float) -> str:
        if math.isnan(lo) or math.isnan(hi):
            return NOT_TESTED
        if hi >= 1:
            return NO_LOSS
        if hi < self.large_below:
            return LARGE_LOSS
        return SMALL_LOSS if lo >= self.large_below else UNCLEAR_LOSS

    def of_format(self, intervals: Mapping[str, tuple[float, float]]) -> tuple[str, list[str]]:
        """(the worst task verdict, the tasks that have it) over {task: (lo, hi)}."""
        per = {t: self.of_task(lo, hi) for t, (lo, hi) in intervals.items()}
        worst = max(per.values(), key=self.ORDER.index, default=NOT_TESTED)
        return worst, sorted(t for t, v in per.items() if v == worst and worst not in (NO_LOSS, NOT_TESTED))

    def describe(self) -> str:
        lb = f"{self.large_below:.0%}"
        return (f"'{NO_LOSS}': every task's 95% recovery interval reaches 100%; '{SMALL_LOSS}': a task's interval "
                f"lies below 100% but wholly at or above {lb}; '{LARGE_LOSS}': a task's interval lies wholly below "
                f"{lb}; '{UNCLEAR_LOSS}': below 100% but straddling {lb}. A format takes its worst task's verdict.")


LOSS_VERDICTS = LossVerdicts()
