"""What a report section is (`ReportSection`), what it reads (`ReportData`) and the ordered registry
(`SECTIONS`, `register`). Section modules import this module, not the package, so no section module
imports another through the package's `__init__`."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from qeval.report.doc import Section
from qeval.report.frames import MEMORY_COLUMNS, RESULT_COLUMNS, VARIANT, ordered, tidy
from qeval.store.record import Record


@dataclass(frozen=True, eq=False)
class ReportData:
    """Everything one report shows, derived from the store once (`qeval.report.build.report_data`);
    sections read it and never the store. Frames not given are empty, and their sections absent."""
    results: pd.DataFrame  # qeval.stats.compare.results_frame with the paired columns (with_paired)
    memory: pd.DataFrame  # qeval.stats.compare.memory_frame
    meta: dict  # title, provenance lines (qeval.report.sections.meta)
    records: tuple[Record, ...] = ()  # the store's records: the format landscape and the summary read them
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # qeval.stats.compare.paired_frame
    div: pd.DataFrame = field(default_factory=pd.DataFrame)  # qeval.stats.compare.divergence_frame
    adapters: dict | None = None  # qeval.stats.compare.adapter_frames
    decision: pd.DataFrame = field(default_factory=pd.DataFrame)  # qeval.stats.compare.decision's table
    verdict: str = ""  # ... and its LoRA-vs-QLoRA sentence
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # qeval.stats.compare.history_frame
    speed: pd.DataFrame = field(default_factory=pd.DataFrame)  # qeval.stats.speed.speed_frame
    parity: tuple = ()  # qeval.store.record.ParityRecord, oldest first (GGUF against llama.cpp)
    fdr: float | None = None  # the nightly's FDR level and how many tests share it (significance)
    tests: int = 0
    # filled by the build for the sections that read the others (`reads_banners`)
    banners: tuple = ()  # the banners the other sections raised, in order
    shown: frozenset = frozenset()  # the names of the sections rendered so far

    @functools.cached_property
    def table(self) -> pd.DataFrame:
        """The results as results.csv holds them: documented columns first, rows in report order."""
        return ordered(tidy(self.results, RESULT_COLUMNS), ["model", "task", "metric", "quant", "adapter"])

    @functools.cached_property
    def memory_table(self) -> pd.DataFrame:
        return ordered(tidy(self.memory, MEMORY_COLUMNS), VARIANT)


@dataclass(frozen=True)
class ReportSection:
    name: str
    order: int  # place in the document, lowest first
    frame: Callable[[ReportData], Any]  # the section's input, or None: nothing to show
    render: Callable[[Any], Section | None]
    needs_results: bool = True  # left out (blocks, PNGs, CSVs; not its banners) of a report without results
    reads_banners: bool = False  # rendered after the others, with their banners in ReportData.banners


SECTIONS: list[ReportSection] = []


def register(section: ReportSection) -> ReportSection:
    if any(s.name == section.name or s.order == section.order for s in SECTIONS):
        raise ValueError(f"report section {section.name!r} (order {section.order}) registered twice")
    SECTIONS.append(section)
    SECTIONS.sort(key=lambda s: s.order)
    return section
