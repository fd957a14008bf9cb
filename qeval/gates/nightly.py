"""Nightly regression runs: the plan incrementally, a run entry in the store, gates people can act on.

`nightly(plan_path, store_path)` holds a lock on the store (a second nightly waits), records a run,
computes only missing cells (run_plan), and then:

1. compares every cell and metric with the same variant and task in the previous finished run
   (`qeval.stats.paired.compare_pair`: Tango's score test for right/wrong metrics, a paired t on per-document
   log-likelihoods for perplexities). All comparisons of the run are one family: their p-values are
   adjusted together (Benjamini-Hochberg, level `thresholds.fdr`), and a change is a regression
   only when it is significant after that adjustment *and* larger than the metric's minimum
   meaningful effect (`thresholds.min_effect`, defaults per kind: 1 accuracy point, 0.5% perplexity);
2. applies the recovery gates (`min_recovery`, `per_arm`, `per_metric`) against the baseline of the
   same run, to every metric they name, oriented by the metric's direction; an undefined recovery
   (baseline 0) fails;
3. keeps regressions open: a regression found in an earlier run stays open (reported, exit 1)
   while its cell is unchanged; once the cell changes it is compared against the result from before
   the regression and closes only when that comparison no longer says "worse". A person can
   acknowledge a regression (`qeval nightly PLAN --ack CELL --reason TEXT`, stored as a run of kind
   "ack", or `thresholds.acknowledged: [{cell: ..., reason: ...}]` in the plan); it is then reported
   as ACKNOWLEDGED and does not fail the run.

Exit codes: 0 clean, 1 regression, 2 bad input, 3 could not finish (failed cells, or an unexpected
error: the run is then marked failed in the store, never left "running").
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qeval.core import env
from qeval.train.spec import seed_base
from qeval.store.record import Record
from qeval.core.errors import QevalError, did_you_mean, unknown_name
from qeval.stats.paired import (FDR_METHOD, KINDS, WORSE, Comparison, compare_pair, fdr_verdicts, recovery,
                          recovery_fails)
from qeval.core.config import raise_if
from qeval.core.names import EXIT_BAD_INPUT, EXIT_COULD_NOT_RUN, EXIT_OK, EXIT_REGRESSION  # noqa: F401
from qeval.run.cells import expand
from qeval.run.driver import run_plan
# the gates' settings are a section of the plan's schema (run layer); they are applied here
from qeval.run.plan import DEFAULT_FDR, Plan, Resolved, Thresholds, load_plan, validate  # noqa: F401
from qeval.store.store import Store


@dataclass
class Finding:
    kind: str  # regression | acknowledged | warning
    cell: str
    metric: str
    before: float
    after: float
    detail: str
    id: str = ""  # identity of a regression across runs (what an ack names)
    gate: str = ""  # change | threshold | warning

    def line(self) -> str:
        return f"{self.kind.upper()}: {self.cell} {self.metric}: {self.before:.4g} -> {self.after:.4g} {self.detail}"


@dataclass
class Gate:
    """One gate of a run as CI shows it (a JUnit testcase): a cell's metric against the previous run
    (`change`), against the plan's recovery threshold (`threshold`), or a cell that has no result
    (`cell`: it could not run, so none of its gates could be evaluated)."""

    gate: str  # change | threshold | cell
    cell: str
    metric: str
    outcome: str  # passed | skipped (could not be evaluated); a finding decides failed / acknowledged
    detail: str  # what was found, or why it could not be evaluated
    finding: Finding | None = None

    @property
    def status(self) -> str:
        """passed | failed | acknowledged | skipped."""
        if self.finding is not None:
            return "failed" if self.finding.kind == "regression" else "acknowledged"
        return self.outcome


@dataclass
class NightlyResult:
    run_id: int
    exit_code: int
    computed: int
    reused: int
    failed: list[str]
    findings: list[Finding]
    wall_s: float
    tests: int = 0
    method: str = ""
    gates: list[Gate] = dataclasses.field(default_factory=list)
    fixed: list[dict] = dataclasses.field(default_factory=list)  # regressions open before this run, closed by it
    kind: str = "nightly"


# ----------------------------------------------------------------------------- plan validation

def task_metrics(task: str) -> set[str] | None:
    """The metrics a shipped task reports (its metric_list), None for tasks qeval does not ship."""
    from qeval.core.config import load_yaml
    from qeval.eval.suites import shipped_tasks

    path = shipped_tasks().get(task)
    if path is None:
        return None
    return {m["metric"] for m in (load_yaml(path, "task").get("metric_list") or []) if isinstance(m, dict)}


def thresholds_of(plan: Plan, rp: Resolved | None = None) -> Thresholds:
    """The plan's thresholds, checked against the plan: every arm, task and metric they name must
    exist (a typo would silently gate nothing). All problems are reported together."""
    errors: list[QevalError] = []
    th = plan.thresholds
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not 0 < th.fdr < 1:
        errors.append(QevalError("thresholds.fdr", th.fdr, "a false discovery rate between 0 and 1, e.g. 0.05"))
    if rp is not None:
        arms = [a.name for a in rp.arms]
        tasks = {t.task: task_metrics(t.task) for t in rp.suite.tasks}
        metrics = set().union(*[m for m in tasks.values() if m]) if tasks else set()
        open_world = any(m is None for m in tasks.values())  # an lm-eval task: its metrics are unknown here
        names = list(dict.fromkeys(arms + [seed_base(a) for a in arms]))  # a seeded arm's plan name gates its seeds
        for arm in th.per_arm:
            if arm not in names:
                errors.append(unknown_name("arm in thresholds.per_arm", arm, names))
        for metric in th.per_metric:
            if metric not in metrics and not open_world:
                errors.append(unknown_name("metric in thresholds.per_metric", metric, metrics))
        for name in th.min_effect:
            if name not in metrics and name not in KINDS and not open_world:
                errors.append(unknown_name("metric or kind in thresholds.min_effect", name, metrics | set(KINDS)))
        for name in th.margin:  # a task of the suite (or its group member), a metric or a kind
            if name not in tasks and name not in metrics and name not in KINDS and not open_world:
                errors.append(unknown_name("task, metric or kind in thresholds.margin", name,
                                           set(tasks) | metrics | set(KINDS)))
        for key in th.warn_below:
            task, _, metric = str(key).partition(":")
            if task not in tasks:
                errors.append(unknown_name("task in thresholds.warn_below", key,
                                           [f"{t}:{m}" for t, ms in tasks.items() for m in sorted(ms or ())] or tasks))
            elif tasks[task] is not None and metric not in tasks[task]:
                errors.append(unknown_name("metric in thresholds.warn_below", key, [f"{task}:{m}" for m in sorted(tasks[task])]))
    for where, table in (("per_arm", th.per_arm), ("per_metric", th.per_metric), ("warn_below", th.warn_below),
                         ("min_effect", th.min_effect), ("margin", th.margin)):
        for k, v in table.items():
            if not num(v):
                errors.append(QevalError(f"thresholds.{where}.{k}", v, "a number"))
            elif where == "margin" and not v > 0:
                errors.append(QevalError(f"thresholds.margin.{k}", v, "a positive margin in the kind's units",
                                         "0.01 = 1 accuracy point; 0.01 = 1% for perplexity"))
    for i, a in enumerate(th.acknowledged):
        if not isinstance(a, dict) or set(a) != {"cell", "reason"} or not str(a.get("reason") or "").strip():
            errors.append(QevalError(f"thresholds.acknowledged[{i}]", a, "{cell: CELL, reason: TEXT}",
                                     "name the cell as the nightly prints it and say why"))
    raise_if(errors)
    return th


# ----------------------------------------------------------------------------- the run

def nightly(plan_path: Path, store_path: Path,
            progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
            run_kind: str = "nightly", compare_with: str | None = None) -> NightlyResult:
    """Run the plan and gate it. `run_kind` names the runs this one is recorded as; `compare_with`
    the kind of run it is compared with (default the same): a candidate-environment run
    (`run_kind="candidate"`, `compare_with="nightly"`) is compared with the last locked one."""
    from qeval.core.files import store_lock

    t0 = time.perf_counter()
    plan = load_plan(plan_path)
    rp = validate(plan)
    th = thresholds_of(plan, rp)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    # One nightly at a time per store: a second one waits here, then finds the cells stored.
    with store_lock(store_path, "nightly", progress):  # waits at most QEVAL_LOCK_TIMEOUT, then exit 3
        cells = [c for _, _, job_cells in expand(plan, rp) for c in job_cells]
        info = {"plan": str(plan_path), "plan_spec": dataclasses.asdict(plan), "git_sha": env.git_sha(),
                "versions": env.versions(), "device": rp.device, "cells": [c.key for c in cells],
                "compare_with": compare_with or run_kind}
        with Store(store_path) as store:
            run_id = store.start_run(run_kind, info)
        try:
            progress(f"{run_kind} run {run_id}: {len(cells)} cells")
            summary = run_plan(plan, store_path, suite=rp.suite, progress=progress)
            with Store(store_path) as store:
                gated, status = gate_run(store, run_id, [c.key for c in cells], th, compare_with or run_kind, {
                    **info, "computed": summary.computed, "reused": summary.reused, "failed": summary.failed})
                findings = gated.findings
                names = {c.key: f"{c.model.spec} @ {c.arm.name} / {c.task.task}" for c in cells}
                gated.gates += [Gate("cell", names[k], "", "skipped", "no result: the cell could not run this night")
                                for k in names if k not in store]
        except BaseException as e:
            # never leave a run "running" because of an error; a kill (KeyboardInterrupt, SIGKILL)
            # does leave it so, which is how a restarted job shows it was interrupted
            if isinstance(e, Exception):
                with Store(store_path) as store:
                    store.finish_run(run_id, "failed", {**info, "error": f"{type(e).__name__}: {e}"})
            raise
    code = EXIT_COULD_NOT_RUN if summary.failed else (EXIT_REGRESSION if status == "regression" else EXIT_OK)
    return NightlyResult(run_id, code, len(summary.computed), len(summary.reused), summary.failed, findings,
                         time.perf_counter() - t0, gated.tests, gated.method, gated.gates, gated.fixed, run_kind)


def gate_run(store: Store, run_id: int, keys: list[str], th: Thresholds, compare_with: str, info: dict):
    """Gate the cells `keys` of run `run_id` and finish the run with its findings and the
    regressions left open. Returns (Gated, status)."""
    gated = _compare(store, run_id, keys, th, compare_with)
    regressed = any(f.kind == "regression" for f in gated.findings)
    status = "failed" if info.get("failed") else ("regression" if regressed else "ok")
    store.finish_run(run_id, status, {**info, "findings": [f.line() for f in gated.findings],
                                      "open_regressions": gated.open, "tests": gated.tests, "method": gated.method})
    return gated, status


@dataclass
class Gated:
    findings: list[Finding]
    open: list[dict]  # the regressions still open after this run (unacknowledged), for the next run
    tests: int
    method: str
    gates: list[Gate] = dataclasses.field(default_factory=list)  # every gate, evaluated or not
    fixed: list[dict] = dataclasses.field(default_factory=list)


def _compare(store: Store, run_id: int, keys: list[str], th: Thresholds, compare_with: str) -> Gated:
    previous = [r for r in store.runs(compare_with) if r["run_id"] < run_id and r["status"] in ("ok", "regression")]
    prev = previous[-1] if previous else None
    prev_keys: dict[tuple, str] = {}
    for key in (prev["cells"] if prev else []):
        rec = store.get(key)
        if rec is not None:
            prev_keys[_slot(rec)] = key
    # open regressions carry over from the last gated run, even one with failed cells
    gated_runs = [r for r in store.runs(compare_with) if r["run_id"] < run_id and "open_regressions" in r]
    was_open = {o["id"]: o for o in (gated_runs[-1]["open_regressions"] if gated_runs else [])}
    now = {k: r for k, r in ((k, store.get(k)) for k in keys) if r is not None}  # a failed cell has no record
    baselines = {_slot(r)[1:]: r for r in now.values() if r.variant.is_baseline}

    # (1) changes: every cell and metric against the previous run (or, while a regression of it is
    # open, against the result from before the regression); one family for the FDR control
    tests: list[tuple[Record, Record, str, Comparison]] = []
    carried: list[Finding] = []
    gates: list[Gate] = []
    skip = lambda rec, metric, why: gates.append(Gate("change", cell_name(rec), metric, "skipped", why))  # noqa: E731
    open_change = {(tuple(o["slot"]), o["metric"]): o for o in was_open.values() if o["gate"] == "change"}
    for key, rec in now.items():
        for metric, m in rec.metrics.items():
            o = open_change.get((_slot(rec), metric))
            if o is not None and o["key"] == key:  # unchanged since the regression: still open
                carried.append(Finding("regression", cell_name(rec), metric, o["before"], m.value,
                                       f"(open since run {o['since']}, cell unchanged: {o['detail']})", o["id"], "change"))
                gates.append(Gate("change", cell_name(rec), metric, "passed", "", carried[-1]))
                continue
            ref_key = o["ref_key"] if o is not None else prev_keys.get(_slot(rec))
            if not ref_key:
                skip(rec, metric, f"no earlier result of this cell in a finished {compare_with} run to compare with")
                continue
            if ref_key == key:  # same key = same inputs = same numbers
                gates.append(Gate("change", cell_name(rec), metric, "passed",
                                  "unchanged: the same result as the earlier run (same key, same inputs)"))
                continue
            ref = store.get(ref_key)
            if ref is None or metric not in ref.metrics:
                skip(rec, metric, "the earlier result " + ("is gone from the store" if ref is None else f"has no {metric}"))
                continue
            if _slot(ref) != _slot(rec) or ref.task.fingerprint != rec.task.fingerprint:
                skip(rec, metric, "the task's documents changed since the earlier result: nothing to pair")
                continue
            c = _compare_samples(store.samples(ref_key), store.samples(key), metric, bool(m.higher_is_better), th,
                                 m.aggregation)
            if c is None:
                skip(rec, metric, "no per-document outputs stored to pair")
                continue
            tests.append((ref, rec, metric, c))
    findings: list[Finding] = list(carried)
    method = f"{FDR_METHOD} at q={th.fdr:g} over {len(tests)} comparison{'' if len(tests) == 1 else 's'}"
    for (ref, rec, metric, c), (adj, verdict) in zip(tests, fdr_verdicts([t[3] for t in tests], th.fdr)):
        stats = (f"{c.test}: delta {c.delta:+.4g}, 95% CI [{c.ci_lo:+.4g}, {c.ci_hi:+.4g}], p={c.p_value:.3g}, "
                 f"adjusted p={adj:.3g} ({method}), min effect {_effect(c)}")
        if verdict != WORSE:
            gates.append(Gate("change", cell_name(rec), metric, "passed",
                              f"{c.ref_value:.4g} -> {c.value:.4g}: {verdict} ({stats})"))
            continue
        o = open_change.get((_slot(rec), metric))
        fid = o["id"] if o else f"change|{cell_name(rec)}|{metric}|{ref.key[:12]}"
        findings.append(Finding("regression", cell_name(rec), metric, c.ref_value, c.value,
                                f"({stats}; {_changed(ref, rec)})", fid, "change"))
        gates.append(Gate("change", cell_name(rec), metric, "passed", "", findings[-1]))

    # (2) recovery gates against this run's baseline, every metric they name, with its direction
    for key, rec in now.items():
        base = baselines.get(_slot(rec)[1:])
        arm = rec.variant.arm
        for metric, m in rec.metrics.items():
            limit = th.limit(arm, metric, metric == rec.primary_metric)
            if base is rec or limit is None:
                continue
            if base is None or metric not in base.metrics:
                gates.append(Gate("threshold", cell_name(rec), metric, "skipped",
                                  f"no baseline {'result' if base is None else metric} in this run to measure "
                                  f"recovery against (threshold {limit:.3f})"))
                continue
            bv, hib = base.metrics[metric].value, bool(m.higher_is_better)
            rec_ = recovery(m.value, bv, hib)
            if recovery_fails(rec_, limit):
                why = "recovery undefined (baseline 0)" if rec_ != rec_ else f"recovery {rec_:.3f}"
                findings.append(Finding("regression", cell_name(rec), metric, bv, m.value,
                                        f"({why} < threshold {limit:.3f})", f"threshold|{cell_name(rec)}|{metric}",
                                        "threshold"))
                gates.append(Gate("threshold", cell_name(rec), metric, "passed", "", findings[-1]))
            else:
                gates.append(Gate("threshold", cell_name(rec), metric, "passed",
                                  f"recovery {rec_:.3f} >= threshold {limit:.3f} (baseline {bv:.4g}, value {m.value:.4g})"))
        for wkey, level in th.warn_below.items():
            task, _, metric = wkey.partition(":")
            if task != rec.task.name or metric not in rec.metrics:
                continue
            m = rec.metrics[metric]
            hib = bool(m.higher_is_better)
            if (m.value < level) if hib else (m.value > level):
                findings.append(Finding("warning", cell_name(rec), metric, level, m.value,
                                        f"(worse than the warning level {level:g}: "
                                        f"{'lower' if hib else 'higher'} is worse)", gate="warning"))

    # (3) acknowledgements turn a regression into a reported, non-failing finding
    acks = _acks(store, th)
    still_open = []
    for f in findings:
        if f.kind != "regression":
            continue
        reason = acks.get(f.id) or acks.get(norm_cell(f.cell))
        if reason:
            f.kind, f.detail = "acknowledged", f"{f.detail} [acknowledged: {reason}]"
            continue
        since = was_open.get(f.id, {}).get("since", run_id)
        entry = {"id": f.id, "gate": f.gate, "cell": f.cell, "metric": f.metric, "before": f.before,
                 "detail": f.detail, "since": since}
        if f.gate == "change":
            rec = next(r for r in now.values() if cell_name(r) == f.cell)
            prior = was_open.get(f.id)
            entry.update(slot=list(_slot(rec)), key=rec.key,
                         ref_key=prior["ref_key"] if prior else _ref_key_of(tests, rec, f.metric))
        still_open.append(entry)
    order = {"regression": 0, "acknowledged": 1, "warning": 2}
    # fixed: open before this run, not open now, and not merely acknowledged
    now_ids = {f.id for f in findings if f.kind in ("regression", "acknowledged")}
    measured = {cell_name(r) for r in now.values()}  # a cell that could not run fixed nothing
    fixed = [o for i, o in was_open.items() if i not in now_ids and o["cell"] in measured]
    return Gated(sorted(findings, key=lambda f: (order[f.kind], f.cell, f.metric)), still_open, len(tests), method,
                 sorted(gates, key=lambda g: (g.cell, g.gate, g.metric)), fixed)


def _compare_samples(ref_samples, var_samples, metric: str, hib: bool, th: Thresholds,
                     aggregation: str | None = None) -> Comparison | None:
    if not ref_samples or not var_samples:
        return None
    if not any(metric in s for s in ref_samples):
        return None
    return compare_pair(ref_samples, var_samples, metric, hib, th.min_effect, aggregation=aggregation)


def _ref_key_of(tests, rec, metric) -> str:
    return next(ref.key for ref, r, m, _ in tests if r is rec and m == metric)


def _effect(c: Comparison) -> str:
    unit = KINDS.get(c.kind).unit
    if unit == "relative":
        return f"{c.min_effect:.2%} relative (effect {-c.effect if c.effect < 0 else c.effect:.2%})"
    return f"{c.min_effect:g} absolute (effect {abs(c.effect):.3g})"


# ----------------------------------------------------------------------------- acknowledgements

def norm_cell(cell: str) -> str:
    return " ".join(str(cell).replace("/", " / ").split())


def cell_matches(cell: str, given: str) -> bool:
    """CELL as printed ('model @ arm / task'), or without the model ('arm / task')."""
    full, g = norm_cell(cell), norm_cell(given)
    return g == full or full.endswith("@ " + g)


def _acks(store: Store, th: Thresholds) -> dict[str, str]:
    """Regression id (from `--ack`) or normalized cell name (from the plan) -> reason."""
    out = {}
    for run in store.runs("ack"):
        for rid in run.get("ids", []):
            out[rid] = run["reason"]
    for a in th.acknowledged:
        out[norm_cell(a["cell"])] = str(a["reason"])
    return _Acks(out)


class _Acks(dict):
    """A plan entry may name the cell without its model: look cell names up by `cell_matches`."""

    def get(self, key, default=None):
        if key in self:
            return self[key]
        for k, v in self.items():
            if "|" not in k and cell_matches(key, k):
                return v
        return default


def acknowledge(store_path: Path, cell: str, reason: str, kind: str = "nightly") -> list[str]:
    """Record that a person accepted the open regressions of `cell` (as of the last finished run of
    `kind`); returns their ids. A cell with no open regression is an error (listing those that are)."""
    if not reason or not reason.strip():
        raise QevalError("--reason", reason, "a reason for the acknowledgement", "say why, e.g. --reason 'known nf4 loss'")
    # read first, read-only: a mistyped --store must not leave a new, empty store behind
    with Store(store_path, readonly=True) as store:
        finished = [r for r in store.runs(kind) if "open_regressions" in r]
    open_ = finished[-1].get("open_regressions", []) if finished else []
    ids = [o["id"] for o in open_ if cell_matches(o["cell"], cell)]
    if not ids:
        cells = sorted({o["cell"] for o in open_})
        hint = did_you_mean(cell, cells)
        raise QevalError("--ack", cell, "a cell with an open regression: " + (", ".join(cells) or "there are none"),
                         hint or "copy the cell name from the nightly output")
    info = {"cell": cell, "reason": reason.strip(), "ids": ids, "after_run": finished[-1]["run_id"]}
    with Store(store_path) as store:
        run_id = store.start_run("ack", info)
        store.finish_run(run_id, "ok", info)
    return ids


# ----------------------------------------------------------------------------- identities

def _slot(rec: Record) -> tuple:
    """A cell's identity across upgrades: variant (no versions) + task + the documents measured."""
    t = rec.task
    return (rec.variant_id, rec.model.fingerprint, t.name, t.limit, t.num_fewshot)


def cell_name(rec: Record) -> str:
    return f"{rec.variant.model} @ {rec.variant.arm} / {rec.task.name}"


def _changed(prev: Record, rec: Record) -> str:
    diff = [f"{k} {prev.versions.get(k)} -> {v}" for k, v in rec.versions.items() if prev.versions.get(k) != v]
    return "versions: " + ", ".join(diff) if diff else "same versions"
