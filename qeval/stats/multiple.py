"""Multiple testing: Benjamini-Hochberg over one family of paired comparisons (a nightly run: every
cell and metric it compared), and the verdicts at the FDR level."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from qeval.stats.comparison import Comparison, verdict_at

FDR_METHOD = "Benjamini-Hochberg FDR"


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

