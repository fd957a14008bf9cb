"""Stage: turn stored records into tidy comparison frames (never from in-memory run state).

`results_frame` has one row per (model, quant, adapter, task, metric) with the baseline's value
beside it; `memory_frame` one row per variant with measured vs theoretical bytes. When a cell was
measured several times (a library upgrade, another limit), the newest record of each comparable
group wins; a variant is only compared with a baseline measured on the same documents.
"""
from __future__ import annotations

import math

import pandas as pd

from qeval.quant import DEFAULT_FORMATS, FORMATS

BASELINE = "none"

RESULT_COLUMNS = ["model", "quant", "adapter", "task", "metric", "higher_is_better", "primary", "value",
                  "stderr", "n", "baseline_value", "baseline_stderr", "delta", "recovery", "ratio",
                  "weight_bytes", "device", "key"]
MEMORY_COLUMNS = ["model", "quant", "adapter", "total_bytes", "quantized_weight_bytes", "quant_state_bytes",
                  "unquantized_bytes", "theory_bytes", "baseline_bytes", "ratio_to_baseline", "ratio_to_theory",
                  "measured_bits_per_weight", "theory_bits_per_weight", "load_s", "eval_s", "peak_bytes", "device"]


def _group(rec: dict) -> tuple:
    """Records in one group measured the same documents the same way, so they are comparable."""
    t = rec["task"]
    return (rec["model"]["fingerprint"], t["name"], t["fingerprint"], t["limit"], t["num_fewshot"],
            rec["device"].split(":")[0])


def latest(records: list[dict]) -> list[dict]:
    """The newest record per (comparable group, variant)."""
    best: dict[tuple, dict] = {}
    for r in records:
        k = _group(r) + (r["variant"]["quant"], r["variant"]["adapter"])
        if k not in best or r["created_at"] > best[k]["created_at"]:
            best[k] = r
    return list(best.values())


def results_frame(records: list[dict]) -> pd.DataFrame:
    recs = latest(records)
    baselines = {_group(r): r for r in recs if r["variant"]["quant"] == BASELINE and not r["variant"]["adapter"]}
    rows = []
    for r in recs:
        base = baselines.get(_group(r))
        for metric, m in r["metrics"].items():
            b = base["metrics"].get(metric) if base else None
            bv = b["value"] if b else math.nan
            v = m["value"]
            hib = bool(m["higher_is_better"])
            if b and bv and v:
                recovery = v / bv if hib else bv / v  # 1.0 = nothing lost, < 1 = worse, any metric
                ratio = v / bv
            else:
                recovery = ratio = math.nan
            rows.append({
                "model": r["variant"]["model"], "quant": r["variant"]["quant"], "adapter": r["variant"]["adapter"],
                "task": r["task"]["name"], "metric": metric, "higher_is_better": hib,
                "primary": metric == r["primary_metric"], "value": v,
                "stderr": math.nan if m["stderr"] is None else m["stderr"], "n": r["n"],
                "baseline_value": bv, "baseline_stderr": (b["stderr"] if b and b["stderr"] is not None else math.nan),
                "delta": v - bv, "recovery": recovery, "ratio": ratio,
                "weight_bytes": r["footprint"]["total_bytes"], "device": r["device"], "key": r["key"]})
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return _sorted(frame, ["model", "task", "metric"])


def memory_frame(records: list[dict]) -> pd.DataFrame:
    """One row per variant: measured bytes split by kind, theory, ratios, and time costs."""
    recs = latest(records)
    by_variant: dict[tuple, list[dict]] = {}
    for r in recs:
        by_variant.setdefault((r["variant"]["model"], r["variant"]["quant"], r["variant"]["adapter"],
                               r["model"]["fingerprint"], r["device"]), []).append(r)
    base_bytes = {(k[3], k[4]): rs[0]["footprint"]["total_bytes"]
                  for k, rs in by_variant.items() if k[1] == BASELINE and not k[2]}
    rows = []
    for (model, quant, adapter, fp, device), rs in by_variant.items():
        fpt = max(rs, key=lambda r: r["created_at"])["footprint"]
        base = base_bytes.get((fp, device), math.nan)
        qp = fpt["quantized_params"]
        fmt = FORMATS.get(quant) if quant in FORMATS else None
        theory_bits = math.nan
        if qp and fmt is not None and fmt.bits_per_weight is not None:
            # the quantized share of the theory bytes, per quantized weight
            theory_bits = (fpt["theory_bytes"] - fpt["unquantized_bytes"]) * 8 / qp
        rows.append({
            "model": model, "quant": quant, "adapter": adapter, "total_bytes": fpt["total_bytes"],
            "quantized_weight_bytes": fpt["quantized_weight_bytes"], "quant_state_bytes": fpt["quant_state_bytes"],
            "unquantized_bytes": fpt["unquantized_bytes"], "theory_bytes": fpt["theory_bytes"],
            "baseline_bytes": base, "ratio_to_baseline": fpt["total_bytes"] / base if base == base else math.nan,
            "ratio_to_theory": fpt["total_bytes"] / fpt["theory_bytes"],
            "measured_bits_per_weight": (fpt["quantized_weight_bytes"] + fpt["quant_state_bytes"]) * 8 / qp if qp else math.nan,
            "theory_bits_per_weight": theory_bits,
            "load_s": max(r["timings"]["load_s"] for r in rs), "eval_s": sum(r["timings"]["eval_s"] for r in rs),
            "peak_bytes": max(r["peak_bytes"] for r in rs), "device": device})
    return _sorted(pd.DataFrame(rows, columns=MEMORY_COLUMNS), ["model"])


def _sorted(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Sort with the baseline first, then the formats in the default plan's order."""
    if frame.empty:
        return frame.reset_index(drop=True)
    order = {q: i for i, q in enumerate(DEFAULT_FORMATS)}
    frame = frame.assign(_q=frame["quant"].map(lambda q: order.get(q, len(order))))
    return frame.sort_values(by + ["_q", "quant", "adapter"], kind="stable").drop(columns="_q").reset_index(drop=True)
