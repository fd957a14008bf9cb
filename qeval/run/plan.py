"""The plan: one typed schema for what to measure, read once, checked all together.

`load_plan` builds a `Plan` from YAML with `qeval.core.config.from_mapping`: every section is its
own frozen spec (`thresholds: Thresholds`, `ray: RaySettings`, `calibration: CalibrationSpec`,
`adapters: {name: AdapterSpec}`, `arms: [Arm]`), unknown keys and wrong types anywhere are
reported together, and nothing downstream reads a raw mapping again. `validate` then checks what
the types cannot (names that must exist, devices, packages, the suite) and returns `Resolved`.

This module imports no heavy library at import time: the CLI lists the plan's keys from it for
`--help`. The specs that live in heavy modules (AdapterSpec, CalibrationSpec) are named lazily.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from qeval.core.config import from_mapping, load_yaml, raise_if
from qeval.core.errors import QevalError, unknown_name
from qeval.core.names import (BASELINE, DEFAULT_FORMATS, DEFAULT_MODEL, MAX_BATCH, MAX_BOOTSTRAP_ITERS,
                               MAX_RETRIES, MAX_SEED)
# the executors' registry (names a plan may give) and the `ray:` section, the ray executor's
# settings, defined beside it (light: ray itself is imported when a Ray starts)
from qeval.run.executors import EXECUTORS, RaySettings

if TYPE_CHECKING:
    from qeval.eval.suites import Suite
    from qeval.quant.backends.gptq import CalibrationSpec
    from qeval.train.spec import AdapterSpec

DEFAULT_FDR = 0.05


@dataclass(frozen=True)
class Arm:
    """One variant of the model: a format, optionally an adapter from the plan, optionally merged."""

    name: str
    quant: str = BASELINE
    adapter: str | None = None  # a key of Plan.adapters
    merge: str = "none"  # none | dequantized (into the float base) | requantized (back to `quant`)


@dataclass(frozen=True)
class Thresholds:
    """The plan's `thresholds:` section: the nightly's gates (applied by qeval.gates.nightly, which
    also checks the names in them against the plan).

    Recovery gates (value vs the baseline in the same run, 1.0 = nothing lost; perplexity is
    baseline/value): a metric named in `per_metric` uses that limit; otherwise the arm's `per_arm`
    limit, otherwise `min_recovery`, on the primary metric. `warn_below` ("task:metric" -> level)
    warns when a value is worse than the level (below it, or above it for lower-is-better metrics).
    `fdr`: the false discovery rate of the run's comparisons. `min_effect`: metric name or
    comparison kind (right_wrong, loglikelihood_ratio, mean) -> minimum meaningful effect.
    `margin`: task, metric name or kind -> the non-inferiority margin the report holds each loss
    against (qeval.stats.margin; default 1 point absolute, 1% for perplexity-like kinds).
    `acknowledged`: [{cell, reason}] regressions a person accepted."""

    min_recovery: float | None = None
    per_arm: dict = field(default_factory=dict)
    per_metric: dict = field(default_factory=dict)
    warn_below: dict = field(default_factory=dict)
    fdr: float = DEFAULT_FDR
    min_effect: dict = field(default_factory=dict)
    margin: dict = field(default_factory=dict)
    acknowledged: tuple[dict, ...] = ()

    def limit(self, arm: str, metric: str, primary: bool) -> float | None:
        from qeval.train.spec import seed_base

        if metric in self.per_metric:
            return self.per_metric[metric]
        if not primary:
            return None
        if arm in self.per_arm:
            return self.per_arm[arm]
        # an arm trained with several seeds runs as `name#s<seed>`: the plan's gate for `name` applies
        return self.per_arm.get(seed_base(arm), self.min_recovery)


@dataclass(frozen=True)
class ParitySpec:
    """The plan's `parity:` section: qeval's simulated GGUF formats scored by llama.cpp's own runtime
    (qeval.eval.parity) after the cells; skipped with its reason where the runtime is not built."""

    formats: tuple[str, ...] = ("gguf:q8_0", "gguf:q4_0")
    docs: int = 8  # Lee news documents scored by both
    ctx: int = 256  # tokens per document, BOS included

    def problems(self, where: str = "parity") -> list[QevalError]:
        from qeval.quant.formats import FORMATS

        out = [unknown_name(f"{where}.formats", f, FORMATS) for f in self.formats if f not in FORMATS]
        out += [QevalError(f"{where}.formats", f, "a gguf: format (llama.cpp runs GGUF files)", "e.g. gguf:q4_0")
                for f in self.formats if f in FORMATS and not f.startswith("gguf:")]
        if not 1 <= self.docs <= 50:  # the Lee news corpus has 50 documents
            out.append(QevalError(f"{where}.docs", self.docs, "1..50 documents", "e.g. docs: 8"))
        if not 2 <= self.ctx <= 8192:
            out.append(QevalError(f"{where}.ctx", self.ctx, "2..8192 tokens per document", "e.g. ctx: 256"))
        return out


@dataclass(frozen=True)
class Plan:
    """What to measure. Every format becomes an arm of its own; `arms` adds adapter arms."""

    models: tuple[str, ...] = (DEFAULT_MODEL,)
    formats: tuple[str, ...] = DEFAULT_FORMATS
    # formats measured where they can run: one that needs CUDA (or a package, or an isolated env)
    # missing here is skipped with its one-line reason instead of failing the plan (plans/deploy.yaml)
    optional_formats: tuple[str, ...] = ()
    suite: str = "default"  # shipped suite name or suite YAML path
    device: str = "auto"  # auto | cpu | cuda
    # auto: float32 on CPU, bfloat16 on CUDA; bf16 on a CPU with native bf16 only as an explicit choice
    # (baseline included; part of every key, with the CPU's bf16 instruction set)
    compute_dtype: str = "auto"
    seed: int = 1234
    bootstrap_iters: int = 1000
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)  # name -> how to fine-tune
    arms: tuple[Arm, ...] = ()
    thresholds: Thresholds = Thresholds()  # nightly gates
    include_path: str | tuple[str, ...] = ()  # folders with the user's task YAML (relative: to the plan file)
    executor: str = "local"  # local (this process) | ray (qeval.run.executors)
    retries: int = 1  # a job that raises (or loses its worker) runs again up to this many times
    ray: RaySettings = RaySettings()
    data_mirror: str | None = None  # offline hub datasets (qeval.data.mirror; $QEVAL_DATA_MIRROR wins); relative: to the plan
    # chat settings for every task of the suite that does not set its own (qeval.eval.suites.TaskSpec)
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    # calibration text for calibration-based formats (gptq); None: the default set. Its content
    # hash is in those formats' specs and so their keys
    calibration: CalibrationSpec | None = None
    # measure each arm's speed in the job that evaluates it (qeval.models.speed; records of their own,
    # keyed apart from the cells): a few seconds per arm on CPU
    speed: bool = True
    # GGUF parity against llama.cpp's runtime (plans/deploy.yaml); None: not run
    parity: ParitySpec | None = None

    def __post_init__(self):
        # a plan built in Python holds specs, like one read from YAML: a raw section here would be
        # read as a mapping by no one (a programming error, so not a QevalError)
        raw = [name for name in ("thresholds", "ray", "calibration", "parity") if isinstance(getattr(self, name), dict)]
        raw += [f"adapters.{k}" for k, v in self.adapters.items() if isinstance(v, dict)] if isinstance(self.adapters, dict) else []
        raw += [f"arms[{i}]" for i, a in enumerate(self.arms) if isinstance(a, dict)]
        if raw:
            raise TypeError(f"Plan sections {', '.join(raw)} are mappings; build the plan with plan_from(mapping)")

    @classmethod
    def schema_types(cls) -> dict[str, type]:
        """The section types defined in heavy modules, imported only when a plan is read."""
        from qeval.quant.backends.gptq import CalibrationSpec
        from qeval.train.spec import AdapterSpec

        return {"AdapterSpec": AdapterSpec, "CalibrationSpec": CalibrationSpec}


def plan_keys() -> list[str]:
    """The keys a plan YAML may hold, from the schema (for `qeval run --help`)."""
    return [f.name for f in dataclasses.fields(Plan)]


def plan_from(data: Any, where: str = "plan") -> Plan:
    """A Plan from a mapping (a parsed YAML document): typed all the way down, or every problem raised."""
    errors: list[QevalError] = []
    plan = from_mapping(Plan, data, where, errors)
    raise_if(errors)
    return plan


def load_plan(path: Path) -> Plan:
    plan = plan_from(load_yaml(path, "plan"), f"plan {path.name}")
    if plan.include_path:  # relative to the plan's folder, like a suite path would be to the user
        from qeval.eval.suites import include_paths

        paths = include_paths(plan.include_path, path.parent, f"plan {path.name} include_path")
        plan = dataclasses.replace(plan, include_path=tuple(str(p) for p in paths))
    if plan.data_mirror and not Path(plan.data_mirror).expanduser().is_absolute():
        plan = dataclasses.replace(plan, data_mirror=str((path.parent / plan.data_mirror).resolve()))
    return plan


@dataclass(frozen=True)
class Resolved:
    """A validated plan: everything typed, every name looked up."""

    plan: Plan
    arms: tuple[Arm, ...]
    adapters: dict[str, AdapterSpec]  # seeds expanded: one adapter per (name, seed)
    suite: Suite
    device: str
    dtype: Any = None  # the torch dtype every model of the plan is loaded and computed in
    calibration: CalibrationSpec | None = None  # what calibration-based formats calibrate on (the default if unset)


def validate(plan: Plan, suite: Suite | None = None) -> Resolved:
    """Check formats, adapters, arms, suite and device together before anything loads or writes."""
    from qeval.core import env
    from qeval.data.mirror import check_root, mirror_root, set_plan_mirror
    from qeval.eval.divergence import reference_cache_bytes
    from qeval.eval.suites import include_paths, load_suite, with_chat_defaults
    from qeval.models.load import compute_dtype, compute_dtype_problem
    from qeval.quant.backends.gptq import CalibrationSpec
    from qeval.quant.formats import FORMATS
    from qeval.train.spec import MERGES, expand_seeds, lora_base_problem, merge_problem

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
    calibration = plan.calibration or CalibrationSpec()
    if plan.calibration is not None or any(str(q).startswith(("gptq:", "awq:")) for q in
                                           list(plan.formats) + list(plan.optional_formats) + [a.quant for a in plan.arms]):
        errors += calibration.problems("calibration")
    # a format whose package (or CUDA) is missing fails here, in one line, before anything runs
    for name in plan.formats:
        check(lambda: FORMATS.get(name).require(device))
    if plan.parity is not None:
        errors += plan.parity.problems("parity")
    adapters: dict[str, AdapterSpec] = {}
    for name, spec in plan.adapters.items():
        errors += spec.problems(f"adapters.{name}") + spec.device_problems(f"adapters.{name}", device)
        adapters[name] = spec
    arms = [Arm(f, f) for f in plan.formats]
    for name in plan.optional_formats:
        if name not in FORMATS:
            errors.append(unknown_name("optional_formats", name, FORMATS))
            continue
        try:
            FORMATS.get(name).require(device)
            arms.append(Arm(name, name))
        except QevalError as e:
            from qeval.core.console import say  # the run's console: the terminal, not the log

            say(f"qeval: skipped optional format {name}: {e}")
    for i, arm in enumerate(plan.arms):
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
    if plan.executor not in EXECUTORS:
        errors.append(unknown_name("executor", plan.executor, EXECUTORS))
    for name in ("num_cpus", "cpus_per_job", "gpus_per_job", "threads_per_job"):
        value = getattr(plan.ray, name)
        if value is not None and not 0 <= value <= MAX_BATCH:
            errors.append(QevalError(f"ray.{name}", value, "0 or more" if not value >= 0 else f"0 or more, up to {MAX_BATCH:,}"))
    for name, top in (("seed", MAX_SEED), ("bootstrap_iters", MAX_BOOTSTRAP_ITERS), ("retries", MAX_RETRIES)):
        if getattr(plan, name) < 0:
            errors.append(QevalError(name, getattr(plan, name), "0 or more"))
        elif getattr(plan, name) > top:  # bigger fails only at run time (numpy's seed range, hours of bootstrap)
            errors.append(QevalError(name, getattr(plan, name), f"0 or more, up to {top:,}"))
    if plan.device not in ("auto", "cpu", "cuda"):
        errors.append(QevalError("device", plan.device, "auto, cpu or cuda"))
    elif plan.device == "cuda" and plan.executor == "local":  # a Ray cluster's GPUs: asked when it starts
        import torch

        if not torch.cuda.is_available():
            errors.append(QevalError("device", "cuda", "a machine with a CUDA GPU", "use --device cpu or auto"))
    if problem := compute_dtype_problem(plan.compute_dtype, device):
        errors.append(problem)
    elif device == "cpu" and compute_dtype(device, plan.compute_dtype) != compute_dtype(device) and plan.adapters:
        errors.append(QevalError("compute_dtype", plan.compute_dtype, "float32 (auto) for a plan with adapters on cpu",
                                 "adapter training on CPU runs in float32: drop adapters/arms or compute_dtype"))
    if not plan.models:
        errors.append(QevalError("models", "[]", "at least one model", f"e.g. {DEFAULT_MODEL}"))
    if not arms:
        errors.append(QevalError("formats", "[]", "at least one format or arm", "e.g. formats: [none, bnb-nf4]"))
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
    return Resolved(plan, tuple(arms), adapters, suite, device, dtype=compute_dtype(device, plan.compute_dtype),
                    calibration=calibration)
