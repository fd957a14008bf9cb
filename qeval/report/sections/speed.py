"""Report section: speed per format and arm, and the format landscape over accuracy, memory and decode
speed together, with the formats another beats on all three marked.

The numbers are the run's speed records (`qeval.models.speed`, one per arm, measured in the job that
evaluated it); the judgements are `qeval.stats.speed`'s. A format whose compute is simulated is not
measured (`qeval.run.cells.speed_cell`; stores from before that show its float speed with the mark
"simulated: not a kernel's speed") and takes no part in the dominance or the fastest-within-margin
sentence: its float compute says nothing about the format's kernel (nor its memory).
"""
from __future__ import annotations

import math

import pandas as pd

from qeval.report.doc import Heading, Para, Section, Table
from qeval.report.fmt import BASELINE, NA, fmt_mib, fmt_num, fmt_pct, missing
from qeval.report.frames import declared, primary_rows
from qeval.report.sections.base import ReportData, ReportSection, register
from qeval.report.sections.formats import landscape_frame
from qeval.stats.margin import NOT_TESTED
from qeval.stats.speed import dominated, fastest_within, not_beyond
from qeval.store.record import SIMULATED_SPEED

SPEED_CSV = "speed.csv"


def margin_verdicts(results: pd.DataFrame) -> dict[str, dict[str, str]]:
    """{format: {task: its verdict against the margin}} for the formats without an adapter (the
    paired frame's `margin_verdict` of each task's primary metric)."""
    if results.empty or "margin_verdict" not in results.columns:
        return {}
    prim = primary_rows(results)
    prim = prim[(prim["adapter"].fillna("") == "") & (prim["quant"] != BASELINE)]
    out: dict[str, dict[str, str]] = {}
    for r in prim.to_dict("records"):
        v = r.get("margin_verdict")
        out.setdefault(r["quant"], {})[r["task"]] = NOT_TESTED if missing(v) else str(v)
    return out


def format_speed(speed: pd.DataFrame) -> pd.DataFrame:
    """The speed rows of plain formats (no adapter)."""
    if speed.empty:
        return speed
    return speed[speed["adapter"].fillna("") == ""]


def real_decode(speed: pd.DataFrame) -> dict[str, float]:
    """{format: decode tokens/s at batch 1} for formats computed by a real kernel."""
    fs = format_speed(speed)
    return {r["quant"]: float(r["decode_tok_s_b1"]) for r in fs.to_dict("records") if r["kernel"] != "simulated"}


def fastest_sentence(speed: pd.DataFrame, results: pd.DataFrame) -> str:
    """"Fastest format whose loss is within the margin: X (N tokens/s decode at batch 1; the baseline M)"."""
    if speed.empty:
        return ""
    decode = {q: s for q, s in real_decode(speed).items() if q != BASELINE}
    best = fastest_within(decode, margin_verdicts(results))
    base = real_decode(speed).get(BASELINE, math.nan)
    ref = "" if missing(base) else f"; the baseline '{BASELINE}' {fmt_num(base, 3)}"
    if best is not None:
        return (f"Fastest format whose loss is within the margin: {best} ({fmt_num(decode[best], 3)} tokens/s "
                f"decode at batch 1{ref}; simulated formats not counted).")
    if not decode:
        return ""
    # none is shown within on every task (small suites rarely can): the weaker reading, said as such
    near = fastest_within(decode, margin_verdicts(results), rule=not_beyond)
    text = ("Fastest format whose loss is within the margin: no format qualifies (no real-kernel format's loss "
            "is shown within the margin on every task)")
    if near is not None:
        text += (f"; fastest with no task's loss shown beyond the margin (the rest 'cannot tell'): {near} "
                 f"({fmt_num(decode[near], 3)} tokens/s decode at batch 1{ref})")
    return text + "."


def speed_cell(speed: pd.DataFrame, quant: str) -> str:
    """The summary's speed column for one format: decode tokens/s at batch 1, or the simulated mark
    (a simulated format is not measured: the registry says so; an older store's record says so too)."""
    if declared(quant)["kernel"] == "simulated":
        return SIMULATED_SPEED
    fs = format_speed(speed)
    row = fs[fs["quant"] == quant] if not fs.empty else fs
    if row.empty:
        return NA
    r = row.iloc[0]
    if r["kernel"] == "simulated":
        return SIMULATED_SPEED
    return fmt_num(r["decode_tok_s_b1"], 3)


def speed_landscape(land: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """Per format: mean recovery, MiB and decode speed, and which real-kernel formats dominate it."""
    fs = format_speed(speed)
    if land.empty or fs.empty:
        return pd.DataFrame()
    df = land[["model", "quant", "mean_recovery", "total_bytes", "kernel"]].merge(
        fs.drop(columns=["kernel"]), on=["model", "quant"], how="left")
    # a real format without a speed record has nothing to show; a simulated one is listed, unmeasured
    df = df[df["decode_tok_s_b1"].notna() | (df["kernel"] == "simulated")]
    df = df.assign(kernel=[("simulated" if m else k) for k, m in zip(df["kernel"], df["mark"] == SIMULATED_SPEED)])
    df = df.assign(mean_recovery=df["mean_recovery"].where(df["quant"] != BASELINE, 1.0))
    marks = []
    for model, g in df.groupby("model", sort=False):
        real = g[g["kernel"] != "simulated"]
        dom = dominated({q: (float(a), float(b), float(s)) for q, a, b, s in
                         zip(real["quant"], real["mean_recovery"], real["total_bytes"], real["decode_tok_s_b1"])})
        marks += [(model, q, ", ".join(dom.get(q, []))) for q in g["quant"]]
    by = {(m, q): d for m, q, d in marks}
    return df.assign(dominated_by=[by.get((m, q), "") for m, q in zip(df["model"], df["quant"])])


def speed_section(speed: pd.DataFrame, land: pd.DataFrame, results: pd.DataFrame) -> Section | None:
    if speed.empty:
        return None
    multi = speed["model"].nunique() > 1
    rows = []
    for r in speed.to_dict("records"):
        rows.append(([str(r["model"])] if multi else []) + [
            r["quant"], r["adapter"] or "", fmt_num(r["prefill_tok_s"], 3), fmt_num(r["decode_tok_s_b1"], 3),
            fmt_num(r["decode_tok_s_b8"], 3), fmt_num(r["ttft_s_b1"], 3), fmt_mib(r["peak_bytes"]), r["mark"]])
    first = speed.iloc[0]
    blocks = [Heading(2, "Speed per format"),
              Para(f"Speed measured on: {'; '.join(sorted(set(speed['identity'])))} ({first['device']})."),
              Para(f"Measured in the job that evaluated each arm (no extra load), {first['settings']}: prefill tokens/s at batch {first['prefill_batch']} (the suite's), decode "
                   "tokens/s at batch 1 and 8 (median step after the first token), time to first token at batch 1, "
                   f"peak memory while generating ({first['peak_kind']}). A simulated format computes in float: "
                   f"its speed is not measured (older stores: marked '{SIMULATED_SPEED}'). Arms that run the "
                   "same kernels (the format as loaded, an unmerged adapter's shape: not the weights' values) "
                   "share one measurement, named in the note. Timings on a shared machine move from run to run."),
              Table((["model"] if multi else []) + ["format", "adapter", "prefill tok/s", "decode tok/s b1",
                                                    "decode tok/s b8", "TTFT s", "peak MiB", "note"],
                    rows, ([False] if multi else []) + [False, False, True, True, True, True, True, False])]
    sl = speed_landscape(land, speed)
    if not sl.empty:
        lrows = [([str(r["model"])] if multi else []) + [
            r["quant"], fmt_pct(r["mean_recovery"]), fmt_mib(r["total_bytes"]),
            SIMULATED_SPEED if r["kernel"] == "simulated" else fmt_num(r["decode_tok_s_b1"], 3),
            ("dominated by " + r["dominated_by"]) if r["dominated_by"] else
            ("not compared (simulated)" if r["kernel"] == "simulated" else "")]
            for r in sl.to_dict("records")]
        blocks += [Heading(3, "Accuracy, memory and decode speed together"),
                   Para("A format is dominated when another real-kernel format has at least its mean recovery, "
                        "at most its memory and at least its decode speed (batch 1), and is better on one of them. "
                        "Simulated formats take no part: neither their memory nor their speed is a kernel's."),
                   Table((["model"] if multi else []) + ["format", "mean recovery", "MiB", "decode tok/s b1",
                                                         "dominated"], lrows,
                         ([False] if multi else []) + [False, True, True, True, False])]
    sentence = fastest_sentence(speed, results)
    if sentence:
        blocks.append(Para(sentence))
    return Section(blocks, files={SPEED_CSV: speed.to_csv(index=False).encode("utf-8")})


def _frame(d: ReportData) -> tuple | None:
    if d.speed.empty:
        return None
    land = landscape_frame(d.memory, d.div, d.results, list(d.records)) if d.records else pd.DataFrame()
    return d.speed, land, d.results


register(ReportSection("speed", 55, _frame, lambda f: speed_section(*f)))
