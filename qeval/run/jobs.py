"""Jobs: what a piece of a plan is, apart from where it runs.

A job is a frozen, picklable description of work: train an adapter (`TrainAdapter`), record a
baseline's divergence reference (`RecordReference`), or evaluate the missing cells of one
(model, arm) on one loaded model (`EvaluateArm`). `run_job(job, inputs)` is a pure function of the
job and its input artifacts: it yields pieces (log lines, artifacts, one record per finished cell)
and never touches the store; the driver (`qeval.run.driver.run_plan`) writes each record as it arrives,
so a crash loses only the cell in flight and a rerun computes only what is missing.

Artifacts (adapters, references) travel as values: a `Reference` object, or an adapter's files as
bytes when the job runs where the driver's cache is not (`Job.pack`). A job names the artifacts it
`needs` and `makes` by content key; `plan_jobs` turns a pruned matrix into a DAG from those names
(an adapter before its arms, a baseline reference before its variants; qeval.run.dag).

The stage functions (`finetune`, `load_model`, `evaluate`, `build_record`) are module globals here,
looked up at call time: the one place tests and tools patch them (`monkeypatch.setattr(jobs, ...)`).
This module never imports the driver: the driver imports it.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from qeval.core import env
from qeval.core.errors import QevalError
from qeval.core.names import BASELINE
from qeval.eval.evaluate import evaluate
from qeval.models.load import LoadedModel, ResolvedModel, fingerprint, load_model
from qeval.quant.formats import FORMATS, QuantFormat
from qeval.run.cells import needs_calibration
from qeval.run.plan import Arm
from qeval.models.speed import measure_speed
from qeval.run.record import build_record, build_speed_record
from qeval.store.record import Record
from qeval.train.artifact import AdapterArtifact, load_finetuned
from qeval.train.merge import attach
from qeval.train.recipe import finetune


# -- jobs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Origin:
    """Where and with what the plan was expanded: a job checks it runs with the same library
    versions (they are part of every key), and records carry the driver's git sha."""

    pid: int
    host: str
    git_sha: str
    versions: tuple[tuple[str, str], ...]
    gpu: tuple[tuple[str, str], ...] | None = None  # env.gpu_identity() of the driver (keys of CUDA cells)

    def elsewhere(self) -> bool:
        """True in a worker process (another process or machine than the driver's)."""
        return (self.host, self.pid) != (socket.gethostname(), os.getpid())

    @classmethod
    def here(cls) -> "Origin":
        gpu = env.gpu_identity()
        return cls(os.getpid(), socket.gethostname(), env.git_sha(), tuple(sorted(env.versions().items())),
                   None if gpu is None else tuple(sorted(gpu.items())))


@dataclass(frozen=True, kw_only=True)
class Job:
    id: str  # unique in the DAG
    label: str  # "[2/7] smollm2-135m @ bnb-nf4": the tag of its progress lines
    model: Any  # qeval.models.load.ResolvedModel
    device: str  # cpu | cuda (resolved by the driver; part of every key)
    dtype: str = ""  # the plan's compute dtype ("float32", "bfloat16"); "" is the device's default
    origin: Origin
    needs: tuple[str, ...] = ()  # artifact keys it reads
    makes: tuple[str, ...] = ()  # artifact keys it produces
    num_gpus: float = 0.0  # what a scheduler must reserve (Ray's resource request)
    num_cpus: float = 1.0
    pack: bool = False  # adapters as bytes: the worker may not share the driver's cache folder
    threads: int = 0  # torch CPU threads in a worker (0: leave them); see RaySettings.threads_per_job

    def run(self, inputs: dict[str, Any]) -> Iterator[Any]:
        """The work: yield Log, Artifact, CellDone and CellFailed pieces (see `run_job`)."""
        raise NotImplementedError

    def pieces(self, inputs: dict[str, Any]) -> Iterator[Any]:
        """Run this job here, as an executor does: `run_job(self, inputs)` (executors call this
        method, so they need not import this module)."""
        return run_job(self, inputs)

    @staticmethod
    def log(text: str) -> "Log":
        """A Log piece (for an executor that relays a worker's lines without importing this module)."""
        return Log(text)


@dataclass(frozen=True, kw_only=True)
class TrainAdapter(Job):
    adapter: str  # its name in the plan
    spec: Any  # qeval.train.adapters.AdapterSpec
    key: str  # adapter_key(model, spec, device)

    def run(self, inputs: dict[str, Any]) -> Iterator[Any]:
        return _train(self)


@dataclass(frozen=True, kw_only=True)
class RecordReference(Job):
    """Load the baseline and record the reference one variant cell compares with (when the
    baseline's own cell is stored already, so no baseline evaluation will record it)."""

    cell: Any  # the variant's qeval.run.cells.Cell (its key material names the reference)
    eval_spec: Any
    paths: tuple[Path, ...] = ()

    def run(self, inputs: dict[str, Any]) -> Iterator[Any]:
        return _reference(self)


@dataclass(frozen=True, kw_only=True)
class EvaluateArm(Job):
    arm: Any  # qeval.run.plan.Arm
    cells: tuple  # the cells of this (model, arm) still to compute
    seed: int
    eval_spec: Any
    paths: tuple[Path, ...] = ()
    adapter_key: str | None = None
    speed: Any = None  # qeval.run.cells.SpeedCell: measure the arm's speed once its cells are done

    def run(self, inputs: dict[str, Any]) -> Iterator[Any]:
        return _evaluate(self, inputs)

    def only(self, keys: set[str]) -> "EvaluateArm":
        """The same job for the cells in `keys` only (a retry after some cells were stored); the
        speed measurement goes with it when its key is among them."""
        speed = self.speed if self.speed is not None and self.speed.key in keys else None
        return dataclasses.replace(self, cells=tuple(c for c in self.cells if c.key in keys), speed=speed)


# -- what a running job yields ---------------------------------------------------------------------

@dataclass(frozen=True)
class Started:
    host: str
    pid: int


@dataclass(frozen=True)
class Finished:
    seconds: float  # inside the job, measured where it ran (the rest of its wall time is scheduling)


@dataclass(frozen=True)
class Log:
    text: str


@dataclass(frozen=True)
class Artifact:
    key: str
    kind: str  # adapter | reference
    value: Any  # AdapterBundle | qeval.eval.divergence.Reference
    head: str = ""  # a reference's output-head key


@dataclass(frozen=True)
class AdapterBundle:
    artifact: Any  # qeval.train.adapters.AdapterArtifact (its path is on the machine that trained it)
    files: dict[str, bytes] | None = None  # the folder's files, when they must travel


@dataclass(frozen=True)
class CellDone:
    key: str
    record: Record
    samples: list
    line: str  # the progress line ("... acc=0.5 (n=8, 1.2 s)")


@dataclass(frozen=True)
class SpeedDone:
    key: str
    record: Any  # qeval.store.record.SpeedRecord
    line: str


@dataclass(frozen=True)
class CellFailed:
    key: str
    line: str  # "<tag> <task>: <Type>: <message>"
    trace: str = ""


@dataclass(frozen=True)
class Missing:
    """An input artifact whose producer failed: the cells that need it fail with this line."""

    type_name: str
    message: str


def error_line(what: str, e: BaseException) -> str:
    name, msg = getattr(e, "type_name", type(e).__name__), getattr(e, "message", str(e))
    return f"{what}: {name}: {msg.splitlines()[0][:200] if msg else ''}"


# -- running a job ---------------------------------------------------------------------------------

def run_job(job: Job, inputs: dict[str, Any]) -> Iterator[Any]:
    """Run `job` with its input artifacts (key -> value); yield Started, then Log, Artifact, CellDone
    and CellFailed pieces, then Finished. Raises on what fails the whole job (a load, training); a
    failed cell is a CellFailed and the job goes on. Touches no store."""
    import time

    t0 = time.perf_counter()
    # an artifact another job yielded arrives as that piece; one from the driver's cache as the value
    inputs = {k: v.value if isinstance(v, Artifact) else v for k, v in inputs.items()}
    yield Started(socket.gethostname(), os.getpid())
    if job.origin.elsewhere():
        _check_worker(job)
        if job.threads:
            import torch

            torch.set_num_threads(job.threads)  # Ray sets OMP_NUM_THREADS=num_cpus in its workers
    yield from job.run(inputs)
    yield Finished(time.perf_counter() - t0)


def _check_worker(job: Job) -> None:
    """A worker computes under the driver's keys: the libraries that move numbers must match."""
    mine, theirs = env.versions(), dict(job.origin.versions)
    drift = {k: (v, mine.get(k)) for k, v in theirs.items() if mine.get(k) != v}
    if drift:
        raise QevalError("worker environment", f"{socket.gethostname()} pid {os.getpid()}",
                         "the driver's library versions (they are part of every cell key)",
                         "differs in " + ", ".join(f"{k} {a} (driver) vs {b}" for k, (a, b) in sorted(drift.items()))
                         + "; install the same versions on every worker (runtime_env pip, or one image)")
    if job.device.startswith("cuda") and job.origin.gpu is not None:
        # the driver's GPU identity is in the CUDA cells' keys: a worker on another GPU, CUDA,
        # driver or bitsandbytes build would store numbers under keys that do not describe them
        here = tuple(sorted((env.gpu_identity() or {}).items()))
        if here != job.origin.gpu:
            raise QevalError("worker GPU", f"{socket.gethostname()} pid {os.getpid()}",
                             f"the driver's GPU identity {dict(job.origin.gpu)} (part of every CUDA cell key)",
                             f"this worker has {dict(here) or 'no GPU'}; run on one GPU type, or start the driver "
                             "on a CPU node (its keys then say the GPU is unknown)")
    from qeval.data.suite_data import ensure_built

    ensure_built()  # the shipped tasks' data, built here if this worker never had it


def _check_tasks(cells, paths) -> None:
    """A worker evaluates the task the key names: same YAML, helper code and data (by hash)."""
    from qeval.eval.suites import task_fingerprint

    for c in cells:
        if task_fingerprint(c.task.task, paths) != c.key_material["task"]["fingerprint"]:
            raise QevalError(f"task {c.task.task} on worker", f"{socket.gethostname()} pid {os.getpid()}",
                             "the driver's task files and data (the task fingerprint is part of the key)",
                             "give every worker the same qeval version and include_path folders (a shared path)")


def _model_here(model):
    """The model's weights on this worker: the driver's folder when visible here (one machine, or a
    shared path), else resolved again from its spec (an embedded model converts once per machine),
    which must give the same fingerprint."""
    if Path(model.path).is_dir():
        return model
    from qeval.models.load import resolve_model

    here = resolve_model(model.spec)
    if here.fingerprint != model.fingerprint:
        raise QevalError("model on worker", model.spec, f"the driver's weights (fingerprint {model.fingerprint[:12]})",
                         "put the model folder on a path every worker shares")
    return here


def _dtype(job: Job):
    """The job's compute dtype as a torch dtype (None: the device's default); jobs carry its name."""
    import torch

    return getattr(torch, job.dtype) if job.dtype else None


def load_arm(model: ResolvedModel, arm: Arm, fmt: QuantFormat, artifact: AdapterArtifact | None, device: str,
             dtype=None) -> LoadedModel:
    """Load + quantize the arm's base at `fmt` (the cell's format), then put its adapter on (or
    load the fully fine-tuned model)."""
    if artifact is not None and artifact.spec.method == "full":
        if not needs_calibration(fmt):
            return load_finetuned(model, artifact, fmt.name, device)
        # load_finetuned looks the format up by name, which would calibrate on the default set
        # rather than the cell's: the same load of the fine-tuned folder, at the cell's format
        ft = ResolvedModel(f"{model.spec}+{artifact.spec.method}", artifact.path, fingerprint(artifact.path), "finetuned")
        return dataclasses.replace(load_model(ft, fmt, device), resolved=model)
    loaded = load_model(model, fmt, device, dtype)
    if artifact is not None:
        loaded = attach(loaded, artifact, arm.merge)
    return loaded


def _train(job: TrainAdapter) -> Iterator[Any]:
    art = finetune(_model_here(job.model), job.spec, job.device, prefix=f"{job.label}: ")
    yield Log(f"{job.label}: adapter {job.adapter} {'reused' if art.reused else 'trained'} "
              f"({art.trainable_params:,} trainable, {art.train_s:.0f} s)")
    yield Artifact(job.key, "adapter", AdapterBundle(art, pack_folder(art.path) if job.pack else None))


def _reference(job: RecordReference) -> Iterator[Any]:
    cell = job.cell
    if job.origin.elsewhere():
        _check_tasks([cell], job.paths)
    yield Log(f"  baseline reference for {cell.task.task} missing: loading the baseline to record it")
    base = load_model(_model_here(job.model), FORMATS.get(BASELINE), job.device, _dtype(job))
    outcome = evaluate(base, cell.task, job.eval_spec, "reference", job.paths)
    if outcome.reference is None:
        raise QevalError("divergence", cell.task.task, "a task whose forwards hold one sequence",
                         outcome.divergence_note)
    yield Artifact(job.makes[0], "reference", outcome.reference, cell.head)
    del base
    gc.collect()


def _evaluate(job: EvaluateArm, inputs: dict[str, Any]) -> Iterator[Any]:
    import torch

    tag = job.label
    artifact = None
    if job.adapter_key is not None:
        got = inputs.get(job.adapter_key)
        if not isinstance(got, AdapterBundle):
            got = got if isinstance(got, Missing) else Missing("ArtifactMissing", f"adapter {job.adapter_key[:12]}")
            for cell in job.cells:
                yield CellFailed(cell.key, f"{tag} {cell.task.task}: {got.type_name}: {got.message}")
            return
        artifact = adapter_here(got)
    if job.origin.elsewhere():
        _check_tasks(job.cells, job.paths)
    yield Log(f"{tag}: loading + quantizing on {job.device}")
    torch.manual_seed(job.seed)
    # every cell of the job has the arm's format (with its calibration, for a calibration-based one)
    fmt = job.cells[0].fmt if job.cells else job.speed.fmt
    loaded = load_arm(_model_here(job.model), job.arm, fmt, artifact, job.device, _dtype(job))
    yield Log(f"{tag}: {loaded.footprint.total_bytes / 2**20:.1f} MiB in {loaded.load_s:.1f} s")
    for cell in job.cells:
        what = f"{tag} {cell.task.task}"
        yield Log(f"{tag}: evaluating {cell.task.task} (limit {cell.task.limit})")
        ref_key = cell.key_material.get("divergence", {}).get("reference")
        mode = None
        if ref_key is not None:
            mode = "reference" if ref_key in job.makes else inputs.get(ref_key)
            if isinstance(mode, Missing) or mode is None:
                m = mode or Missing("ArtifactMissing", f"reference {ref_key[:12]}")
                yield CellFailed(cell.key, f"{what}: {m.type_name}: {m.message}")
                continue
        try:
            outcome = evaluate(loaded, cell.task, job.eval_spec, mode, job.paths)
        except QevalError:
            raise  # user errors stop the run
        except Exception as e:  # noqa: BLE001 -- a failed cell is an outcome; the others go on
            yield CellFailed(cell.key, error_line(what, e), traceback.format_exc())
            continue
        if outcome.reference is not None:
            yield Artifact(ref_key, "reference", outcome.reference, cell.head)
        record = build_record(cell, loaded, outcome, job.seed, artifact, git_sha=job.origin.git_sha)
        m = outcome.metrics[outcome.primary]
        yield CellDone(cell.key, record, outcome.samples,
                       f"{tag}: {cell.task.task} {outcome.primary}={m.value:.4g} (n={outcome.n}, {outcome.eval_s:.1f} s)")
    if job.speed is not None:
        yield from _speed(job, loaded)
    del loaded
    gc.collect()


def _speed(job: EvaluateArm, loaded: LoadedModel) -> Iterator[Any]:
    """The arm's speed on the model its cells just used (no second load). A failure is a line, never
    a failed cell: speed is a measurement beside the accuracy, and the run goes on."""
    cell = job.speed
    here = env.device_identity(job.device)
    if here != cell.key_material["identity"]:
        # keyed on the driver's device: numbers measured on another would be stored under a wrong key
        yield Log(f"{job.label}: speed not measured: this worker is {here}, the key names "
                  f"{cell.key_material['identity']}")
        return
    yield Log(f"{job.label}: measuring speed")
    try:
        got = measure_speed(loaded, cell.settings)
        record = build_speed_record(cell, job.model, job.arm, loaded, got, git_sha=job.origin.git_sha)
    except Exception as e:  # noqa: BLE001 -- speed is beside the accuracy: one line, the run goes on
        yield Log("FAILED " + error_line(f"{job.label} speed", e))
        return
    d1 = record.decode_tok_s(1)
    yield SpeedDone(cell.key, record, f"{job.label}: speed prefill {record.prefill_tok_s:.0f} tok/s, decode "
                    f"{d1:.1f} tok/s at batch 1{' (' + record.mark + ')' if record.mark else ''} "
                    f"({record.seconds:.1f} s)")


# -- artifacts as values ---------------------------------------------------------------------------

def pack_folder(path: Path) -> dict[str, bytes]:
    """An artifact folder's files (relative name -> bytes), to travel with a job's result."""
    path = Path(path)
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def unpack_folder(files: dict[str, bytes], out: Path) -> None:
    """Write `files` as folder `out`, atomically (a temporary folder renamed into place): a reader
    sees the whole artifact or none; two writers of the same content-keyed folder both succeed."""
    import shutil
    import tempfile

    out = Path(out)
    if out.is_dir():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        try:
            tmp.rename(out)
        except OSError:
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def adapter_here(bundle: AdapterBundle):
    """The adapter as an AdapterArtifact whose path exists on this machine (written into this
    machine's cache from the bundle's bytes when it travelled as a value)."""
    from qeval.train.artifact import load_artifact

    if bundle.files is None:
        return bundle.artifact
    out = env.adapter_dir(bundle.artifact.key)
    unpack_folder(bundle.files, out)
    return dataclasses.replace(load_artifact(out / "qeval-artifact.json", reused=True), reused=bundle.artifact.reused)
