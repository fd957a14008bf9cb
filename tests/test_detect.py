"""The nightly MDE (qeval.stats.detect), the one computation the nightly's step summary and the
report's significance section share: against the closed form of the mean kind's MDE carried from
alpha 0.05 to the per-test level fdr / tests."""
import math
from collections import namedtuple
from statistics import NormalDist

import pytest

from qeval.stats.detect import nightly_level, nightly_mde

pytestmark = pytest.mark.unit

Row = namedtuple("Row", "kind n flip_rate mde")


def _z(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(0.8)


@pytest.mark.parametrize("rate", [math.nan, None])
def test_nightly_mde_of_a_mean_task_is_its_mde_at_fdr_over_tests(rate):
    mde = 0.03  # at alpha 0.05, power 0.8: z-sum * sd / sqrt(n)
    got = nightly_mde(Row("mean", 60, rate, mde), fdr=0.05, tests=25)
    assert got == pytest.approx(mde * _z(0.05 / 25) / _z(0.05), rel=1e-9)
    assert got > mde  # a stricter level needs a larger change


def test_nightly_level_is_fdr_over_tests_and_never_divides_by_zero():
    assert nightly_level(0.05, 25) == pytest.approx(0.002)
    assert nightly_level(0.1, 0) == 0.1
