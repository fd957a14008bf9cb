"""The value a paired comparison returns, its verdict, and the constants every kind shares.

Kept apart from the kinds (qeval.stats.kinds) and the dispatch (qeval.stats.paired) so that a kind
module can build a `Comparison` without importing the module that imports it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05
POWER = 0.8
MIN_N_T = 10  # the t interval on fewer documents leans too hard on normality
MIN_N_BOOTSTRAP = 20  # BCa needs enough documents for its acceleration estimate to mean anything

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
    mcnemar_p: float | None = None  # right/wrong only: McNemar's exact p, an extra column (never the verdict)

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
        """The columns every frame shows for a comparison. `mcnemar_p`: McNemar's exact p of a
        comparison that counted flips (right/wrong; NaN otherwise and without documents)."""
        return {"test": self.test, "pairs": self.n, "delta_lo": self.ci_lo, "delta_hi": self.ci_hi,
                "effect": self.effect, "p_value": self.p_value, "min_effect": self.min_effect, "mde": self.mde,
                "significant": self.significant, "meaningful": self.meaningful, "verdict": self.verdict,
                "flips": self.flips, "flips_right_to_wrong": self.right_to_wrong,
                "flips_wrong_to_right": self.wrong_to_right, "flip_rate": self.flip_rate,
                "mcnemar_p": math.nan if self.mcnemar_p is None else self.mcnemar_p}


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


def undefined(metric, kind, test, n, ref_value, value, min_effect, alpha, reason, **kw) -> Comparison:
    """A comparison that can not be decided (too few documents, nothing recorded): NaN p and interval."""
    nan = math.nan
    return Comparison(metric, kind, test, n, ref_value, value, value - ref_value if n else nan, nan, nan, nan, nan,
                      nan, nan, min_effect, nan, alpha, reason=reason, **kw)


@functools.lru_cache(maxsize=64)
def z_power(alpha: float, power: float = POWER) -> float:
    """z_{1-alpha/2} + z_power: the normal-approximation MDE is this many standard errors."""
    return float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
