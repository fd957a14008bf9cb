"""Stage: turn stored records into tidy comparison frames (never from in-memory run state).

`results_frame` has one row per (model, quant, adapter, task, metric) with the baseline's value
beside it; `memory_frame` one row per variant with measured vs theoretical bytes. When a cell was
measured several times (a library upgrade, another limit), the newest record of each comparable
group wins; a variant is only compared with a baseline measured on the same documents.
"""
from __future__ import annotations

import math

import pandas as pd

# re-exported: the adapter frames and the record helpers were defined here, importers still find them here
from qeval.stats.adapters import adapter_frames, decision, decision_summary, seed_frame  # noqa: F401
from qeval.stats.kind import KINDS
from qeval.stats.margin import margin_columns
from qeval.stats.records import (BASELINE, MERGE_SUFFIX, MinEffect, adapter_label, compare_records,  # noqa: F401
                                 latest, metrics_of, record_group, task_views)
from qeval.stats.recovery import recovery as recovery_of
from qeval.stats.recovery import recovery_undefined
from qeval.store.columns import KL_STAT_COLUMNS, MEMORY_COLUMNS, RESULT_COLUMNS  # noqa: F401  (re-exported: frames' column lists)
from qeval.store.record import Record

# qeval.quant.formats (FORMATS, format_order) is imported where used: it imports torch today, and
# the frames must not.


def results_frame(records: list[Record]) -> pd.DataFrame:
    """One row per (record, task or subtask, metric id): filtered metrics read `metric,filter`,
    a group's members `group/subtask` in the task column."""
    recs = latest(records)
    baselines = {record_group(r): r for r in recs if r.variant.is_baseline}
    rows = []
    for r in recs:
        base = baselines.get(record_group(r))
        for task, sub, metrics, primary, n in task_views(r):
            base_metrics = metrics_of(base, sub)
            for metric, m in metrics.items():
                b = base_metrics.get(metric)
                bv = b.value if b else math.nan
                v = m.value
                hib = bool(m.higher_is_better)
                # 1.0 = nothing lost, < 1 = worse, any metric; a score of 0 recovers 0, a baseline of 0
                # leaves recovery undefined (NaN with recovery_undefined set), which gates treat as failing
                recovery = recovery_of(v, bv, hib)
                ratio = v / bv if bv else math.nan
                rows.append({
                    "model": r.variant.model, "quant": r.variant.quant,
                    "adapter": r.variant.adapter_label, "task": task, "metric": metric, "higher_is_better": hib,
                    "primary": metric == primary, "value": v,
                    "stderr": math.nan if m.stderr is None else m.stderr, "n": n,
                    "baseline_value": bv, "baseline_stderr": (b.stderr if b and b.stderr is not None else math.nan),
                    "delta": v - bv, "recovery": recovery, "ratio": ratio,
                    "recovery_undefined": recovery_undefined(v, bv, hib),
                    "weight_bytes": r.footprint.total_bytes, "device": r.device, "key": r.key,
                    "arm": r.variant.arm})
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return sort_frame(frame, ["model", "task", "metric", "quant", "adapter"])


def memory_frame(records: list[Record]) -> pd.DataFrame:
    """One row per variant: measured bytes split by kind, theory, ratios, and time costs."""
    from qeval.quant.formats import FORMATS

    recs = latest(records)
    by_variant: dict[tuple, list[Record]] = {}
    for r in recs:
        by_variant.setdefault((r.variant.model, r.variant.quant, r.variant.adapter_label,
                               r.model.fingerprint, r.device), []).append(r)
    # sizes are read against the checkpoint as stored when it is stored in another dtype than the
    # baseline computes in (a bf16 checkpoint computed in float32 on CPU holds twice its bytes in
    # memory); in the same dtype, or recorded before the checkpoint was: the baseline's measured bytes
    base_rec = {(k[3], k[4]): rs[0] for k, rs in by_variant.items() if k[1] == BASELINE and not k[2]}
    base_fp = {k: r.footprint for k, r in base_rec.items()}
    base_bytes = {k: r.footprint.checkpoint_bytes
                  if r.footprint.checkpoint_bytes and r.footprint.checkpoint_dtype != r.compute_dtype
                  else r.footprint.total_bytes for k, r in base_rec.items()}
    rows = []
    for (model, quant, adapter, fp, device), rs in by_variant.items():
        fpt = max(rs, key=lambda r: r.created_at).footprint
        base = base_bytes.get((fp, device), math.nan)
        qp = fpt.quantized_params
        fmt = FORMATS.get(quant) if quant in FORMATS else None
        theory_bits = math.nan
        if qp and fmt is not None and fmt.bits_per_weight is not None:
            # the quantized share of the theory bytes, per quantized weight
            theory_bits = (fpt.theory_bytes - fpt.unquantized_bytes) * 8 / qp
        rows.append({
            "model": model, "quant": quant, "adapter": adapter, "total_bytes": fpt.total_bytes,
            "quantized_weight_bytes": fpt.quantized_weight_bytes, "quant_state_bytes": fpt.quant_state_bytes,
            "unquantized_bytes": fpt.unquantized_bytes, "theory_bytes": fpt.theory_bytes,
            "baseline_bytes": base, "ratio_to_baseline": fpt.total_bytes / base if base == base else math.nan,
            "ratio_to_theory": fpt.total_bytes / fpt.theory_bytes,
            "measured_bits_per_weight": (fpt.quantized_weight_bytes + fpt.quant_state_bytes) * 8 / qp if qp else math.nan,
            "theory_bits_per_weight": theory_bits,
            "load_s": max(r.timings.load_s for r in rs), "eval_s": sum(r.timings.eval_s for r in rs),
            "peak_bytes": max(r.peak_bytes for r in rs), "device": device,
            "checkpoint_dtype": base_fp[(fp, device)].checkpoint_dtype if (fp, device) in base_fp else "",
            "compute_baseline_bytes": base_fp[(fp, device)].total_bytes if (fp, device) in base_fp else math.nan})
    return sort_frame(pd.DataFrame(rows, columns=MEMORY_COLUMNS), ["model", "quant", "adapter"])


def _no_adapter(adapter: object) -> str:
    # a frame read back from CSV turns '' into NaN; both mean "no adapter"
    return "" if adapter is None or adapter != adapter else str(adapter)


def sort_frame(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Sort by the columns `by` (stable), the index reset; `quant` in `qeval.quant.format_order`
    (baseline first, bitsandbytes presets, then the other backends' formats), `adapter` with a
    missing one as "". The one order of every frame and table (stats and report)."""
    from qeval.quant.formats import format_order

    if frame.empty:
        return frame.reset_index(drop=True)
    keys, tmp = [], {}
    for col in by:
        if col == "quant":
            tmp["_quant_order"] = frame["quant"].map(format_order)
            keys += ["_quant_order", "quant"]
        elif col == "adapter":
            tmp["_adapter"] = frame["adapter"].map(_no_adapter)
            keys.append("_adapter")
        else:
            keys.append(col)
    return frame.assign(**tmp).sort_values(keys, kind="stable").drop(columns=list(tmp)).reset_index(drop=True)


# ----------------------------------------------------------------------------- paired statistics

def paired_frame(records: list[Record], samples, min_effect: MinEffect | None = None,
                 margin: MinEffect | None = None) -> pd.DataFrame:
    """One row per variant and task (primary metric): the paired comparison against the baseline
    (`qeval.stats.paired.compare_pair`: test, interval, p-value, flips, MDE, verdict) and its
    verdict against the non-inferiority margin (`qeval.stats.margin`; `margin`: a plan's
    `thresholds.margin`). `samples(key)` returns a record's stored per-sample outputs."""
    recs = latest(records)
    baselines = {record_group(r): r for r in recs if r.variant.is_baseline}
    rows = []
    for r in recs:
        base = baselines.get(record_group(r))
        if base is None or base is r:
            continue
        for task, sub, metrics, metric, _ in task_views(r):
            if sub is not None and (r.subtasks[sub].group or metric not in metrics_of(base, sub)):
                continue  # a nested group's documents are its leaves' (compared there and in the top group)
            c = compare_records(base, r, metric, samples, min_effect, sub)
            if c is None or (sub is not None and not c.n):
                continue
            rows.append({"model": r.variant.model, "quant": r.variant.quant,
                         "adapter": r.variant.adapter_label, "task": task, "metric": metric,
                         "delta": c.delta, "kind": c.kind, **c.as_row(), **margin_columns(c, task, margin)})
    return pd.DataFrame(rows)


def task_mde(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per task: n and the minimum detectable effect of its test at that n (alpha 0.05, power 0.8).

    Measured on the variant closest to the baseline -- the noise of a numerically different but
    equivalent computation, which is what separates two nightly runs; each kind says how
    (`Kind.closest_noise`): right/wrong tasks get the exact MDE of the score test at the lowest flip rate any
    variant shows against the baseline, the others the smallest MDE (the smallest per-document
    spread) of any variant."""
    if pairs.empty:
        return pd.DataFrame(columns=["task", "metric", "n", "mde", "min_effect", "test", "kind", "flip_rate"])
    out = []
    for (task, metric), g in pairs.groupby(["task", "metric"], sort=True):
        n = int(g["pairs"].max())
        rate, mde = KINDS.get(g["kind"].iloc[0]).closest_noise(n, list(g["flip_rate"]), list(g["mde"]))
        out.append({"task": task, "metric": metric, "n": n, "mde": mde, "min_effect": float(g["min_effect"].iloc[0]),
                    "test": g["test"].iloc[0], "kind": g["kind"].iloc[0], "flip_rate": rate})
    return pd.DataFrame(out)


def divergence_frame(records: list[Record], pairs: pd.DataFrame) -> pd.DataFrame:
    """Per variant: KL / top-1 agreement on the divergence task beside flips and McNemar p of each
    right/wrong task (the CSV a user reads to see damage that accuracy hides)."""
    rows = []
    recs = latest(records)
    for r in recs:
        d = r.divergence
        if d is None or not d.measured:
            continue
        row = {"model": r.variant.model, "quant": r.variant.quant, "adapter": r.variant.adapter_label,
               "divergence_task": r.task.name, "tokens": d.tokens, "kl_mean": d.kl_mean,
               "kl_p90": d.kl_p90, "kl_p99": d.kl_p99, "kl_max": d.kl_max, "top1_agree": d.top1_agree,
               "ppl_ratio": d.ppl_ratio, "divergence_s": d.seconds,
               **{c: math.nan if getattr(d, c) is None else getattr(d, c) for c in KL_STAT_COLUMNS}}
        mine = pairs[(pairs.model == row["model"]) & (pairs.quant == row["quant"]) & (pairs.adapter == row["adapter"])] \
            if not pairs.empty else pairs
        flip_rows = mine[mine["flips"].notna()] if "flips" in mine.columns else mine.iloc[0:0]
        if flip_rows.empty:
            rows.append({**row, "task": "", "flips": math.nan, "mcnemar_p": math.nan})
        for f in flip_rows.itertuples(index=False):
            rows.append({**row, "task": f.task, "flips": int(f.flips), "flips_right_to_wrong": int(f.flips_right_to_wrong),
                         "flips_wrong_to_right": int(f.flips_wrong_to_right), "flip_rate": f.flip_rate,
                         "mcnemar_p": f.mcnemar_p, "delta": f.delta, "delta_lo": f.delta_lo, "delta_hi": f.delta_hi,
                         "verdict": f.verdict})
    return sort_frame(pd.DataFrame(rows), ["model", "quant", "adapter"]) if rows else pd.DataFrame(
        columns=["model", "quant", "adapter", "kl_mean", "kl_p99", "top1_agree", "flips", "mcnemar_p"])


def with_paired(results: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The results frame with the paired comparison (interval, p, verdict, MDE, flips) on each primary row."""
    cols = ["test", "delta_lo", "delta_hi", "p_value", "significant", "meaningful", "verdict", "mde", "min_effect",
            "flips", "mcnemar_p", "margin", "margin_label", "margin_verdict"]
    if pairs.empty:
        return results.assign(**{c: math.nan for c in cols})
    keep = pairs[["model", "quant", "adapter", "task", "metric"] + [c for c in cols if c in pairs.columns]]
    return results.merge(keep, on=["model", "quant", "adapter", "task", "metric"], how="left")


# ----------------------------------------------------------------------------- nightly history

def history_frame(runs: list[dict], get) -> pd.DataFrame:
    """One row per finished nightly run, variant and task (primary metric), in run order, with a
    flag where library versions changed since the previous run. `get(key)` returns a record."""
    rows, prev_versions = [], None
    for run in runs:
        if run["status"] not in ("ok", "regression"):
            continue
        changed = "" if prev_versions is None else ", ".join(
            f"{k} {prev_versions.get(k)} -> {v}" for k, v in run["versions"].items() if prev_versions.get(k) != v)
        prev_versions = run["versions"]
        for key in run["cells"]:
            rec = get(key)
            if rec is None:
                continue
            metric = rec.primary_metric
            rows.append({"run_id": run["run_id"], "started_at": run["started_at"], "git_sha": run["git_sha"],
                         "versions_changed": changed, "model": rec.variant.model,
                         "arm": rec.variant.arm, "variant_id": rec.variant_id,
                         "task": rec.task.name, "metric": metric, "value": rec.metrics[metric].value,
                         "stderr": rec.metrics[metric].stderr, "computed": key in run.get("computed", []),
                         "key": key})
    return pd.DataFrame(rows)
