"""The driver: `run_plan` reads top to bottom like a recipe.

validate the plan (qeval.run.plan) -> expand the matrix (qeval.run.cells) -> prune the stored cells
-> plan the jobs (a DAG: an adapter before its arms, a baseline reference before its variants;
qeval.run.jobs) -> run them on an executor (`local` in this process, or `ray`; qeval.run.executors)
-> store each record the moment it comes back. Only this driver writes the store.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from qeval.core import env
from qeval.core.console import advance, expect, hold
from qeval.core.errors import QevalError
from qeval.core.files import store_lock
from qeval.run.cells import expand, head_file, reference_file, reference_ready, save_reference, speed_cell
from qeval.run.executors import make_executor
from qeval.run.dag import plan_jobs
from qeval.run.jobs import (Artifact, CellDone, CellFailed, Log, Missing, SpeedDone, Started, TrainAdapter,
                            error_line, unpack_folder)
from qeval.run.plan import Plan, validate
from qeval.run.preflight import preflight
from qeval.run.record import shared_speed_record
from qeval.store.store import Store, check_store_path

if TYPE_CHECKING:
    from qeval.eval.suites import Suite


@dataclass
class RunSummary:
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line per failed cell
    trained: list[str] = field(default_factory=list)  # adapter keys trained in this run
    speed: list[str] = field(default_factory=list)  # speed records measured in this run (qeval.run.cells.SpeedCell)
    parity: list[str] = field(default_factory=list)  # GGUF parity records stored in this run (qeval.run.parity_stage)
    wall_s: float = 0.0


def run_plan(plan: Plan, store_path: Path, suite: Suite | None = None,
             progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> RunSummary:
    """Compute every missing cell of `plan` into the store at `store_path`, on the plan's executor."""
    t_start = time.perf_counter()
    check_store_path(store_path, write=True)
    rp = validate(plan, suite)
    matrix = expand(plan, rp)  # fails on a bad model before the store is touched
    # seq_len against each model's context, training / calibration data against seq_len
    preflight(list({id(m): m for m, _, _ in matrix}.values()), rp)
    executor = make_executor(plan.executor, plan.ray)  # a missing `ray` fails here, before the store
    summary = RunSummary()
    # One `qeval run` per store at a time: a second one waits, then finds the first one's cells
    # stored instead of computing (and writing references for) the same cells again.
    with store_lock(store_path, "run", progress), Store(store_path) as store:
        todo, speed, shared, measuring = [], {}, [], set()
        for i, (model, arm, cells) in enumerate(matrix, 1):  # prune: stored cells are never jobs
            missing = [c for c in cells if c.key not in store]
            summary.reused += [c.key for c in cells if c not in missing]
            tag = f"[{i}/{len(matrix)}] {model.spec} @ {arm.name}"
            sc = speed_cell(cells, rp.suite, rp.device) if plan.speed else None
            if sc is not None and not store.has_speed(sc.key):
                if sc.kernels in measuring or store.has_speed_kernels(sc.kernels):
                    shared.append((tag, sc, model, arm))  # another arm's measurement of the same kernels
                else:
                    speed[tag] = sc  # measured in the arm's job (a job of its own when every cell is stored)
                    measuring.add(sc.kernels)
            if not missing and tag not in speed:
                progress(f"{tag}: all {len(cells)} tasks stored, nothing to compute")
                continue
            todo.append((tag, model, arm, rp.adapters.get(arm.adapter) if arm.adapter else None, missing))
        if todo:
            dag = plan_jobs(todo, rp, pack=not executor.shares_cache, progress=progress, speed=speed)
            progress(f"{len(dag.jobs)} jobs for {sum(len(t[4]) for t in todo)} cells on the {executor.name} executor")
            expect(progress, sum(len(t[4]) for t in todo))  # the overall bar's total (a Console's)
            try:
                executor.check_device(rp.device)
                _execute(dag, executor, store, summary, plan.retries, progress)
            finally:
                executor.close()  # Ctrl-C and user errors too: nothing keeps running
        _share_speed(shared, store, summary, progress)
        if plan.parity is not None:  # after the cells: they never wait on llama.cpp
            from qeval.run.parity_stage import parity_stage

            stored, failed = parity_stage(list({id(m): m for m, _, _ in matrix}.values()), plan.parity, store, progress)
            summary.parity += stored
            summary.failed += failed
    summary.wall_s = time.perf_counter() - t_start
    progress(f"done: {len(summary.computed)} computed, {len(summary.reused)} reused, "
             f"{len(summary.failed)} failed, {len(summary.trained)} adapters trained in {summary.wall_s:.1f} s")
    return summary


def _share_speed(shared: list, store: Store, summary: RunSummary, progress) -> None:
    """Speed records for the arms whose kernels another arm's record measured (`kernels_key`): that
    measurement's numbers under each arm's own key, marked shared. Written once the run has measured
    them; an arm whose kernels were not measured (the measuring arm's speed failed) gets none."""
    if not shared:
        return
    by_kernels = {r.kernels: r for r in store.speed_records() if r.kernels}  # oldest first: the latest wins
    for tag, sc, model, arm in shared:
        source = by_kernels.get(sc.kernels)
        if source is None:
            progress(f"{tag}: speed not measured: the arm that measures the same kernels did not")
            continue
        record = shared_speed_record(source, sc, model, arm)
        store.put_speed(record)
        summary.speed.append(record.key)
        progress(f"{tag}: speed shared with {record.shared_arm} (same kernels: measured once)")


def _execute(dag, executor, store: Store, summary: RunSummary, retries: int, progress) -> None:
    """The driver loop: submit each job once the artifacts it needs exist (a variant starts as soon
    as the baseline's reference arrives, not when the baseline's job ends), write each record as it
    arrives, retry a job that raised (or lost its worker) for the cells it has not delivered, and
    fail what depends on an artifact that could not be made."""
    made = dag.producers()
    pending = list(dag.jobs)
    attempts = {j.id: 0 for j in dag.jobs}
    final: dict[str, bool] = {}  # job id -> succeeded
    handles: dict[str, Any] = {}  # artifact key -> executor handle (or a Missing)
    failed_cells: dict[str, dict[str, CellFailed]] = {}  # job id -> cell key -> its last failure
    done_cells: set[str] = set()
    running: dict[str, Any] = {}  # job id -> the job (as submitted: a retry holds fewer cells)
    started: set[str] = set()  # submitted jobs a worker has started (the rest wait in a queue)

    def inputs(job) -> dict[str, Any]:
        out = {}
        for key in job.needs:
            if key not in handles:
                if key in dag.existing:
                    handles[key] = executor.put(dag.existing[key]())
                else:  # its producer ended without making it
                    handles[key] = executor.put(Missing("ArtifactMissing", f"{key[:12]} was not produced"))
            out[key] = handles[key]
        return out

    def submit(job) -> None:
        started.discard(job.id)
        attempts[job.id] += 1
        running[job.id] = job
        executor.submit(job, inputs(job))

    trainings = {j.id for j in dag.jobs if isinstance(j, TrainAdapter)}

    def pace() -> None:
        # only adapters training: no cell can finish, so the clock the ETA's pace is read from stops
        hold(progress, bool(started) and started <= trainings, len(trainings - set(final)))

    def finish(job, ok: bool, why: Missing | None = None) -> None:
        final[job.id] = ok
        running.pop(job.id, None)
        for key in job.makes:
            if key not in handles:
                handles[key] = executor.put(why or Missing("ArtifactMissing", f"{key[:12]} was not produced"))
        started.discard(job.id)
        pace()
        progress(f"jobs: {len(final)} done, {len(started)} running, {len(dag.jobs) - len(final) - len(started)} pending")

    def cells_left(job) -> set[str]:
        return {c.key for c in getattr(job, "cells", ())} - done_cells

    def ready(job) -> bool:
        return all(k in handles or k in dag.existing or k not in made or made[k] in final for k in job.needs)

    pace()  # the count of trainings to come, from the first status line
    while pending or running:
        for job in [j for j in pending if ready(j)]:
            pending.remove(job)
            submit(job)
        if not running:  # cannot happen in a DAG; guard against a cycle hanging the run
            raise RuntimeError(f"jobs waiting on each other: {[j.id for j in pending]}")
        ev = executor.next_event()
        job = running.get(ev.job.id, ev.job)
        if ev.kind == "piece":
            p = ev.piece
            if isinstance(p, Log):
                progress(p.text)
            elif isinstance(p, Started):
                started.add(job.id)
                pace()
                if p.pid != os.getpid():
                    progress(f"{job.label}: {type(job).__name__} running on {p.host} pid {p.pid}")
            elif isinstance(p, Artifact):
                handles[p.key] = ev.handle
                _keep_artifact(p, summary)
            elif isinstance(p, CellDone):
                store.put(p.record, p.samples)
                done_cells.add(p.key)
                failed_cells.get(job.id, {}).pop(p.key, None)
                summary.computed.append(p.key)
                advance(progress)  # before the line: a status line due anyway then shows this cell
                progress(p.line)
            elif isinstance(p, SpeedDone):
                store.put_speed(p.record)
                summary.speed.append(p.key)
                progress(p.line)
            elif isinstance(p, CellFailed):
                failed_cells.setdefault(job.id, {})[p.key] = p
                progress("FAILED " + p.line)
                if os.environ.get("QEVAL_DEBUG") and p.trace:
                    print(p.trace, file=sys.stderr)
            continue
        if ev.kind == "error" and isinstance(ev.error, QevalError):
            raise ev.error  # user errors stop the run (the executor is closed by the caller)
        if ev.kind == "error":
            line = error_line(job.label, ev.error)
            progress("FAILED " + line)
            if os.environ.get("QEVAL_DEBUG"):
                traceback.print_exception(ev.error)
            left = cells_left(job)
            if hasattr(job, "cells") and not left:  # every cell delivered before it failed
                finish(job, True)
                continue
            if attempts[job.id] <= retries and (left or not hasattr(job, "cells")):
                progress(f"{job.label}: retrying ({attempts[job.id] + 1} of {retries + 1} attempts)")
                submit(job.only(left) if hasattr(job, "cells") else job)
                continue
            name, msg = getattr(ev.error, "type_name", type(ev.error).__name__), getattr(ev.error, "message", str(ev.error))
            why = Missing(name, msg.splitlines()[0][:200] if msg else "")
            for c in getattr(job, "cells", ()):
                if c.key in left:
                    summary.failed.append(error_line(f"{job.label} {c.task.task}", ev.error))
                    advance(progress)
            failed_cells.pop(job.id, None)
            finish(job, False, why)
            continue
        # done: cells that failed inside the job run again (a retry), or are final failures
        failures = failed_cells.pop(job.id, {})
        if failures and attempts[job.id] <= retries:
            progress(f"{job.label}: retrying {len(failures)} failed cell(s) ({attempts[job.id] + 1} of "
                     f"{retries + 1} attempts)")
            submit(job.only(set(failures)))
            continue
        for f in failures.values():
            summary.failed.append(f.line)
        advance(progress, len(failures))
        finish(job, True)


def _keep_artifact(p, summary: RunSummary) -> None:
    """The driver keeps what a job made in its own cache: a rerun (or a new arm) reuses it and
    `qeval gc` sees it, wherever the job ran."""
    if p.kind == "reference":
        ref_path, head_path = reference_file(p.key), head_file(p.head)
        if not reference_ready(ref_path, head_path):
            save_reference(p.value, ref_path, head_path)
    elif p.kind == "adapter":
        bundle = p.value
        if bundle.files is not None:
            unpack_folder(bundle.files, env.adapter_dir(bundle.artifact.key))
        if not bundle.artifact.reused:
            summary.trained.append(bundle.artifact.key)
