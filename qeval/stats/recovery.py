"""Recovery (variant / baseline, oriented so that 1.0 = nothing lost), its gate, its paired interval
and the plain loss verdicts the report summary prints from those intervals."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

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
