"""Jobs and executors: the DAG, retries, and the same plan on the local and the Ray executor.

The Ray tests start a local Ray of 2 CPUs (seconds each), so there are two: same keys and
bit-identical numbers as the local executor (artifacts travelling between Ray tasks), and a worker
killed mid-job.
"""
import dataclasses
import os
import re
import signal
import sys

import pytest

from qeval.eval.evaluate import EvalSpec
from qeval.run import jobs, runner
from qeval.run.runner import Plan, plan_from, run_plan
from qeval.store.store import Store

SUITE = """name: tiny
tasks:
  - {task: qeval_analogy, limit: 8, batch_size: 8}
  - {task: qeval_lee_ppl, limit: 2, divergence: true}
"""


@pytest.fixture
def plan(tiny_model_dir, tmp_path):
    (tmp_path / "tiny.yaml").write_text(SUITE)
    return Plan(models=(str(tiny_model_dir),), formats=("none", "bnb-nf4"), suite=str(tmp_path / "tiny.yaml"),
                device="cpu")


def _records(path):
    with Store(path, readonly=True) as s:
        return {r.key: (r, s.samples(r.key)) for r in s.records()}


def test_dag_orders_references_and_adapters_before_their_users(plan):
    from qeval.run.dag import plan_jobs
    from qeval.run.jobs import EvaluateArm, TrainAdapter

    arm_plan = plan_from({**plan.__dict__, "formats": ("bnb-nf4", "none"),
                          "adapters": {"a": {"steps": 1}}, "arms": ({"name": "lora", "quant": "none", "adapter": "a"},)})
    rp = runner.validate(arm_plan)
    todo = [(f"[{i}] {a.name}", m, a, rp.adapters.get(a.adapter) if a.adapter else None, cells)
            for i, (m, a, cells) in enumerate(runner.expand(arm_plan, rp))]
    dag = plan_jobs(todo, rp)
    by_id = {j.id: j for j in dag.jobs}
    kinds = [type(j).__name__ for j in dag.jobs]
    assert kinds.count("TrainAdapter") == 1 and kinds.count("EvaluateArm") == 3 and "RecordReference" not in kinds
    base = next(j for j in dag.jobs if isinstance(j, EvaluateArm) and j.arm.name == "none")
    nf4 = next(j for j in dag.jobs if isinstance(j, EvaluateArm) and j.arm.name == "bnb-nf4")
    lora = next(j for j in dag.jobs if isinstance(j, EvaluateArm) and j.arm.name == "lora")
    train = next(j for j in dag.jobs if isinstance(j, TrainAdapter))
    # the baseline records the reference as it evaluates; every variant waits for it
    assert len(base.makes) == 1 and dag.deps(base) == set()
    assert dag.deps(nf4) == {base.id} and dag.deps(lora) == {base.id, train.id}
    assert set(by_id) == {j.id for j in dag.jobs}  # ids are unique


def test_a_failed_job_is_retried_then_recorded(plan, tmp_path, monkeypatch):
    real = jobs.load_model
    calls = []

    def flaky(resolved, fmt, device, dtype=None):
        calls.append(fmt.name)
        if fmt.name == "bnb-nf4" and calls.count("bnb-nf4") == 1:
            raise RuntimeError("lost the GPU (simulated)")
        return real(resolved, fmt, device, dtype)

    monkeypatch.setattr(jobs, "load_model", flaky)
    lines = []
    summary = run_plan(plan, tmp_path / "s.sqlite", progress=lines.append)
    assert not summary.failed and len(summary.computed) == 4 == len(set(summary.computed))
    assert calls.count("bnb-nf4") == 2 and any("retrying (2 of 2 attempts)" in line for line in lines)
    assert any(re.match(r"jobs: 2 done, 0 running, 0 pending", line) for line in lines)

    # with retries: 0 the same failure is final: every cell of the arm is reported, nothing stored
    calls.clear()
    summary = run_plan(Plan(**{**plan.__dict__, "retries": 0}), tmp_path / "t.sqlite", progress=lambda s: None)
    assert len(summary.computed) == 2 and len(summary.failed) == 2
    assert all("@ bnb-nf4" in f and "RuntimeError: lost the GPU (simulated)" in f for f in summary.failed)


def test_reference_recorded_by_its_own_job_when_the_baseline_is_stored(plan, tmp_path, monkeypatch):
    """The baseline's cells are stored but its reference is not in this cache (another machine's
    cache, or `qeval gc`): a RecordReference job loads the baseline again, and the variant's
    divergence equals the one measured against the reference the baseline's own evaluation made."""
    base_only = Plan(**{**plan.__dict__, "formats": ("none",)})
    run_plan(base_only, tmp_path / "s.sqlite", progress=lambda s: None)
    monkeypatch.setenv("QEVAL_CACHE", str(tmp_path / "other-cache"))
    lines = []
    summary = run_plan(plan, tmp_path / "s.sqlite", progress=lines.append)
    assert len(summary.computed) == 2 and len(summary.reused) == 2 and not summary.failed
    assert any("baseline reference for qeval_lee_ppl missing" in line for line in lines)
    monkeypatch.setenv("QEVAL_CACHE", str(tmp_path / "fresh-cache"))
    run_plan(plan, tmp_path / "together.sqlite", progress=lambda s: None)
    a, b = _records(tmp_path / "s.sqlite"), _records(tmp_path / "together.sqlite")
    assert set(a) == set(b)
    nf4 = [k for k, (r, _) in a.items() if r.variant.quant == "bnb-nf4" and r.divergence]
    assert len(nf4) == 1
    numbers = lambda d: dataclasses.replace(d, seconds=None)  # noqa: E731
    assert numbers(a[nf4[0]][0].divergence) == numbers(b[nf4[0]][0].divergence)


def test_missing_ray_is_one_line(plan, tmp_path, monkeypatch, capsys):
    from qeval.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["run", "--model", plan.models[0], "--formats", "none", "--suite", plan.suite, "--device", "cpu",
                 "--executor", "ray", "--store", str(tmp_path / "s.sqlite")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "qeval[ray]" in err, err
    assert not (tmp_path / "s.sqlite").exists()


ray = pytest.importorskip("ray", reason="the optional extra qeval[ray] is not installed")
RAY = {"num_cpus": 2}  # this machine's 2 cores: 2 jobs at a time


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for both tests (its start-up costs seconds); the executor joins a Ray that is
    already initialised and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_gives_the_same_keys_and_bit_identical_numbers(plan, tmp_path, monkeypatch, local_ray):
    local = run_plan(plan, tmp_path / "local.sqlite", progress=lambda s: None)
    assert not local.failed
    # a fresh cache: the Ray run records its own reference and hands it from the baseline's task to
    # the variant's as a Ray object
    monkeypatch.setenv("QEVAL_CACHE", str(tmp_path / "cache-ray"))
    lines = []
    remote = run_plan(plan_from({**plan.__dict__, "executor": "ray", "ray": RAY}), tmp_path / "ray.sqlite",
                      progress=lines.append)
    assert not remote.failed and sorted(remote.computed) == sorted(local.computed)
    assert any("running on" in line and f"pid {os.getpid()}" not in line for line in lines)  # not in-process
    a, b = _records(tmp_path / "local.sqlite"), _records(tmp_path / "ray.sqlite")
    assert set(a) == set(b) and len(a) == 4
    for key, (ra, sa) in a.items():
        rb, sb = b[key]
        assert ra.metrics == rb.metrics, ra.variant  # bit-identical: floats compared with ==
        numbers = lambda d: d and dataclasses.replace(d, seconds=None)  # noqa: E731 (a timing)
        assert numbers(ra.divergence) == numbers(rb.divergence)  # KL, top-1 agreement, ppl ratio
        assert sa == sb
        assert ra.git_sha == rb.git_sha
    nf4_ppl = next(r for r, _ in b.values() if r.variant.quant == "bnb-nf4" and r.divergence)
    assert nf4_ppl.divergence.tokens > 0  # the variant really compared with the Ray-made reference
    assert (tmp_path / "cache-ray" / "references").is_dir()  # and the driver kept it in its own cache


def test_killed_ray_worker_is_retried_and_every_cell_stored_once(plan, tmp_path, local_ray):
    three = plan_from({**plan.__dict__, "formats": ("none", "bnb-nf4", "bnb-fp4"), "executor": "ray", "ray": RAY})
    pids, killed, lines = {}, [], []

    def progress(line: str) -> None:
        lines.append(line)
        m = re.match(r"(\[\d/3\] .*?): EvaluateArm running on .* pid (\d+)", line)
        if m:
            pids[m.group(1)] = int(m.group(2))
        # the first cell of the bnb-nf4 arm is stored: kill its worker during the second
        if not killed and "@ bnb-nf4: qeval_analogy acc=" in line:
            tag = line.split(": qeval_analogy")[0]
            os.kill(pids[tag], signal.SIGKILL)
            killed.append(tag)

    summary = run_plan(three, tmp_path / "s.sqlite", progress=progress)
    text = "\n".join(lines)
    assert killed and f"{killed[0]}: retrying (2 of 2 attempts)" in text, text
    assert not summary.failed, summary.failed
    assert len(summary.computed) == 6 == len(set(summary.computed))  # each cell stored exactly once
    with Store(tmp_path / "s.sqlite", readonly=True) as s:
        assert len(s) == 6 and s.integrity_ok()
    # the retry computed only what the killed job had not delivered
    assert text.count(f"{killed[0]}: evaluating qeval_analogy") == 1


def test_ctrl_c_cancels_the_ray_jobs(plan, tmp_path, local_ray):
    """^C in the driver: the running task's worker is stopped (not left computing), the error
    reaches the caller, and what was stored stays stored."""
    pids = []

    def progress(line: str) -> None:
        m = re.search(r"EvaluateArm running on .* pid (\d+)", line)
        if m:
            pids.append(int(m.group(1)))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_plan(plan_from({**plan.__dict__, "executor": "ray", "ray": RAY}), tmp_path / "s.sqlite", progress=progress)
    assert pids

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    import time

    deadline = time.monotonic() + 20
    while alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pids[0]), "the cancelled job's worker is still running"


def test_a_worker_with_other_library_versions_refuses_the_job(plan):
    """Versions are part of every key: a worker that differs must not compute under the driver's keys."""
    from qeval.core.errors import QevalError
    from qeval.run.jobs import Origin, RecordReference, run_job

    here = Origin.here()
    other = Origin(here.pid + 1, here.host, here.git_sha,
                   tuple((k, "0.0.1" if k == "transformers" else v) for k, v in here.versions))
    rp = runner.validate(plan)
    (_, _, cells), = [x for x in runner.expand(plan, rp) if x[1].name == "bnb-nf4"]
    job = RecordReference(id="r", label="r", model=cells[0].model, device="cpu", origin=other, cell=cells[1],
                          eval_spec=EvalSpec())
    with pytest.raises(QevalError, match=r"transformers 0\.0\.1 \(driver\)"):
        list(run_job(job, {}))


def test_a_worker_on_another_gpu_refuses_cuda_jobs(plan, monkeypatch):
    """On CUDA the GPU identity (model, capability, CUDA, driver, bitsandbytes build) is in the keys;
    a worker whose identity differs from the driver's refuses, one without a GPU too."""
    from qeval.core import env
    from qeval.core.errors import QevalError
    from qeval.run.jobs import Origin, RecordReference, run_job

    h200 = {"gpu": "NVIDIA H200", "capability": "9.0", "cuda": "13.0", "driver": "580.159.04", "bnb_build": "cuda130"}
    here = Origin.here()
    driver = Origin(here.pid + 1, here.host, here.git_sha, here.versions, tuple(sorted(h200.items())))
    rp = runner.validate(plan)
    (_, _, cells), = [x for x in runner.expand(plan, rp) if x[1].name == "bnb-nf4"]
    job = RecordReference(id="r", label="r", model=cells[0].model, device="cuda", origin=driver, cell=cells[1],
                          eval_spec=EvalSpec())
    monkeypatch.setattr(env, "gpu_identity", lambda: {**h200, "gpu": "NVIDIA H100 80GB HBM3"})
    with pytest.raises(QevalError, match="worker GPU.*H100"):
        list(run_job(job, {}))
    monkeypatch.setattr(env, "gpu_identity", lambda: None)
    with pytest.raises(QevalError, match="no GPU"):
        list(run_job(job, {}))


def test_cuda_keys_carry_the_gpu_identity(plan, tiny_model_dir, monkeypatch):
    from qeval.core import env
    from qeval.eval.evaluate import EvalSpec
    from qeval.models.load import resolve_model
    from qeval.eval.suites import load_suite

    model, suite = resolve_model(str(tiny_model_dir)), load_suite(plan.suite)
    key = lambda dev: runner.make_cells(model, runner.Arm("none", "none"), suite, EvalSpec(), dev)[0]
    cpu = key("cpu")
    assert cpu.key_material["versions"] == env.versions()  # CPU keys as they were
    ident = {"gpu": "NVIDIA H200", "capability": "9.0", "cuda": "13.0", "driver": "580.159.04", "bnb_build": "cuda130"}
    monkeypatch.setattr(env, "gpu_identity", lambda: ident)
    h200 = key("cuda")
    assert h200.key_material["versions"]["gpu"] == "NVIDIA H200" and h200.key_material["versions"]["gpu_driver"] == "580.159.04"
    monkeypatch.setattr(env, "gpu_identity", lambda: {**ident, "driver": "580.159.03"})
    assert key("cuda").key != h200.key  # a driver update is a new key (and a version line in the nightly)
    monkeypatch.setattr(env, "gpu_identity", lambda: None)  # a Ray head node without a GPU
    assert key("cuda").key_material["versions"]["gpu"].startswith("unknown")
