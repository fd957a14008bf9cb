"""The `ray` executor: each job a Ray task (a streaming generator: every finished cell comes back as
it is done) that reserves `num_cpus` / `num_gpus` from the job. Artifacts travel as Ray objects,
never through one machine's cache folder. Needs the optional extra `qeval[ray]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qeval.core.errors import ChildError, QevalError
from qeval.run.executors.base import Event, Executor


@dataclass(frozen=True)
class RaySettings:
    """The plan's `ray:` section (qeval.run.plan) and `qeval run --address`: where the `ray` executor runs jobs."""

    address: str = ""  # "" starts a local Ray in this process; "auto" joins `ray start --head`; ray://host:10001
    num_cpus: int | None = None  # CPUs of a Ray started here (default: all)
    cpus_per_job: float = 1.0  # what each job reserves: on a 2-core machine, 2 jobs at a time
    gpus_per_job: float = 1.0  # on CUDA (any executor's jobs reserve it); raise for a model that needs several GPUs
    # torch CPU threads per job. Default: the driver's own count, so a job's numbers are
    # bit-identical to a local run on the driver's machine (batched matmuls round differently with
    # another thread count: ~1e-6 in log-likelihoods); 1 trades that for throughput on a busy machine
    threads_per_job: int | None = None
    runtime_env: dict = field(default_factory=dict)  # Ray runtime_env: working_dir, pip, env_vars


def _ray():
    try:
        import ray
    except ImportError:
        raise QevalError("executor", "ray", "the ray package installed",
                         "pip install 'qeval[ray]' (make setup installs it)") from None
    return ray


def _ray_job(job, keys, *values):
    """A Ray task body: the same work the local executor does (`Job.pieces`, qeval.run.jobs). qeval's
    warnings (they move numbers) travel to the driver's console as Log pieces: the worker's stderr
    ends in its log."""
    from qeval.core.console import collected_warnings

    with collected_warnings() as warned:
        for piece in job.pieces(dict(zip(keys, values))):
            while warned:
                yield job.log(warned.pop(0))
            yield piece


class RayExecutor(Executor):
    """Each job a Ray task (streaming generator); started lazily, on the first job or device question."""

    name = "ray"

    def __init__(self, settings: RaySettings):
        _ray()  # fail at once (exit 2, one line) when ray is missing
        self.settings = settings
        self._owned = False
        self._reaper = None  # for a Ray started here: kills its processes if this one dies (qeval.core.reaper)
        self._remote = None
        self._gens: dict = {}  # ObjectRefGenerator -> job
        # one machine (a Ray started here) shares the driver's cache; a cluster may not
        self.shares_cache = False

    def _start(self):
        ray = _ray()
        if self._remote is not None:
            return ray
        s = self.settings
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if s.runtime_env:
                kw["runtime_env"] = s.runtime_env
            if s.address:
                kw["address"] = s.address
            else:
                kw["num_cpus"] = s.num_cpus
            from qeval.core.reaper import descendants

            before = set(descendants())
            try:
                ray.init(**kw)
            except ConnectionError as e:
                raise QevalError("ray address", s.address or "(local)", "a running Ray cluster",
                                 f"{str(e).splitlines()[0][:160]}; start one with `ray start --head`, or drop --address") from None
            self._owned = True
            if not s.address:  # a local Ray is this run's: it must not outlive the driver, even a kill -9
                from qeval.core.reaper import Reaper

                self._reaper = Reaper(before)
        self._remote = ray.remote(max_retries=0)(_ray_job)  # retries are the driver's (plan `retries:`)
        return ray

    def check_device(self, device: str) -> None:
        if device.startswith("cuda") and not self._start().cluster_resources().get("GPU", 0):
            raise QevalError("device", "cuda", "a Ray cluster with GPUs", "this cluster has none; use --device cpu")

    def put(self, value: Any) -> Any:
        return self._start().put(value)

    def submit(self, job, inputs: dict[str, Any]) -> None:
        self._start()
        if self._reaper is not None:  # Ray starts its agents and workers after init returns
            self._reaper.watch()
        keys = tuple(inputs)
        gen = self._remote.options(num_cpus=job.num_cpus, num_gpus=job.num_gpus,
                                   name=f"qeval {job.label}"[:100]).remote(job, keys, *inputs.values())
        self._gens[gen] = job

    def running(self) -> int:
        return len(self._gens)

    def next_event(self) -> Event:
        ray = self._start()
        if self._reaper is not None:
            self._reaper.watch()
        while True:
            ready, _ = ray.wait(list(self._gens), num_returns=1, timeout=1.0)
            if ready:
                break
        gen = ready[0]
        job = self._gens[gen]
        try:
            ref = next(gen)
            piece = ray.get(ref)
        except StopIteration:
            del self._gens[gen]
            return Event(job, "done")
        except Exception as e:  # noqa: BLE001 -- a task error or a lost worker: the driver decides
            del self._gens[gen]
            return Event(job, "error", error=_unwrap(e))
        return Event(job, "piece", piece, ref)

    def close(self) -> None:
        if self._remote is None:
            return
        ray = _ray()
        for gen in list(self._gens):  # Ctrl-C or a user error: stop what is still running
            try:
                ray.cancel(gen, force=True)
            except Exception:  # noqa: BLE001 -- already finished
                pass
        self._gens.clear()
        if self._owned and ray.is_initialized():
            ray.shutdown()
        if self._reaper is not None:  # what ray.shutdown() left running (its agents, at times)
            self._reaper.close()
            self._reaper = None


def _unwrap(e: BaseException) -> BaseException:
    """The job's own exception when Ray carried it (QevalErrors and ChildErrors pickle), else the Ray
    error as a ChildError with its type name and first line (a lost worker: WorkerCrashedError)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    msg = str(e).strip().splitlines()
    return ChildError(type(e).__name__, msg[-1][:300] if msg else "")
