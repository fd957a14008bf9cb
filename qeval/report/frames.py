"""The frames the report reads, as the report orders them: their documented columns, the order of
rows (formats in the registry's order), each task's headline rows, and what the format registry
declares about a format. Formatting is `qeval.report.fmt`'s; nothing here computes a number."""
from __future__ import annotations

import pandas as pd

from qeval.report.fmt import NA, adapter_name, missing

from qeval.store.columns import MEMORY_COLUMNS, RESULT_COLUMNS  # noqa: E402,F401  (the one list)
# Without these a results row cannot even be placed in a table; anything else missing shows as n/a.
IDENTITY = ["model", "quant", "adapter", "task", "metric"]
VARIANT = ["model", "quant", "adapter"]


def ordered(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Sort by `by` in the one frame order (`qeval.stats.compare.sort_frame`)."""
    from qeval.stats.compare import sort_frame  # here: stats.compare imports pandas-heavy frames

    return sort_frame(df, by)


def tidy(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The documented columns first, in order (missing ones as NaN), any extra columns after."""
    extra = [c for c in df.columns if c not in columns]
    return df.reindex(columns=columns + extra)


def check_columns(results: pd.DataFrame, memory: pd.DataFrame) -> None:
    """A frame without its identity columns is a caller's bug: say which, before anything renders."""
    if not results.empty:
        absent = [c for c in IDENTITY if c not in results.columns]
        if absent:
            raise ValueError(f"results frame lacks columns {absent}; expected {RESULT_COLUMNS}")
    if not memory.empty:
        absent = [c for c in VARIANT if c not in memory.columns]
        if absent:
            raise ValueError(f"memory frame lacks columns {absent}; expected {MEMORY_COLUMNS}")


def primary_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Each task's headline-metric rows. A task with no row flagged primary falls back to its first
    metric by name, so a malformed frame still shows something rather than silently dropping a task."""
    parts = []
    for _, g in results.groupby("task", sort=True):
        flagged = g[g["primary"].map(lambda v: not missing(v) and bool(v))]
        if flagged.empty:
            flagged = g[g["metric"] == sorted(g["metric"].astype(str))[0]]
        else:
            flagged = g[g["metric"] == flagged["metric"].iloc[0]]  # one metric per task, as documented
        parts.append(flagged)
    return pd.concat(parts) if parts else results.iloc[0:0]


def lower_is_better(rows: pd.DataFrame) -> bool:
    hib = rows["higher_is_better"].dropna()
    return bool(len(hib)) and not bool(hib.iloc[0])


def declared(quant: str) -> dict:
    """What the registry says about a format (unknown names -- an old store -- show as n/a)."""
    from qeval.quant.formats import FORMATS

    if quant not in FORMATS:
        return {"backend": NA, "kernel": NA, "can_save": None, "lora_trainable": None, "storage": ""}
    f = FORMATS.get(quant)
    return {"backend": f.backend, "kernel": "float" if f.bits_per_weight is None else f.kernel,
            "can_save": f.can_save, "lora_trainable": f.lora_trainable, "storage": f.storage}
