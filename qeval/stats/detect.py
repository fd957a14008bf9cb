"""What the nightly can detect: the minimum detectable effect of one task's test when a single real
regression must pass the nightly's Benjamini-Hochberg control over all of a run's comparisons
(p < q / tests). One computation for the nightly's step summary (qeval.gates.summary_md) and the
report's significance section, so the two never disagree."""
from __future__ import annotations

import math
from typing import Any

from qeval.stats.paired import mde_at


def nightly_level(fdr: float, tests: int) -> float:
    """The per-test level a single regression among `tests` comparisons must reach under
    Benjamini-Hochberg at `fdr`: the smallest p it can be admitted with is fdr / tests."""
    return fdr / max(tests, 1)


def nightly_mde(row: Any, fdr: float, tests: int) -> float:
    """The nightly MDE of one `qeval.stats.compare.task_mde` row (fields kind, n, flip_rate, mde):
    its MDE at alpha 0.05 carried to the nightly's level. A missing flip rate (a kind without one)
    is passed as 0."""
    rate = row.flip_rate
    rate = 0.0 if rate is None or (isinstance(rate, float) and math.isnan(rate)) else round(float(rate), 6)
    return mde_at(str(row.kind), int(row.n), rate, float(row.mde), nightly_level(fdr, tests))
