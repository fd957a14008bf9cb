"""The result store: immutable records keyed by a content hash, and garbage collection of cached artifacts.

store (Store: SQLite, one writer) <- record (Record and its typed parts: the stored JSON, read and
written back unchanged) ; columns (the report's column lists) ; gc (`qeval gc`).
Names are re-exported lazily, like every package's: importing `qeval.store` opens nothing.
"""
from __future__ import annotations

from qeval.core.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "record": ("Record", "Part", "Variant", "ModelRef", "TaskRef", "Metric", "Subtask", "Timings", "Footprint",
               "Divergence", "AdapterSummary", "MERGE_SUFFIX"),
    "store": ("Store", "SCHEMA_VERSION", "check_store_path", "canonical_json", "content_key"),
    "columns": ("RESULT_COLUMNS", "MEMORY_COLUMNS"),
})
