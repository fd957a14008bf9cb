"""Nightly regression runs: the plan incrementally, a run entry in the store, noise-aware gates.

`nightly(plan_path, store_path)` holds a lock on the store (a second nightly waits), records a run,
computes only missing cells (run_plan), and compares every cell of the plan with (a) the same
variant and task in the previous finished nightly run and (b) the plan's thresholds. A drop is a
regression only when it is beyond noise: its paired-bootstrap interval against the previous value
excludes zero, or the recovery breaks a threshold. Exit codes: 0 clean, 1 regression,
3 the run could not finish (failed cells), 2 bad input (as everywhere in qeval).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qeval import env
from qeval.compare import BASELINE, adapter_label, paired
from qeval.errors import QevalError
from qeval.runner import Plan, expand, load_plan, run_plan, validate
from qeval.specs import from_mapping, raise_if
from qeval.store import Store

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_COULD_NOT_RUN = 0, 1, 2, 3


@dataclass(frozen=True)
class Thresholds:
    """Gates on recovery (value vs the baseline in the same run, 1.0 = nothing lost; perplexity is
    baseline/value). The most specific one applies: per arm, then per metric, then the default."""

    min_recovery: float | None = None
    per_arm: dict = field(default_factory=dict)  # arm name -> min recovery
    per_metric: dict = field(default_factory=dict)  # metric name -> min recovery
    warn_below: dict = field(default_factory=dict)  # "task:metric" -> absolute value that only warns

    def for_cell(self, arm: str, metric: str) -> float | None:
        return self.per_arm.get(arm, self.per_metric.get(metric, self.min_recovery))


@dataclass
class Finding:
    kind: str  # regression | warning
    cell: str
    metric: str
    before: float
    after: float
    detail: str

    def line(self) -> str:
        return f"{self.kind.upper()}: {self.cell} {self.metric}: {self.before:.4g} -> {self.after:.4g} {self.detail}"


@dataclass
class NightlyResult:
    run_id: int
    exit_code: int
    computed: int
    reused: int
    failed: list[str]
    findings: list[Finding]
    wall_s: float


def thresholds_of(plan: Plan) -> Thresholds:
    errors: list[QevalError] = []
    th = from_mapping(Thresholds, plan.thresholds, "thresholds", errors)
    raise_if(errors)
    return th


def nightly(plan_path: Path, store_path: Path,
            progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> NightlyResult:
    from qeval.files import store_lock

    t0 = time.perf_counter()
    plan = load_plan(plan_path)
    rp = validate(plan)
    th = thresholds_of(plan)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    # One nightly at a time per store: a second one waits here, then finds the cells stored.
    with store_lock(store_path, "nightly", progress):  # waits at most QEVAL_LOCK_TIMEOUT, then exit 3
        cells = [c for _, _, job_cells in expand(plan, rp) for c in job_cells]
        info = {"plan": str(plan_path), "plan_spec": dataclasses.asdict(plan), "git_sha": env.git_sha(),
                "versions": env.versions(), "device": rp.device, "cells": [c.key for c in cells]}
        with Store(store_path) as store:
            run_id = store.start_run("nightly", info)
        progress(f"nightly run {run_id}: {len(cells)} cells")
        summary = run_plan(plan, store_path, suite=rp.suite, progress=progress)
        with Store(store_path) as store:
            findings = _compare(store, run_id, cells, th)
            status = "failed" if summary.failed else ("regression" if any(f.kind == "regression" for f in findings) else "ok")
            store.finish_run(run_id, status, {**info, "computed": summary.computed, "reused": summary.reused,
                                              "failed": summary.failed, "findings": [f.line() for f in findings]})
    code = EXIT_COULD_NOT_RUN if summary.failed else (EXIT_REGRESSION if status == "regression" else EXIT_OK)
    return NightlyResult(run_id, code, len(summary.computed), len(summary.reused), summary.failed, findings,
                         time.perf_counter() - t0)


def _compare(store: Store, run_id: int, cells, th: Thresholds) -> list[Finding]:
    """Each cell against the previous finished nightly and against the thresholds."""
    previous = [r for r in store.runs("nightly") if r["run_id"] < run_id and r["status"] in ("ok", "regression")]
    prev_keys: dict[tuple, str] = {}
    if previous:
        for key in previous[-1]["cells"]:
            rec = store.get(key)
            if rec is not None:
                prev_keys[_slot(rec)] = key
    now = {c.key: store.get(c.key) for c in cells}
    now = {k: r for k, r in now.items() if r is not None}  # a failed cell has no record
    baselines = {(_slot(r)[1:]): r for r in now.values()
                 if r["variant"]["quant"] == BASELINE and not adapter_label(r["variant"])}
    findings = []
    for key, rec in now.items():
        metric = rec["primary_metric"]
        m = rec["metrics"][metric]
        hib = bool(m["higher_is_better"])
        cell = _cell_name(rec)
        # (a) against the previous nightly: only a drop beyond noise counts
        pkey = prev_keys.get(_slot(rec))
        if pkey and pkey != key:  # same key = same inputs = same numbers
            prev = store.get(pkey)
            if prev["task"]["fingerprint"] == rec["task"]["fingerprint"] and prev["task"]["limit"] == rec["task"]["limit"]:
                stats = paired(store.samples(pkey) or [], store.samples(key) or [], metric, hib, seed=rec["seed"])
                worse = (stats.get("delta_hi", math.inf) < 0) if hib else (stats.get("delta_lo", -math.inf) > 0)
                if worse:
                    findings.append(Finding("regression", cell, metric, prev["metrics"][metric]["value"], m["value"],
                                            f"(delta {stats['delta']:+.4g}, 95% CI [{stats['delta_lo']:+.4g}, "
                                            f"{stats['delta_hi']:+.4g}]; {_changed(prev, rec)})"))
        # (b) against the thresholds, relative to the baseline of this run
        base = baselines.get(_slot(rec)[1:])
        limit = th.for_cell(rec["variant"].get("arm", rec["variant"]["quant"]), metric)
        if base is not None and base is not rec and limit is not None:
            bv = base["metrics"][metric]["value"]
            recovery = (m["value"] / bv if hib else bv / m["value"]) if bv and m["value"] else math.nan
            if recovery < limit:
                findings.append(Finding("regression", cell, metric, bv, m["value"],
                                        f"(recovery {recovery:.3f} < threshold {limit:.3f})"))
        warn = th.warn_below.get(f"{rec['task']['name']}:{metric}")
        if warn is not None and m["value"] < warn:
            findings.append(Finding("warning", cell, metric, warn, m["value"], f"(below the warning level {warn:g})"))
    return sorted(findings, key=lambda f: (f.kind != "regression", f.cell, f.metric))


def _slot(rec: dict) -> tuple:
    """A cell's identity across upgrades: variant (no versions) + task + the documents measured."""
    t = rec["task"]
    return (rec["variant_id"], rec["model"]["fingerprint"], t["name"], t["limit"], t["num_fewshot"])


def _cell_name(rec: dict) -> str:
    return f"{rec['variant']['model']} @ {rec['variant'].get('arm', rec['variant']['quant'])} / {rec['task']['name']}"


def _changed(prev: dict, rec: dict) -> str:
    diff = [f"{k} {prev['versions'].get(k)} -> {v}" for k, v in rec["versions"].items() if prev["versions"].get(k) != v]
    return "versions: " + ", ".join(diff) if diff else "same versions"
