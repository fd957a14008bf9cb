"""Orchestration: expand a plan into cells (model x format x task), compute only the missing ones.

`run_plan` reads top to bottom like a recipe: validate -> resolve models -> for each variant, skip
it if every cell is stored, else load + quantize once, evaluate each missing task, store each
record the moment it is done.
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
from typing import Callable

from qeval import env
from qeval.errors import QevalError
from qeval.evaluate import EvalOutcome, EvalSpec, evaluate
from qeval.models import DEFAULT_MODEL, LoadedModel, ResolvedModel, compute_dtype, load_model, resolve_model
from qeval.quant import DEFAULT_FORMATS, FORMATS, QuantFormat
from qeval.specs import from_mapping, load_yaml, raise_if
from qeval.store import SCHEMA_VERSION, Store, content_key
from qeval.suite_data import ensure_built
from qeval.suites import Suite, TaskSpec, load_suite, task_fingerprint

@dataclass(frozen=True)
class Plan:
    """What to measure. `suite` is a shipped suite name or a suite YAML path."""

    models: tuple[str, ...] = (DEFAULT_MODEL,)
    formats: tuple[str, ...] = DEFAULT_FORMATS
    suite: str = "default"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1234
    bootstrap_iters: int = 1000


def load_plan(path: Path) -> Plan:
    errors: list[QevalError] = []
    plan = from_mapping(Plan, load_yaml(path, "plan"), f"plan {path.name}", errors)
    raise_if(errors)
    return plan


@dataclass(frozen=True)
class Cell:
    """One (model, format, task) measurement and the key it is stored under."""

    model: ResolvedModel
    fmt: QuantFormat
    task: TaskSpec
    key: str
    variant_id: str
    key_material: dict


@dataclass
class RunSummary:
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line per failed cell
    wall_s: float = 0.0


def validate(plan: Plan, suite: Suite | None = None) -> tuple[list[QuantFormat], Suite, str]:
    """Check formats, suite and device together before anything loads or writes."""
    errors: list[QevalError] = []
    formats = []
    for name in plan.formats:
        try:
            formats.append(FORMATS.get(name))
        except QevalError as e:
            errors.append(e)
    if len(set(plan.formats)) != len(plan.formats):
        errors.append(QevalError("formats", ",".join(plan.formats), "each format once", "remove the duplicate"))
    if plan.device not in ("auto", "cpu", "cuda"):
        errors.append(QevalError("device", plan.device, "auto, cpu or cuda"))
    elif plan.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            errors.append(QevalError("device", "cuda", "a machine with a CUDA GPU", "use --device cpu or auto"))
    if not plan.models:
        errors.append(QevalError("models", "[]", "at least one model", f"e.g. {DEFAULT_MODEL}"))
    if suite is None:
        try:
            suite = load_suite(plan.suite)
        except QevalError as e:
            errors.extend(getattr(e, "errors", [e]))
    raise_if(errors)
    return formats, suite, env.resolve_device(plan.device)


def make_cells(model: ResolvedModel, fmt: QuantFormat, suite: Suite, eval_spec: EvalSpec, device: str) -> list[Cell]:
    dtype = compute_dtype(device)
    fmt_spec = fmt.spec(dtype)
    device_kind = "cuda" if device.startswith("cuda") else "cpu"
    # The variant is what a user means by "this model at this format": stable across library
    # upgrades, so a history can follow it; the key adds everything else that moves the numbers.
    variant = {"model_fingerprint": model.fingerprint, "quant": fmt.name, "compute_dtype": fmt_spec["compute_dtype"],
               "adapter": None, "device": device_kind}
    variant_id = content_key(variant)
    cells = []
    for t in suite.tasks:
        material = {"schema": SCHEMA_VERSION, "variant": variant, "format": fmt_spec,
                    "task": {"name": t.task, "fingerprint": task_fingerprint(t.task), "limit": t.limit,
                             "num_fewshot": t.num_fewshot, "batch_size": t.batch_size},
                    "eval": dataclasses.asdict(eval_spec), "versions": env.versions()}
        cells.append(Cell(model, fmt, t, content_key(material), variant_id, material))
    return cells


def run_plan(plan: Plan, store_path: Path, suite: Suite | None = None,
             progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> RunSummary:
    """Compute every missing cell of `plan` into the store at `store_path`."""
    t_start = time.perf_counter()
    formats, suite, device = validate(plan, suite)
    models = [resolve_model(m) for m in plan.models]  # fails on a bad model before the store is touched
    ensure_built()
    eval_spec = EvalSpec(seed=plan.seed, bootstrap_iters=plan.bootstrap_iters)
    summary = RunSummary()
    with Store(store_path) as store:
        variants = [(m, f) for m in models for f in formats]
        for i, (model, fmt) in enumerate(variants, 1):
            cells = make_cells(model, fmt, suite, eval_spec, device)
            missing = [c for c in cells if c.key not in store]
            summary.reused += [c.key for c in cells if c not in missing]
            tag = f"[{i}/{len(variants)}] {model.spec} @ {fmt.name}"
            if not missing:
                progress(f"{tag}: all {len(cells)} tasks stored, nothing to compute")
                continue
            progress(f"{tag}: loading + quantizing on {device}")
            import torch

            torch.manual_seed(plan.seed)
            loaded = load_model(model, fmt, device)
            progress(f"{tag}: {loaded.footprint.total_bytes / 2**20:.1f} MiB in {loaded.load_s:.1f} s")
            for cell in missing:
                progress(f"{tag}: evaluating {cell.task.task} (limit {cell.task.limit})")
                try:
                    outcome = evaluate(loaded, cell.task, eval_spec)
                except (RuntimeError, ValueError, MemoryError, OSError) as e:
                    # A failed cell is reported and the run goes on; nothing is stored for it, so a
                    # rerun retries it. (QevalErrors are user errors and stop the run.)
                    line = f"{tag} {cell.task.task}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    summary.failed.append(line)
                    progress("FAILED " + line)
                    if os.environ.get("QEVAL_DEBUG"):
                        traceback.print_exc()
                    continue
                store.put(build_record(cell, loaded, outcome, plan.seed), outcome.samples)
                summary.computed.append(cell.key)
                m = outcome.metrics[outcome.primary]
                progress(f"{tag}: {cell.task.task} {outcome.primary}={m.value:.4g} "
                         f"(n={outcome.n}, {outcome.eval_s:.1f} s)")
            del loaded
            gc.collect()
    summary.wall_s = time.perf_counter() - t_start
    progress(f"done: {len(summary.computed)} computed, {len(summary.reused)} reused, "
             f"{len(summary.failed)} failed in {summary.wall_s:.1f} s")
    return summary


def build_record(cell: Cell, loaded: LoadedModel, outcome: EvalOutcome, seed: int) -> dict:
    """The immutable record of one cell: its spec, numbers, costs and provenance."""
    return {
        "key": cell.key,
        "schema": SCHEMA_VERSION,
        "variant_id": cell.variant_id,
        "variant": {"model": cell.model.spec, "quant": cell.fmt.name, "adapter": ""},
        "model": {"spec": cell.model.spec, "source": cell.model.source, "path": str(cell.model.path),
                  "fingerprint": cell.model.fingerprint},
        "format": cell.key_material["format"],
        "task": cell.key_material["task"],
        "eval": cell.key_material["eval"],
        "metrics": {k: dataclasses.asdict(v) for k, v in outcome.metrics.items()},
        "primary_metric": outcome.primary,
        "n": outcome.n,
        "lm_eval_config": outcome.config,
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
