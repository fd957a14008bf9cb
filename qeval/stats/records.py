"""The stored records a comparison frame reads: which records are comparable (one group measured the
same documents the same way), the newest of each, the views of a group task, and the paired
comparison of two records. Shared by the frames of qeval.stats.compare and qeval.stats.adapters.
"""
from __future__ import annotations

from typing import Mapping

from qeval.stats.comparison import Comparison
from qeval.stats.paired import compare_pair

from qeval.core.names import BASELINE  # noqa: E402,F401  (one definition; re-exported)


def record_group(rec: dict) -> tuple:
    """Records in one group measured the same documents the same way, so they are comparable."""
    t = rec["task"]
    return (rec["model"]["fingerprint"], t["name"], t["fingerprint"], t["limit"], t["num_fewshot"],
            rec["device"].split(":")[0], rec.get("compute_dtype"))  # a bf16 variant pairs with the bf16 baseline


MERGE_SUFFIX = {"none": "", "dequantized": "@merged-float", "requantized": "@merged-requant"}


def adapter_label(variant: dict) -> str:
    """The adapter column: the adapter's plan name, suffixed by how it was merged."""
    if not variant.get("adapter"):
        return ""
    return variant["adapter"] + MERGE_SUFFIX[variant.get("merge", "none")]


def latest(records: list[dict]) -> list[dict]:
    """The newest record per (comparable group, variant)."""
    best: dict[tuple, dict] = {}
    for r in records:
        k = record_group(r) + (r["variant"]["quant"], adapter_label(r["variant"]))
        if k not in best or r["created_at"] > best[k]["created_at"]:
            best[k] = r
    return list(best.values())


def task_views(rec: dict) -> list[tuple[str, str | None, dict, str, int]]:
    """The (task, subtask, metrics, primary metric, n) views of a record: the task itself (a group:
    lm-eval's aggregate) and each member of a group as `group/subtask`."""
    out = [(rec["task"]["name"], None, rec["metrics"], rec["primary_metric"], rec["n"])]
    for sub, s in (rec.get("subtasks") or {}).items():
        out.append((f"{rec['task']['name']}/{sub}", sub, s["metrics"], s["primary_metric"], s["n"]))
    return out


def metrics_of(rec: dict | None, subtask: str | None) -> dict:
    if rec is None:
        return {}
    if subtask is None:
        return rec["metrics"]
    return ((rec.get("subtasks") or {}).get(subtask) or {}).get("metrics", {})


# A plan's `thresholds.min_effect` (metric name or comparison kind -> minimum meaningful effect);
# empty: every kind's default. `compare_pair` resolves it once it knows the metric's kind.
MinEffect = Mapping[str, float]


def compare_records(ref: dict, rec: dict, metric: str, samples, min_effect: MinEffect | None = None,
                    subtask: str | None = None) -> Comparison | None:
    """`compare_pair` of two stored records on `metric` (of one member of a group with `subtask`),
    by the metric's stored aggregation; None where either has no samples."""
    if samples is None:
        return None
    rs, vs = samples(ref["key"]), samples(rec["key"])
    if not rs or not vs:
        return None
    m = metrics_of(rec, subtask)[metric]
    return compare_pair(rs, vs, metric, bool(m["higher_is_better"]), min_effect,
                        aggregation=m.get("aggregation"), task=subtask)

