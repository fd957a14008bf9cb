"""Orchestration: expand a plan into cells (model x arm x task), compute only the missing ones.

An arm is a format, optionally with an adapter (and a merge mode): `baseline`, `nf4`, `qlora`
(LoRA trained on NF4, evaluated on NF4), `qlora-merged-nf4`, ... `run_plan` reads top to bottom
like a recipe: validate -> expand the matrix -> prune the stored cells -> plan the jobs (a DAG:
an adapter before its arms, a baseline reference before its variants; `qeval.run.jobs`) -> run them on
an executor (`local` in this process, or `ray`; `qeval.run.executors`) -> store each record the moment
it comes back. Only this driver writes the store.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from qeval.core import env
from qeval.core.console import advance, expect
# finetune / evaluate / load_model are looked up here by the jobs (qeval.run.jobs), so tests can patch them
from qeval.train.adapters import (MERGES, AdapterArtifact, AdapterSpec, adapter_key, attach, expand_seeds,  # noqa: F401
                            finetune, load_finetuned, lora_base_problem, merge_problem)
from qeval.core.errors import QevalError, unknown_name
from qeval.eval.divergence import reference_cache_bytes
from qeval.eval.evaluate import EvalOutcome, EvalSpec, evaluate  # noqa: F401
from qeval.models.load import (DEFAULT_MODEL, LoadedModel, ResolvedModel, compute_dtype, compute_dtype_problem,
                          linear_in_features, load_model, resolve_model)
from qeval.quant.formats import DEFAULT_FORMATS, FORMATS, QuantFormat
from qeval.core.config import from_mapping, load_yaml, raise_if
from qeval.core.files import content_key, store_lock
from qeval.store.store import SCHEMA_VERSION, Store, check_store_path
from qeval.data.suite_data import ensure_built
from qeval.data.mirror import check_root, mirror_root, set_plan_mirror
from qeval.eval.suites import Suite, TaskSpec, include_paths, load_suite, task_fingerprint, with_chat_defaults


@dataclass(frozen=True)
class Arm:
    """One variant of the model: a format, optionally an adapter from the plan, optionally merged."""

    name: str
    quant: str = "none"
    adapter: str | None = None  # a key of Plan.adapters
    merge: str = "none"  # none | dequantized (into the float base) | requantized (back to `quant`)


@dataclass(frozen=True)
class Plan:
    """What to measure. Every format becomes an arm of its own; `arms` adds adapter arms."""

    models: tuple[str, ...] = (DEFAULT_MODEL,)
    formats: tuple[str, ...] = DEFAULT_FORMATS
    suite: str = "default"  # shipped suite name or suite YAML path
    device: str = "auto"  # auto | cpu | cuda
    # auto: float32 on CPU, bfloat16 on CUDA; bf16 on a CPU with native bf16 only as an explicit choice
    # (baseline included; part of every key, with the CPU's bf16 instruction set)
    compute_dtype: str = "auto"
    seed: int = 1234
    bootstrap_iters: int = 1000
    adapters: dict = field(default_factory=dict)  # name -> AdapterSpec fields
    arms: tuple[dict, ...] = ()  # Arm fields
    thresholds: dict = field(default_factory=dict)  # nightly gates (qeval.gates.nightly.Thresholds)
    include_path: str | tuple[str, ...] = ()  # folders with the user's task YAML (relative: to the plan file)
    executor: str = "local"  # local (this process) | ray (qeval.run.executors)
    retries: int = 1  # a job that raises (or loses its worker) runs again up to this many times
    ray: dict = field(default_factory=dict)  # qeval.run.executors.RaySettings: address, runtime_env, ...
    data_mirror: str | None = None  # offline hub datasets (qeval.data.mirror; $QEVAL_DATA_MIRROR wins); relative: to the plan
    # chat settings for every task of the suite that does not set its own (qeval.eval.suites.TaskSpec)
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    # calibration text for calibration-based formats (gptq): qeval.quant.backends.gptq.CalibrationSpec
    # fields (data, samples, seq_len); its content hash is in those formats' specs and so their keys
    calibration: dict = field(default_factory=dict)


def load_plan(path: Path) -> Plan:
    errors: list[QevalError] = []
    plan = from_mapping(Plan, load_yaml(path, "plan"), f"plan {path.name}", errors)
    raise_if(errors)
    if plan.include_path:  # relative to the plan's folder, like a suite path would be to the user
        paths = include_paths(plan.include_path, path.parent, f"plan {path.name} include_path")
        plan = dataclasses.replace(plan, include_path=tuple(str(p) for p in paths))
    if plan.data_mirror and not Path(plan.data_mirror).expanduser().is_absolute():
        plan = dataclasses.replace(plan, data_mirror=str((path.parent / plan.data_mirror).resolve()))
    return plan


@dataclass(frozen=True)
class Cell:
    """One (model, arm, task) measurement and the key it is stored under."""

    model: ResolvedModel
    arm: Arm
    fmt: QuantFormat
    task: TaskSpec
    key: str
    variant_id: str
    key_material: dict
    head: str = ""  # the baseline output head's cache key (divergence); shared by all tasks of a model

    def __reduce__(self):
        # pickled (to a Ray worker) with its format's name: formats hold functions, and the
        # registry's entry is the one source of truth for what a name means
        # registry's entry is the one source of truth for what a name means; a calibration-based
        # format (gptq) means it with the plan's calibration set, which travels with it
        from qeval.quant.backends.gptq import calibration

        return (_cell, (self.model, self.arm, self.fmt.name, self.task, self.key, self.variant_id,
                        self.key_material, self.head, calibration() if self.fmt.backend == "gptq" else None))


def _cell(model, arm, fmt_name, task, key, variant_id, key_material, head, cal=None) -> Cell:
    if cal is not None:
        from qeval.quant.backends.gptq import set_calibration

        set_calibration(cal)
    return Cell(model, arm, FORMATS.get(fmt_name), task, key, variant_id, key_material, head)


@dataclass
class RunSummary:
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line per failed cell
    trained: list[str] = field(default_factory=list)  # adapter keys trained in this run
    wall_s: float = 0.0


@dataclass(frozen=True)
class Resolved:
    """A validated plan: everything typed, every name looked up."""

    arms: tuple[Arm, ...]
    adapters: dict[str, AdapterSpec]
    suite: Suite
    device: str
    dtype: Any = None  # the torch dtype every model of the plan is loaded and computed in
    ray: Any = None  # qeval.run.executors.RaySettings


def validate(plan: Plan, suite: Suite | None = None) -> Resolved:
    """Check formats, adapters, arms, suite and device together before anything loads or writes."""
    errors: list[QevalError] = []

    def check(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except QevalError as e:
            errors.extend(getattr(e, "errors", [e]))

    # auto resolves on the driver (a CPU head node with GPU workers says `device: cuda`); a Ray
    # cluster's GPUs are checked when it starts
    device = ("cuda" if plan.device == "cuda" else env.resolve_device(plan.device)) \
        if plan.device in ("auto", "cpu", "cuda") else "cpu"
    from qeval.quant.backends.gptq import CalibrationSpec, set_calibration

    cal = from_mapping(CalibrationSpec, plan.calibration, "calibration", errors)
    calibrated = plan.calibration or any(str(q).startswith("gptq:") for q in
                                         list(plan.formats) + [a.get("quant", "") for a in plan.arms if isinstance(a, dict)])
    cal_errors = cal.problems("calibration") if cal is not None and calibrated else []
    if cal is not None and not cal_errors:
        set_calibration(cal)  # before any gptq format is looked up: it binds the calibration hash
    errors += cal_errors
    # a format whose package (or CUDA) is missing fails here, in one line, before anything runs
    for name in plan.formats:
        check(lambda: FORMATS.get(name).require(device))
    adapters: dict[str, AdapterSpec] = {}
    for name, raw in plan.adapters.items():
        spec = from_mapping(AdapterSpec, raw, f"adapters.{name}", errors)
        if spec is not None:
            errors += spec.problems(f"adapters.{name}")
            adapters[name] = spec
    arms = [Arm(f, f) for f in plan.formats]
    for i, raw in enumerate(plan.arms):
        arm = from_mapping(Arm, raw, f"arms[{i}]", errors)
        if arm is None:
            continue
        where = f"arms[{i}] ({arm.name})"
        if arm.quant not in FORMATS:
            errors.append(unknown_name(f"{where} quant", arm.quant, FORMATS))
        else:
            check(lambda: FORMATS.get(arm.quant).require(device))
        if arm.adapter is not None and arm.adapter not in plan.adapters:
            errors.append(unknown_name(f"{where} adapter", arm.adapter, plan.adapters, "define it under adapters:"))
        if arm.merge not in MERGES:
            errors.append(unknown_name(f"{where} merge", arm.merge, MERGES))
        elif arm.merge != "none":
            spec = adapters.get(arm.adapter or "")
            if spec is None or spec.method != "lora":
                errors.append(QevalError(f"{where} merge", arm.merge, "a LoRA adapter on a quantized base "
                                         "(bnb 4-bit, torchao int8, quanto, GGUF)", "merge paths exist for QLoRA-style arms only"))
            elif arm.quant in FORMATS and (problem := merge_problem(arm.quant, f"{where} merge {arm.merge} on quant")):
                errors.append(problem)
        spec = adapters.get(arm.adapter or "")
        if spec is not None and spec.method == "lora" and arm.quant in FORMATS and \
                (problem := lora_base_problem(arm.quant, f"{where} quant")):
            errors.append(problem)  # a LoRA adapter attached to a base whose backend has no LoRA support
        arms.append(arm)
    names = [a.name for a in arms]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(QevalError("arm name", dup, "unique arm names (formats are arms too)", "rename one"))
    from qeval.run.executors import EXECUTORS, RaySettings

    if plan.executor not in EXECUTORS:
        errors.append(unknown_name("executor", plan.executor, EXECUTORS))
    ray_settings = from_mapping(RaySettings, plan.ray, "ray", errors)
    for name in ("num_cpus", "cpus_per_job", "gpus_per_job", "threads_per_job"):
        value = getattr(ray_settings, name, None)
        if value is not None and not value >= 0:
            errors.append(QevalError(f"ray.{name}", value, "0 or more"))
    for name in ("seed", "bootstrap_iters", "retries"):
        if isinstance(getattr(plan, name), int) and getattr(plan, name) < 0:
            errors.append(QevalError(name, getattr(plan, name), "0 or more"))
    if plan.device not in ("auto", "cpu", "cuda"):
        errors.append(QevalError("device", plan.device, "auto, cpu or cuda"))
    elif plan.device == "cuda" and plan.executor == "local":  # a Ray cluster's GPUs: asked when it starts
        import torch

        if not torch.cuda.is_available():
            errors.append(QevalError("device", "cuda", "a machine with a CUDA GPU", "use --device cpu or auto"))
    if isinstance(plan.compute_dtype, str):
        if problem := compute_dtype_problem(plan.compute_dtype, device):
            errors.append(problem)
        elif device == "cpu" and compute_dtype(device, plan.compute_dtype) != compute_dtype(device) and plan.adapters:
            errors.append(QevalError("compute_dtype", plan.compute_dtype, "float32 (auto) for a plan with adapters on cpu",
                                     "adapter training on CPU runs in float32: drop adapters/arms or compute_dtype"))
    if not plan.models:
        errors.append(QevalError("models", "[]", "at least one model", f"e.g. {DEFAULT_MODEL}"))
    if not arms:
        errors.append(QevalError("formats", "[]", "at least one format or arm", "e.g. formats: [none, bnb-nf4]"))
    if plan.thresholds:
        from qeval.gates.nightly import Thresholds  # the nightly gates live beside the code that applies them

        from_mapping(Thresholds, plan.thresholds, "thresholds", errors)
    paths = check(lambda: include_paths(plan.include_path, None, "include_path")) or ()
    set_plan_mirror(plan.data_mirror)
    check(lambda: check_root(mirror_root(), "QEVAL_DATA_MIRROR" if os.environ.get("QEVAL_DATA_MIRROR") else "data_mirror"))
    check(reference_cache_bytes)
    if suite is None:
        suite = check(lambda: load_suite(plan.suite, paths))
        for name, spec in adapters.items():  # not against a --tasks override: it may leave them out
            errors += spec.domain_problems(f"adapters.{name}", [t.task for t in suite.tasks] if suite else [])
    if suite is not None:
        suite = with_chat_defaults(suite, plan)
    raise_if(errors)
    adapters, arms = expand_seeds(adapters, arms)  # `seeds: [..]`: one adapter and arm per seed
    return Resolved(tuple(arms), adapters, suite, device, dtype=compute_dtype(device, plan.compute_dtype),
                    ray=ray_settings)


def make_cells(model: ResolvedModel, arm: Arm, suite: Suite, eval_spec: EvalSpec, device: str,
               adapter: AdapterSpec | None = None, dtype=None) -> list[Cell]:
    fmt = FORMATS.get(arm.quant)
    dtype = dtype or compute_dtype(device)
    fmt_spec = fmt.spec(dtype)
    device_kind = "cuda" if device.startswith("cuda") else "cpu"
    if device_kind == "cpu" and dtype != compute_dtype(device):
        # bf16 on a CPU: AMX and AVX512-BF16 kernels round differently (float32 keys stay as they were)
        device_kind = f"cpu:{env.cpu_bf16_isa()}"
    # The variant is what a user means by "this model at this format with this adapter": stable
    # across library upgrades, so a history can follow it; the key adds what else moves the numbers.
    adapter_id = None
    if adapter is not None:
        adapter_id = {"spec": adapter.identity(), "key": adapter_key(model, adapter, device),
                      "merge": arm.merge}
    variant = {"model_fingerprint": model.fingerprint, "quant": fmt.name, "compute_dtype": fmt_spec["compute_dtype"],
               "adapter": None if adapter is None else {"spec": adapter_id["spec"], "merge": arm.merge},
               "device": device_kind}
    variant_id = content_key(variant)
    environment = env.key_environment(device)  # versions (+ GPU model, CUDA, driver, bnb build on CUDA)
    head = content_key({"model": model.fingerprint, "device": device_kind,
                        "baseline": FORMATS.get(BASELINE).spec(dtype), "versions": environment})
    cells = []
    for t in suite.tasks:
        task = {"name": t.task, "fingerprint": task_fingerprint(t.task, suite.include_paths), "limit": t.limit,
                "num_fewshot": t.num_fewshot, "batch_size": t.batch_size, **t.key_settings()}
        material = {"schema": SCHEMA_VERSION, "variant": variant, "format": fmt_spec, "adapter": adapter_id,
                    "task": task, "eval": dataclasses.asdict(eval_spec), "versions": environment}
        if t.divergence:
            # the baseline's hidden states on this task's forwards: a new baseline means new numbers
            material["divergence"] = {"reference": content_key(
                {"model": model.fingerprint, "task": task, "device": device_kind, "versions": environment,
                 "baseline": FORMATS.get(BASELINE).spec(dtype)})}
        cells.append(Cell(model, arm, fmt, t, content_key(material), variant_id, material, head))
    return cells


BASELINE = "none"


def _is_baseline(arm: Arm) -> bool:
    return arm.quant == BASELINE and arm.adapter is None


def _reference_path(cell: Cell) -> Path:
    return _reference_file(cell.key_material['divergence']['reference'])


def _reference_file(key: str) -> Path:
    return env.cache_dir() / "references" / f"{key[:32]}.safetensors"


def _head_file(key: str) -> Path:
    return env.cache_dir() / "references" / "heads" / f"{key[:32]}.safetensors"


def _reference_ready(path: Path, head: Path) -> bool:
    """A reference is usable when its hidden states are there and its head is (in its own file,
    or, for references written before heads were shared, inside it)."""
    if not path.is_file():
        return False
    if head.is_file():
        return True
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return "weight" in f.keys()


def _head_path(cell: Cell) -> Path:
    return _head_file(cell.head)


def expand(plan: Plan, rp: Resolved) -> list[tuple[ResolvedModel, Arm, list[Cell]]]:
    """The plan's matrix: per (model, arm), its cells and their keys. Nothing is loaded or stored;
    the suite data is built first because task fingerprints hash it."""
    models = [resolve_model(m) for m in plan.models]
    # group / block sizes against each model's layer widths (config.json only: nothing loads)
    shape_errors = {str(e): e for m in models for a in rp.arms
                    for e in FORMATS.get(a.quant).check_shapes(linear_in_features(m.path), m.spec)}
    raise_if(list(shape_errors.values()))
    ensure_built()
    eval_spec = EvalSpec(seed=plan.seed, bootstrap_iters=plan.bootstrap_iters)
    return [(m, a, make_cells(m, a, rp.suite, eval_spec, rp.device, rp.adapters.get(a.adapter) if a.adapter else None,
                              rp.dtype))
            for m in models for a in rp.arms]


def run_plan(plan: Plan, store_path: Path, suite: Suite | None = None,
             progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> RunSummary:
    """Compute every missing cell of `plan` into the store at `store_path`, on the plan's executor."""
    from qeval.run.executors import make_executor
    from qeval.run.jobs import plan_jobs

    t_start = time.perf_counter()
    check_store_path(store_path, write=True)
    rp = validate(plan, suite)
    matrix = expand(plan, rp)  # fails on a bad model before the store is touched
    executor = make_executor(plan.executor, rp.ray)  # a missing `ray` fails here, before the store
    summary = RunSummary()
    # One `qeval run` per store at a time: a second one waits, then finds the first one's cells
    # stored instead of computing (and writing references for) the same cells again.
    with store_lock(store_path, "run", progress), Store(store_path) as store:
        todo = []
        for i, (model, arm, cells) in enumerate(matrix, 1):  # prune: stored cells are never jobs
            missing = [c for c in cells if c.key not in store]
            summary.reused += [c.key for c in cells if c not in missing]
            tag = f"[{i}/{len(matrix)}] {model.spec} @ {arm.name}"
            if not missing:
                progress(f"{tag}: all {len(cells)} tasks stored, nothing to compute")
                continue
            todo.append((tag, model, arm, rp.adapters.get(arm.adapter) if arm.adapter else None, missing))
        if todo:
            dag = plan_jobs(todo, rp, plan, pack=not executor.shares_cache, progress=progress)
            progress(f"{len(dag.jobs)} jobs for {sum(len(t[4]) for t in todo)} cells on the {executor.name} executor")
            expect(progress, sum(len(t[4]) for t in todo))  # the overall bar's total (a Console's)
            try:
                executor.check_device(rp.device)
                _execute(dag, executor, store, summary, plan.retries, progress)
            finally:
                executor.close()  # Ctrl-C and user errors too: nothing keeps running
    summary.wall_s = time.perf_counter() - t_start
    progress(f"done: {len(summary.computed)} computed, {len(summary.reused)} reused, "
             f"{len(summary.failed)} failed, {len(summary.trained)} adapters trained in {summary.wall_s:.1f} s")
    return summary


def _execute(dag, executor, store: Store, summary: RunSummary, retries: int, progress) -> None:
    """The driver loop: submit each job once the artifacts it needs exist (a variant starts as soon
    as the baseline's reference arrives, not when the baseline's job ends), write each record as it
    arrives, retry a job that raised (or lost its worker) for the cells it has not delivered, and
    fail what depends on an artifact that could not be made."""
    from qeval.run.jobs import Artifact, CellDone, CellFailed, Log, Missing, Started, error_line

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

    def finish(job, ok: bool, why: Missing | None = None) -> None:
        final[job.id] = ok
        running.pop(job.id, None)
        for key in job.makes:
            if key not in handles:
                handles[key] = executor.put(why or Missing("ArtifactMissing", f"{key[:12]} was not produced"))
        started.discard(job.id)
        progress(f"jobs: {len(final)} done, {len(started)} running, {len(dag.jobs) - len(final) - len(started)} pending")

    def cells_left(job) -> set[str]:
        return {c.key for c in getattr(job, "cells", ())} - done_cells

    def ready(job) -> bool:
        return all(k in handles or k in dag.existing or k not in made or made[k] in final for k in job.needs)

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
        ref_path, head_path = _reference_file(p.key), _head_file(p.head)
        if not _reference_ready(ref_path, head_path):
            p.value.save(ref_path, head_path)
    elif p.kind == "adapter":
        from qeval.run.jobs import unpack_folder

        bundle = p.value
        if bundle.files is not None:
            unpack_folder(bundle.files, env.cache_dir() / "adapters" / bundle.artifact.key[:32])
        if not bundle.artifact.reused:
            summary.trained.append(bundle.artifact.key)


def _load_arm(model: ResolvedModel, arm: Arm, artifact: AdapterArtifact | None, device: str,
              dtype=None) -> LoadedModel:
    """Load + quantize the arm's base, then put its adapter on (or load the fully fine-tuned model)."""
    if artifact is not None and artifact.spec.method == "full":
        return load_finetuned(model, artifact, arm.quant, device)
    loaded = load_model(model, FORMATS.get(arm.quant), device, dtype)
    if artifact is not None:
        loaded = attach(loaded, artifact, arm.merge)
    return loaded


def build_record(cell: Cell, loaded: LoadedModel, outcome: EvalOutcome, seed: int,
                 artifact: AdapterArtifact | None = None, git_sha: str | None = None) -> dict:
    """The immutable record of one cell: its spec, numbers, costs and provenance."""
    return {
        "key": cell.key,
        "schema": SCHEMA_VERSION,
        "variant_id": cell.variant_id,
        "variant": {"model": cell.model.spec, "quant": cell.fmt.name, "adapter": cell.arm.adapter or "",
                    "merge": cell.arm.merge, "arm": cell.arm.name},
        "model": {"spec": cell.model.spec, "source": cell.model.source, "path": str(cell.model.path),
                  "fingerprint": cell.model.fingerprint},
        "format": cell.key_material["format"],
        "adapter": None if artifact is None else artifact.summary(),
        "task": cell.key_material["task"],
        "eval": cell.key_material["eval"],
        "metrics": {k: dataclasses.asdict(v) for k, v in outcome.metrics.items()},
        "primary_metric": outcome.primary,
        "subtasks": outcome.subtasks_record(),  # a group's members: metrics per (subtask, filter, metric)
        "n": outcome.n,
        "lm_eval_config": outcome.config,
        "divergence": _divergence_record(outcome),
        # which cached reference the divergence numbers came from (`qeval gc` keeps those in use)
        "divergence_reference": cell.key_material.get("divergence", {}).get("reference"),
        "divergence_head": cell.head if "divergence" in cell.key_material else None,
        "timings": {"load_s": loaded.load_s, "eval_s": outcome.eval_s},
        "peak_bytes": max(loaded.peak_load_bytes, outcome.peak_bytes),
        "footprint": loaded.footprint.as_dict(),
        "compute_dtype": loaded.dtype,
        "versions": cell.key_material["versions"],
        "git_sha": git_sha or env.git_sha(),  # the driver's (a worker may run a copy without .git)
        "device": loaded.device,
        "device_description": env.device_description(loaded.device),
        "seed": seed,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    }


def _divergence_record(outcome: EvalOutcome) -> dict | None:
    if outcome.divergence is not None:
        return {**outcome.divergence.metrics(), "seconds": outcome.divergence.seconds, "note": outcome.divergence_note}
    if outcome.reference is not None:
        return {"role": "reference", "windows": len(outcome.reference.hidden)}
    return {"note": outcome.divergence_note} if outcome.divergence_note else None
