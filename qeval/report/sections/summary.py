"""Report section: the one screen a decision-maker reads first.

Per format: its size against the baseline, its mean recovery with an interval, its KL and a plain
verdict; per adapter arm what it regained (and forgot); the LoRA-vs-QLoRA verdict; the banners
(pre-quantized baseline, simulated formats). Nothing is decided here: the verdicts are
`qeval.stats.paired.LOSS_VERDICTS` applied to the paired 95% intervals (`qeval.stats.paired.recovery_interval`
of the intervals `compare_pair` gave each task, the accuracy table's); sizes, KL, regained shares and
the LoRA-vs-QLoRA verdict are the columns and the sentence the other sections show
(`qeval.stats.compare.decision` computes the verdict once, for both).
"""
from __future__ import annotations

import math

import pandas as pd

from qeval.stats.margin import NOT_TESTED as MARGIN_NOT_TESTED
from qeval.stats.margin import margin_sentence
from qeval.stats.paired import LOSS_VERDICTS, NOT_TESTED, LossVerdicts, recovery_interval
from qeval.report.doc import Bullets, Heading, Para, Section, Table
from qeval.report.fmt import BASELINE, NA, fmt_mib, fmt_num, fmt_pct, missing
from qeval.report.frames import declared, ordered, primary_rows
from qeval.report.sections.base import ReportData, ReportSection, register
from qeval.report.sections.speed import fastest_sentence, speed_cell

HEADING = "Summary"


def format_frame(results: pd.DataFrame, memory: pd.DataFrame, div: pd.DataFrame,
                 verdicts: LossVerdicts = LOSS_VERDICTS) -> pd.DataFrame:
    """One row per (model, format) without an adapter, baseline excluded: `ratio` (measured bytes /
    the baseline's), `theory_ratio` (the format's nominal bytes / the baseline's), `kl_mean`,
    `recovery` (mean over tasks of each primary metric's recovery), `recovery_lo` / `recovery_hi`
    (the mean of the tasks' 95% bounds; NaN when a task has none), `tasks` (per task: recovery, lo, hi,
    its own verdict), `verdict` and `verdict_tasks` (the tasks that set it), `margin` (the verdict
    against each task's non-inferiority margin, `qeval.stats.margin.margin_sentence`)."""
    if results.empty:
        return pd.DataFrame()
    prim = primary_rows(results)
    prim = prim[(prim["adapter"].fillna("") == "") & (prim["quant"] != BASELINE)]
    rows = []
    for (model, quant), g in prim.groupby(["model", "quant"], sort=False):
        per, intervals, margins = {}, {}, {}
        for r in g.to_dict("records"):
            margins[r["task"]] = _margin_of(r)
            lo, hi = recovery_interval(r.get("baseline_value"), r.get("delta_lo", math.nan), r.get("delta_hi", math.nan),
                                       bool(r["higher_is_better"]))
            intervals[r["task"]] = (lo, hi)
            per[r["task"]] = {"recovery": r.get("recovery"), "lo": lo, "hi": hi, "verdict": verdicts.of_task(lo, hi)}
        verdict, which = verdicts.of_format(intervals)
        mem = memory[(memory["model"] == model) & (memory["quant"] == quant) & (memory["adapter"].fillna("") == "")] \
            if not memory.empty else memory
        m = mem.iloc[0].to_dict() if len(mem) else {}
        base_bytes = m.get("baseline_bytes", math.nan)
        d = div[(div["model"] == model) & (div["quant"] == quant) & (div["adapter"].fillna("") == "")] \
            if not div.empty and "kl_mean" in div.columns else pd.DataFrame()
        rec = [float(r) for r in g["recovery"] if not missing(r)]
        rows.append({"model": model, "quant": quant, "adapter": "",
                     "ratio": m.get("ratio_to_baseline", math.nan),
                     "theory_ratio": (m["theory_bytes"] / base_bytes
                                      if not missing(base_bytes) and base_bytes and not missing(m.get("theory_bytes"))
                                      else math.nan),
                     "total_bytes": m.get("total_bytes", math.nan),
                     # the checkpoint's dtype and the baseline in memory, when the ratio is against another
                     "checkpoint_dtype": "" if missing(m.get("checkpoint_dtype")) else str(m["checkpoint_dtype"]),
                     "compute_ratio": (m["total_bytes"] / m["compute_baseline_bytes"]
                                       if not missing(m.get("compute_baseline_bytes")) and m["compute_baseline_bytes"]
                                       and m["compute_baseline_bytes"] != base_bytes else math.nan),
                     "kl_mean": float(d["kl_mean"].iloc[0]) if len(d) else math.nan,
                     "recovery": sum(rec) / len(rec) if rec and len(rec) == len(g) else math.nan,
                     "recovery_lo": _mean([v["lo"] for v in per.values()]),
                     "recovery_hi": _mean([v["hi"] for v in per.values()]),
                     "tasks": per, "verdict": verdict, "verdict_tasks": which,
                     "margin": margin_sentence(margins)})
    return ordered(pd.DataFrame(rows), ["model", "quant"]) if rows else pd.DataFrame()


def _margin_of(r: dict) -> tuple[str, str]:
    """(verdict against the margin, the margin as printed) of one results row with paired columns."""
    v, label = r.get("margin_verdict"), r.get("margin_label")
    return (MARGIN_NOT_TESTED, "") if missing(v) else (str(v), str(label))


def margin_rows(results: pd.DataFrame) -> dict[tuple[str, str], str]:
    """{(model, adapter arm): its verdict against the margins, vs the baseline}: the adapter arms'
    rows of the results (each seed of an arm is a task of its own, `task#sN`)."""
    if results.empty or "margin_verdict" not in results.columns:
        return {}
    from qeval.train.spec import seed_base

    prim = primary_rows(results)
    prim = prim[prim["adapter"].fillna("") != ""]
    out: dict[tuple[str, str], dict] = {}
    for r in prim.to_dict("records"):
        arm = str(r.get("arm") or r["adapter"])
        base = seed_base(arm)
        task = r["task"] + (arm[len(base):] if arm != base else "")
        out.setdefault((r["model"], base), {})[task] = _margin_of(r)
    return {k: margin_sentence(v) for k, v in out.items()}


def _mean(xs: list[float]) -> float:
    return math.nan if not xs or any(missing(x) for x in xs) else sum(xs) / len(xs)


def _kernel(quant: str) -> str:
    return declared(quant)["kernel"]  # the format landscape's reading of the registry


def _size(r: dict) -> str:
    out = f"×{fmt_num(r['ratio'], 3)}" if not missing(r["ratio"]) else NA
    if not missing(r.get("compute_ratio", math.nan)) and not missing(r["ratio"]):
        # against the checkpoint as stored; the compute dtype's copy beside it (qeval.stats.compare.memory_frame)
        out += f" of the {r['checkpoint_dtype']} checkpoint (×{fmt_num(r['compute_ratio'], 3)} of the baseline in memory)"
    if _kernel(r["quant"]) == "simulated" and not missing(r["theory_ratio"]):
        out += f" in memory (simulated; ×{fmt_num(r['theory_ratio'], 3)} packed)"
    return out


def _recovery(r: dict) -> str:
    if missing(r["recovery"]):
        return NA
    ci = "" if missing(r["recovery_lo"]) else f" [{fmt_pct(r['recovery_lo'])}, {fmt_pct(r['recovery_hi'])}]"
    return fmt_pct(r["recovery"]) + ci


def _verdict(r: dict) -> str:
    return r["verdict"] + (f" ({', '.join(r['verdict_tasks'])})" if r["verdict_tasks"] else "")


def simulated_banner(quants) -> str:
    sim = [q for q in dict.fromkeys(quants) if _kernel(q) == "simulated"]
    if not sim:
        return ""
    return (f"Simulated compute: {', '.join(sim)}. Their accuracy and KL are the format's own numerics, computed in "
            "float; their memory is not what a real kernel would hold (the size column shows both).")


# ----------------------------------------------------------------------------- adapters

def adapter_rows(frames: dict[str, pd.DataFrame]) -> list[dict]:
    """Per model and arm (seeds together): what it regained on its domain tasks and what it forgot on
    the others, from `qeval.stats.compare.adapter_frames` (its verdicts, its seed spread)."""
    # imported here: the adapter spec is the train stage's, and `import qeval.report` stays light
    from qeval.train.spec import seed_base

    reg = frames.get("regained", pd.DataFrame())
    if reg.empty:
        return []
    seeds = frames.get("seeds", pd.DataFrame())
    reg = reg.assign(base_arm=reg["arm"].map(seed_base))
    out = []
    for (model, arm), g in reg.groupby(["model", "base_arm"], sort=True):
        gained, forgot = [], []
        for task, t in g.groupby("task", sort=True):
            s = seeds[(seeds["model"] == model) & (seeds["arm"] == arm) & (seeds["task"] == task)] \
                if not seeds.empty else seeds
            s = s.iloc[0].to_dict() if len(s) else {}
            n = len(t)
            if bool(t["untouched"].all()):
                bad = [v for v, dv in zip(t["regained_verdict"], t["delta_vs_reference"])
                       if v in ("worse", "below min effect") and not missing(dv) and _down(dv, t)]
                if bad:
                    forgot.append(f"{task} {fmt_num(t['delta_vs_reference'].mean(), signed=True)} "
                                  f"({_count(bad, n)})")
                continue
            if bool(t["lost_significant"].all()):
                text = f"{task}: {fmt_pct(t['regained'].mean())} of the loss"
                if n > 1 and s:
                    text += f" ({fmt_pct(s.get('regained_min'))} .. {fmt_pct(s.get('regained_max'))} over {n} seeds)"
                else:
                    text += f" (vs its quantized base: {t['regained_verdict'].iloc[0]})"
            elif bool(t["float_base"].all()):
                text = f"{task}: {fmt_num(t['delta_vs_baseline'].mean(), signed=True)} vs baseline"
                if n > 1 and s:
                    text += f", mean {fmt_num(s.get('value_mean'))} [{fmt_num(s.get('value_lo'))}, {fmt_num(s.get('value_hi'))}] over {n} seeds"
                text += f" ({_count(list(t['vs_baseline_verdict']), n)})"
            else:
                text = f"{task}: nothing to regain (its base against the baseline: {t['lost_verdict'].iloc[0]})"
            gained.append(text)
        out.append({"model": model, "arm": arm, "quant": g["quant"].iloc[0], "seeds": int(g.groupby("task").size().max()),
                    "gained": "; ".join(gained) or NA, "forgot": "; ".join(forgot) or "none detected"})
    return out


def _down(delta: float, t: pd.DataFrame) -> bool:
    """Is this change of the task's metric a loss (lower perplexity is better)?"""
    return delta < 0 if bool(t["higher_is_better"].iloc[0]) else delta > 0


def _count(verdicts: list[str], n: int) -> str:
    if n == 1:
        return verdicts[0]
    counts = pd.Series(verdicts).value_counts()
    return ", ".join(f"{v} in {c}/{n} seeds" for v, c in counts.items())


# ----------------------------------------------------------------------------- section

def summary_section(results: pd.DataFrame, memory: pd.DataFrame, div: pd.DataFrame, frames: dict[str, pd.DataFrame],
                    lora_verdict: str, banners: list[str], verdicts: LossVerdicts = LOSS_VERDICTS,
                    speed: pd.DataFrame | None = None) -> Section | None:
    """The summary's blocks (the report puts them right under the title); None when the
    store holds nothing to summarise and there is no banner."""
    fmt = format_frame(results, memory, div, verdicts)
    banners = [b for b in banners if b]
    sim = simulated_banner(fmt["quant"]) if not fmt.empty else ""
    if sim:
        banners.append(sim)
    arms = adapter_rows(frames)
    if fmt.empty and not arms and not banners:
        return None
    blocks: list = [Heading(2, HEADING)]
    if banners:
        blocks.append(Bullets(banners))
    multi = not fmt.empty and fmt["model"].nunique() > 1
    if not fmt.empty:
        base = memory[(memory["quant"] == BASELINE) & (memory["adapter"].fillna("") == "")] if not memory.empty else memory
        base_mib = f" ({fmt_mib(base['total_bytes'].iloc[0])} MiB)" if len(base) == 1 else ""
        # decode speed only when the store holds speed records (a store from before them renders as it did)
        fast = speed is not None and not speed.empty
        rows = [([str(r["model"])] if multi else []) + [r["quant"], _size(r), _recovery(r), fmt_num(r["kl_mean"]),
                                                         _verdict(r), r["margin"]]
                + ([speed_cell(speed, r["quant"])] if fast else [])
                for r in fmt.to_dict("records")]
        blocks += [
            Table((["model"] if multi else []) + ["format", "size × baseline", "mean recovery [95%]", "KL mean",
                                                  "verdict", "against the margin"]
                  + (["decode tok/s (batch 1)"] if fast else []), rows,
                  ([False] if multi else []) + [False, True, True, True, False, False] + ([True] if fast else [])),
            Para(f"Against the unquantized baseline '{BASELINE}'{base_mib}. Recovery: 100% = nothing lost "
                 "(value/baseline; perplexity baseline/value), the mean over tasks of each task's primary metric; "
                 "its bracket is the mean of the tasks' 95% bounds (conservative). Each task's interval is its "
                 "paired comparison with the baseline (qeval.stats.paired: Tango's score test, paired t on log-likelihoods), "
                 "so it excludes 100% exactly when the loss is significant. Verdicts follow from those intervals: "
                 + verdicts.describe() + f" '{NOT_TESTED}': no task has a paired interval (too few documents "
                 "or no stored outputs). Against the margin (non-inferiority, qeval.stats.margin): per task, "
                 "'loss within the margin shown' when the task's whole 95% interval of the change lies above "
                 "minus the margin, 'loss beyond the margin shown' when it lies wholly below, 'cannot tell' when it "
                 "straddles it; margins from the plan's thresholds.margin, by default 1 point (accuracy) and 1% "
                 "(perplexity). KL: mean per token against the baseline on the divergence task."
                 + (" Decode speed: tokens/s at batch 1, greedy, on the device the cells ran on (the speed "
                    "section has the settings)." if fast else ""))]
        if fast and fastest_sentence(speed, results):
            blocks.append(Para(fastest_sentence(speed, results)))
    if arms:
        multi_a = len({a["model"] for a in arms}) > 1
        vs = margin_rows(results)
        blocks += [Heading(3, "Adapters"),
                   Table((["model"] if multi_a else []) + ["arm", "base", "regained (domain tasks)",
                                                           "forgetting (other tasks)", "vs baseline, against the margin"],
                         [([str(a["model"])] if multi_a else []) + [a["arm"], a["quant"], a["gained"], a["forgot"],
                                                                    vs.get((a["model"], a["arm"]), NA)]
                          for a in arms])]
    if lora_verdict:
        blocks.append(Para("LoRA vs QLoRA: " + lora_verdict))
    blocks.append(Para("The tables below give every number behind this summary, with its interval and test."))
    return Section(blocks)


def _frame(d: ReportData) -> tuple | None:
    """A report of a store has a summary; one rendered from bare frames (`qeval.report.build.render`) has none."""
    if not d.records:
        return None
    return d.results, d.memory, d.div, d.adapters or {}, d.verdict, list(d.banners), LOSS_VERDICTS, d.speed


register(ReportSection("summary", 10, _frame, lambda f: summary_section(*f), needs_results=False, reads_banners=True))
