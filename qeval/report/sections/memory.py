"""Memory: what each variant holds (measured against the format's theory and the baseline), its
load and eval times, memory.csv and the memory-vs-score plot."""
from __future__ import annotations

import math

import pandas as pd

from qeval.report.doc import Block, Heading, Para, Section, Table
from qeval.report.fmt import BASELINE, MIB, NA, adapter_name, fmt_mib, fmt_num, missing, variant_label
from qeval.report.frames import MEMORY_COLUMNS, VARIANT, lower_is_better, ordered, primary_rows, tidy
from qeval.report.plots import placeholder_png, plot_label, plt, png, variant_colors
from qeval.report.plots import MEMORY_PNG
from qeval.report.sections.base import ReportSection, register

MEMORY_CSV = "memory.csv"


def memory_section(memory: pd.DataFrame, results: pd.DataFrame) -> Section:
    """`memory` and `results` as `ReportData.memory_table` / `.table` hold them."""
    if results.empty:
        image = placeholder_png("No results")
    else:
        multi_model = results["model"].nunique() > 1
        image = _memory_png(primary_rows(results), memory, variant_colors(results, multi_model), multi_model)
    return Section(memory_blocks(memory), {MEMORY_PNG: image}, {MEMORY_CSV: memory.to_csv(index=False).encode("utf-8")})


def memory_blocks(memory: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Memory")]
    if memory.empty:
        return blocks + [Para("No memory measurements.")]
    memory = tidy(memory, MEMORY_COLUMNS)
    multi_model = memory["model"].nunique() > 1
    header = (["model"] if multi_model else []) + [
        "variant", "measured MiB", "quantized weights MiB", "quant state MiB", "unquantized MiB",
        "theory MiB", "ratio to baseline", "ratio to theory", "bits/weight measured vs theory",
        "load s", "eval s", "peak MiB"]
    numeric = ([False] if multi_model else []) + [False] + [True] * 11
    rows = []
    for r in ordered(memory, VARIANT).itertuples(index=False):
        d = r._asdict()
        measured, theory = d["measured_bits_per_weight"], d["theory_bits_per_weight"]
        bits = NA if missing(measured) and missing(theory) else f"{fmt_num(measured)} vs {fmt_num(theory)}"
        rows.append(([str(d["model"])] if multi_model else []) + [
            variant_label(d["quant"], d["adapter"]), fmt_mib(d["total_bytes"]),
            fmt_mib(d["quantized_weight_bytes"]), fmt_mib(d["quant_state_bytes"]),
            fmt_mib(d["unquantized_bytes"]), fmt_mib(d["theory_bytes"]), fmt_num(d["ratio_to_baseline"]),
            fmt_num(d["ratio_to_theory"]), bits, fmt_num(d["load_s"]), fmt_num(d["eval_s"]),
            fmt_mib(d["peak_bytes"])])
    blocks.append(Table(header, rows, numeric))
    blocks.append(Para("Measured MiB is the loaded model's total; theory MiB is what the format's nominal "
                       "bits per weight would cost. Ratios are measured/baseline and measured/theory."))
    blocks += [Para(s) for s in checkpoint_sentences(memory)]
    return blocks


SIXTEEN_BIT = ("bfloat16", "float16")


def checkpoint_sentences(memory: pd.DataFrame) -> list[str]:
    """Per model whose checkpoint is stored in another dtype than the baseline computes in: what the
    ratios are against; for a 16-bit checkpoint also the claim row, "up to 4x smaller than 16-bit"
    as measured (the smallest format against the checkpoint). Nothing for a model whose checkpoint
    was not recorded or matches the compute dtype's bytes."""
    out = []
    for model, g in memory.groupby("model", sort=True):
        first = g.iloc[0].to_dict()
        dtype, ckpt, computed = first.get("checkpoint_dtype"), first.get("baseline_bytes"), first.get("compute_baseline_bytes")
        if missing(dtype) or not dtype or missing(ckpt) or missing(computed) or ckpt == computed:
            continue
        name = f"{model}: " if memory["model"].nunique() > 1 else ""
        text = (f"{name}ratios are against the checkpoint as stored ({dtype}, {fmt_mib(ckpt)} MiB), not the baseline "
                f"in memory ({fmt_mib(computed)} MiB in the compute dtype; ratio to it = ratio to baseline × "
                f"{fmt_num(ckpt / computed, 3)}).")
        if dtype in SIXTEEN_BIT:
            fmts = g[(g["adapter"].fillna("") == "") & (g["quant"] != BASELINE) & g["ratio_to_baseline"].notna()]
            if len(fmts):
                best = fmts.loc[fmts["ratio_to_baseline"].idxmin()]
                text += (f" Claim \"up to 4x smaller than 16-bit\", measured: the smallest format, {best['quant']}, "
                         f"holds {fmt_mib(best['total_bytes'])} MiB, ×{fmt_num(best['ratio_to_baseline'], 3)} of the "
                         f"{dtype} checkpoint ({fmt_num(1 / best['ratio_to_baseline'], 2)}x smaller; the embeddings, "
                         "norms and quantization state stay).")
        out.append(text)
    return out


def _memory_png(primary: pd.DataFrame, memory: pd.DataFrame, colors: dict[str, object],
                multi_model: bool) -> bytes:
    """One panel per task: x = total MiB of the variant, y = its primary metric value."""
    if memory.empty or "total_bytes" not in memory.columns:
        return placeholder_png("Memory vs. score: no memory measurements")
    mem = (memory[VARIANT + ["total_bytes"]].assign(adapter=memory["adapter"].map(adapter_name))
           .drop_duplicates(VARIANT))  # one point per variant even if the frame repeats a row
    joined = primary.assign(adapter=primary["adapter"].map(adapter_name)).merge(mem, on=VARIANT, how="left")
    tasks = sorted(joined["task"].astype(str).unique())
    ncols = min(len(tasks), 3)
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks):
        rows = ordered(joined[joined["task"] == task], VARIANT)
        metric = str(rows["metric"].iloc[0])
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("total memory (MiB)")
        ax.set_ylabel(f"{metric} ({'lower' if lower_is_better(rows) else 'higher'} is better)")
        ax.grid(alpha=0.3)
        plotted = 0
        for k, r in enumerate(rows.itertuples(index=False)):
            if missing(r.total_bytes) or missing(r.value):
                continue
            x, y = float(r.total_bytes) / MIB, float(r.value)
            lab = plot_label(r, multi_model)
            yerr = None if missing(r.stderr) else float(r.stderr)
            ax.errorbar([x], [y], yerr=yerr, fmt="o", color=colors.get(lab, "C0"), capsize=3)
            # Alternate label offsets: variants of similar size and score (nf4 vs nf4-dq) sit close.
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(6, 6 if k % 2 == 0 else -11),
                        fontsize=8)
            plotted += 1
        if not plotted:
            ax.text(0.5, 0.5, "no memory data", transform=ax.transAxes, ha="center", va="center")
        ax.margins(x=0.2, y=0.2)  # room for the annotations at the extremes
    fig.suptitle("Memory vs. score (primary metric per task)", fontsize=11)
    fig.tight_layout()
    return png(fig)


register(ReportSection("memory", 40, lambda d: (d.memory_table, d.table), lambda f: memory_section(*f),
                       needs_results=False))
