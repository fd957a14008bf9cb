"""History: each variant's score across nightly runs, library version changes marked."""
from __future__ import annotations

import pandas as pd
from matplotlib.ticker import MaxNLocator

from qeval.report.doc import Heading, Image, Para, Section, Table
from qeval.report.fmt import NA, fmt_num
from qeval.report.plots import plt, png
from qeval.report.sections.base import ReportSection, register

HISTORY_PNG = "history.png"
HISTORY_NIGHTS = 30  # the report shows the last 30 nightly runs (a year of nights is no table); `qeval history` any N


def history_section(hist: pd.DataFrame) -> Section | None:
    """Score per variant and task across nightly runs; version changes marked."""
    if hist.empty or hist["run_id"].nunique() < 2:
        return None
    hist = hist[hist["run_id"].isin(sorted(hist["run_id"].unique())[-HISTORY_NIGHTS:])]
    blocks = [Heading(2, "History (nightly runs)"),
              Para(f"The last {hist['run_id'].nunique()} nightly runs (at most {HISTORY_NIGHTS}; "
                   "`qeval history CELL --nights N` for one cell over any span). Each variant keeps its "
                   "identity across library upgrades (the result key changes, the variant does not), so a "
                   "column is one variant through versions. † marks a run whose library "
                   "versions differ from the run before; 'computed' counts the cells that run had to compute.")]
    runs = hist.drop_duplicates("run_id").sort_values("run_id")
    blocks.append(Table(["run", "started", "git sha", "computed", "versions changed"],
                        [[str(r.run_id), str(r.started_at)[:19], str(r.git_sha)[:12],
                          str(int(hist[(hist.run_id == r.run_id)]["computed"].sum())), r.versions_changed or "-"]
                         for r in runs.itertuples(index=False)], [True, False, False, True, False]))
    for task, g in hist.groupby("task", sort=True):
        arms = list(dict.fromkeys(g.sort_values("arm")["arm"]))
        rows = []
        for run_id, rg in g.groupby("run_id", sort=True):
            mark = " †" if rg["versions_changed"].iloc[0] else ""
            vals = {r.arm: fmt_num(r.value) for r in rg.itertuples(index=False)}
            rows.append([f"{run_id}{mark}"] + [vals.get(a, NA) for a in arms])
        blocks += [Heading(3, f"{task}: {g['metric'].iloc[0]}"), Table(["run"] + arms, rows, [False] + [True] * len(arms))]
    blocks.append(Image("Score per variant across nightly runs", HISTORY_PNG))
    return Section(blocks, {HISTORY_PNG: _history_png(hist)}, {"history.csv": hist.to_csv(index=False).encode("utf-8")})


def _history_png(hist: pd.DataFrame) -> bytes:
    tasks = sorted(hist["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.8), squeeze=False)
    changes = hist[hist["versions_changed"] != ""].drop_duplicates("run_id")
    for ax, task in zip(axes.flat, tasks):
        g = hist[hist.task == task]
        for arm, ag in g.groupby("arm", sort=True):
            ag = ag.sort_values("run_id")
            ax.plot(ag["run_id"], ag["value"], marker="o", label=arm)
        for r in changes.itertuples(index=False):
            ax.axvline(r.run_id, ls="--", color="grey", lw=1)
        ax.set_title(f"{task} ({g['metric'].iloc[0]})", fontsize=10)
        ax.set_xlabel("nightly run (dashed: versions changed)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes.flat[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return png(fig)



register(ReportSection("history", 90, lambda d: None if d.history.empty else d.history, history_section))
