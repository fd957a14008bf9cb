"""Accuracy by task: each task's headline metric per variant against the baseline (delta with its
paired interval, p, MDE, recovery), the task's other metrics, results.csv and recovery.png."""
from __future__ import annotations

import pandas as pd

from qeval.report.doc import Block, Heading, Para, Section, Table
from qeval.report.fmt import (BASELINE, adapter_name, fmt_effect, fmt_int, fmt_num, fmt_pct, fmt_ratio,
                              fmt_value_stderr, missing, variant_label)
from qeval.report.frames import VARIANT, lower_is_better, ordered, primary_rows
from qeval.report.plots import placeholder_png, plot_label, plt, png, variant_colors
from qeval.report.plots import RECOVERY_PNG
from qeval.report.sections.base import ReportSection, register
from qeval.stats.margin import short_verdict
from qeval.stats.paired import KINDS

RESULTS_CSV = "results.csv"


def accuracy_section(results: pd.DataFrame) -> Section:
    """`results` as `ReportData.table` holds it (tidy, in report order); without rows the report says so."""
    files = {RESULTS_CSV: results.to_csv(index=False).encode("utf-8")}
    if results.empty:
        return Section([Para("No results: the store holds no evaluated cells for this selection.")],
                       {RECOVERY_PNG: placeholder_png("No results")}, files)
    multi_model = results["model"].nunique() > 1
    image = _recovery_png(primary_rows(results), variant_colors(results, multi_model), multi_model)
    return Section(accuracy_blocks(results), {RECOVERY_PNG: image}, files)


def accuracy_blocks(results: pd.DataFrame) -> list[Block]:
    multi_model = results["model"].nunique() > 1
    blocks: list[Block] = [
        Heading(2, "Accuracy by task"),
        Para("Recovery is value/baseline for higher-is-better metrics; 100% means no loss against the "
             "unquantized baseline ('none'), below 100% is worse; a score of 0 recovers 0%, and a baseline "
             "of 0 leaves recovery undefined. Each variant is compared with the baseline on the same "
             "documents (qeval.stats.paired): Tango's score test for right/wrong metrics, a paired t-test on "
             "per-document log-likelihoods for perplexities; brackets are the 95% interval of that test, "
             "so an interval excludes 0 exactly when p < 0.05. * marks a change that is both significant "
             "and larger than the metric's minimum meaningful effect; 'below min effect' is significant "
             "but smaller; the others are within noise. MDE is the smallest change the test would find "
             "(80% power, alpha 0.05) at this n and this variant's flip rate / per-document spread. "
             "Against the margin: 'loss within the margin shown' when the whole interval of the change lies "
             "above minus the task's non-inferiority margin (thresholds.margin; default 1 point, 1% for "
             "perplexity), 'loss beyond the margin shown' when it lies wholly below, 'cannot tell at this n' "
             "when it straddles it."),
    ]
    primary = primary_rows(results)
    for task, rows in primary.groupby("task", sort=True):
        rows = ordered(rows, ["model", "quant", "adapter"])
        metric = str(rows["metric"].iloc[0])
        lower = lower_is_better(rows)
        blocks.append(Heading(3, f"{task}: {metric} ({'lower' if lower else 'higher'} is better)"))
        header = (["model"] if multi_model else []) + [
            "variant", metric, "n", "Δ vs baseline", "p", "MDE", "ratio value/baseline" if lower else "recovery %"]
        numeric = ([False] if multi_model else []) + [False, True, True, True, True, True, True]
        # a report rendered from bare frames has no paired comparisons, so no margins to show
        margins = "margin_verdict" in rows.columns and bool(rows["margin_verdict"].notna().any())
        if margins:
            header, numeric = header + ["against the margin"], numeric + [False]
        table_rows = []
        for r in rows.itertuples(index=False):
            d = r._asdict()
            # Lower-is-better (perplexity): a ratio reads naturally (x1.35 = 35% more perplexed);
            # the frame's recovery (baseline/value) would too, but inverted against intuition.
            rec = fmt_ratio(d.get("ratio")) if lower else fmt_pct(d.get("recovery"))
            if d.get("recovery_undefined") is True:
                rec = "undefined (baseline 0)"
            delta = fmt_num(d.get("delta"), signed=True)
            if not missing(d.get("delta_lo")):
                delta += f" [{fmt_num(d['delta_lo'], signed=True)}, {fmt_num(d['delta_hi'], signed=True)}]"
                # a kind whose coverage misses its target below some n says so (`qeval bench-stats`)
                if d.get("kind") in KINDS and not missing(d.get("pairs")) and \
                        KINDS.get(d["kind"]).approximate_at(int(d["pairs"])):
                    delta += " (approximate at this n)"
            verdict = d.get("verdict")
            if not missing(verdict):
                delta += " *" if verdict in ("better", "worse") else f" ({verdict})"
            table_rows.append(([str(d["model"])] if multi_model else []) + [
                variant_label(d["quant"], d["adapter"]), fmt_value_stderr(d.get("value"), d.get("stderr")),
                fmt_int(d.get("n")), delta, fmt_num(d.get("p_value"), sig=2), fmt_effect(d.get("mde"), lower), rec]
                + ([_margin(d)] if margins else []))
        blocks.append(Table(header, table_rows, numeric))
        if lower:
            blocks.append(Para(f"Note: {metric} is lower-is-better (perplexity), so it is shown as the ratio "
                               "value/baseline instead of a recovery %: ×1.000 is no change, above 1 is worse."))
        blocks += _secondary_table(results[(results["task"] == task) & (results["metric"] != metric)],
                                   multi_model)
    return blocks


def _margin(d: dict) -> str:
    """"loss within 1 point shown" (the verdict with the row's margin printed); blank for the baseline."""
    v = d.get("margin_verdict")
    return "" if missing(v) else short_verdict(str(v), str(d.get("margin_label")))


def _secondary_table(others: pd.DataFrame, multi_model: bool) -> list[Block]:
    """The task's non-headline metrics, one column each, value only."""
    if others.empty:
        return []
    metrics = sorted(others["metric"].astype(str).unique())
    hib = others.groupby("metric")["higher_is_better"].first()
    header = (["model"] if multi_model else []) + ["variant"] + [
        f"{m} {'↓' if (not missing(hib.get(m)) and not bool(hib.get(m))) else '↑'}" for m in metrics]
    numeric = ([False] if multi_model else []) + [False] + [True] * len(metrics)
    rows = []
    for (model, quant, adapter), g in ordered(others, VARIANT).groupby(
            ["model", "quant", "adapter"], sort=False, dropna=False):
        values = dict(zip(g["metric"].astype(str), g["value"]))
        rows.append(([str(model)] if multi_model else []) + [variant_label(quant, adapter)]
                    + [fmt_num(values.get(m)) for m in metrics])
    return [Para("Other metrics (value only; ↑ higher is better, ↓ lower is better):"),
            Table(header, rows, numeric)]


def _recovery_png(primary: pd.DataFrame, colors: dict[str, object], multi_model: bool) -> bytes:
    """Grouped bars: x = task, one bar per non-baseline variant, y = recovery %."""
    is_base = primary["quant"].eq(BASELINE) & primary["adapter"].map(adapter_name).eq("")
    data = ordered(primary[~is_base], ["task"] + VARIANT)
    tasks = sorted(primary["task"].astype(str).unique())
    variants = [lab for lab in colors if lab in {plot_label(r, multi_model) for r in data.itertuples(index=False)}]
    title = ("Recovery vs. baseline, primary metric per task\n"
             "(higher-is-better: value/baseline; perplexity / lower-is-better: baseline/value)")
    if not variants or data["recovery"].dropna().empty:
        return placeholder_png("Recovery: no quantized variant has a baseline to compare against")

    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(min(16, max(6.5, 1.5 + len(tasks) * (0.55 * len(variants) + 0.9))), 4.8))
    recs = []
    for i, lab in enumerate(variants):
        xs, ys = [], []
        for t_i, task in enumerate(tasks):
            sel = data[(data["task"] == task)]
            sel = sel[[plot_label(r, multi_model) == lab for r in sel.itertuples(index=False)]]
            if sel.empty or missing(sel["recovery"].iloc[0]):
                continue  # no baseline for this cell: leave a gap rather than invent a bar
            xs.append(t_i - 0.4 + width * (i + 0.5))
            ys.append(float(sel["recovery"].iloc[0]) * 100)
        recs += ys
        bars = ax.bar(xs, ys, width=width * 0.92, label=lab, color=colors[lab])
        # a collapse to 0 has no bar to see: mark it on the axis so it can not be mistaken for a gap
        zeros = [x for x, y in zip(xs, ys) if y == 0]
        ax.plot(zeros, [0] * len(zeros), marker="X", ls="", ms=9, color=colors[lab], clip_on=False, zorder=5)
        if len(variants) <= 6:  # value labels only while they still fit above the bars
            ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=7, padding=2)
    ax.axhline(100, color="0.3", linestyle="--", linewidth=1)
    # Zoom on the interesting band: differences of a few percent vanish on a 0-100 axis.
    lo, hi = min(min(recs), 100.0), max(max(recs), 100.0)
    pad = max(2.0, (hi - lo) * 0.15)
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    metric_of = primary.groupby("task")["metric"].first()
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({metric_of[t]})" for t in tasks], rotation=20 if len(tasks) > 4 else 0,
                       ha="right" if len(tasks) > 4 else "center")
    ax.set_ylabel("recovery (%; 100 = no loss)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="variant", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return png(fig)


register(ReportSection("accuracy", 30, lambda d: d.table, accuracy_section, needs_results=False))
