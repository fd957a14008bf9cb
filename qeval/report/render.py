"""Stage 4: render the accuracy and memory frames into report files.

`render` only *formats*: every number it shows (delta, recovery, ratios, bytes) is already a column of
the frames another module derived from the result store. It writes, into one folder:

- `results.csv`, `memory.csv`: the frames themselves, sorted, for anyone who wants to re-plot;
- `recovery.png`: recovery of each task's primary metric per quantized variant;
- `memory_vs_score.png`: one panel per task, total memory against the primary metric;
- `report.md` and `report.html`: the same document twice. Both are rendered from one list of blocks
  (headings, paragraphs, lists, tables, images) so the two can never disagree; the HTML is
  self-contained (inline CSS, images as base64 data URIs).

Every file is written to a temporary name in the output folder and moved into place with
`os.replace`, and nothing is written until everything has been rendered in memory, so a crash never
leaves a half-written report behind.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from qeval.core.files import atomic_write

import matplotlib

matplotlib.use("Agg")  # headless: the harness runs on servers and in CI; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from qeval.quant.formats import format_order # noqa: E402
# the document model (blocks -> Markdown / HTML); re-exported for the sections and tests that import it here
from qeval.report.doc import (Block, Bullets, Heading, Image, Para, Table,  # noqa: E402,F401
                              to_html, to_markdown)

BASELINE = "none"
NA = "n/a"
MIB = 2 ** 20

RESULT_COLUMNS = ["model", "quant", "adapter", "task", "metric", "higher_is_better", "primary", "value",
                  "stderr", "n", "baseline_value", "baseline_stderr", "delta", "recovery", "ratio",
                  "weight_bytes", "device", "key"]
MEMORY_COLUMNS = ["model", "quant", "adapter", "total_bytes", "quantized_weight_bytes", "quant_state_bytes",
                  "unquantized_bytes", "theory_bytes", "baseline_bytes", "ratio_to_baseline",
                  "ratio_to_theory", "measured_bits_per_weight", "theory_bits_per_weight", "load_s",
                  "eval_s", "peak_bytes", "device"]
# Without these a results row cannot even be placed in a table; anything else missing shows as n/a.
_IDENTITY = ["model", "quant", "adapter", "task", "metric"]
_VARIANT = ["model", "quant", "adapter"]

RESULTS_CSV, MEMORY_CSV = "results.csv", "memory.csv"
RECOVERY_PNG, MEMORY_PNG = "recovery.png", "memory_vs_score.png"
REPORT_MD, REPORT_HTML = "report.md", "report.html"


# ----------------------------------------------------------------------------- formatting

def _missing(x: object) -> bool:
    try:
        return x is None or pd.isna(x)
    except (TypeError, ValueError):  # pd.isna of a list-like is an array, not a verdict
        return False


def fmt_num(x: object, sig: int = 4, signed: bool = False) -> str:
    """`x` to `sig` significant digits, in fixed notation for ordinary magnitudes; NaN -> 'n/a'.

    Fixed rather than '%g' because perplexities in the thousands would otherwise print as 1.234e+03,
    and a column of numbers should read the same way down the column."""
    if _missing(x):
        return NA
    x = float(x)
    if x == 0:
        return "0"
    sign = "+" if signed else ""
    if math.isinf(x) or not 1e-4 <= abs(x) < 1e15:
        return f"{x:{sign}.{sig}g}"
    decimals = max(0, sig - 1 - math.floor(math.log10(abs(x))))
    return f"{x:{sign}.{decimals}f}"


def fmt_mib(nbytes: object) -> str:
    """Bytes as MiB with one decimal."""
    return NA if _missing(nbytes) else f"{float(nbytes) / MIB:.1f}"


def fmt_pct(fraction: object) -> str:
    """A fraction (1.0 = 100%) as a percent with one decimal."""
    return NA if _missing(fraction) else f"{float(fraction) * 100:.1f}%"


def fmt_ratio(ratio: object) -> str:
    """A multiplicative ratio, e.g. '×1.350'."""
    return NA if _missing(ratio) else f"×{fmt_num(ratio)}"


def fmt_int(n: object) -> str:
    return NA if _missing(n) else str(int(n))


def fmt_value_stderr(value: object, stderr: object) -> str:
    if _missing(stderr):
        return fmt_num(value)
    return f"{fmt_num(value)} ± {fmt_num(stderr)}"


def _adapter(adapter: object) -> str:
    # A frame read back from CSV turns '' into NaN; both mean "no adapter".
    return "" if _missing(adapter) else str(adapter)


def variant_label(quant: str, adapter: object = "") -> str:
    """The name a variant goes by everywhere in the report: quant, plus '+adapter' when there is one."""
    a = _adapter(adapter)
    return f"{quant}+{a}" if a else str(quant)


def _model_short(model: str) -> str:
    # Model specs can be long local paths; the last component is enough to tell them apart on a plot.
    return Path(str(model).rstrip("/")).name or str(model)


# ----------------------------------------------------------------------------- ordering

def _sorted(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Sort by `by`; quants in `qeval.quant.format_order` (baseline first, bitsandbytes presets,
    then the other backends' formats)."""
    if df.empty:
        return df
    tmp = df.assign(_not_base=df["quant"].map(format_order),
                    _adapter=df["adapter"].map(_adapter))
    keys = []
    for col in by:
        if col == "quant":
            keys += ["_not_base", "quant"]
        elif col == "adapter":
            keys.append("_adapter")
        else:
            keys.append(col)
    return tmp.sort_values(keys, kind="stable").drop(columns=["_not_base", "_adapter"]).reset_index(drop=True)


def _tidy(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The documented columns first, in order (missing ones as NaN), any extra columns after."""
    extra = [c for c in df.columns if c not in columns]
    return df.reindex(columns=columns + extra)


# ----------------------------------------------------------------------------- report sections

def _primary_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Each task's headline-metric rows. A task with no row flagged primary falls back to its first
    metric by name, so a malformed frame still shows something rather than silently dropping a task."""
    parts = []
    for _, g in results.groupby("task", sort=True):
        flagged = g[g["primary"].map(lambda v: not _missing(v) and bool(v))]
        if flagged.empty:
            flagged = g[g["metric"] == sorted(g["metric"].astype(str))[0]]
        else:
            flagged = g[g["metric"] == flagged["metric"].iloc[0]]  # one metric per task, as documented
        parts.append(flagged)
    return pd.concat(parts) if parts else results.iloc[0:0]


def _lower_is_better(rows: pd.DataFrame) -> bool:
    hib = rows["higher_is_better"].dropna()
    return bool(len(hib)) and not bool(hib.iloc[0])


def _meta_blocks(meta: dict, results: pd.DataFrame, memory: pd.DataFrame) -> list[Block]:
    title = str(meta.get("title") or "qeval quantization report")
    items: list[str] = []
    if meta.get("generated_at"):
        items.append(f"Generated at: {meta['generated_at']}")
    if meta.get("suite"):
        items.append(f"Suite: {meta['suite']}")
    for key, label in (("seed", "Seed"), ("cells", "Cells")):
        if meta.get(key) is not None:
            items.append(f"{label}: {meta[key]}")
    models = meta.get("models") or {}
    if isinstance(models, dict) and models:
        items.append("Models: " + "; ".join(f"{spec} (fingerprint {str(fp)[:12]})" for spec, fp in models.items()))
    elif not results.empty:
        items.append("Models: " + ", ".join(sorted(results["model"].astype(str).unique())))
    devices = meta.get("devices")
    if not devices:
        # Not in the meta: fall back to what the rows themselves record.
        seen = pd.concat([f["device"] for f in (results, memory) if "device" in f.columns and not f.empty]
                         or [pd.Series(dtype=object)])
        devices = sorted(seen.dropna().astype(str).unique())
    if devices:
        items.append("Device: " + ", ".join(map(str, devices if isinstance(devices, (list, tuple)) else [devices])))
    if meta.get("git_sha"):
        items.append(f"Git sha: {meta['git_sha']}")
    versions = meta.get("versions") or {}
    if isinstance(versions, dict) and versions:
        items.append("Versions: " + ", ".join(f"{lib} {ver}" for lib, ver in versions.items()))
    if meta.get("store"):
        items.append(f"Store: {meta['store']}")
    blocks: list[Block] = [Heading(1, title)]
    if items:
        blocks.append(Bullets(items))
    return blocks


def _accuracy_blocks(results: pd.DataFrame) -> list[Block]:
    multi_model = results["model"].nunique() > 1
    blocks: list[Block] = [
        Heading(2, "Accuracy by task"),
        Para("Recovery is value/baseline for higher-is-better metrics; 100% means no loss against the "
             "unquantized baseline ('none'), below 100% is worse; a score of 0 recovers 0%, and a baseline "
             "of 0 leaves recovery undefined. Each variant is compared with the baseline on the same "
             "documents (qeval.stats.paired): exact McNemar for right/wrong metrics, a paired t-test on "
             "per-document log-likelihoods for perplexities; brackets are the 95% interval of that test, "
             "so an interval excludes 0 exactly when p < 0.05. * marks a change that is both significant "
             "and larger than the metric's minimum meaningful effect; 'below min effect' is significant "
             "but smaller; the others are within noise. MDE is the smallest change the test would find "
             "(80% power, alpha 0.05) at this n and this variant's flip rate / per-document spread."),
    ]
    primary = _primary_rows(results)
    for task, rows in primary.groupby("task", sort=True):
        rows = _sorted(rows, ["model", "quant", "adapter"])
        metric = str(rows["metric"].iloc[0])
        lower = _lower_is_better(rows)
        blocks.append(Heading(3, f"{task}: {metric} ({'lower' if lower else 'higher'} is better)"))
        header = (["model"] if multi_model else []) + [
            "variant", metric, "n", "Δ vs baseline", "p", "MDE", "ratio value/baseline" if lower else "recovery %"]
        numeric = ([False] if multi_model else []) + [False, True, True, True, True, True, True]
        table_rows = []
        for r in rows.itertuples(index=False):
            d = r._asdict()
            # Lower-is-better (perplexity): a ratio reads naturally (x1.35 = 35% more perplexed);
            # the frame's recovery (baseline/value) would too, but inverted against intuition.
            rec = fmt_ratio(d.get("ratio")) if lower else fmt_pct(d.get("recovery"))
            if d.get("recovery_undefined") is True:
                rec = "undefined (baseline 0)"
            delta = fmt_num(d.get("delta"), signed=True)
            if not _missing(d.get("delta_lo")):
                delta += f" [{fmt_num(d['delta_lo'], signed=True)}, {fmt_num(d['delta_hi'], signed=True)}]"
            verdict = d.get("verdict")
            if not _missing(verdict):
                delta += " *" if verdict in ("better", "worse") else f" ({verdict})"
            table_rows.append(([str(d["model"])] if multi_model else []) + [
                variant_label(d["quant"], d["adapter"]), fmt_value_stderr(d.get("value"), d.get("stderr")),
                fmt_int(d.get("n")), delta, fmt_num(d.get("p_value"), sig=2), _fmt_effect(d.get("mde"), lower), rec])
        blocks.append(Table(header, table_rows, numeric))
        if lower:
            blocks.append(Para(f"Note: {metric} is lower-is-better (perplexity), so it is shown as the ratio "
                               "value/baseline instead of a recovery %: ×1.000 is no change, above 1 is worse."))
        blocks += _secondary_table(results[(results["task"] == task) & (results["metric"] != metric)],
                                   multi_model)
    return blocks


def _fmt_effect(x: object, relative: bool) -> str:
    """An effect size: relative ones (perplexity) as a percent, absolute ones (accuracy) as points."""
    if _missing(x):
        return NA
    return f"{float(x) * 100:.2f}%" if relative else f"{float(x) * 100:.1f} pts"


SIGNIFICANCE_HEADING = "What the suite can tell apart"


def significance_section(mde: pd.DataFrame, fdr: float, tests: int) -> "Section | None":
    """Per task: n, the test, its minimum detectable effect, the minimum meaningful effect, and what
    the nightly can detect with `tests` comparisons under Benjamini-Hochberg at level `fdr` (a
    single real regression among them must reach p < fdr / tests)."""
    from qeval.stats.paired import mde_at

    if mde.empty:
        return None
    strict = fdr / max(tests, 1)
    rows, sentences = [], []
    for r in mde.itertuples(index=False):
        relative = r.kind == "loglikelihood_ratio"
        rate = round(float(r.flip_rate), 6) if not _missing(r.flip_rate) else 0.0
        nightly = mde_at(str(r.kind), int(r.n), rate, float(r.mde), strict)
        rows.append([str(r.task), str(r.metric), fmt_int(r.n), str(r.test), fmt_pct(r.flip_rate),
                     _fmt_effect(r.mde, relative), _fmt_effect(r.min_effect, relative), _fmt_effect(nightly, relative)])
        sentences.append(f"{r.task}: a change smaller than {_fmt_effect(max(nightly, r.min_effect), relative)} "
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


def _secondary_table(others: pd.DataFrame, multi_model: bool) -> list[Block]:
    """The task's non-headline metrics, one column each, value only."""
    if others.empty:
        return []
    metrics = sorted(others["metric"].astype(str).unique())
    hib = others.groupby("metric")["higher_is_better"].first()
    header = (["model"] if multi_model else []) + ["variant"] + [
        f"{m} {'↓' if (not _missing(hib.get(m)) and not bool(hib.get(m))) else '↑'}" for m in metrics]
    numeric = ([False] if multi_model else []) + [False] + [True] * len(metrics)
    rows = []
    for (model, quant, adapter), g in _sorted(others, _VARIANT).groupby(
            ["model", "quant", "adapter"], sort=False, dropna=False):
        values = dict(zip(g["metric"].astype(str), g["value"]))
        rows.append(([str(model)] if multi_model else []) + [variant_label(quant, adapter)]
                    + [fmt_num(values.get(m)) for m in metrics])
    return [Para("Other metrics (value only; ↑ higher is better, ↓ lower is better):"),
            Table(header, rows, numeric)]


def _memory_blocks(memory: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Memory")]
    if memory.empty:
        return blocks + [Para("No memory measurements.")]
    memory = _tidy(memory, MEMORY_COLUMNS)
    multi_model = memory["model"].nunique() > 1
    header = (["model"] if multi_model else []) + [
        "variant", "measured MiB", "quantized weights MiB", "quant state MiB", "unquantized MiB",
        "theory MiB", "ratio to baseline", "ratio to theory", "bits/weight measured vs theory",
        "load s", "eval s", "peak MiB"]
    numeric = ([False] if multi_model else []) + [False] + [True] * 11
    rows = []
    for r in _sorted(memory, _VARIANT).itertuples(index=False):
        d = r._asdict()
        measured, theory = d["measured_bits_per_weight"], d["theory_bits_per_weight"]
        bits = NA if _missing(measured) and _missing(theory) else f"{fmt_num(measured)} vs {fmt_num(theory)}"
        rows.append(([str(d["model"])] if multi_model else []) + [
            variant_label(d["quant"], d["adapter"]), fmt_mib(d["total_bytes"]),
            fmt_mib(d["quantized_weight_bytes"]), fmt_mib(d["quant_state_bytes"]),
            fmt_mib(d["unquantized_bytes"]), fmt_mib(d["theory_bytes"]), fmt_num(d["ratio_to_baseline"]),
            fmt_num(d["ratio_to_theory"]), bits, fmt_num(d["load_s"]), fmt_num(d["eval_s"]),
            fmt_mib(d["peak_bytes"])])
    blocks.append(Table(header, rows, numeric))
    blocks.append(Para("Measured MiB is the loaded model's total; theory MiB is what the format's nominal "
                       "bits per weight would cost. Ratios are measured/baseline and measured/theory."))
    return blocks


# ----------------------------------------------------------------------------- plots

def _png(fig: plt.Figure) -> bytes:
    """Encode and close a figure. No Software tag, so the same data gives the same bytes."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


def _placeholder_png(text: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)
    return _png(fig)


def _variant_colors(results: pd.DataFrame, multi_model: bool) -> dict[str, object]:
    """One colour per variant label, shared by both plots so a variant looks the same in each."""
    labels = list(dict.fromkeys(_plot_label(r, multi_model) for r in
                                _sorted(results[_VARIANT].drop_duplicates(), _VARIANT).itertuples(index=False)))
    # tab10 while it suffices; the default plan has 12 arms, and tab20 keeps them distinct up to 20
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _plot_label(r, multi_model: bool) -> str:
    label = variant_label(r.quant, r.adapter)
    return f"{_model_short(r.model)}: {label}" if multi_model else label


def _recovery_png(primary: pd.DataFrame, colors: dict[str, object], multi_model: bool) -> bytes:
    """Grouped bars: x = task, one bar per non-baseline variant, y = recovery %."""
    is_base = primary["quant"].eq(BASELINE) & primary["adapter"].map(_adapter).eq("")
    data = _sorted(primary[~is_base], ["task"] + _VARIANT)
    tasks = sorted(primary["task"].astype(str).unique())
    variants = [lab for lab in colors if lab in {_plot_label(r, multi_model) for r in data.itertuples(index=False)}]
    title = ("Recovery vs. baseline, primary metric per task\n"
             "(higher-is-better: value/baseline; perplexity / lower-is-better: baseline/value)")
    if not variants or data["recovery"].dropna().empty:
        return _placeholder_png("Recovery: no quantized variant has a baseline to compare against")

    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(min(16, max(6.5, 1.5 + len(tasks) * (0.55 * len(variants) + 0.9))), 4.8))
    recs = []
    for i, lab in enumerate(variants):
        xs, ys = [], []
        for t_i, task in enumerate(tasks):
            sel = data[(data["task"] == task)]
            sel = sel[[_plot_label(r, multi_model) == lab for r in sel.itertuples(index=False)]]
            if sel.empty or _missing(sel["recovery"].iloc[0]):
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
    return _png(fig)


def _memory_png(primary: pd.DataFrame, memory: pd.DataFrame, colors: dict[str, object],
                multi_model: bool) -> bytes:
    """One panel per task: x = total MiB of the variant, y = its primary metric value."""
    if memory.empty or "total_bytes" not in memory.columns:
        return _placeholder_png("Memory vs. score: no memory measurements")
    mem = (memory[_VARIANT + ["total_bytes"]].assign(adapter=memory["adapter"].map(_adapter))
           .drop_duplicates(_VARIANT))  # one point per variant even if the frame repeats a row
    joined = primary.assign(adapter=primary["adapter"].map(_adapter)).merge(mem, on=_VARIANT, how="left")
    tasks = sorted(joined["task"].astype(str).unique())
    ncols = min(len(tasks), 3)
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks):
        rows = _sorted(joined[joined["task"] == task], _VARIANT)
        metric = str(rows["metric"].iloc[0])
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("total memory (MiB)")
        ax.set_ylabel(f"{metric} ({'lower' if _lower_is_better(rows) else 'higher'} is better)")
        ax.grid(alpha=0.3)
        plotted = 0
        for k, r in enumerate(rows.itertuples(index=False)):
            if _missing(r.total_bytes) or _missing(r.value):
                continue
            x, y = float(r.total_bytes) / MIB, float(r.value)
            lab = _plot_label(r, multi_model)
            yerr = None if _missing(r.stderr) else float(r.stderr)
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
    return _png(fig)


# ----------------------------------------------------------------------------- adapters

@dataclass
class Section:
    """Extra report content from another stage: blocks, the PNGs they show, CSV files."""
    blocks: list
    images: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    banners: list = field(default_factory=list)  # sentences the report opens with (e.g. a pre-quantized baseline)


TRAINING_PNG, TRAIN_MEMORY_PNG = "training_curves.png", "train_memory_vs_score.png"


def adapter_section(frames: dict[str, pd.DataFrame], decision_table: pd.DataFrame, verdict: str,
                    memory: pd.DataFrame) -> Section | None:
    """LoRA / QLoRA: what each adapter arm regained, what merging costs, the decision table."""
    reg, merges, train = frames["regained"], frames["merge"], frames["training"]
    if reg.empty:
        return None
    blocks: list = [Heading(2, "Adapters: what LoRA / QLoRA win back"),
                    Para("lost = baseline - the arm's format without adapter; regained = (arm - that format) / "
                         "lost, oriented so that lower perplexity counts as better. Every verdict is the same paired "
                         "test as the accuracy table (exact McNemar / paired t on log-likelihoods): 'lost' is the "
                         "format against the baseline, 'vs reference' the arm against its format, 'vs baseline' "
                         "the arm against the float baseline. A share regained is shown only where the format's "
                         "loss is significant and meaningful ('worse'); arms trained on the float base have "
                         "nothing to regain and show their gain against the baseline. On an untouched task (not "
                         "the adapter's training domain) the change against the reference measures forgetting.")]
    for task, g in reg.groupby("task", sort=True):
        metric = str(g["metric"].iloc[0])
        blocks.append(Heading(3, f"{task}: {metric}" + (" (untouched by training: forgetting)" if g["untouched"].all() else "")))
        rows = []
        for r in g.sort_values("arm").itertuples(index=False):
            d = r._asdict()
            if r.untouched:
                note = f"forgetting: {fmt_num(r.delta_vs_reference, signed=True)} vs {r.reference_arm}"
            elif d.get("float_base") is True:
                note = f"trained on the float base: {d.get('vs_baseline_verdict', NA)} vs baseline"
            else:
                note = ""
            regained = (fmt_pct(r.regained) if r.lost_significant else
                        f"nothing to regain (loss {d.get('lost_verdict', 'undefined')})")
            rows.append([r.arm, fmt_value_stderr(r.value, r.stderr), r.reference_arm or NA,
                         fmt_num(r.reference_value), fmt_num(r.baseline_value),
                         f"{fmt_num(r.lost, signed=True)} ({d.get('lost_verdict', NA)})", regained,
                         str(d.get("regained_verdict", NA)),
                         f"{fmt_num(r.delta_vs_baseline, signed=True)} ({d.get('vs_baseline_verdict', NA)})", note])
        blocks.append(Table(["arm", metric, "reference", "reference value", "baseline", "lost", "regained",
                             "vs reference", "Δ vs baseline", "note"], rows,
                            [False, True, False, True, True, True, True, False, True, False]))
    if not merges.empty:
        blocks += [Heading(3, "Merge paths"),
                   Para("Each merged arm against the same adapter unmerged on the same 4-bit base: merging into "
                        "the dequantized float base should cost nothing; re-quantizing the merged weights is the "
                        "deploy path that can lose the fine-tune.")]
        rows = [[r.arm, r.task, r.metric, fmt_num(r.unmerged_value), fmt_num(r.merged_value),
                 fmt_num(r.merge_delta, signed=True), fmt_mib(r.merged_bytes)]
                for r in merges.sort_values(["arm", "task"]).itertuples(index=False)]
        blocks.append(Table(["arm", "task", "metric", "unmerged", "merged", "merge Δ", "merged MiB"], rows,
                            [False, False, False, True, True, True, True]))
    images = {}
    if not decision_table.empty:
        score_cols = [c for c in decision_table.columns if ":" in c and c.split(":")[1] not in ("hib", "untouched")]
        header = ["arm", "trained on", "trainable params", "adapter MiB", "tokens", "s/step", "tokens/s", "train s",
                  "peak training MiB", "of which idle process MiB", "converged"] + score_cols
        rows = [[r["arm"], r["train_quant"], f"{int(r['trainable_params']):,}", fmt_mib(r["adapter_bytes"]),
                 fmt_int(r.get("tokens")), fmt_num(r["s_per_step"]), fmt_num(r["tokens_per_s"]), fmt_num(r["train_s"]),
                 fmt_mib(r["peak_train_bytes"]), fmt_mib(r["idle_bytes"]) if r["idle_bytes"] else NA,
                 "no: held-out loss still falling" if r.get("not_converged") else "yes"]
                + [fmt_num(r[c]) for c in score_cols]
                for _, r in decision_table.iterrows()]
        blocks += [Heading(3, "LoRA vs QLoRA: decision table"),
                   Para("Each adapter evaluated on the base it was trained on. Peak training memory is CUDA max "
                        "allocated on GPU; on CPU it is the peak RSS of the training process (each adapter trains "
                        "in a fresh process), of which 'idle' is that process before loading the model "
                        "(Python, torch and the other libraries). Arms compared are trained on the same tokens "
                        "in the same order (checked by a hash of the blocks trained on); s/step and tokens/s "
                        "exclude the held-out evaluation passes. 'converged: no' means the held-out loss fell "
                        "by more than 1% over the last 3 evaluations: the budget was too small to rank the arms "
                        "at convergence."),
                   Table(header, rows, [False, False] + [True] * (len(header) - 3) + [False])]
        if verdict:
            blocks.append(Para("Verdict: " + verdict))
    seeds = frames.get("seeds", pd.DataFrame())
    if not seeds.empty and (seeds["seeds"] > 1).any():
        blocks += [Heading(3, "Training noise: spread across seeds"),
                   Para("Arms trained with several seeds (seeds: [...]): the score's mean with its 95% t interval "
                        "over seeds, min..max, and the regained share's range.")]
        rows = [[r.arm, r.task, r.metric, str(r.seeds), fmt_num(r.value_mean),
                 f"[{fmt_num(r.value_lo)}, {fmt_num(r.value_hi)}]", f"{fmt_num(r.value_min)} .. {fmt_num(r.value_max)}",
                 f"{fmt_pct(r.regained_min)} .. {fmt_pct(r.regained_max)}" if not _missing(r.regained_mean) else NA]
                for r in seeds[seeds["seeds"] > 1].itertuples(index=False)]
        blocks.append(Table(["arm", "task", "metric", "seeds", "mean", "95% interval", "min .. max", "regained"],
                            rows, [False, False, False, True, True, True, True, True]))
    if not train.empty and "memory" in train and train["memory"].map(bool).any():
        blocks += _train_memory_blocks(train)
    if not train.empty:
        images[TRAINING_PNG] = _training_png(train)
        blocks.append(Image("Training and held-out loss per adapter", TRAINING_PNG))
    images[TRAIN_MEMORY_PNG] = _train_memory_png(reg, train, memory)
    blocks.append(Image("Peak training memory vs score per arm", TRAIN_MEMORY_PNG))
    files = {"adapters.csv": reg.to_csv(index=False).encode("utf-8"),
             "training.csv": train.drop(columns=["losses", "heldout", "memory"], errors="ignore").to_csv(index=False).encode("utf-8")}
    if not seeds.empty:
        files["adapter_seeds.csv"] = seeds.to_csv(index=False).encode("utf-8")
    return Section(blocks, images, files)


def _train_memory_blocks(train: pd.DataFrame) -> list:
    """Training memory by part against the analytic model (qeval.models.memory.estimate), and the
    projection of the measured model to common GPU sizes (`qeval plan-memory`)."""
    import json

    from qeval.train.estimate import Shape, fits_table

    rows = []
    for t in train.itertuples(index=False):
        m = t.memory or {}
        if not m:
            continue
        pred = m.get("predicted") or {}
        err = m.get("prediction_error")
        rows.append([str(t.adapter), str(t.train_quant), fmt_mib(m.get("load_peak")), fmt_mib(m.get("train_peak")),
                     fmt_mib(m.get("runtime")) if m.get("runtime") else NA,
                     fmt_mib(m.get("process")) if m.get("process") else NA,
                     fmt_mib(m.get("weights")), fmt_mib(m.get("adapter_optimizer")), fmt_mib(m.get("gradients")),
                     fmt_mib(m.get("activations")), fmt_mib(pred.get("activations")),
                     fmt_mib(pred.get("total")), NA if err is None else f"{err:+.1%}"])
    out = [Heading(3, "Training memory by part, measured and predicted"),
           Para("Each adapter trains in a fresh process; load and training are measured apart (a 4-bit load on "
                "CPU reads the float weights to quantize them: that high-water mark is not training memory). On CPU "
                "the peak is the process's peak RSS (Linux VmHWM, reset per phase); the training process unmaps every freed block of 1 MiB or more (glibc "
                "mallopt), so RSS follows what is live, and a quantized base keeps no view of the weights file. On "
                "CUDA max allocated is reset per phase. runtime = RSS after importing the training libraries, "
                "before the load; process = what the load left besides the model (tokenizer, data); weights = the "
                "loaded model; adapter + optimizer = trainable weights + AdamW states; activations = the rest of "
                "the training peak (held-out passes included). Predicted: qeval.models.memory.estimate from the model's "
                "config plus the measured runtime and process (error = predicted / measured - 1)."),
           Table(["adapter", "trained on", "load peak MiB", "training peak MiB", "runtime", "process", "weights",
                  "adapter + optimizer", "gradients", "activations", "predicted activations", "predicted MiB", "error"],
                 rows, [False, False] + [True] * 11)]
    t = train.iloc[0]
    cfg = Path(str(t.get("model_path", ""))) / "config.json"
    if cfg.is_file():
        shape = Shape.from_config(json.loads(cfg.read_text()))
        batch, seq = int(t.get("batch_size") or 1), int(t.get("seq_len") or 512)
        proj = []
        for gpu in (16, 24, 48, 80):
            for r in fits_table(shape, gpu, batch, seq):
                proj.append([f"{gpu} GiB", r["method"], fmt_num(r["weights_gib"]), fmt_num(r["total_gib"]),
                             "yes" if r["fits"] else "no"])
        out += [Heading(3, "Projected to GPUs (bf16, this model)"),
                Para(f"`qeval plan-memory --config {cfg.parent} --batch-size {batch} --seq-len {seq}`: predicted peak "
                     "GiB of LoRA, QLoRA (NF4 + double quant) and a full fine-tune (fp32 master weights) per GPU size."),
                Table(["GPU", "method", "weights GiB", "total GiB", "fits"], proj, [False, False, True, True, False])]
    return out


def _training_png(train: pd.DataFrame) -> bytes:
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, t in enumerate(train.itertuples(index=False)):
        color = plt.get_cmap("tab10")(i % 10)
        steps, loss = zip(*t.losses) if len(t.losses) else ((), ())
        ax.plot(steps, loss, color=color, alpha=0.45, lw=1, label=f"{t.adapter} ({t.train_quant}) train")
        hs, hl = zip(*t.heldout) if len(t.heldout) else ((), ())
        late = " (not converged)" if getattr(t, "not_converged", False) else ""
        ax.plot(hs, hl, color=color, marker="o", lw=2, label=f"{t.adapter} held-out{late}")
    ax.set_xlabel("step (the same tokens per step for every arm)")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Training loss (thin) and held-out loss (markers)", fontsize=10)
    return _png(fig)


def _train_memory_png(reg: pd.DataFrame, train: pd.DataFrame, memory: pd.DataFrame) -> bytes:
    """x = peak training memory of the arm's adapter (0 for arms with no training), y = score on
    each task; one panel per task."""
    peak = {t.adapter: float(t.peak_train_bytes) / MIB for t in train.itertuples(index=False)}
    tasks = sorted(reg["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.9), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        g = reg[reg.task == task]
        metric = str(g["metric"].iloc[0])
        for k, r in enumerate(g.sort_values("arm").itertuples(index=False)):
            base_adapter = str(r.adapter).split("@")[0]
            x = peak.get(base_adapter, math.nan)
            ax.errorbar([x], [r.value], yerr=None if _missing(r.stderr) else r.stderr, fmt="o", capsize=3)
            ax.annotate(r.arm, (x, r.value), textcoords="offset points", xytext=(6, 6 if k % 2 == 0 else -11), fontsize=8)
        refs = g.drop_duplicates("reference_arm")
        for r in refs.itertuples(index=False):
            if not _missing(r.reference_value):
                ax.axhline(r.reference_value, ls=":", lw=1, color="grey")
                ax.annotate(f"{r.reference_arm} (no training)", (0.01, r.reference_value), xycoords=("axes fraction", "data"),
                            fontsize=7, color="grey", va="bottom")
        if not g.empty and not _missing(g["baseline_value"].iloc[0]):
            ax.axhline(g["baseline_value"].iloc[0], ls="--", lw=1, color="black")
            ax.annotate("baseline (no training)", (0.01, g["baseline_value"].iloc[0]), xycoords=("axes fraction", "data"),
                        fontsize=7, va="bottom")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("peak training memory (MiB)")
        ax.set_ylabel(f"{metric} ({'higher' if bool(g['higher_is_better'].iloc[0]) else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.2)
    fig.suptitle("Peak training memory vs score per arm (lines: arms without training)", fontsize=11)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------- divergence

KL_PNG = "kl_vs_delta.png"


def divergence_section(div: pd.DataFrame) -> Section | None:
    """KL / top-1 agreement next to flips and McNemar p: the damage accuracy alone hides."""
    if div.empty or "kl_mean" not in div.columns:
        return None
    rows = []
    for r in _sorted(div.assign(adapter=div["adapter"].fillna("")), _VARIANT).itertuples(index=False):
        d = r._asdict()
        flips = NA if _missing(d.get("flips")) else (
            f"{int(d['flips'])} ({int(d['flips_right_to_wrong'])} r→w, {int(d['flips_wrong_to_right'])} w→r; "
            f"{fmt_pct(d['flip_rate'])})")
        delta = NA if _missing(d.get("delta")) else (
            f"{fmt_num(d['delta'], signed=True)} [{fmt_num(d['delta_lo'], signed=True)}, {fmt_num(d['delta_hi'], signed=True)}]")
        rows.append([variant_label(d["quant"], d["adapter"]), fmt_int(d["tokens"]), fmt_num(d["kl_mean"]),
                     fmt_num(d["kl_p90"]), fmt_num(d["kl_p99"]), fmt_pct(d["top1_agree"]), fmt_ratio(d["ppl_ratio"]),
                     str(d.get("task") or NA), flips, fmt_num(d.get("mcnemar_p")), delta,
                     NA if _missing(d.get("verdict")) else str(d["verdict"])])
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
        return _placeholder_png("KL vs accuracy delta: no variant with both KL and a right/wrong task")
    d = _sorted(d.assign(adapter=d["adapter"].fillna("")), _VARIANT)
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
    return _png(fig)


# ----------------------------------------------------------------------------- history

HISTORY_PNG = "history.png"


def history_section(hist: pd.DataFrame) -> Section | None:
    """Score per variant and task across nightly runs; version changes marked."""
    if hist.empty or hist["run_id"].nunique() < 2:
        return None
    blocks = [Heading(2, "History (nightly runs)"),
              Para("Each variant keeps its identity across library upgrades (the result key changes, the variant "
                   "does not), so a column is one variant through versions. † marks a run whose library "
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
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes.flat[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------- writing

def render(results: pd.DataFrame, memory: pd.DataFrame, meta: dict, out_dir: Path,
           extra: Iterable[Section | None] = (), summary: Section | None = None) -> list[Path]:
    """Render report files into out_dir (created if missing) and return the paths written.

    Writes results.csv, memory.csv, recovery.png, memory_vs_score.png, report.md and report.html.
    Only formats the frames (see the module docstring for their columns); NaN shows as 'n/a'. An
    empty `results` frame still yields every file, with a report that says there are no results.
    `summary` (qeval.report.summary) opens the report, right under the title, and carries the
    banners; without it the banners of `extra` open it under "Read this first".
    """
    out_dir = Path(out_dir)
    extras = [e for e in extra if e is not None]
    meta = dict(meta or {})
    results = results if results is not None else pd.DataFrame()
    memory = memory if memory is not None else pd.DataFrame()
    if not results.empty:
        missing = [c for c in _IDENTITY if c not in results.columns]
        if missing:
            raise ValueError(f"results frame lacks columns {missing}; expected {RESULT_COLUMNS}")
    if not memory.empty:
        missing = [c for c in _VARIANT if c not in memory.columns]
        if missing:
            raise ValueError(f"memory frame lacks columns {missing}; expected {MEMORY_COLUMNS}")

    results = _sorted(_tidy(results, RESULT_COLUMNS), ["model", "task", "metric", "quant", "adapter"])
    memory = _sorted(_tidy(memory, MEMORY_COLUMNS), _VARIANT)
    title = str(meta.get("title") or "qeval quantization report")

    # Render everything in memory first: a failure below then writes nothing at all.
    blocks = _meta_blocks(meta, results, memory)
    banners = [b for section in extras for b in section.banners]
    if summary is not None:  # the one screen a reader needs first; the run's provenance after it
        blocks = blocks[:1] + summary.blocks + [Heading(2, "About this run")] + blocks[1:]
    elif banners:
        blocks += [Heading(2, "Read this first"), Bullets(banners)]
    if results.empty:
        blocks.append(Para("No results: the store holds no evaluated cells for this selection."))
        images = {RECOVERY_PNG: _placeholder_png("No results"), MEMORY_PNG: _placeholder_png("No results")}
        blocks += _memory_blocks(memory)
    else:
        multi_model = results["model"].nunique() > 1
        primary = _primary_rows(results)
        colors = _variant_colors(results, multi_model)
        images = {RECOVERY_PNG: _recovery_png(primary, colors, multi_model),
                  MEMORY_PNG: _memory_png(primary, memory, colors, multi_model)}
        blocks += _accuracy_blocks(results)
        blocks += _memory_blocks(memory)
        for section in extras:
            blocks += section.blocks
            images.update(section.images)
        blocks += [Heading(2, "Plots"),
                   Image("Recovery of each task's primary metric per variant", RECOVERY_PNG),
                   Image("Total memory vs. primary metric per task", MEMORY_PNG)]

    files = {
        RESULTS_CSV: results.to_csv(index=False).encode("utf-8"),
        MEMORY_CSV: memory.to_csv(index=False).encode("utf-8"),
        **({name: data for section in extras for name, data in section.files.items()} if not results.empty else {}),
        **images,
        REPORT_MD: to_markdown(blocks).encode("utf-8"),
        REPORT_HTML: to_html(blocks, images, title).encode("utf-8"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        atomic_write(out_dir / name, data)
        written.append(out_dir / name)
    return written
