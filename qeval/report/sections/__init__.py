"""The report's sections, registered in reading order.

Each section module registers one `ReportSection`: its `order` in the document, its `frame` (what it
shows, taken from the `ReportData` one report is built from; None when it has nothing to show) and
its `render` (that frame -> a `qeval.report.doc.Section`: blocks, PNGs, CSVs, banners).
`qeval.report.build` calls them in order; adding a section is one module here and one import below.
"""
from qeval.report.sections.base import SECTIONS, ReportData, ReportSection, register  # noqa: F401

# every section module registers itself on import; the order lives in each module's `order`
from qeval.report.sections import (accuracy, adapters, divergence, figures, formats, history, memory,  # noqa: E402,F401
                                   meta, parity, significance, speed, summary)
