"""The stored records a comparison frame reads: which records are comparable (one group measured the
same documents the same way), the newest of each, the views of a group task, and the paired
comparison of two records. Shared by the frames of qeval.stats.compare and qeval.stats.adapters.
"""
from __future__ import annotations

from typing import Mapping

from qeval.stats.comparison import Comparison
from qeval.stats.paired import compare_pair
from qeval.store.record import MERGE_SUFFIX, Metric, Record, Variant  # noqa: F401  (MERGE_SUFFIX re-exported)

from qeval.core.names import BASELINE  # noqa: E402,F401  (one definition; re-exported)


def record_group(rec: Record) -> tuple:
    """Records in one group measured the same documents the same way, so they are comparable."""
    t = rec.task
    return (rec.model.fingerprint, t.name, t.fingerprint, t.limit, t.num_fewshot,
            rec.device_kind, rec.compute_dtype)  # a bf16 variant pairs with the bf16 baseline


def adapter_label(variant: Variant) -> str:
    """The adapter column: the adapter's plan name, suffixed by how it was merged."""
    return variant.adapter_label


def latest(records: list[Record]) -> list[Record]:
    """The newest record per (comparable group, variant)."""
    best: dict[tuple, Record] = {}
    for r in records:
        k = record_group(r) + (r.variant.quant, r.variant.adapter_label)
        if k not in best or r.created_at > best[k].created_at:
            best[k] = r
    return list(best.values())


def task_views(rec: Record) -> list[tuple[str, str | None, Mapping[str, Metric], str, int]]:
    """The (task, subtask, metrics, primary metric, n) views of a record: the task itself (a group:
    lm-eval's aggregate) and each member of a group as `group/subtask`."""
    out = [(rec.task.name, None, rec.metrics, rec.primary_metric, rec.n)]
    for sub, s in rec.subtasks.items():
        out.append((f"{rec.task.name}/{sub}", sub, s.metrics, s.primary_metric, s.n))
    return out


def metrics_of(rec: Record | None, subtask: str | None) -> Mapping[str, Metric]:
    if rec is None:
        return {}
    if subtask is None:
        return rec.metrics
    s = rec.subtasks.get(subtask)
    return s.metrics if s is not None else {}


# A plan's `thresholds.min_effect` (metric name or comparison kind -> minimum meaningful effect);
# empty: every kind's default. `compare_pair` resolves it once it knows the metric's kind.
MinEffect = Mapping[str, float]


def compare_records(ref: Record, rec: Record, metric: str, samples, min_effect: MinEffect | None = None,
                    subtask: str | None = None) -> Comparison | None:
    """`compare_pair` of two stored records on `metric` (of one member of a group with `subtask`),
    by the metric's stored aggregation; None where either has no samples."""
    if samples is None:
        return None
    rs, vs = samples(ref.key), samples(rec.key)
    if not rs or not vs:
        return None
    m = metrics_of(rec, subtask)[metric]
    return compare_pair(rs, vs, metric, bool(m.higher_is_better), min_effect,
                        aggregation=m.aggregation, task=subtask)
