"""Render stored records into report files (Markdown, HTML, CSVs, plots).

`build_report(store, out_dir)` is `qeval report`; `render(results, memory, meta, out_dir)` the same
document from bare frames. The sections live in `qeval.report.sections`, one module each, registered
in reading order. Names are re-exported lazily: importing this package loads neither pandas nor
matplotlib until one is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_report": "qeval.report.build", "render": "qeval.report.build", "compose": "qeval.report.build",
    "report_data": "qeval.report.build",
    "ReportData": "qeval.report.sections", "ReportSection": "qeval.report.sections", "SECTIONS": "qeval.report.sections",
    "register": "qeval.report.sections",
    "Section": "qeval.report.doc", "to_markdown": "qeval.report.doc", "to_html": "qeval.report.doc",
    "variant_label": "qeval.report.fmt", "fmt_num": "qeval.report.fmt",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qeval.report' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
