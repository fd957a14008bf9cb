"""Orchestration: expand a plan into cells (model x arm x task), compute only the missing ones.

An arm is a format, optionally with an adapter (and a merge mode): `baseline`, `nf4`, `qlora`
(LoRA trained on NF4, evaluated on NF4), `qlora-merged-nf4`, ... `run_plan` reads top to bottom
like a recipe: validate -> resolve models -> for each arm, skip it if every cell is stored, else
fine-tune (or reuse) its adapter, load + quantize its base once, attach, evaluate each missing task,
store each record the moment it is done.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from qeval import env
from qeval.adapters import MERGES, AdapterArtifact, AdapterSpec, adapter_key, attach, finetune, load_finetuned
from qeval.divergence import Reference
from qeval.errors import QevalError, unknown_name
from qeval.evaluate import EvalOutcome, EvalSpec, evaluate
from qeval.models import DEFAULT_MODEL, LoadedModel, ResolvedModel, compute_dtype, load_model, resolve_model
from qeval.quant import DEFAULT_FORMATS, FORMATS, QuantFormat
from qeval.specs import from_mapping, load_yaml, raise_if
from qeval.files import content_key, store_lock
from qeval.store import SCHEMA_VERSION, Store, check_store_path
from qeval.suite_data import ensure_built
from qeval.mirror import check_root, mirror_root, set_plan_mirror
from qeval.suites import Suite, TaskSpec, include_paths, load_suite, task_fingerprint, with_chat_defaults


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
    seed: int = 1234
    bootstrap_iters: int = 1000
    adapters: dict = field(default_factory=dict)  # name -> AdapterSpec fields
    arms: tuple[dict, ...] = ()  # Arm fields
    thresholds: dict = field(default_factory=dict)  # nightly gates (qeval.nightly.Thresholds)
    include_path: str | tuple[str, ...] = ()  # folders with the user's task YAML (relative: to the plan file)
    data_mirror: str | None = None  # offline hub datasets (qeval.mirror; $QEVAL_DATA_MIRROR wins); relative: to the plan
    # chat settings for every task of the suite that does not set its own (qeval.suites.TaskSpec)
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None


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


def validate(plan: Plan, suite: Suite | None = None) -> Resolved:
    """Check formats, adapters, arms, suite and device together before anything loads or writes."""
    errors: list[QevalError] = []

    def check(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except QevalError as e:
            errors.extend(getattr(e, "errors", [e]))

    for name in plan.formats:
        check(lambda: FORMATS.get(name))
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
        if arm.adapter is not None and arm.adapter not in plan.adapters:
            errors.append(unknown_name(f"{where} adapter", arm.adapter, plan.adapters, "define it under adapters:"))
        if arm.merge not in MERGES:
            errors.append(unknown_name(f"{where} merge", arm.merge, MERGES))
        elif arm.merge != "none":
            spec = adapters.get(arm.adapter or "")
            if spec is None or spec.method != "lora" or arm.quant not in FORMATS or \
                    FORMATS.get(arm.quant).backend != "bitsandbytes" or "int8" in arm.quant:
                errors.append(QevalError(f"{where} merge", arm.merge,
                                         "a LoRA adapter on a bitsandbytes 4-bit quant",
                                         "merge paths exist for QLoRA-style arms only"))
        arms.append(arm)
    names = [a.name for a in arms]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(QevalError("arm name", dup, "unique arm names (formats are arms too)", "rename one"))
    for name in ("seed", "bootstrap_iters"):
        if isinstance(getattr(plan, name), int) and getattr(plan, name) < 0:
            errors.append(QevalError(name, getattr(plan, name), "0 or more"))
    if plan.device not in ("auto", "cpu", "cuda"):
        errors.append(QevalError("device", plan.device, "auto, cpu or cuda"))
    elif plan.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append(QevalError("device", "cuda", "a machine with a CUDA GPU", "use --device cpu or auto"))
    if not plan.models:
        errors.append(QevalError("models", "[]", "at least one model", f"e.g. {DEFAULT_MODEL}"))
    if not arms:
        errors.append(QevalError("formats", "[]", "at least one format or arm", "e.g. formats: [none, bnb-nf4]"))
    if plan.thresholds:
        from qeval.nightly import Thresholds  # the nightly gates live beside the code that applies them

        from_mapping(Thresholds, plan.thresholds, "thresholds", errors)
    paths = check(lambda: include_paths(plan.include_path, None, "include_path")) or ()
    set_plan_mirror(plan.data_mirror)
    check(lambda: check_root(mirror_root(), "QEVAL_DATA_MIRROR" if os.environ.get("QEVAL_DATA_MIRROR") else "data_mirror"))
    if suite is None:
        suite = check(lambda: load_suite(plan.suite, paths))
    if suite is not None:
        suite = with_chat_defaults(suite, plan)
    raise_if(errors)
    return Resolved(tuple(arms), adapters, suite, env.resolve_device(plan.device))


def make_cells(model: ResolvedModel, arm: Arm, suite: Suite, eval_spec: EvalSpec, device: str,
               adapter: AdapterSpec | None = None) -> list[Cell]:
    fmt = FORMATS.get(arm.quant)
    fmt_spec = fmt.spec(compute_dtype(device))
    device_kind = "cuda" if device.startswith("cuda") else "cpu"
    # The variant is what a user means by "this model at this format with this adapter": stable
    # across library upgrades, so a history can follow it; the key adds what else moves the numbers.
    adapter_id = None
    if adapter is not None:
        adapter_id = {"spec": dataclasses.asdict(adapter), "key": adapter_key(model, adapter, device),
                      "merge": arm.merge}
    variant = {"model_fingerprint": model.fingerprint, "quant": fmt.name, "compute_dtype": fmt_spec["compute_dtype"],
               "adapter": None if adapter is None else {"spec": adapter_id["spec"], "merge": arm.merge},
               "device": device_kind}
    variant_id = content_key(variant)
    head = content_key({"model": model.fingerprint, "device": device_kind,
                        "baseline": FORMATS.get(BASELINE).spec(compute_dtype(device)), "versions": env.versions()})
    cells = []
    for t in suite.tasks:
        task = {"name": t.task, "fingerprint": task_fingerprint(t.task, suite.include_paths), "limit": t.limit,
                "num_fewshot": t.num_fewshot, "batch_size": t.batch_size, **t.key_settings()}
        material = {"schema": SCHEMA_VERSION, "variant": variant, "format": fmt_spec, "adapter": adapter_id,
                    "task": task, "eval": dataclasses.asdict(eval_spec), "versions": env.versions()}
        if t.divergence:
            # the baseline's hidden states on this task's forwards: a new baseline means new numbers
            material["divergence"] = {"reference": content_key(
                {"model": model.fingerprint, "task": task, "device": device_kind, "versions": env.versions(),
                 "baseline": FORMATS.get(BASELINE).spec(compute_dtype(device))})}
        cells.append(Cell(model, arm, fmt, t, content_key(material), variant_id, material, head))
    return cells


BASELINE = "none"


def _is_baseline(arm: Arm) -> bool:
    return arm.quant == BASELINE and arm.adapter is None


def _reference_path(cell: Cell) -> Path:
    return env.cache_dir() / "references" / f"{cell.key_material['divergence']['reference'][:32]}.safetensors"


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
    return env.cache_dir() / "references" / "heads" / f"{cell.head[:32]}.safetensors"


def _divergence_mode(cell: Cell, eval_spec: EvalSpec, device: str, progress,
                     paths: tuple[Path, ...] = ()) -> str | Reference | None:
    """None (not asked), "reference" (this is the baseline and no reference exists yet), or the
    baseline's Reference to compare with (built first, from a baseline load, when missing)."""
    if "divergence" not in cell.key_material:
        return None
    path = _reference_path(cell)
    if not _reference_ready(path, _head_path(cell)):
        if _is_baseline(cell.arm):
            return "reference"
        progress(f"  baseline reference for {cell.task.task} missing: loading the baseline to record it")
        base = load_model(cell.model, FORMATS.get(BASELINE), device)
        outcome = evaluate(base, cell.task, eval_spec, "reference", paths)
        if outcome.reference is None:
            raise QevalError("divergence", cell.task.task, "a task whose forwards hold one sequence",
                             outcome.divergence_note)
        outcome.reference.save(path, _head_path(cell))
        del base
        gc.collect()
    return Reference.load(path, _head_path(cell))


def expand(plan: Plan, rp: Resolved) -> list[tuple[ResolvedModel, Arm, list[Cell]]]:
    """The plan's matrix: per (model, arm), its cells and their keys. Nothing is loaded or stored;
    the suite data is built first because task fingerprints hash it."""
    models = [resolve_model(m) for m in plan.models]
    ensure_built()
    eval_spec = EvalSpec(seed=plan.seed, bootstrap_iters=plan.bootstrap_iters)
    return [(m, a, make_cells(m, a, rp.suite, eval_spec, rp.device, rp.adapters.get(a.adapter) if a.adapter else None))
            for m in models for a in rp.arms]


def run_plan(plan: Plan, store_path: Path, suite: Suite | None = None,
             progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> RunSummary:
    """Compute every missing cell of `plan` into the store at `store_path`."""
    import torch

    t_start = time.perf_counter()
    check_store_path(store_path, write=True)
    rp = validate(plan, suite)
    jobs = expand(plan, rp)  # fails on a bad model before the store is touched
    eval_spec = EvalSpec(seed=plan.seed, bootstrap_iters=plan.bootstrap_iters)
    summary = RunSummary()
    paths = rp.suite.include_paths
    # One `qeval run` per store at a time: a second one waits, then finds the first one's cells
    # stored instead of computing (and writing references for) the same cells again.
    with store_lock(store_path, "run", progress), Store(store_path) as store:
        for i, (model, arm, cells) in enumerate(jobs, 1):
            adapter = rp.adapters.get(arm.adapter) if arm.adapter else None
            missing = [c for c in cells if c.key not in store]
            summary.reused += [c.key for c in cells if c not in missing]
            tag = f"[{i}/{len(jobs)}] {model.spec} @ {arm.name}"
            if not missing:
                progress(f"{tag}: all {len(cells)} tasks stored, nothing to compute")
                continue
            try:
                artifact = None
                if adapter is not None:
                    artifact = finetune(model, adapter, rp.device, prefix=f"{tag}: ")
                    if not artifact.reused:
                        summary.trained.append(artifact.key)
                    progress(f"{tag}: adapter {arm.adapter} {'reused' if artifact.reused else 'trained'} "
                             f"({artifact.trainable_params:,} trainable, {artifact.train_s:.0f} s)")
                progress(f"{tag}: loading + quantizing on {rp.device}")
                torch.manual_seed(plan.seed)
                loaded = _load_arm(model, arm, artifact, rp.device)
            except QevalError:
                raise
            except Exception as e:  # OOM, a training crash, an unsupported format: this arm's cells fail
                for cell in missing:
                    _failed(summary, progress, f"{tag} {cell.task.task}", e)
                continue
            progress(f"{tag}: {loaded.footprint.total_bytes / 2**20:.1f} MiB in {loaded.load_s:.1f} s")
            for cell in missing:
                progress(f"{tag}: evaluating {cell.task.task} (limit {cell.task.limit})")
                try:
                    mode = _divergence_mode(cell, eval_spec, rp.device, progress, paths)
                    outcome = evaluate(loaded, cell.task, eval_spec, mode, paths)
                    if outcome.reference is not None:
                        outcome.reference.save(_reference_path(cell), _head_path(cell))
                except QevalError:
                    raise  # user errors stop the run
                except Exception as e:
                    # A failed cell is reported and the run goes on; nothing is stored for it, so a
                    # rerun retries it.
                    _failed(summary, progress, f"{tag} {cell.task.task}", e)
                    continue
                store.put(build_record(cell, loaded, outcome, plan.seed, artifact), outcome.samples)
                summary.computed.append(cell.key)
                m = outcome.metrics[outcome.primary]
                progress(f"{tag}: {cell.task.task} {outcome.primary}={m.value:.4g} "
                         f"(n={outcome.n}, {outcome.eval_s:.1f} s)")
            del loaded
            gc.collect()
    summary.wall_s = time.perf_counter() - t_start
    progress(f"done: {len(summary.computed)} computed, {len(summary.reused)} reused, "
             f"{len(summary.failed)} failed, {len(summary.trained)} adapters trained in {summary.wall_s:.1f} s")
    return summary


def _failed(summary: RunSummary, progress, what: str, e: BaseException) -> None:
    name, msg = getattr(e, "type_name", type(e).__name__), getattr(e, "message", str(e))
    line = f"{what}: {name}: {msg.splitlines()[0][:200] if msg else ''}"
    summary.failed.append(line)
    progress("FAILED " + line)
    if os.environ.get("QEVAL_DEBUG"):
        traceback.print_exc()
        if getattr(e, "trace", ""):
            print(e.trace, file=sys.stderr)


def _load_arm(model: ResolvedModel, arm: Arm, artifact: AdapterArtifact | None, device: str) -> LoadedModel:
    """Load + quantize the arm's base, then put its adapter on (or load the fully fine-tuned model)."""
    if artifact is not None and artifact.spec.method == "full":
        return load_finetuned(model, artifact, arm.quant, device)
    loaded = load_model(model, FORMATS.get(arm.quant), device)
    if artifact is not None:
        loaded = attach(loaded, artifact, arm.merge)
    return loaded


def build_record(cell: Cell, loaded: LoadedModel, outcome: EvalOutcome, seed: int,
                 artifact: AdapterArtifact | None = None) -> dict:
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
        "git_sha": env.git_sha(),
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
