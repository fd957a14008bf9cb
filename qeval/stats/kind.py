"""What a statistics kind declares, and the one registry of kinds (`KINDS`).

A kind is how one lm-eval aggregation compares (qeval.stats.paired picks it from the aggregation and
the per-document values). Everything that differs between kinds is asked of the kind, never decided
by its name elsewhere: its test and interval (`compare`), its minimum detectable effect (`mde`,
`mde_at`, `closest_noise`), its units (`unit`) and how `qeval bench-gates` simulates a night for it
(`simulates`, `night_rate`, `night_noise`, `plant`, `plant_regression`).

Each kind lives in its own module under qeval.stats.kinds and registers an instance there
(`KINDS.add(kind.name, kind)`); lm-eval aggregation names map to it through its `aggregations`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from qeval.core.registry import Registry
from qeval.stats.comparison import ALPHA, POWER, Comparison, z_power


class Kind:
    """The base of every kind: the defaults shared by the normal-approximation tests. Instances are
    stateless singletons (`__slots__ = ()`: nothing to set after registration)."""

    __slots__ = ()

    name: str = ""
    test: str = ""  # the test in words, as the tables print it
    unit: str = "absolute"  # "absolute": the metric's own units (an accuracy point is 0.01); "relative": a ratio - 1
    default_min_effect: float = 0.01  # the smallest change worth a verdict, in `unit`
    aggregations: tuple[str, ...] = ()  # lm-eval aggregation names this kind compares
    plant: str = ""  # the regression bench-gates plants: "drop" (right answers lost), "rise" (relative), "" none
    # Below this many documents the interval's coverage is not held to the target `qeval bench-stats`
    # measures (0.94 right/wrong, 0.92 otherwise): the report marks such an interval "approximate at
    # this n". 0: it holds at every n the kind compares at.
    approximate_below: int = 0

    def compare(self, ref, var, *, metric: str, higher_is_better: bool, min_effect: float, alpha: float,
                noise_rate: float | None, aggregation: str | None = None) -> Comparison:
        """Aligned per-document values (ref[i], var[i] one document) -> the paired comparison."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- minimum detectable effect

    def mde(self, n: int, spread: float, alpha: float = ALPHA) -> float:
        """The smallest true change detected with probability POWER at level `alpha` and `n`
        documents: (z_{1-alpha/2} + z_power) standard errors of a mean of `n` per-document
        differences with standard deviation `spread`."""
        return z_power(alpha) * spread / math.sqrt(n)

    def mde_at(self, n: int, noise_rate: float, mde: float, alpha: float, power: float = POWER) -> float:
        """The MDE at a stricter level `alpha` (a gate under FDR control) and `power` from the MDE
        `mde` at ALPHA and POWER: for the t and bootstrap intervals it scales with z_{1-alpha/2} +
        z_power (to first order in a relative change)."""
        return mde * z_power(alpha, power) / z_power(ALPHA)

    def approximate_at(self, n: int) -> bool:
        """Whether an interval on `n` documents is "approximate at this n" (`approximate_below`)."""
        return 0 < n < self.approximate_below

    def closest_noise(self, n: int, flip_rates: Sequence[float], mdes: Sequence[float]) -> tuple[float, float]:
        """(noise rate, MDE) of a task at `n`, measured on the variant closest to the baseline,
        from every variant's flip rate and MDE: here the smallest MDE (the smallest per-document
        spread); no flip rate (NaN)."""
        return math.nan, min((float(m) for m in mdes if not math.isnan(m)), default=math.nan)

    @property
    def relative(self) -> bool:
        """Whether effects print as a percent change (else in points of the metric)."""
        return self.unit == "relative"

    # ------------------------------------------------------------------------- simulated nights (bench-gates)

    def simulates(self, values: list) -> bool:
        """Whether bench-gates simulates nights for per-document `values` of this kind."""
        return False

    def night_rate(self, flip_rate: float) -> float | None:
        """The noise rate a simulated night draws at, from the task's MDE row (its flip rate);
        None: this kind's night noise needs no measured rate."""
        return None

    def night_noise(self, values: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
        """A no-change night: `values` with the noise of a numerically different but equivalent run."""
        raise NotImplementedError(f"no simulated nights for kind {self.name!r}")

    def plant_regression(self, noisy: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
        """A night with a planted regression of `size` (see `plant`) on top of `noisy`."""
        raise NotImplementedError(f"no planted regression for kind {self.name!r}")


KINDS: Registry[Kind] = Registry("comparison kind")
