"""Build the report: the store's records -> frames (`qeval.stats.compare`) -> the registered sections
(`qeval.report.sections`, in order) -> files. It writes, into one folder:

- `results.csv`, `memory.csv`: the frames themselves, sorted, for anyone who wants to re-plot; each
  further section its own CSV (formats.csv, divergence.csv, adapters.csv, ...);
- `recovery.png`, `memory_vs_score.png` and each section's plots;
- `report.md` and `report.html`: the same document twice. Both are rendered from one list of blocks
  (`qeval.report.doc`) so the two can never disagree; the HTML is self-contained (inline CSS,
  images as base64 data URIs).

The sections only *format*: every number they show is a column of a frame another stage derived.
Every file is written to a temporary name in the output folder and moved into place with
`os.replace`, and nothing is written until everything has been rendered in memory, so a crash never
leaves a half-written report behind.
"""
from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import pandas as pd

from qeval.core.files import atomic_write
from qeval.report.doc import Section, to_html, to_markdown
from qeval.report.frames import check_columns
from qeval.report.sections import SECTIONS, ReportData, ReportSection
from qeval.report.sections.meta import title_of

REPORT_MD, REPORT_HTML = "report.md", "report.html"


def compose(data: ReportData, sections: list[ReportSection] = SECTIONS) -> dict[str, bytes]:
    """Every file of the report, rendered in memory: {name: bytes}, CSVs first, then PNGs, then the
    Markdown and the HTML. Sections that read the others' banners (the summary, the run's
    provenance) are rendered after them; all are placed by their order."""
    check_columns(data.results, data.memory)
    done: dict[str, Section] = {}

    def run(section: ReportSection, d: ReportData) -> None:
        frame = section.frame(d)
        rendered = None if frame is None else section.render(frame)
        if rendered is not None:
            done[section.name] = rendered

    for section in sections:
        if not section.reads_banners:
            run(section, data)
    banners = tuple(b for s in sections if s.name in done for b in done[s.name].banners)
    for section in sections:
        if section.reads_banners:
            run(section, dataclasses.replace(data, banners=banners, shown=frozenset(done)))

    # A report without results keeps what explains that (title, summary, provenance, memory) and
    # drops the sections that compare results; their banners above still count.
    shown = [done[s.name] for s in sections if s.name in done and not (s.needs_results and data.results.empty)]
    blocks = [b for s in shown for b in s.blocks]
    files = {name: data_ for s in shown for name, data_ in s.files.items()}
    images = {name: data_ for s in shown for name, data_ in s.images.items()}
    return {**files, **images,
            REPORT_MD: to_markdown(blocks).encode("utf-8"),
            REPORT_HTML: to_html(blocks, images, title_of(data.meta)).encode("utf-8")}


def write(files: dict[str, bytes], out_dir: Path) -> list[Path]:
    """Write `files` into out_dir (created if missing), each atomically; the paths, in order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        atomic_write(out_dir / name, data)
        written.append(out_dir / name)
    return written


def render(results: pd.DataFrame | None, memory: pd.DataFrame | None, meta: dict | None, out_dir: Path,
           **inputs) -> list[Path]:
    """Render report files from frames (`qeval.report.frames.RESULT_COLUMNS` / `MEMORY_COLUMNS`; NaN
    shows as 'n/a') into out_dir and return the paths written. `inputs` are further `ReportData`
    fields (div=, adapters=, history=, ...): the sections they feed appear. Without records there
    is no summary and no format landscape. An empty `results` frame still yields every core file,
    with a report that says there are no results."""
    data = ReportData(results if results is not None else pd.DataFrame(),
                      memory if memory is not None else pd.DataFrame(), dict(meta or {}), **inputs)
    return write(compose(data), out_dir)


def report_data(store: Path, plan=None, memory_budget: float | None = None) -> ReportData:
    """Everything the report shows, from the store at `store` (read-only). `plan` (a plan path or a
    `qeval.run.runner.Plan`) sets the minimum meaningful effects, the FDR level and the adapters'
    domain tasks; `memory_budget` (bytes) the training memory the LoRA-vs-QLoRA verdict picks within."""
    from qeval.core import env
    from qeval.gates.nightly import thresholds_of
    from qeval.run.plan import Thresholds, load_plan
    from qeval.stats.compare import (adapter_frames, decision, divergence_frame, history_frame, latest,
                                     memory_frame, paired_frame, results_frame, with_paired)
    from qeval.stats.speed import speed_frame
    from qeval.store.store import Store

    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    th = thresholds_of(plan) if plan else Thresholds()
    # adapter name -> domain_tasks as the plan says now (stored records keep the run's)
    domain = None if not plan else {name: tuple(spec.domain_tasks) for name, spec in plan.adapters.items()}
    with Store(store, readonly=True) as s:
        records = list(s.records())
        pairs = paired_frame(records, s.samples, th.min_effect, th.margin)
        frames = adapter_frames(records, s.samples, th.min_effect, domain)
        history = history_frame(s.runs("nightly"), s.get)
        speed = speed_frame(s.speed_records())
        parity = tuple(s.parity_records())
    meta = {
        "title": "qeval report", "store": str(store),
        "generated_at": datetime.now().isoformat(timespec="seconds"),
        "models": {r.model.spec: r.model.fingerprint for r in records},
        "versions": dict(records[-1].versions) if records else env.versions(),
        "git_sha": ", ".join(sorted({r.git_sha for r in records})) or env.git_sha(),
        # with the compute dtype: a bf16 baseline on CPU is an explicit choice the reader must see
        "devices": sorted({f"{r.device_description} ({r.compute_dtype if r.stored('compute_dtype') else '?'})"
                           for r in records}),
        "seed": ", ".join(sorted({str(r.seed) for r in records})), "cells": len(records),
    }
    table, verdict = decision(frames, memory_budget)
    return ReportData(
        results=with_paired(results_frame(records), pairs), memory=memory_frame(records), meta=meta,
        records=tuple(records), pairs=pairs, div=divergence_frame(records, pairs), adapters=frames,
        decision=table, verdict=verdict, history=history, speed=speed, parity=parity, fdr=th.fdr,
        # the nightly compares every cell and metric of the plan: that many tests share the FDR
        tests=sum(len(r.metrics) for r in latest(records)))


def build_report(store: Path, out_dir: Path, plan=None, memory_budget: float | None = None) -> list[Path]:
    """`qeval report`: the report of the store at `store`, written into out_dir; the paths written."""
    return write(compose(report_data(Path(store), plan, memory_budget)), out_dir)
