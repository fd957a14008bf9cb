"""Non-inferiority margins: is a variant's loss within a margin the user names, and how many
documents does a suite need to tell?

"Is there a difference?" is rarely the question; "is NF4 within one point on MMLU?" is. A margin m
(in the effect's units: absolute for accuracies and means, relative for perplexity-like kinds) turns
the paired 95% interval of the effect (`Comparison.effect_lo/effect_hi`, oriented so that positive
is better) into one of three statements:

- "loss within the margin shown": the whole interval lies above -m;
- "loss beyond the margin shown": the whole interval lies below -m;
- "cannot tell at this n": the interval straddles -m (it contains -m, or touches it).

The interval is whatever the kind's test gives (`qeval.stats.paired`): this module reads only the
`Comparison`, so it follows any change of a kind's interval.

Margins come from a plan's `thresholds.margin` (task, metric or kind -> number; the task's entry
wins, then the metric's, then the kind's, as `compare_values` resolves `min_effect`) or default to
one point of the kind's scale for absolute kinds (its default minimum effect: 0.01 on a 0..1
accuracy, 1 on sacrebleu's 0..100) and 1% for relative ones.

Sample sizes (`documents_for_margin`): the documents a paired test needs to tell a loss of exactly
m apart from none with probability `POWER` at level `ALPHA` -- for right/wrong metrics the exact
power of the paired score test (the verdict's test: Tango) under the discordant-pairs model at a
flip rate psi (`paired_power`: symmetric noise flips at psi plus m n right->wrong flips); for the others the normal approximation
n = ((z_{1-alpha/2} + z_power) sd / m)^2 with sd the per-document spread in the effect's units
(refined with t quantiles at that n). `tests/test_margin.py` checks both by simulation.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Mapping

from scipy import stats

from qeval.core.errors import QevalError
from qeval.stats.comparison import ALPHA, MIN_N_BOOTSTRAP, MIN_N_T, POWER, Comparison
from qeval.stats.paired import KINDS, paired_power

WITHIN, BEYOND, CANNOT_TELL, NOT_TESTED = ("loss within the margin shown", "loss beyond the margin shown",
                                          "cannot tell at this n", "not tested")
ORDER = (WITHIN, BEYOND, CANNOT_TELL, NOT_TESTED)  # the order a summary counts them in
RELATIVE_DEFAULT = 0.01  # 1% of a perplexity-like aggregate
MAX_DOCUMENTS = 10_000_000  # beyond this the answer is "not with any suite"

_MARGIN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(pts?|points?|%)\s*$", re.IGNORECASE)


# ----------------------------------------------------------------------------- margins

def parse_margin(text: str, what: str = "--margin") -> tuple[float, bool]:
    """"1pt" -> (0.01, False): absolute, in accuracy points (0.01 each); "1%" -> (0.01, True):
    relative. Anything else (a bare number, a negative or zero margin) is one line of error."""
    m = _MARGIN.match(str(text))
    value = float(m.group(1)) if m else math.nan
    if not m or not value > 0:
        raise QevalError(what, text, "a positive margin in accuracy points or percent, e.g. 1pt, 0.5pt or 1%",
                         "points for right/wrong and mean metrics, percent for perplexity-like ones")
    return value / 100, m.group(2) == "%"


def point_of(kind: str) -> float:
    """One point of an absolute kind's scale: its default minimum effect (0.01 on a 0..1 score, 1
    on sacrebleu's 0..100)."""
    return KINDS.get(kind).default_min_effect


def default_margin(kind: str) -> float:
    """1 point for absolute kinds, 1% for relative ones."""
    return RELATIVE_DEFAULT if KINDS.get(kind).relative else point_of(kind)


def resolve_margin(margins: Mapping[str, float] | None, task: str, metric: str, kind: str) -> float:
    """The margin of `metric` on `task` from a plan's `thresholds.margin`: the task's entry (a group
    member `group/sub` also finds its group's), then the metric's (by its name before a filter:
    `exact_match,strict-match` finds `exact_match`), then the kind's, else `default_margin`."""
    margins = margins or {}
    for key in (task, task.split("/")[0], metric, metric.split(",")[0], kind):
        if key in margins:
            return float(margins[key])
    return default_margin(kind)


def margin_verdict(effect_lo: float, effect_hi: float, margin: float) -> str:
    """The statement the interval [effect_lo, effect_hi] (positive = better) supports about a loss
    of `margin`; NaN bounds (an undefined comparison) are "not tested"."""
    if any(x is None or math.isnan(float(x)) for x in (effect_lo, effect_hi, margin)):
        return NOT_TESTED
    if effect_lo > -margin:
        return WITHIN
    if effect_hi < -margin:
        return BEYOND
    return CANNOT_TELL


def margin_columns(c: Comparison, task: str, margins: Mapping[str, float] | None) -> dict:
    """The columns a paired frame adds for the margin: the effect's interval, the margin (in the
    effect's units), the margin as the report prints it ("1 point", "1%") and the verdict of this
    comparison's interval against it."""
    m = resolve_margin(margins, task, c.metric, c.kind)
    relative = KINDS.get(c.kind).relative
    return {"effect_lo": c.effect_lo, "effect_hi": c.effect_hi, "margin": m,
            "margin_label": margin_text(m, relative, point_of(c.kind)),
            "margin_verdict": margin_verdict(c.effect_lo, c.effect_hi, m)}


def margin_text(margin: float, relative: bool, point: float = 0.01) -> str:
    """"1 point", "0.5 points", "1%"."""
    if relative:
        return f"{margin * 100:g}%"
    pts = margin / point
    return f"{pts:g} point" + ("" if pts == 1 else "s")


def short_verdict(verdict: str, margin: str) -> str:
    """A verdict with its margin printed: "loss within 1 point shown"."""
    if verdict in (WITHIN, BEYOND):
        return verdict.replace("the margin", margin)
    return verdict


def margin_sentence(per_task: Mapping[str, tuple[str, str]]) -> str:
    """One format's verdict over its tasks {task: (verdict, margin text)}: "loss within 1 point
    shown on 4 of 6 tasks; cannot tell on 2 (a, b)". With one margin for every task it is printed
    once; otherwise each clause names its tasks by margin ("1 point on a, b; 1% on c"). Tasks
    with a loss beyond the margin or an undecided one are always named."""
    tested = {t: v for t, v in per_task.items() if v[0] != NOT_TESTED}
    if not tested:
        return NOT_TESTED
    margins = {m for _, m in tested.values()}
    one = next(iter(margins)) if len(margins) == 1 else None
    clauses = []
    for verdict in ORDER:
        tasks = sorted(t for t, (v, _) in per_task.items() if v == verdict)
        if not tasks:
            continue
        count = f"{len(tasks)} of {len(tested)} task{'' if len(tested) == 1 else 's'}" if not clauses \
            else str(len(tasks))
        if one or verdict == NOT_TESTED:
            names = ", ".join(tasks)
        else:
            by: dict[str, list[str]] = {}
            for t in tasks:
                by.setdefault(per_task[t][1], []).append(t)
            names = "; ".join(f"{m} on {', '.join(ts)}" for m, ts in by.items())
        if verdict == WITHIN:
            text = f"loss within {one or 'the margin'} shown on {count}" + ("" if one else f" ({names})")
        elif verdict == BEYOND:
            text = f"loss beyond {one or 'the margin'} shown on {count} ({names})"
        elif verdict == CANNOT_TELL:
            text = f"cannot tell on {count} ({names})"
        else:
            text = f"not tested on {len(tasks)} ({names})"
        clauses.append(text)
    return "; ".join(clauses)


# ----------------------------------------------------------------------------- sample sizes

def _smallest_n(power_at, guess: float, rel: float = 0.002) -> int | None:
    """An n with power_at(n) >= POWER where n (1 - rel) has less, searched from `guess` (a
    normal-approximation answer, usually within a percent): a bracket around it, widened until it
    holds the answer, then narrowed by interpolating the power curve and probing the interpolated
    n's neighbour `rel` away on the other side (so the bracket usually closes in two rounds). None
    above MAX_DOCUMENTS. The exact power of a discrete test is not monotone in n (a sawtooth a few
    documents wide) and one evaluation at 10^4 documents costs ~0.2 s, so the answer is good to
    `rel` (0.2%), not to the document."""
    lo, hi = max(1, int(guess * 0.98)), max(2, int(guess * 1.03) + 1)
    p_lo, p_hi = power_at(lo), power_at(hi)
    if guess > MAX_DOCUMENTS:
        return None
    while p_hi < POWER:
        if hi >= MAX_DOCUMENTS:
            return None
        lo, p_lo, hi = hi, p_hi, min(MAX_DOCUMENTS, int(hi * 1.25) + 1)
        p_hi = power_at(hi)
    while lo > 1 and p_lo >= POWER:
        hi, p_hi, lo = lo, p_lo, max(1, lo // 2)
        p_lo = power_at(lo)
    while hi - lo > max(1, rel * hi):
        width = max(1, int(rel * hi))
        mid = int(round(lo + (POWER - p_lo) / (p_hi - p_lo) * (hi - lo))) if p_hi > p_lo else (lo + hi) // 2
        mid = min(max(mid, lo + 1), hi - 1)
        p = power_at(mid)
        if p >= POWER:
            hi, p_hi = mid, p
            mid = max(lo + 1, hi - width)
        else:
            lo, p_lo = mid, p
            mid = min(hi - 1, lo + width)
        if lo < mid < hi:
            p = power_at(mid)
            if p >= POWER:
                hi, p_hi = mid, p
            else:
                lo, p_lo = mid, p
    return hi


@functools.lru_cache(maxsize=1024)
def _documents_right_wrong(margin: float, psi: float, alpha: float) -> int | None:
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(POWER)
    guess = ((za * math.sqrt(psi + margin) + zb * math.sqrt(max(psi + margin - margin ** 2, 1e-12))) / margin) ** 2
    return _smallest_n(lambda n: paired_power(n, psi, margin, alpha), guess)


def documents_right_wrong(margin: float, flip_rate: float, alpha: float = ALPHA) -> int | None:
    """Documents for the paired score test (the verdict's test) to tell a loss of `margin` (absolute) apart from none with
    probability POWER at level `alpha`, noise flips at `flip_rate` (`paired_power`); None: more
    than MAX_DOCUMENTS. The search starts at the normal approximation of the same model
    (discordance psi under no loss, psi + m under the loss)."""
    # the rate rounded to 4 decimals, as the MDE's: nearby rates share one (cached) search
    return _documents_right_wrong(float(margin), round(max(0.0, float(flip_rate)), 4), float(alpha))


def power_normal(n: int, margin: float, sd: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test against a true change of `margin` with per-document
    spread `sd` (normal approximation of the noncentral t: t_{n-1} quantiles)."""
    if n < 2:
        return 0.0
    shift = margin * math.sqrt(n) / sd
    t = stats.t.ppf(1 - alpha / 2, n - 1)
    return float(stats.t.sf(t - shift, n - 1))


def documents_spread(margin: float, sd: float, alpha: float = ALPHA) -> int | None:
    """Documents for a paired test on per-document changes with spread `sd` (the effect's units) to
    tell a change of `margin` apart from none with probability POWER at level `alpha`."""
    if sd <= 0:
        return 2
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(POWER)
    return _smallest_n(lambda n: power_normal(n, margin, sd, alpha), (z * sd / margin) ** 2, rel=0.0)


def spread_of(c_mde: float, n: int, alpha: float = ALPHA) -> float:
    """The per-document spread (effect units) behind a normal-approximation MDE at n:
    mde = (z_{1-alpha/2} + z_power) sd / sqrt(n) (`Kind.mde`)."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(POWER)
    return float(c_mde) * math.sqrt(n) / z


def documents_for_margin(margin: float, flip_rate: float, mde: float, n: int, alpha: float = ALPHA) -> int | None:
    """Documents a task needs for its margin, from what a comparison measured at `n` documents: a
    test that counts flips (a `flip_rate`, not NaN) by the discordant-pairs model at that rate; any
    other from the spread behind its normal-approximation `mde` (`spread_of`). None: not computable
    (nothing measured) or more than MAX_DOCUMENTS."""
    if math.isnan(margin) or margin <= 0:
        return None
    if not math.isnan(flip_rate):
        return documents_right_wrong(margin, flip_rate, alpha)
    if math.isnan(mde) or math.isinf(mde) or not n:
        return None
    return documents_spread(margin, spread_of(mde, n, alpha), alpha)


# The fewest documents each kind's test gives an interval on (the kinds refuse fewer: qeval.stats.kinds;
# tests/test_margin.py checks this table against them). A sample size below it is no plan at all.
MIN_DOCUMENTS = {"loglikelihood_ratio": MIN_N_T, "mean": MIN_N_BOOTSTRAP, "corpus": MIN_N_BOOTSTRAP,
                 "corpus_points": MIN_N_BOOTSTRAP}
FLOOR_TESTS = {MIN_N_T: "the paired t", MIN_N_BOOTSTRAP: "the bootstrap"}


def min_documents(kind: str) -> int:
    """The fewest documents `kind`'s test compares (1 for a kind with no minimum: McNemar's)."""
    return MIN_DOCUMENTS.get(kind, 1)


def task_documents(pairs) -> list[dict]:
    """Per task and metric of a paired frame (`qeval.stats.compare.paired_frame`, with the margin
    columns): its margin and the documents it needs (`documents_for_margin`) at the median
    variant's noise -- the flip rate, or the spread behind the MDE -- and at the lowest and the
    highest (`n_min`, `n_max`: more noise needs more documents). The median, because a suite is
    planned for the formats it compares, not for the closest or the farthest one. Each is at least the
    kind's minimum n (`min_documents`: the test gives no interval on fewer); `n_floor` and `floor_note`
    say when that floor, not the power, set a number."""
    out = []
    if pairs is None or len(pairs) == 0 or "margin" not in pairs.columns:
        return out
    for (task, metric), g in pairs.groupby(["task", "metric"], sort=True):
        margin, n = float(g["margin"].iloc[0]), int(g["pairs"].max())
        rates = sorted(float(r) for r in g["flip_rate"] if r is not None and r == r)
        if rates:  # a test that counts flips: the discordant-pairs model at that rate
            noise = [(r, math.nan, n) for r in (rates[0], rates[(len(rates) - 1) // 2], rates[-1])]
        else:  # the spread behind each variant's MDE, at its own n
            spread = sorted((float(m), int(k)) for m, k in zip(g["mde"], g["pairs"])
                            if m == m and not math.isinf(m) and k)
            noise = [(math.nan, m, k) for m, k in (spread[0], spread[(len(spread) - 1) // 2], spread[-1])] \
                if spread else []
        found = [documents_for_margin(margin, r, m, k) for r, m, k in noise] or [None] * 3
        floor = min_documents(str(g["kind"].iloc[0]))  # the test's own minimum, whatever the power says
        lo, mid, hi = [None if x is None else max(x, floor) for x in found]
        floored = any(x is not None and x < floor for x in found)
        out.append({"task": task, "metric": metric, "margin": margin, "margin_label": str(g["margin_label"].iloc[0]),
                    "n": n,
                    "flip_rate": noise[1][0] if noise else math.nan, "n_needed": mid, "n_min": lo, "n_max": hi,
                    "n_floor": floor if floored else None,
                    "floor_note": f"floored at {FLOOR_TESTS.get(floor, 'its test')}'s minimum of {floor}" if floored else ""})
    return out
