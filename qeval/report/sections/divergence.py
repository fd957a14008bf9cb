"""Beyond accuracy: KL divergence and top-1 agreement against the baseline next to the flips and
McNemar's test, divergence.csv and the KL-vs-delta plot: the damage accuracy alone hides."""
from __future__ import annotations

import pandas as pd

from qeval.report.doc import Heading, Image, Para, Section, Table
from qeval.report.fmt import NA, fmt_int, fmt_num, fmt_pct, fmt_ratio, missing, variant_label
from qeval.report.frames import VARIANT, ordered
from qeval.report.plots import placeholder_png, plt, png
from qeval.report.sections.base import ReportSection, register

KL_PNG = "kl_vs_delta.png"


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
    blocks = [Heading(2, "Beyond accuracy: divergence and flips"),
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
