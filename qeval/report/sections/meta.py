"""The report's opening: its title (first), and what the run was (models, devices, versions, store).

With a summary (`qeval.report.sections.summary`) the provenance follows it under "About this run";
without one it follows the title, and the other sections' banners close it under "Read this first".
"""
from __future__ import annotations

import pandas as pd

from qeval.report.doc import Block, Bullets, Heading, Section
from qeval.report.sections.base import ReportData, ReportSection, register

TITLE = "qeval quantization report"


def title_of(meta: dict) -> str:
    return str(meta.get("title") or TITLE)


def provenance(meta: dict, results: pd.DataFrame, memory: pd.DataFrame) -> list[str]:
    """One line per fact the meta holds (or, for models and devices, the rows record)."""
    items: list[str] = []
    if meta.get("generated_at"):
        items.append(f"Generated at: {meta['generated_at']}")
    if meta.get("suite"):
        items.append(f"Suite: {meta['suite']}")
    for key, label in (("seed", "Seed"), ("cells", "Cells")):
        if meta.get(key) is not None:
            items.append(f"{label}: {meta[key]}")
    models = meta.get("models") or {}
    if isinstance(models, dict) and models:
        items.append("Models: " + "; ".join(f"{spec} (fingerprint {str(fp)[:12]})" for spec, fp in models.items()))
    elif not results.empty:
        items.append("Models: " + ", ".join(sorted(results["model"].astype(str).unique())))
    devices = meta.get("devices")
    if not devices:
        # Not in the meta: fall back to what the rows themselves record.
        seen = pd.concat([f["device"] for f in (results, memory) if "device" in f.columns and not f.empty]
                         or [pd.Series(dtype=object)])
        devices = sorted(seen.dropna().astype(str).unique())
    if devices:
        items.append("Device: " + ", ".join(map(str, devices if isinstance(devices, (list, tuple)) else [devices])))
    if meta.get("git_sha"):
        items.append(f"Git sha: {meta['git_sha']}")
    versions = meta.get("versions") or {}
    if isinstance(versions, dict) and versions:
        items.append("Versions: " + ", ".join(f"{lib} {ver}" for lib, ver in versions.items()))
    if meta.get("store"):
        items.append(f"Store: {meta['store']}")
    return items


def title_section(title: str) -> Section:
    return Section([Heading(1, title)])


def about_section(items: list[str], after_summary: bool, banners: list[str]) -> Section:
    blocks: list[Block] = [Heading(2, "About this run")] if after_summary else []
    if items:
        blocks.append(Bullets(items))
    if not after_summary and banners:  # the summary carries them when there is one
        blocks += [Heading(2, "Read this first"), Bullets(banners)]
    return Section(blocks)


register(ReportSection("title", 0, lambda d: title_of(d.meta), title_section, needs_results=False))


def _about_frame(d: ReportData) -> tuple:
    return provenance(d.meta, d.table, d.memory_table), "summary" in d.shown, list(d.banners)


register(ReportSection("about", 20, _about_frame, lambda f: about_section(*f), needs_results=False,
                       reads_banners=True))
