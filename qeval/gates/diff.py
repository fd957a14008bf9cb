"""`qeval diff STORE_A STORE_B`: did moving to another machine, GPU, driver or library change anything?

The same cells in two stores are compared document by document with the paired statistics every
other verdict uses (`qeval.stats.paired.compare_pair`), all comparisons as one family under
Benjamini-Hochberg (as the nightly does), and a change counts only beyond the margin (default each
kind's minimum meaningful effect). Exit 1 when a cell got worse, 0 otherwise.

What "the same cell" means across two machines: a result key hashes the environment (library
versions; on CUDA the GPU, CUDA, driver and bitsandbytes build) and the variant id hashes the device
kind and compute dtype, so neither can match across an upgrade or from a CPU to a GPU. Cells are
matched on their spec without the environment (`cell_spec`): the model's content fingerprint, the
arm (format, adapter and its training recipe, merge), the task with its document fingerprint, limit
and few-shot count, and the evaluation seed. What differs between the matched records (versions,
device, compute dtype) is what the diff measures, and is printed above the table. Per-document
outputs are paired by document id and content hash, so a changed document is never compared.
When a store holds a cell several times (a nightly history), its newest record is compared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from qeval.core.errors import QevalError
from qeval.core.files import canonical_json
from qeval.gates.nightly import cell_name
from qeval.stats.paired import (BETTER, FDR_METHOD, NOISE, SMALL, UNDEFINED, WORSE, Comparison, compare_pair,
                                fdr_verdicts)
from qeval.store.record import Record
from qeval.store.store import Store

ONLY_A, ONLY_B, NOT_COMPARABLE = "only in A", "only in B", "not comparable"
ORDER = (WORSE, BETTER, SMALL, NOISE, UNDEFINED, NOT_COMPARABLE, ONLY_A, ONLY_B)


def cell_spec(rec: Record) -> tuple:
    """A cell's identity across machines and environments: the spec without versions, device or dtype."""
    t, v = rec.task, rec.variant
    recipe = "" if rec.adapter is None else canonical_json({k: x for k, x in rec.adapter.spec.items()
                                                            if k != "domain_tasks"})
    return (rec.model.fingerprint, v.arm, v.quant, v.adapter, v.merge, recipe, t.name, t.fingerprint, t.limit,
            t.num_fewshot, rec.eval.get("seed"))


@dataclass
class DiffRow:
    cell: str
    metric: str
    status: str  # one of ORDER
    a: float = math.nan
    b: float = math.nan
    comparison: Comparison | None = None
    adjusted_p: float = math.nan
    note: str = ""


@dataclass
class Diff:
    rows: list[DiffRow]
    environment: list[str]  # what differs between the matched records, with how many cells
    method: str
    margin: str
    exit_code: int = 0
    counts: dict = field(default_factory=dict)


def newest(store: Store) -> dict[tuple, Record]:
    out: dict[tuple, Record] = {}
    for rec in store.records():  # in created_at order: a later record of a cell replaces an earlier one
        out[cell_spec(rec)] = rec
    return out


def diff(store_a: Path, store_b: Path, margin: float | Mapping[str, float] | None = None,
         fdr: float = 0.05) -> Diff:
    """Compare the cells the two stores share; see the module docstring. `margin`: the change that
    counts (a number, or metric name / comparison kind -> number; None: each kind's minimum
    meaningful effect)."""
    with Store(store_a, readonly=True) as sa, Store(store_b, readonly=True) as sb:
        ra, rb = newest(sa), newest(sb)
        if not set(ra) & set(rb):
            names = lambda rs: sorted({cell_name(r) for r in rs.values()})  # noqa: E731
            raise QevalError("stores", f"{store_a} and {store_b}", "two stores that share at least one cell "
                             f"(same model, arm, task, limit); A has {len(ra)} cells ({', '.join(names(ra)[:3])}"
                             f"{', ...' if len(ra) > 3 else ''}), B has {len(rb)} ({', '.join(names(rb)[:3])}"
                             f"{', ...' if len(rb) > 3 else ''})", "diff stores of the same plan")
        rows, tests, env_diffs = [], [], {}
        for spec in sorted(set(ra) & set(rb), key=lambda s: cell_name(ra[s])):
            a, b = ra[spec], rb[spec]
            for d in _environment(a, b):
                env_diffs[d] = env_diffs.get(d, 0) + 1
            samples_a, samples_b = sa.samples(a.key), sb.samples(b.key)
            for metric, m in a.metrics.items():
                if metric not in b.metrics:
                    rows.append(DiffRow(cell_name(a), metric, NOT_COMPARABLE, m.value, note="not measured in B"))
                    continue
                row = DiffRow(cell_name(a), metric, UNDEFINED, m.value, b.metrics[metric].value)
                rows.append(row)
                if not samples_a or not samples_b:
                    row.status, row.note = NOT_COMPARABLE, "no per-document outputs stored"
                    continue
                try:
                    c = compare_pair(samples_a, samples_b, metric, bool(m.higher_is_better), margin,
                                     aggregation=m.aggregation)
                except ValueError as e:  # a document whose content differs: not the same documents
                    row.status, row.note = NOT_COMPARABLE, str(e)
                    continue
                row.comparison = c
                tests.append(row)
        method = f"{FDR_METHOD} at q={fdr:g} over {len(tests)} comparison{'' if len(tests) == 1 else 's'}"
        for row, (adj, verdict) in zip(tests, fdr_verdicts([r.comparison for r in tests], fdr)):
            row.adjusted_p, row.status = adj, verdict
            if verdict == UNDEFINED:
                row.note = row.comparison.reason
        for spec in set(ra) - set(rb):
            rows.append(DiffRow(cell_name(ra[spec]), "", ONLY_A))
        for spec in set(rb) - set(ra):
            rows.append(DiffRow(cell_name(rb[spec]), "", ONLY_B))
    rows.sort(key=lambda r: (ORDER.index(r.status), r.cell, r.metric))
    counts = {s: sum(r.status == s for r in rows) for s in ORDER}
    margin_text = "each kind's minimum meaningful effect" if margin is None else (
        f"{margin:g}" if isinstance(margin, (int, float)) else ", ".join(f"{k}={v:g}" for k, v in margin.items()))
    envs = [f"{d} ({n} cell{'' if n == 1 else 's'})" for d, n in sorted(env_diffs.items())]
    return Diff(rows, envs, method, margin_text, 1 if counts[WORSE] else 0, counts)


def _environment(a: Record, b: Record) -> list[str]:
    out = [f"{k} {a.versions.get(k)} -> {b.versions.get(k)}" for k in sorted(set(a.versions) | set(b.versions))
           if a.versions.get(k) != b.versions.get(k)]
    da, db = a.device_description or a.device, b.device_description or b.device
    if da != db:
        out.append(f"device {da} -> {db}")
    if a.compute_dtype != b.compute_dtype:
        out.append(f"compute dtype {a.compute_dtype} -> {b.compute_dtype}")
    return out


def render(d: Diff, store_a: Path, store_b: Path) -> str:
    """The diff as Markdown: what differs between the environments, then one table of every cell and
    metric (changes beyond noise first, then what did not change, then cells only in one store)."""
    changed = d.counts[WORSE] + d.counts[BETTER]
    out = [f"# qeval diff: {d.counts[WORSE]} worse, {d.counts[BETTER]} better, "
           f"{d.counts[SMALL] + d.counts[NOISE]} within noise or the margin", "",
           f"A = {store_a}, B = {store_b}; paired per document; {d.method}; margin: {d.margin}.", "",
           "What differs between the matched records: " + ("; ".join(d.environment) or "nothing recorded") + ".", ""]
    if not changed:
        out += ["Nothing changed beyond noise and the margin.", ""]
    out += ["| cell | metric | A | B | delta [95% CI] | adjusted p | verdict |", "|---|---|---:|---:|---|---:|---|"]
    for r in d.rows:
        c = r.comparison
        delta = "" if c is None or math.isnan(c.ci_lo) else f"{c.delta:+.4g} [{c.ci_lo:+.4g}, {c.ci_hi:+.4g}]"
        verdict = r.status.upper() if r.status == WORSE else r.status
        if r.note:
            verdict += f" ({r.note})"
        out.append(f"| {_md(r.cell)} | {_md(r.metric)} | {_num(r.a)} | {_num(r.b)} | {delta} | "
                   f"{_num(r.adjusted_p, '.3g')} | {_md(verdict)} |")
    return "\n".join(out) + "\n"


def _num(v: float, spec: str = ".4g") -> str:
    return "" if v is None or math.isnan(v) else format(v, spec)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
