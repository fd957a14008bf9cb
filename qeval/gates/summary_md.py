"""A nightly run as a compact Markdown summary for a CI step summary ($GITHUB_STEP_SUMMARY, a GitLab
job report, a chat message): regressions, acknowledgements, fixes, warnings, what could not run,
and what the nightly can detect at all (its minimum detectable effects under the run's FDR control),
so that a green run is read as "nothing this large changed", not "nothing changed"."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from qeval.gates.nightly import Finding, NightlyResult
from qeval.run.plan import Thresholds


@dataclass(frozen=True)
class Detectable:
    """What one task's metric lets the nightly see: its n, test, MDE at alpha 0.05, the minimum
    meaningful effect, and the MDE of a single regression among all the run's comparisons under
    Benjamini-Hochberg (p < q / tests)."""

    task: str
    metric: str
    n: int
    test: str
    mde: float
    min_effect: float
    nightly_mde: float
    relative: bool


def detectable(store_path: Path, run_id: int, th: Thresholds) -> tuple[list[Detectable], int]:
    """The MDEs of run `run_id`'s cells, measured as the report measures them (each task's noise is
    that of the variant closest to the baseline: qeval.stats.compare.task_mde), and the number of
    comparisons that share the FDR (every cell and metric of the run)."""
    from qeval.stats.compare import paired_frame, task_mde
    from qeval.stats.detect import nightly_mde
    from qeval.stats.paired import KINDS
    from qeval.store.store import Store

    with Store(store_path, readonly=True) as s:
        run = next(r for r in s.runs() if r["run_id"] == run_id)
        records = [r for r in (s.get(k) for k in run.get("cells", [])) if r is not None]
        pairs = paired_frame(records, s.samples, th.min_effect)
    tests = sum(len(r.metrics) for r in records)
    out = []
    for r in task_mde(pairs).itertuples(index=False):
        out.append(Detectable(str(r.task), str(r.metric), int(r.n), str(r.test), float(r.mde), float(r.min_effect),
                              nightly_mde(r, th.fdr, tests), KINDS.get(str(r.kind)).relative))
    return out, tests


def summary_md(res: NightlyResult, fdr: float, mdes: list[Detectable] | None = None, tests: int = 0) -> str:
    """The Markdown summary of a finished nightly run."""
    regressions = [f for f in res.findings if f.kind == "regression"]
    acks = [f for f in res.findings if f.kind == "acknowledged"]
    warnings = [f for f in res.findings if f.kind == "warning"]
    status = ("could not finish" if res.failed else
              f"{len(regressions)} regression{'' if len(regressions) == 1 else 's'}" if regressions else "clean")
    counts = {s: sum(g.status == s for g in res.gates) for s in ("passed", "failed", "acknowledged", "skipped")}
    out = [f"## qeval {res.kind} run {res.run_id}: {status} (exit {res.exit_code})", "",
           f"{res.computed + res.reused} cells ({res.computed} computed, {res.reused} reused, {len(res.failed)} failed) "
           f"in {res.wall_s:.0f} s; {len(res.gates)} gates: " + ", ".join(f"{v} {k}" for k, v in counts.items())
           + f"; {res.method or 'no comparisons'}.", ""]
    out += _findings("Regressions", regressions, empty="none")
    out += _findings("Acknowledged", acks)
    if res.fixed:
        out += [f"### Fixed ({len(res.fixed)})", "", "| cell | metric | open since run |", "|---|---|---:|"]
        out += [f"| {_cell(o['cell'])} | {_cell(o['metric'])} | {o.get('since', '')} |" for o in res.fixed] + [""]
    out += _findings("Warnings", warnings)
    if res.failed:
        out += [f"### Could not run ({len(res.failed)})", ""] + [f"- {_cell(line)}" for line in res.failed] + [""]
    if mdes:
        out += ["### What this nightly can detect", "",
                f"A change smaller than the larger of the last two columns can pass unnoticed: a single regression "
                f"among the run's {tests} comparisons must reach p < q/{tests} = {fdr / max(tests, 1):.2g} "
                f"(Benjamini-Hochberg, q = {fdr:g}) and exceed the minimum effect.", "",
                "| task | metric | n | test | MDE (alpha 0.05) | min effect | nightly MDE |", "|---|---|---:|---|---:|---:|---:|"]
        out += [f"| {d.task} | {_cell(d.metric)} | {d.n} | {d.test} | {_effect(d.mde, d.relative)} | "
                f"{_effect(d.min_effect, d.relative)} | {_effect(d.nightly_mde, d.relative)} |" for d in mdes] + [""]
    return "\n".join(out)


def _findings(title: str, findings: list[Finding], empty: str = "") -> list[str]:
    if not findings:
        return [f"### {title}: {empty}", ""] if empty else []
    rows = [f"| {_cell(f.cell)} | {_cell(f.metric)} | {f.before:.4g} | {f.after:.4g} | {_cell(f.detail.strip('()'))} |"
            for f in findings]
    return [f"### {title} ({len(findings)})", "", "| cell | metric | before | after | detail |",
            "|---|---|---:|---:|---|", *rows, ""]


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _effect(v: float, relative: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2%}" if relative else f"{v:.3g}"
