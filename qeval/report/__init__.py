"""Render stored records into report files (Markdown, HTML, CSVs, plots).

`build_report(store, out_dir)` is `qeval report`; `render(results, memory, meta, out_dir)` the same
document from bare frames. The sections live in `qeval.report.sections`, one module each, registered
in reading order. Names are re-exported lazily: importing this package loads neither pandas nor
matplotlib until one is used.
"""
from __future__ import annotations

from qeval.core.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "build": ("build_report", "render", "compose", "report_data"),
    "sections": ("ReportData", "ReportSection", "SECTIONS", "register"),
    "doc": ("Section", "to_markdown", "to_html"),
    "fmt": ("variant_label", "fmt_num"),
})
