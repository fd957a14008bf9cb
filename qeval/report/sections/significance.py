"""What the suite can tell apart: per task its n, its test, its minimum detectable effect against the
minimum meaningful one, and what the nightly (all its comparisons under one FDR) can still detect."""
from __future__ import annotations

import pandas as pd

from qeval.report.doc import Heading, Para, Section, Table
from qeval.report.fmt import fmt_effect, fmt_int, fmt_pct, missing
from qeval.report.sections.base import ReportData, ReportSection, register

SIGNIFICANCE_HEADING = "What the suite can tell apart"


def significance_section(mde: pd.DataFrame, fdr: float, tests: int) -> Section | None:
    """Per task: n, the test, its minimum detectable effect, the minimum meaningful effect, and what
    the nightly can detect with `tests` comparisons under Benjamini-Hochberg at level `fdr` (a
    single real regression among them must reach p < fdr / tests)."""
    from qeval.stats.paired import KINDS, mde_at

    if mde.empty:
        return None
    strict = fdr / max(tests, 1)
    rows, sentences = [], []
    for r in mde.itertuples(index=False):
        relative = KINDS.get(str(r.kind)).relative
        rate = round(float(r.flip_rate), 6) if not missing(r.flip_rate) else 0.0
        nightly = mde_at(str(r.kind), int(r.n), rate, float(r.mde), strict)
        rows.append([str(r.task), str(r.metric), fmt_int(r.n), str(r.test), fmt_pct(r.flip_rate),
                     fmt_effect(r.mde, relative), fmt_effect(r.min_effect, relative), fmt_effect(nightly, relative)])
        sentences.append(f"{r.task}: a change smaller than {fmt_effect(max(nightly, r.min_effect), relative)} "
                         "can pass the nightly unnoticed")
    return Section([
        Heading(2, SIGNIFICANCE_HEADING),
        Para("MDE = the smallest true change each task's test detects with 80% power at alpha 0.05 and its n, "
             "at the noise of the variant closest to the baseline (the lowest flip rate, or the smallest "
             "per-document spread of log-likelihood changes, any variant shows): the noise of a numerically "
             "different but equivalent computation. "
             f"The nightly compares every cell and metric of a run at once and controls the false discovery rate "
             f"(Benjamini-Hochberg, q = {fdr:g}); with {tests} comparisons a single real regression must reach "
             f"p < q/{tests} = {strict:.2g}, so it detects only the larger 'nightly MDE'. A change must also "
             "exceed the minimum meaningful effect to count. " + "; ".join(sentences) + "."),
        Table(["task", "metric", "n", "test", "noise flip rate", "MDE (alpha 0.05)", "min effect",
               f"nightly MDE (FDR {fdr:g}, {tests} tests)"], rows,
              [False, False, True, False, True, True, True, True])])



def _frame(d: ReportData) -> tuple | None:
    if d.pairs.empty or d.fdr is None:
        return None
    from qeval.stats.compare import task_mde

    return task_mde(d.pairs), d.fdr, d.tests


register(ReportSection("significance", 60, _frame, lambda f: significance_section(*f)))
