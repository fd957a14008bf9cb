"""What the suite can tell apart: per task its n, its test, its minimum detectable effect against the
minimum meaningful one, what the nightly (all its comparisons under one FDR) can still detect, and
the documents the task would need to tell a loss of its non-inferiority margin apart from none
(`qeval.stats.margin.task_documents`)."""
from __future__ import annotations

import pandas as pd

from qeval.report.doc import Heading, Para, Section, Table
from qeval.report.fmt import NA, fmt_effect, fmt_int, fmt_pct
from qeval.report.sections.base import ReportData, ReportSection, register
from qeval.stats.margin import MAX_DOCUMENTS

SIGNIFICANCE_HEADING = "What the suite can tell apart"


def significance_section(mde: pd.DataFrame, fdr: float, tests: int, documents: list[dict] = ()) -> Section | None:
    """Per task: n, the test, its minimum detectable effect, the minimum meaningful effect, what
    the nightly can detect with `tests` comparisons under Benjamini-Hochberg at level `fdr` (a
    single real regression among them must reach p < fdr / tests), and (`documents`, from
    `task_documents`) its margin and the documents that margin needs."""
    from qeval.stats.detect import nightly_mde
    from qeval.stats.paired import KINDS

    if mde.empty:
        return None
    strict = fdr / max(tests, 1)
    needed = {(d["task"], d["metric"]): d for d in documents}
    rows, sentences = [], []
    for r in mde.itertuples(index=False):
        relative = KINDS.get(str(r.kind)).relative
        nightly = nightly_mde(r, fdr, tests)
        d = needed.get((r.task, r.metric), {})
        rows.append([str(r.task), str(r.metric), fmt_int(r.n), str(r.test), fmt_pct(r.flip_rate),
                     fmt_effect(r.mde, relative), fmt_effect(r.min_effect, relative), fmt_effect(nightly, relative),
                     d.get("margin_label", NA), _documents(d)])
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
        Para("Documents for the margin: how many documents the task needs to tell a loss of its "
             "non-inferiority margin (thresholds.margin; default 1 point, 1% for perplexity) apart from none "
             "with 80% power at alpha 0.05 -- for right/wrong metrics the exact power of the paired score test (Tango) at the median "
             "variant's flip rate (symmetric noise flips plus the loss), for the others the normal "
             "approximation at the median variant's per-document spread; in brackets the range from the "
             "variant closest to the baseline to the farthest. `qeval plan-n TASK --margin 1pt` computes it "
             "for any rate."),
        Table(["task", "metric", "n", "test", "noise flip rate", "MDE (alpha 0.05)", "min effect",
               f"nightly MDE (FDR {fdr:g}, {tests} tests)", "margin", "documents for the margin (80% power)"], rows,
              [False, False, True, False, True, True, True, True, True, True])])


def _documents(d: dict) -> str:
    """"4,880 (1,200 .. 9,800)"; "more than 10,000,000" beyond reach; n/a when nothing was measured."""
    if not d or (d.get("n_needed") is None and d.get("n_max") is None):
        return NA
    def one(n):
        return f"more than {MAX_DOCUMENTS:,}" if n is None else f"{n:,}"
    out = one(d["n_needed"])
    if d.get("n_min") != d.get("n_max"):
        out += f" ({one(d['n_min'])} .. {one(d['n_max'])})"
    return out + (f"; {d['floor_note']}" if d.get("floor_note") else "")  # the test's minimum n, not the power



def _frame(d: ReportData) -> tuple | None:
    if d.pairs.empty or d.fdr is None:
        return None
    from qeval.stats.compare import task_mde
    from qeval.stats.margin import task_documents

    return task_mde(d.pairs), d.fdr, d.tests, task_documents(d.pairs)


register(ReportSection("significance", 60, _frame, lambda f: significance_section(*f)))
