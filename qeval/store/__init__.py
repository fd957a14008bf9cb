"""The result store: immutable records keyed by a content hash, and garbage collection of cached artifacts.

store (Store: SQLite, one writer) <- record (Record and its typed parts: the stored JSON, read and
written back unchanged) ; columns (the report's column lists) ; gc (`qeval gc`).
Names are re-exported lazily, like every package's: importing `qeval.store` opens nothing.
"""
from __future__ import annotations

import importlib

_OWNERS = {
    **dict.fromkeys(("Record", "Part", "Variant", "ModelRef", "TaskRef", "Metric", "Subtask", "Timings", "Footprint",
                     "Divergence", "AdapterSummary", "MERGE_SUFFIX"), "record"),
    **dict.fromkeys(("Store", "SCHEMA_VERSION", "check_store_path", "canonical_json", "content_key"), "store"),
    **dict.fromkeys(("RESULT_COLUMNS", "MEMORY_COLUMNS"), "columns"),
}
__all__ = sorted(_OWNERS)


def __getattr__(name: str):
    if name in _OWNERS:
        return getattr(importlib.import_module(f"qeval.store.{_OWNERS[name]}"), name)
    raise AttributeError(f"module 'qeval.store' has no attribute {name!r}")
