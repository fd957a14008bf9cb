"""`qeval bench-stats`: does each kind's 95% interval cover the true difference 95% of the time?

Every kind is fed paired per-document values with a known true difference and compared through
`qeval.stats.paired.compare_values`, the function every table and gate uses. Per cell it prints the
coverage (the share of intervals holding the true difference) and the p/interval disagreements
("p < alpha" but the interval holds 0, or the reverse).

- `right_wrong`: n in {20, 60, 300, 1000}; flips none, one-way (right->wrong only) and two-way.
  Coverage is *exact*, not simulated: every (right->wrong, wrong->right) count pair with
  probability above 1e-12 under the trinomial is compared once and weighted by its probability, so
  a cell's number has no Monte Carlo error. The old interval (Clopper-Pearson on the discordant
  split, conditional on their number; replaced in issue 21) is recomputed beside it as row 'old'.
- `loglikelihood_ratio`: per-document log-likelihood changes with a skewed heavy tail (a centred
  lognormal(0, 1): now and then a document gets much worse), equal counts; seeded simulation.
- `mean`: skewed per-document scores (Beta(0.5, 2)) and skewed per-document changes; seeded.
- `corpus`: lm-eval's f1 of a binary task, the true difference taken on a population of 200,000
  documents the samples are drawn from; seeded, fewer repetitions (each comparison resamples the
  corpus 1,000 times through sklearn).

Targets: coverage >= 0.94 for right/wrong at n >= 20, >= 0.92 for the others. A kind that misses
its target below some n declares it (`Kind.approximate_below`); the report then marks its intervals
"approximate at this n", and this table marks those cells "(declared)".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from qeval.core.files import atomic_write
from qeval.stats.paired import ALPHA, KINDS, compare_values

SEED = 20260121
RW_NS = (20, 60, 300, 1000)
# (name, right->wrong rate, wrong->right rate): the true difference is wr - rw
RW_PATTERNS = (("none", 0.0, 0.0), ("one-way 1%", 0.01, 0.0), ("one-way 5%", 0.05, 0.0),
               ("one-way 30%", 0.30, 0.0), ("two-way 5%/5%", 0.05, 0.05), ("two-way 25%/2%", 0.25, 0.02))
OTHER_NS = (20, 60, 300)
TARGET_RW, TARGET_OTHER = 0.94, 0.92


@dataclass(frozen=True)
class Cell:
    kind: str
    setting: str
    n: int
    coverage: float
    disagreements: int
    trials: str  # "exact" or the number of simulated comparisons
    target: float
    declared: bool  # the kind declares its interval approximate at this n
    old: float | None = None  # right_wrong: the replaced interval's coverage on the same cell


def old_interval(rw: int, wr: int, n: int, alpha: float = ALPHA) -> tuple[float, float, float]:
    """The interval issue 21 replaced, as a reference: exact McNemar p; Clopper-Pearson on the
    wrong->right share of the d = rw + wr discordant pairs, mapped to (2 share - 1) d / n (d held
    fixed: [0, 0] when no document flips)."""
    d = rw + wr
    if d == 0:
        return 1.0, 0.0, 0.0
    p = float(stats.binomtest(wr, d, 0.5).pvalue)
    lo = 0.0 if wr == 0 else float(stats.beta.ppf(alpha / 2, wr, d - wr + 1))
    hi = 1.0 if wr == d else float(stats.beta.ppf(1 - alpha / 2, wr + 1, d - wr))
    return p, (2 * lo - 1) * d / n, (2 * hi - 1) * d / n


def _pairs(rw: int, wr: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 per-document outputs with these flips (the concordant documents half right, half wrong)."""
    same = n - rw - wr
    ref = np.r_[np.ones(rw), np.zeros(wr), np.ones(same // 2), np.zeros(same - same // 2)]
    var = np.r_[np.zeros(rw), np.ones(wr), np.ones(same // 2), np.zeros(same - same // 2)]
    return ref, var


def _trinomial(n: int, p_rw: float, p_wr: float, floor: float = 1e-12):
    """(rw, wr, probability) of every count pair above `floor`."""
    out = []
    for rw in range(n + 1):
        p_b = stats.binom.pmf(rw, n, p_rw)
        if p_b < floor:
            continue
        rest = n - rw
        q = p_wr / (1 - p_rw) if p_rw < 1 else 0.0
        wrs = np.arange(rest + 1)
        pw = stats.binom.pmf(wrs, rest, q) * p_b
        for wr in wrs[pw >= floor]:
            out.append((rw, int(wr), float(pw[wr])))
    return out


def right_wrong_cells(ns=RW_NS, patterns=RW_PATTERNS, alpha: float = ALPHA) -> list[Cell]:
    kind = KINDS.get("right_wrong")
    cells = []
    for name, p_rw, p_wr in patterns:
        truth = p_wr - p_rw
        for n in ns:
            cov = cov_old = 0.0
            bad = bad_old = 0
            for rw, wr, prob in _trinomial(n, p_rw, p_wr):
                c = compare_values(*_pairs(rw, wr, n), "acc", True, alpha=alpha, kind="right_wrong")
                cov += prob * (c.ci_lo <= truth <= c.ci_hi)
                bad += (c.p_value < alpha) != (c.ci_lo > 0 or c.ci_hi < 0)
                p, lo, hi = old_interval(rw, wr, n, alpha)
                cov_old += prob * (lo <= truth <= hi)
                bad_old += (p < alpha) != (lo > 0 or hi < 0)
            cells.append(Cell("right_wrong", name, n, cov, bad, "exact", TARGET_RW, kind.approximate_at(n), cov_old))
    return cells


def _simulate(kind: str, setting: str, n: int, reps: int, draw, truth: float, rng, alpha: float,
              **kw) -> Cell:
    hits = bad = 0
    for _ in range(reps):
        ref, var = draw(n, rng)
        c = compare_values(ref, var, kw.get("metric", "m"), True, alpha=alpha, kind=kind,
                           aggregation=kw.get("aggregation"))
        lo, hi = c.ci_lo, c.ci_hi
        if kind == "loglikelihood_ratio":  # its interval is in the metric's units: compare relative changes
            lo, hi = c.effect_lo, c.effect_hi
        hits += lo <= truth <= hi
        bad += (c.p_value < alpha) != (c.ci_lo > 0 or c.ci_hi < 0)
    return Cell(kind, setting, n, hits / reps, bad, str(reps), TARGET_OTHER, KINDS.get(kind).approximate_at(n))


LL_SHIFT, LL_COUNT = 0.02, 50.0  # mean log-likelihood loss per document (nats), tokens per document


def _ll_draw(n, rng):
    """Per-document (log-likelihood, count); the variant loses LL_SHIFT on average with a skewed heavy tail."""
    ref_ll = -LL_COUNT * rng.uniform(2.5, 3.5, n)
    change = LL_SHIFT + 0.05 * (rng.lognormal(0.0, 1.0, n) - math.exp(0.5))
    return [[x, LL_COUNT] for x in ref_ll], [[x - c, LL_COUNT] for x, c in zip(ref_ll, change)]


MEAN_SHIFT = -0.02


def _mean_draw(n, rng):
    """Skewed scores (Beta(0.5, 2)) and skewed changes with mean MEAN_SHIFT."""
    ref = rng.beta(0.5, 2.0, n)
    return ref, ref + MEAN_SHIFT + 0.1 * (rng.exponential(1.0, n) - 1.0)


def _f1_population(rng, size=200_000):
    gold = rng.random(size) < 0.4
    ref = np.where(rng.random(size) < 0.85, gold, ~gold)  # 85% right
    var = np.where(rng.random(size) < 0.10, ~ref, ref)  # 10% of predictions flip
    return gold.astype(int), ref.astype(int), var.astype(int)


def _f1(gold, pred) -> float:
    tp = int(((gold == 1) & (pred == 1)).sum())
    return 2 * tp / (int((gold == 1).sum()) + int((pred == 1).sum()))


def other_cells(reps: int = 1000, boot_reps: int = 200, corpus_reps: int = 60, ns=OTHER_NS,
                alpha: float = ALPHA, corpus: bool = True, seed: int = SEED) -> list[Cell]:
    rng = np.random.default_rng(seed)
    cells = []
    for n in (10,) + tuple(ns):
        cells.append(_simulate("loglikelihood_ratio", "skewed heavy-tailed changes", n, reps, _ll_draw,
                               math.expm1(LL_SHIFT / LL_COUNT), rng, alpha, metric="word_perplexity",
                               aggregation="weighted_perplexity"))
    for n in ns:
        cells.append(_simulate("mean", "skewed scores and changes", n, boot_reps, _mean_draw, MEAN_SHIFT, rng, alpha))
    if corpus:
        gold, ref, var = _f1_population(rng)
        truth = _f1(gold, var) - _f1(gold, ref)

        def draw(n, r):
            i = r.integers(0, len(gold), n)
            return [[int(g), int(p)] for g, p in zip(gold[i], ref[i])], [[int(g), int(p)] for g, p in zip(gold[i], var[i])]

        for n in ns[:-1] if len(ns) > 2 else ns:
            cells.append(_simulate("corpus", "f1, 10% of predictions flip", n, corpus_reps, draw, truth, rng, alpha,
                                   metric="f1", aggregation="f1"))
    return cells


def table(cells: list[Cell]) -> str:
    lines = ["| kind | setting | n | coverage | target | p/interval disagreements | trials | old interval |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for c in cells:
        mark = " (declared approximate at this n)" if c.declared else (" (below target)" if c.coverage < c.target
                                                                       else "")
        old = "" if c.old is None else f"{c.old:.3f}"
        lines.append(f"| {c.kind} | {c.setting} | {c.n} | {c.coverage:.3f}{mark} | >= {c.target:.2f} | "
                     f"{c.disagreements} | {c.trials} | {old} |")
    return "\n".join(lines)


def bench_stats(out_dir: Path, reps: int = 1000, boot_reps: int = 200, corpus_reps: int = 60,
                corpus: bool = True) -> tuple[str, list[Cell]]:
    """Run every cell, write `out_dir`/stats.md, return its text and the cells."""
    import warnings

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # sklearn's f1 on a resample with no positive label warns "ill-defined" (and scores 0, which the
        # corpus kind's bootstrap is meant to see): thousands of lines of noise around the table
        warnings.simplefilter("ignore")
        cells = right_wrong_cells() + other_cells(reps, boot_reps, corpus_reps, corpus=corpus)
    text = "\n".join([
        "# Interval coverage per kind (`qeval bench-stats`)", "",
        f"Nominal 95% intervals through `qeval.stats.paired.compare_values`; seed {SEED}. right_wrong rows are "
        "exact (every count pair weighted by its trinomial probability); 'old' is the conditional "
        "Clopper-Pearson interval issue 21 replaced. Other rows are seeded simulations ('trials' "
        "comparisons; a coverage of 0.95 has a simulation error of about "
        f"{math.sqrt(0.95 * 0.05 / reps):.3f} at {reps} trials).", "",
        table(cells), "", f"Computed in {time.perf_counter() - t0:.0f} s.", ""])
    out_dir = Path(out_dir)
    atomic_write(out_dir / "stats.md", text)
    return text, cells
