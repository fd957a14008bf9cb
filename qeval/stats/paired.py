"""The one paired comparison: a variant against a reference on the same documents.

Every verdict qeval prints goes through `compare_pair`: the `*` in the accuracy table, the flips and
p-value of divergence.csv, "lost"/"regained" in the adapter table, the nightly gate. A comparison
never decides significance anywhere else, so two tables can not disagree on the same pair.

Which test applies depends on how a metric aggregates its per-document values, not on its name:

| kind                 | per-document value        | test                                              |
|----------------------|---------------------------|---------------------------------------------------|
| `right_wrong`        | 0/1 (acc, exact_match)    | Tango's score test for the paired difference of   |
|                      |                           | accuracies (McNemar's exact p: an extra column)   |
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
excludes 0" and "p < 0.05" are the same statement. Each kind's module under qeval.stats.kinds
says how (its test, interval, MDE, units and the noise `qeval bench-gates` simulates for it).

Practical significance: every kind has a default minimum meaningful effect (`DEFAULT_MIN_EFFECT`,
absolute for means, relative for log-likelihood ratios). A change counts only when it is both
significant and larger than that ("better"/"worse"); significant but smaller is "below min effect".

Minimum detectable effect (`mde`): the smallest true change the test finds with probability
`POWER` at level alpha and this n (`Kind.mde`; `mde_at` at a stricter level).

This module is the entry point: `compare_pair` / `compare_values` dispatch to the kind, and it
re-exports the pieces that live beside it (qeval.stats.comparison: `Comparison` and verdicts;
qeval.stats.kind: `Kind`, `KINDS`; qeval.stats.multiple: FDR; qeval.stats.recovery; qeval.stats.seeds).

Extending: subclass `Kind` in a new module under qeval.stats.kinds, register an instance with
`KINDS.add(kind.name, kind)`, list lm-eval's aggregation names in its `aggregations` and import the
module in qeval/stats/kinds/__init__.py. An aggregation qeval does not know is compared as `corpus`
(its own function, resampled over documents).
"""
from __future__ import annotations

from typing import Mapping

import qeval.stats.kinds  # noqa: F401  (registers every kind in KINDS)
from qeval.stats.comparison import (ALPHA, BETTER, MIN_N_BOOTSTRAP, MIN_N_T, NOISE, POWER, SMALL,  # noqa: F401
                                    UNDEFINED, WORSE, Comparison, verdict_at)
from qeval.stats.kind import KINDS, Kind  # noqa: F401
from qeval.stats.kinds.corpus import CORPUS_RESAMPLES, corpus_aggregate  # noqa: F401
from qeval.stats.kinds.mean import BOOTSTRAP_RESAMPLES  # noqa: F401
from qeval.stats.kinds.right_wrong import paired_mde, paired_power  # noqa: F401
# re-exported for the modules that import them from here (one entry point: qeval.stats.paired)
from qeval.stats.multiple import FDR_METHOD, fdr_adjust, fdr_verdicts  # noqa: F401
from qeval.stats.recovery import (LARGE_LOSS, LOSS_VERDICTS, NO_LOSS, NOT_TESTED, SMALL_LOSS,  # noqa: F401
                                  UNCLEAR_LOSS, LossVerdicts, recovery, recovery_fails, recovery_interval,
                                  recovery_undefined)
from qeval.stats.seeds import SeedSpread, seed_spread, seeds_differ  # noqa: F401

# lm-eval's aggregation function (the name it registers it under: `aggregation:` in a task's
# metric_list, or the metric's default) -> qeval's comparison kind, from each kind's `aggregations`.
# "mean" (and None: an aggregation qeval does not know, e.g. a task's own `!function`) decide
# between right_wrong and mean by the per-document values (0/1 or not). Corpus aggregations compute
# one number from all documents at once, so they are compared by a paired bootstrap over documents
# with that same aggregation.
AGGREGATION: dict[str, str | None] = {"mean": None, "nanmean": None,
                                      **{agg: name for name, k in KINDS.items() for agg in k.aggregations}}
# Records written before the aggregation was stored name only the metric: lm-eval's own defaults
# for the metrics qeval's shipped tasks used (lm_eval.api.registry's metric -> aggregation map).
LEGACY_AGGREGATION = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                      "bits_per_byte": "bits_per_byte", "perplexity": "perplexity"}


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


def mde_at(kind: str, n: int, noise_rate: float, mde: float, alpha: float) -> float:
    """The MDE of `kind`'s test at a stricter level `alpha` (the per-test level a gate under FDR
    control needs for a single regression), from its MDE `mde` at ALPHA (`Kind.mde_at`)."""
    return KINDS.get(kind).mde_at(n, noise_rate, mde, alpha)
