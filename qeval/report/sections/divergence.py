"""Beyond accuracy: KL divergence and top-1 agreement against the baseline next to the flips and
McNemar's test, divergence.csv and the KL-vs-delta plot: the damage accuracy alone hides."""
from __future__ import annotations

import pandas as pd

from qeval.report.doc import Heading, Image, Para, Section, Table
from qeval.report.fmt import NA, fmt_int, fmt_num, fmt_pct, fmt_ratio, missing, variant_label
from qeval.report.frames import VARIANT, ordered
from qeval.report.plots import placeholder_png, plt, png
from qeval.report.sections.base import ReportSection, register
from qeval.store.columns import KL_STAT_COLUMNS

KL_PNG = "kl_vs_delta.png"
# what a record written before qeval stored a statistic shows in its place: records are immutable
# (a stored cell is never recomputed behind the user's back), so the way to the number is a rerun
NOT_RECORDED = "not recorded (rerun)"


def _stat(d: dict, col: str, fmt=fmt_num) -> str:
    return NOT_RECORDED if missing(d.get(col)) else fmt(d[col])


def _pm(d: dict, col: str, se: str, scale: float = 1.0, digits: int = 0) -> str:
    """`value ± se` as llama.cpp prints it (scale 100 with 3 decimals for its percentages); the value
    alone where an older record lacks the error, NOT_RECORDED where it lacks both."""
    def one(x):
        return fmt_num(x) if not digits else f"{float(x) * scale:.{digits}f}"
    if missing(d.get(col)):
        return NOT_RECORDED
    unit = " %" if digits else ""
    return one(d[col]) + unit if missing(d.get(se)) else f"{one(d[col])} ± {one(d[se])}{unit}"


def kl_stats_table(div: pd.DataFrame, task: str) -> list:
    """One row per variant with the statistics of `llama-perplexity --kl-divergence`; a note on
    how to get those an older record lacks."""
    per_variant = div.assign(adapter=div["adapter"].fillna("")).drop_duplicates(["model", "quant", "adapter"])
    rows, old = [], False
    for r in ordered(per_variant, VARIANT).itertuples(index=False):
        d = r._asdict()
        old = old or any(missing(d.get(c)) for c in KL_STAT_COLUMNS)
        rows.append([variant_label(d["quant"], d["adapter"]), fmt_int(d["tokens"]), _pm(d, "kl_mean", "kl_se"),
                     _stat(d, "kl_median"), _stat(d, "kl_p90"), _stat(d, "kl_p95"), _stat(d, "kl_p99"),
                     _stat(d, "kl_p999"), _stat(d, "kl_max"), _pm(d, "top1_agree", "top1_se", 100, 3),
                     _pm(d, "dp_mean", "dp_se", 100, 3), _pm(d, "dp_rms", "dp_rms_se", 100, 3)])
    header = ["variant", "tokens", "mean KL ± se", "median KL", "90% KL", "95% KL", "99% KL", "99.9% KL",
              "max KL", "same top-1 ± se", "mean Δp ± se", "RMS Δp ± se"]
    blocks = [Para(f"On the tokens of {task}, as llama.cpp's \"llama-perplexity --kl-divergence\" reports them (docs/statistics.md, "
                   "\"KL like llama.cpp\"): KL(baseline || variant) in nats per token over the full vocabulary; percentiles over tokens; same top-1 = both pick the same most likely "
                   "next token, with its binomial standard error; Δp = the variant's probability of the actual "
                   "next token minus the baseline's, in percentage points."),
              Table(header, rows, [False] + [True] * (len(header) - 1))]
    if old:
        blocks.append(Para(f"{NOT_RECORDED}: the record was written before qeval stored this statistic. Stored "
                           "cells are never recomputed in place; run the plan into a new store (\"qeval run --store "
                           "NEW.sqlite ...\"; cached references and adapters are reused) and report that store."))
    return blocks


def divergence_section(div: pd.DataFrame) -> Section | None:
    """KL / top-1 agreement next to flips and McNemar p: the damage accuracy alone hides."""
    if div.empty or "kl_mean" not in div.columns:
        return None
    rows = []
    for r in ordered(div.assign(adapter=div["adapter"].fillna("")), VARIANT).itertuples(index=False):
        d = r._asdict()
        flips = NA if missing(d.get("flips")) else (
            f"{int(d['flips'])} ({int(d['flips_right_to_wrong'])} r→w, {int(d['flips_wrong_to_right'])} w→r; "
            f"{fmt_pct(d['flip_rate'])})")
        delta = NA if missing(d.get("delta")) else (
            f"{fmt_num(d['delta'], signed=True)} [{fmt_num(d['delta_lo'], signed=True)}, {fmt_num(d['delta_hi'], signed=True)}]")
        rows.append([variant_label(d["quant"], d["adapter"]), fmt_int(d["tokens"]), fmt_num(d["kl_mean"]),
                     fmt_num(d["kl_p90"]), fmt_num(d["kl_p99"]), fmt_pct(d["top1_agree"]), fmt_ratio(d["ppl_ratio"]),
                     str(d.get("task") or NA), flips, fmt_num(d.get("mcnemar_p")), delta,
                     NA if missing(d.get("verdict")) else str(d["verdict"])])
    header = ["variant", "tokens", "KL mean", "KL p90", "KL p99", "top-1 agree", "ppl ratio", "task", "flips",
              "McNemar p", "Δ [95% CI]", "verdict"]
    task = str(div["divergence_task"].iloc[0])
    blocks = [Heading(2, "Beyond accuracy: divergence and flips"), *kl_stats_table(div, task),
              Para(f"KL(baseline || variant) per token, full vocabulary, on the tokens of {task} (the same forwards "
                   "the perplexity task makes); top-1 agree = how often both pick the same next token. Flips are "
                   "documents whose correctness changed against the baseline; McNemar's exact test asks whether "
                   "right→wrong and wrong→right flips are unbalanced (its interval and verdict are the "
                   "accuracy table's). Flips far above |Δ| mean answers changed in both directions while "
                   "accuracy barely moved."),
              Table(header, rows, [False, True, True, True, True, True, True, False, False, True, False, False]),
              Image("KL divergence vs accuracy delta", KL_PNG)]
    return Section(blocks, {KL_PNG: _kl_png(div)}, {"divergence.csv": div.to_csv(index=False).encode("utf-8")})


def _kl_png(div: pd.DataFrame) -> bytes:
    """One panel per right/wrong task: x = mean KL, y = accuracy delta with its interval; one
    colour per variant (a legend, not labels: a dozen arms would overprint each other)."""
    d = div.dropna(subset=["delta"]) if "delta" in div.columns else div.iloc[0:0]
    if d.empty:
        return placeholder_png("KL vs accuracy delta: no variant with both KL and a right/wrong task")
    d = ordered(d.assign(adapter=d["adapter"].fillna("")), VARIANT)
    labels = list(dict.fromkeys(variant_label(q, a) for q, a in zip(d["quant"], d["adapter"])))
    colors = {lab: plt.get_cmap("tab20")(i % 20) for i, lab in enumerate(labels)}
    tasks = sorted(d["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        for r in d[d.task == task].itertuples(index=False):
            lab = variant_label(r.quant, r.adapter)
            ax.errorbar([r.kl_mean], [r.delta], yerr=[[r.delta - r.delta_lo], [r.delta_hi - r.delta]], fmt="o",
                        capsize=3, color=colors[lab], label=lab)
        ax.axhline(0, color="grey", lw=1, ls="--")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("mean KL(baseline || variant), nats/token")
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("accuracy delta vs baseline (95% CI)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[lab]) for lab in labels]
    fig.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False)
    fig.suptitle("KL divergence vs accuracy delta", fontsize=11)
    fig.tight_layout()
    return png(fig)



register(ReportSection("divergence", 70, lambda d: None if d.div.empty else d.div, divergence_section))
