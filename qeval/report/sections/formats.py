"""Report section: the format landscape across backends (one table, one Pareto picture).

`landscape_frame` joins what other stages already derived -- the memory frame (bytes, bits per
weight), the divergence frame (KL, top-1 agreement) and the paired results (each task's delta with
its interval, recovery) -- with what the format registry declares (backend, real or simulated
compute, save / LoRA support) and, for simulated GGUF formats, the packed bytes their quantizer
produced. Nothing is recomputed here. `formats_section` renders it, with two banners: a baseline
whose weights already sit on a quantization grid (`qeval.quant.detect`), and formats whose compute is
simulated.
"""
from __future__ import annotations

import math

import pandas as pd

from qeval.quant.backend import backend_colour, backend_colours
from qeval.report.doc import Bullets, Heading, Image, Para, Section, Table
from qeval.report.fmt import BASELINE, NA, fmt_mib, fmt_num, fmt_pct, missing
from qeval.report.frames import declared
from qeval.report.plots import plt, png
from qeval.report.sections.base import ReportData, ReportSection, register
from qeval.store.record import Record

PARETO_PNG = "formats_pareto.png"
LANDSCAPE_CSV = "formats.csv"


def landscape_frame(memory: pd.DataFrame, div: pd.DataFrame, results: pd.DataFrame, records: list[Record]) -> pd.DataFrame:
    """One row per (model, format) without an adapter: bits (theory, measured in memory, packed),
    bytes, load+quantize time, KL mean/p99, top-1 agreement, mean recovery and each task's primary
    delta with its interval (columns `delta:<task>`, `lo:<task>`, `hi:<task>`)."""
    if memory.empty:
        return pd.DataFrame()
    mem = memory[memory["adapter"].fillna("") == ""]
    packed: dict[tuple, int] = {}
    types: dict[tuple, str] = {}  # GGUF: the share of quantized weights per ggml type (mixes, fallbacks)
    for r in records:
        if not r.variant.adapter:
            packed[(r.variant.model, r.variant.quant)] = r.footprint.packed_bytes
            census = r.footprint.packed_types or {}
            total = sum(census.values())
            types[(r.variant.model, r.variant.quant)] = ", ".join(
                f"{t} {100 * n / total:.1f}%" for t, n in sorted(census.items(), key=lambda kv: -kv[1])) if total else ""
    prim = results[results["primary"].fillna(False).astype(bool) & (results["adapter"].fillna("") == "")] \
        if not results.empty else results
    rows = []
    for m in mem.itertuples(index=False):
        row = {"model": m.model, "quant": m.quant, **declared(m.quant),
               "theory_bits": m.theory_bits_per_weight, "measured_bits": m.measured_bits_per_weight,
               "total_bytes": m.total_bytes, "ratio_to_baseline": m.ratio_to_baseline, "load_s": m.load_s}
        pb = packed.get((m.model, m.quant), 0)
        qp = (m.theory_bytes - m.unquantized_bytes) * 8 / m.theory_bits_per_weight \
            if not missing(m.theory_bits_per_weight) and m.theory_bits_per_weight else math.nan
        row["packed_bits"] = pb * 8 / qp if pb and qp == qp and qp else math.nan
        row["tensor_types"] = types.get((m.model, m.quant), "")
        d = div[(div["model"] == m.model) & (div["quant"] == m.quant) & (div["adapter"].fillna("") == "")] \
            if not div.empty else div
        # the baseline against itself: KL 0 and full agreement by definition
        same = {"kl_mean": 0.0, "kl_p99": 0.0, "top1_agree": 1.0} if m.quant == BASELINE else {}
        for c in ("kl_mean", "kl_p99", "top1_agree"):
            row[c] = float(d[c].iloc[0]) if len(d) and c in d.columns else same.get(c, math.nan)
        mine = prim[(prim["model"] == m.model) & (prim["quant"] == m.quant)] if not prim.empty else prim
        row["mean_recovery"] = float(mine["recovery"].mean()) if len(mine) else math.nan
        for t in mine.itertuples(index=False):
            t = t._asdict()
            row[f"delta:{t['task']}"] = t.get("delta")
            row[f"lo:{t['task']}"] = t.get("delta_lo", math.nan)
            row[f"hi:{t['task']}"] = t.get("delta_hi", math.nan)
        rows.append(row)
    out = pd.DataFrame(rows)
    out["_base"] = out["quant"] != BASELINE
    return out.sort_values(["model", "_base", "backend", "theory_bits", "quant"], ascending=[True, True, True, False, True],
                           kind="stable").drop(columns="_base").reset_index(drop=True)


def _delta(row: dict, task: str) -> str:
    d = row.get(f"delta:{task}")
    if missing(d):
        return NA
    lo, hi = row.get(f"lo:{task}"), row.get(f"hi:{task}")
    ci = "" if missing(lo) or missing(hi) else f" [{fmt_num(lo, signed=True)}, {fmt_num(hi, signed=True)}]"
    return f"{fmt_num(d, signed=True)}{ci}"


def _yes(v) -> str:
    return NA if v is None else ("yes" if v else "no")


def formats_section(land: pd.DataFrame, banners: list[str]) -> Section | None:
    """The landscape table and the Pareto picture (when there are two formats or more), and the
    banners the report opens with; None when there is nothing to show."""
    if land.empty or len(land) < 2:
        return Section([], banners=list(banners)) if banners else None
    tasks = sorted(c.split(":", 1)[1] for c in land.columns if c.startswith("delta:"))
    multi = land["model"].nunique() > 1
    header = (["model"] if multi else []) + [
        "format", "backend", "compute", "bits/w theory", "bits/w in memory", "bits/w packed", "MiB",
        "× baseline", "load+quantize s", "KL mean", "KL p99", "top-1 agree", "mean recovery",
        *[f"Δ {t} [95% CI]" for t in tasks], "save", "LoRA"]
    rows = []
    for r in land.to_dict("records"):
        rows.append(([str(r["model"])] if multi else []) + [
            r["quant"], str(r["backend"]), str(r["kernel"]), fmt_num(r["theory_bits"]), fmt_num(r["measured_bits"]),
            fmt_num(r["packed_bits"]), fmt_mib(r["total_bytes"]), fmt_num(r["ratio_to_baseline"]), fmt_num(r["load_s"]),
            fmt_num(r["kl_mean"]), fmt_num(r["kl_p99"]), fmt_pct(r["top1_agree"]), fmt_pct(r["mean_recovery"]),
            *[_delta(r, t) for t in tasks], _yes(r["can_save"]), _yes(r["lora_trainable"])])
    numeric = ([False] if multi else []) + [False, False, False] + [True] * 10 + [False] * len(tasks) + [False, False]
    sim = land[land["kernel"] == "simulated"]["quant"].tolist()
    blocks = [Heading(2, "Format landscape across backends")]
    notes = []
    if sim:
        notes.append("Simulated compute (" + ", ".join(sim) + "): the numbers (KL, accuracy) are the format's, "
                     "the memory is not. GGUF types are quantized and dequantized with gguf.quants (exact "
                     "llama.cpp numerics; the K-quants by llama.cpp's own ggml) and computed in float; 'bits/w packed' is what the quantizer's output "
                     "takes, as in a .gguf file. torchao's intN weight-only stores one code per int8 byte on this "
                     "CPU build (no packed kernel): 'in memory' is that, 'theory' what a packed kernel would hold.")
        if any(str(q).startswith("gptq:") for q in sim):
            notes.append("GPTQ: quantized by gptqmodel (isolated venv) on the plan's calibration text; qeval "
                         "dequantizes its packed checkpoint and computes in float; 'bits/w packed' is the "
                         "checkpoint's qweight + qzeros + scales + g_idx.")
    mixed = [f"{r['quant']}: {r['tensor_types']}" for r in land.to_dict("records") if r.get("tensor_types")]
    if mixed:
        notes.append("GGUF types per tensor (share of the quantized weights; llama.cpp's mixes, and rows whose "
                     "length is not a multiple of a type's block falling back as llama-quantize does): "
                     + "; ".join(mixed))
    if notes:
        blocks.append(Bullets(notes))  # plain text: the renderer escapes markup
    blocks += [
        Para("One row per format, no adapter. Bits per quantized linear weight: theory from the format's "
             "arithmetic, measured from the loaded model's storage (scales and zero points included). KL is "
             "KL(baseline || format) per token on the divergence task; Δ is each task's primary metric minus the "
             "baseline's, with its paired 95% interval. Real compute: the model holds the format's own storage "
             "and the backend computes from it (on CPU, bitsandbytes and quanto dequantize per forward)."),
        Table(header, rows, numeric),
        Image("Bits per weight vs KL and vs mean recovery, per backend (hollow: simulated compute)", PARETO_PNG)]
    csv = land.to_csv(index=False).encode("utf-8")
    return Section(blocks, {PARETO_PNG: _pareto_png(land)}, {LANDSCAPE_CSV: csv}, banners=list(banners))


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (x, y, label) points no other point beats on both (lower x and lower y), by x."""
    front, best = [], math.inf
    for x, y, lab in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y, lab))
            best = y
    return front


def _pareto_png(land: pd.DataFrame) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    kls = [v for v in land["kl_mean"] if not missing(v) and v > 0]
    floor = min(kls) / 10 if kls else 1e-6  # KL exactly 0 is drawn here, labelled, on the log axis
    for ax, col, label in ((axes[0], "kl_mean", "KL(baseline || format), mean per token (log)"),
                           (axes[1], "mean_recovery", "mean recovery of the primary metrics (%)")):
        pts = []
        for r in land.to_dict("records"):
            if r["quant"] == BASELINE and col == "kl_mean":
                continue  # KL against itself: nothing to show
            x, y = r["theory_bits"], r[col]
            if r["quant"] == BASELINE:
                x = r["measured_bits"] if not missing(r["measured_bits"]) else 32.0
            if missing(x) or missing(y):
                continue
            name = r["quant"]
            if col == "mean_recovery":
                y = 100 * y
            elif y <= 0:
                y, name = floor, f"{name} (KL 0)"
            color = backend_colour(r["backend"])  # declared by the backend (qeval.quant.backend)
            hollow = r["kernel"] == "simulated"
            ax.scatter([x], [y], s=45, marker="o", facecolors="none" if hollow else color, edgecolors=color, zorder=3)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            pts.append((x, y if col == "kl_mean" else -y, r["quant"]))
        front = pareto_front(pts)
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] if col == "kl_mean" else -p[1] for p in front], "--", color="gray",
                    lw=1, zorder=2, label="Pareto front")
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 3, 4, 5, 6, 8, 12, 16, 32])
        ax.set_xticklabels(["2", "3", "4", "5", "6", "8", "12", "16", "32"])
        ax.set_xlabel("bits per quantized weight (theory; baseline: its storage)")
        ax.set_ylabel(label)
        if col == "kl_mean":
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
    for b, c in backend_colours().items():
        if b in set(land["backend"]):
            axes[1].scatter([], [], color=c, label=b)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Format landscape: memory vs quality (filled: real low-bit storage; hollow: simulated; dashed: Pareto front)")
    return png(fig)


def baseline_banners(records: list[Record], land: pd.DataFrame) -> list[str]:
    """Per model: the pre-quantized-baseline banner (a GGUF conversion: the file's tensor types; any
    other checkpoint: the grid census of its weights, memoized), where the weights came from, and
    what re-quantizing to the same GGUF type measured."""
    from pathlib import Path

    from qeval.quant.detect import FLOAT_TYPES, banner, baseline_census

    out, seen = [], set()
    for r in records:
        m = r.model
        if r.variant.quant != BASELINE or m.fingerprint in seen:
            continue
        seen.add(m.fingerprint)
        census = baseline_census(Path(m.path), m.fingerprint)
        text = banner(census, m.spec)
        if not text:
            continue
        if not land.empty:
            # the GGUF formats of the baseline's own grid: its file's types, or the grid's bits
            quants = land["quant"].astype(str)
            if census.get("types"):  # the file's main quantized type (most tensors; the embedding may differ)
                main = [t for t in census["types"] if t not in FLOAT_TYPES][:1]
                mine = quants.isin([f"gguf:{t.lower()}" for t in main])
            else:  # a 4-bit/32 grid: gguf:q4_0 / q4_1 (the block formats; the K mixes are not one grid)
                mine = quants.str.fullmatch("|".join(f"gguf:q{g.split('-')[0]}_[01]" for g in census["grids"]))
            same = land[(land["model"] == r.variant.model) & mine]
            for row in same.to_dict("records"):
                text += (f" Re-quantizing it to {row['quant']} gives KL {fmt_num(row['kl_mean'])} "
                         f"(top-1 agreement {fmt_pct(row['top1_agree'])}): its weights already lie on that grid.")
        out.append(text)
    return out


def _frame(d: ReportData) -> tuple | None:
    """The landscape from the store's records and the frames the report already holds, and its banners."""
    if not d.records:
        return None
    land = landscape_frame(d.memory, d.div, d.results, list(d.records))
    return land, baseline_banners(list(d.records), land)


register(ReportSection("formats", 50, _frame, lambda f: formats_section(*f)))
