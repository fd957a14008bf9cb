"""Cells: the plan's matrix (model x arm x task), each with the key its record is stored under.

A cell is plain data (it pickles as it is, to a Ray worker): its format travels as a name plus,
for a calibration-based format (gptq), the CalibrationSpec it was keyed with, and `Cell.fmt` looks
the format up from those two on whichever process asks. The baseline's divergence references and
output heads are files in the cache named by keys the cells hold (`reference_path`, `head_path`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qeval.core import env
from qeval.core.config import raise_if
from qeval.core.files import content_key, intact, seal
from qeval.core.names import BASELINE
from qeval.run.plan import Arm, Plan, Resolved

if TYPE_CHECKING:
    from qeval.eval.evaluate import EvalSpec
    from qeval.eval.suites import Suite, TaskSpec
    from qeval.models.load import ResolvedModel
    from qeval.quant.backends.gptq import CalibrationSpec
    from qeval.quant.formats import QuantFormat
    from qeval.train.spec import AdapterSpec


@dataclass(frozen=True)
class Cell:
    """One (model, arm, task) measurement and the key it is stored under."""

    model: ResolvedModel
    arm: Arm
    quant: str  # the format's canonical name (`gptq:w4` is `gptq:w4:g128`)
    task: TaskSpec
    key: str
    variant_id: str
    key_material: dict
    head: str = ""  # the baseline output head's cache key (divergence); shared by all tasks of a model
    calibration: CalibrationSpec | None = None  # a calibration-based format's set (in the key); else None

    @property
    def fmt(self) -> QuantFormat:
        return cell_format(self.quant, self.calibration)


def cell_format(quant: str, calibration: CalibrationSpec | None = None) -> QuantFormat:
    """The format `quant` as a cell means it: calibrated on `calibration` when it has one."""
    from qeval.quant.formats import FORMATS

    if calibration is None:
        return FORMATS.get(quant)
    from qeval.quant.backends.gptq import calibrated  # the one calibration-based backend

    return calibrated(quant, calibration)


def needs_calibration(fmt: QuantFormat) -> bool:
    return fmt.requires is not None and fmt.requires.calibration


def make_cells(model: ResolvedModel, arm: Arm, suite: Suite, eval_spec: EvalSpec, device: str,
               adapter: AdapterSpec | None = None, dtype=None, calibration: CalibrationSpec | None = None,
               fingerprints: dict[str, str] | None = None) -> list[Cell]:
    """The cells of one (model, arm) and their keys. `calibration`: the plan's set for a
    calibration-based format (None: the default set); `fingerprints`: the suite's task
    fingerprints when the caller computed them once for every arm (else hashed here)."""
    from qeval.eval.suites import task_fingerprint
    from qeval.models.load import compute_dtype
    from qeval.quant.backends.gptq import CalibrationSpec
    from qeval.quant.formats import FORMATS
    from qeval.store.store import SCHEMA_VERSION
    from qeval.train.spec import adapter_key

    fmt = FORMATS.get(arm.quant)
    cal = None
    if needs_calibration(fmt):
        cal = calibration or CalibrationSpec()
        fmt = cell_format(fmt.name, cal)
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
    baseline = FORMATS.get(BASELINE).spec(dtype)
    head = content_key({"model": model.fingerprint, "device": device_kind, "baseline": baseline,
                        "versions": environment})
    cells = []
    for t in suite.tasks:
        fingerprint = (fingerprints or {}).get(t.task) or task_fingerprint(t.task, suite.include_paths)
        task = {"name": t.task, "fingerprint": fingerprint, "limit": t.limit,
                "num_fewshot": t.num_fewshot, "batch_size": t.batch_size, **t.key_settings()}
        material = {"schema": SCHEMA_VERSION, "variant": variant, "format": fmt_spec, "adapter": adapter_id,
                    "task": task, "eval": dataclasses.asdict(eval_spec), "versions": environment}
        if t.divergence:
            # the baseline's hidden states on this task's forwards: a new baseline means new numbers
            material["divergence"] = {"reference": content_key(
                {"model": model.fingerprint, "task": task, "device": device_kind, "versions": environment,
                 "baseline": baseline})}
        cells.append(Cell(model, arm, fmt.name, t, content_key(material), variant_id, material, head, cal))
    return cells


def expand(plan: Plan, rp: Resolved) -> list[tuple[ResolvedModel, Arm, list[Cell]]]:
    """The plan's matrix: per (model, arm), its cells and their keys. Nothing is loaded or stored;
    the suite data is built first because task fingerprints hash it."""
    from qeval.data.suite_data import ensure_built
    from qeval.eval.evaluate import EvalSpec
    from qeval.eval.suites import task_fingerprint
    from qeval.models.load import linear_in_features, resolve_model
    from qeval.quant.formats import FORMATS

    models = [resolve_model(m) for m in plan.models]
    # group / block sizes against each model's layer widths (config.json only: nothing loads)
    shape_errors = {str(e): e for m in models for a in rp.arms
                    for e in FORMATS.get(a.quant).check_shapes(linear_in_features(m.path), m.spec)}
    raise_if(list(shape_errors.values()))
    ensure_built()
    eval_spec = EvalSpec(seed=plan.seed, bootstrap_iters=plan.bootstrap_iters)
    # hashed once per task, not per arm (YAML, includes, data files: 1.9 s of a warm default plan)
    prints = {t.task: task_fingerprint(t.task, rp.suite.include_paths) for t in rp.suite.tasks}
    return [(m, a, make_cells(m, a, rp.suite, eval_spec, rp.device, rp.adapters.get(a.adapter) if a.adapter else None,
                              rp.dtype, rp.calibration, prints))
            for m in models for a in rp.arms]


@dataclass(frozen=True)
class SpeedCell:
    """The speed measurement of one (model, arm) on this device, and the key its record is stored
    under: the arm's variant, format and adapter as its cells key them, the library versions, the
    device identity and the settings. A key of its own (no task), so no accuracy key changed."""

    key: str
    variant_id: str
    key_material: dict
    quant: str
    calibration: CalibrationSpec | None = None
    settings: Any = None  # qeval.models.speed.SpeedSettings (its as_dict is in the key)
    kernels: str = ""  # what the speed depends on (`kernels_key`): arms sharing it are measured once

    @property
    def fmt(self) -> QuantFormat:
        return cell_format(self.quant, self.calibration)


def speed_settings(suite: Suite):
    """The speed settings for a suite: prefill at the suite's batch (its smallest numeric task batch:
    what every task's forwards reach; 4 when none is a number)."""
    from qeval.models.speed import SpeedSettings

    batches = [t.batch_size for t in suite.tasks if isinstance(t.batch_size, int) and t.batch_size > 0]
    return SpeedSettings(prefill_batch=min(batches) if batches else 4)


def speed_cell(cells: list[Cell], suite: Suite, device: str) -> SpeedCell | None:
    """The speed cell of the (model, arm) whose cells (all of them, stored or not) are `cells`."""
    from qeval.store.store import SCHEMA_VERSION

    if not cells:
        return None
    c = cells[0]
    if cell_format(c.quant, c.calibration).kernel == "simulated":
        # float compute over dequantized weights: its tokens/s is not the format's (the report marks
        # it from the registry), and measuring it cost ~7 s an arm of the cold `make report`
        return None
    settings = speed_settings(suite)
    material = {"kind": "speed", "schema": SCHEMA_VERSION, "variant": c.key_material["variant"],
                "format": c.key_material["format"], "adapter": c.key_material["adapter"],
                "versions": c.key_material["versions"], "identity": env.device_identity(device),
                "settings": settings.as_dict()}
    return SpeedCell(content_key(material), c.variant_id, material, c.quant, c.calibration, settings,
                     kernels_key(material))


def kernels_key(material: dict) -> str:
    """What an arm's speed depends on: the model, the kernels its forward runs (the format as loaded,
    and an unmerged adapter's shape: method, rank, targets, PEFT options) and where and how it is
    measured; never the weights' values, so arms alike in all that share one measurement (in the
    default plan: QLoRA and LoRA-on-NF4 run the same layers; a merge into the dequantized float base
    is the float model, a requantized merge the quantized format; a retrained adapter changes nothing).
    The speed record's own key stays per arm (`speed_cell`)."""
    variant, fmt, adapter = material["variant"], material["format"], material["adapter"]
    lora = None
    if adapter is not None:
        spec = adapter["spec"]
        if adapter["merge"] == "dequantized":  # qeval.train.merge.attach: a float model, the baseline's format
            fmt = baseline_format(fmt["compute_dtype"])
        if adapter["merge"] == "none" and spec["method"] != "full":
            lora = {k: spec.get(k) for k in ("method", "r", "target_modules", "peft")}
    return content_key({"kind": "speed-kernels", "model": variant["model_fingerprint"], "device": variant["device"],
                        "format": fmt, "adapter": lora, "versions": material["versions"],
                        "identity": material["identity"], "settings": material["settings"]})


def baseline_format(compute_dtype: str) -> dict:
    """The baseline format's key material at a compute dtype named as a format spec names it ('torch.float32')."""
    import torch

    from qeval.quant.formats import FORMATS

    return FORMATS.get(BASELINE).spec(getattr(torch, compute_dtype.removeprefix("torch.")))


# -- the baseline and its artifacts ------------------------------------------------------------------

def is_baseline(arm: Arm) -> bool:
    return arm.quant == BASELINE and arm.adapter is None


def reference_file(key: str) -> Path:
    return env.cache_dir() / "references" / f"{key[:32]}.safetensors"


def head_file(key: str) -> Path:
    return env.cache_dir() / "references" / "heads" / f"{key[:32]}.safetensors"


def reference_path(cell: Cell) -> Path:
    return reference_file(cell.key_material['divergence']['reference'])


def head_path(cell: Cell) -> Path:
    return head_file(cell.head)


def reference_ready(path: Path, head: Path) -> bool:
    """A reference is usable when its hidden states are there and its head is (in its own file,
    or, for references written before heads were shared, inside it), each as its recorded sha256
    says (a corrupt file is removed with a WARNING line, so the reference is recorded again)."""
    if not intact(path, "divergence reference"):
        return False
    if head.is_file():
        return intact(head, "divergence reference head")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return "weight" in f.keys()



def save_reference(reference, path: Path, head: Path) -> None:
    """Write a reference (and its model's head, when not there yet) with the hashes `reference_ready`
    checks."""
    new_head = not head.is_file()
    reference.save(path, head)
    seal(path)
    if new_head:
        seal(head)
