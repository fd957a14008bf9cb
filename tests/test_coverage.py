"""Coverage of the paired intervals, by simulation with a known true difference (issue 21).

Two checks: `qeval bench-stats`'s own cells on a small grid (qeval.bench.coverage), and an
independent simulation written here without that module: 0/1 outputs drawn per document, passed to
`compare_values`, coverage >= 0.93 on every cell and no p/interval disagreement.
"""
import math

import numpy as np
import pytest

from qeval.bench.coverage import TARGET_OTHER, TARGET_RW, old_interval, other_cells, right_wrong_cells
from qeval.stats.paired import KINDS, compare_values

pytestmark = pytest.mark.unit


def test_right_wrong_exact_coverage_small_grid():
    """Exact (enumerated) coverage of Tango's interval at n = 20 and 60, one-way and two-way flips:
    every cell at the target unless the kind declares the n approximate; the old conditional interval
    misses one-way flips badly (the defect issue 21 reports)."""
    patterns = (("one-way 5%", 0.05, 0.0), ("one-way 30%", 0.30, 0.0), ("two-way 25%/2%", 0.25, 0.02))
    cells = right_wrong_cells(ns=(20, 60), patterns=patterns)
    for c in cells:
        assert c.disagreements == 0, c
        assert c.declared or c.coverage >= TARGET_RW, c
    assert min(c.old for c in cells) < 0.7  # the reference row reproduces the defect


def test_old_interval_is_zero_width_without_flips():
    assert old_interval(0, 0, 228)[1:] == (0.0, 0.0)
    c = compare_values(np.ones(228), np.ones(228), "acc", True, kind="right_wrong")
    assert c.ci_hi - c.ci_lo > 0


def test_other_kinds_simulated_coverage():
    """t and BCa intervals on skewed, heavy-tailed data: at the target within two simulation errors,
    or declared approximate at that n; p and interval never disagree."""
    cells = other_cells(reps=400, boot_reps=60, ns=(20, 60), corpus=False)
    for c in cells:
        reps = int(c.trials)
        assert c.disagreements == 0, c
        assert c.declared or c.coverage >= TARGET_OTHER - 2 * math.sqrt(0.05 * 0.95 / reps), c


# ----------------------------------------------------------------------------- independent check

def _simulate(n, p_rw, p_wr, reps, rng):
    """Coverage and p/interval disagreements of compare_values on 0/1 outputs with per-document
    flip probabilities p_rw (right->wrong) and p_wr (wrong->right); reference accuracy 0.6."""
    truth = p_wr - p_rw  # E[var - ref] per document: the draw below
    covered = disagree = 0
    for _ in range(reps):
        u = rng.random(n)
        # per document: right->wrong with p_rw, wrong->right with p_wr, else concordant (right or wrong)
        rw = u < p_rw
        wr = (u >= p_rw) & (u < p_rw + p_wr)
        right_both = ~rw & ~wr & (rng.random(n) < 0.6)
        ref = (rw | right_both).astype(float)
        var = (wr | right_both).astype(float)
        c = compare_values(list(ref), list(var), "acc", True)
        covered += c.ci_lo <= truth <= c.ci_hi
        disagree += (c.p_value < 0.05) != (c.ci_lo > 0 or c.ci_hi < 0)
    return covered / reps, disagree


@pytest.mark.parametrize("n", [25, 80, 250])
@pytest.mark.parametrize("p_rw,p_wr", [(0.0, 0.0), (0.02, 0.0), (0.2, 0.0), (0.03, 0.03), (0.15, 0.04)])
def test_independent_simulation_through_compare_values(n, p_rw, p_wr):
    rng = np.random.default_rng(hash((n, p_rw, p_wr)) % 2**32)
    coverage, disagree = _simulate(n, p_rw, p_wr, 1000, rng)
    assert disagree == 0
    assert coverage >= 0.93, coverage
