"""Nightly runs: unchanged rerun is all cache hits (exit 0), a planted regression is caught (exit 1),
a killed run restarted completes correctly, two nightlies at once leave a consistent store."""
import multiprocessing

import pytest

from qeval.core import env
from qeval.run import jobs
from qeval.cli import main
from qeval.gates.nightly import EXIT_COULD_NOT_RUN, EXIT_OK, EXIT_REGRESSION, nightly
from qeval.store.store import Store

PLAN = """models: [{model}]
formats: [none, bnb-nf4]
suite: {suite}
device: cpu
thresholds:
  min_recovery: 0.0
"""
SUITE = """name: nightly
tasks:
  - {task: qeval_analogy, limit: 40, batch_size: 8}
  - {task: qeval_lee_ppl, limit: 2}
"""


@pytest.fixture
def plan_path(tiny_model_dir, tmp_path):
    (tmp_path / "suite.yaml").write_text(SUITE)
    p = tmp_path / "plan.yaml"
    p.write_text(PLAN.format(model=tiny_model_dir, suite=tmp_path / "suite.yaml"))
    return p


def quiet(s):
    pass


def test_unchanged_rerun_is_all_cache_hits(plan_path, tmp_path):
    store = tmp_path / "store.sqlite"
    first = nightly(plan_path, store, progress=quiet)
    assert first.exit_code == EXIT_OK and first.computed == 4 and first.reused == 0
    second = nightly(plan_path, store, progress=quiet)
    assert second.exit_code == EXIT_OK and second.computed == 0 and second.reused == 4
    assert not [f for f in second.findings if f.kind == "regression"]
    with Store(store) as s:
        runs = s.runs("nightly")
    assert [r["status"] for r in runs] == ["ok", "ok"]
    assert len(runs[1]["reused"]) == 4 and runs[1]["git_sha"] and runs[1]["versions"]["torch"]


def _upgrade(monkeypatch, bnb_version):
    """A new bitsandbytes release: every key changes, every variant stays the same."""
    versions = dict(env.versions())
    versions["bitsandbytes"] = bnb_version
    monkeypatch.setattr(env, "versions", lambda: versions)


def test_planted_regression_is_reported_with_nonzero_exit(plan_path, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store.sqlite"
    assert nightly(plan_path, store, progress=quiet).exit_code == EXIT_OK

    _upgrade(monkeypatch, "9.9.9")
    real = jobs.evaluate

    def broken_release(loaded, task, spec, *rest):
        out = real(loaded, task, spec, *rest)
        if loaded.fmt.name == "bnb-nf4" and task.task == "qeval_analogy":
            for s in out.samples:  # the planted bug: the new release gets every question wrong
                s["acc"] = 0.0
            out.metrics["acc"].value = 0.0
        return out

    monkeypatch.setattr(jobs, "evaluate", broken_release)
    code = main(["nightly", str(plan_path), "--store", str(store)])
    out = capsys.readouterr().out
    assert code == EXIT_REGRESSION
    lines = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert len(lines) == 1, out
    assert "bnb-nf4 / qeval_analogy acc" in lines[0] and "-> 0 " in lines[0] and "95% CI" in lines[0]
    assert "bitsandbytes" in lines[0] and "9.9.9" in lines[0]  # says what changed
    # the baseline and nf4's perplexity were recomputed too (new keys) but did not move beyond noise
    with Store(store) as s:
        assert s.runs("nightly")[-1]["status"] == "regression"
        assert s.integrity_ok()


def test_threshold_breach_is_a_regression(plan_path, tmp_path):
    strict = plan_path.read_text().replace("min_recovery: 0.0", "min_recovery: 0.0\n  per_metric: {word_perplexity: 1.01}")
    plan_path.write_text(strict)
    res = nightly(plan_path, tmp_path / "store.sqlite", progress=quiet)
    # nf4 cannot have *better* perplexity than the float baseline by 1%: the gate must fire
    assert res.exit_code == EXIT_REGRESSION
    assert any("threshold" in f.detail and f.metric == "word_perplexity" for f in res.findings)


def test_killed_run_restarts_and_completes(plan_path, tmp_path, monkeypatch):
    store = tmp_path / "store.sqlite"
    real = jobs.evaluate
    calls = []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed during the third cell
        return real(*a, **k)

    monkeypatch.setattr(jobs, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        nightly(plan_path, store, progress=quiet)
    monkeypatch.setattr(jobs, "evaluate", real)
    res = nightly(plan_path, store, progress=quiet)
    assert res.exit_code == EXIT_OK and res.computed == 2 and res.reused == 2  # nothing computed twice
    with Store(store) as s:
        runs = s.runs("nightly")
        assert [r["status"] for r in runs] == ["running", "ok"]  # the killed one stays visibly unfinished
        assert len(s) == 4 and s.integrity_ok()


def test_failed_cell_exits_could_not_run(plan_path, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(jobs, "evaluate", oom)
    res = nightly(plan_path, tmp_path / "store.sqlite", progress=quiet)
    assert res.exit_code == EXIT_COULD_NOT_RUN and len(res.failed) == 4


def _child(plan_path, store, cache, q):
    import os

    os.environ["QEVAL_CACHE"] = cache
    from qeval.gates.nightly import nightly as run

    q.put(run(plan_path, store, progress=lambda s: None).exit_code)


def test_two_nightlies_at_once_keep_the_store_consistent(plan_path, tmp_path):
    import os

    store = tmp_path / "store.sqlite"
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(plan_path, store, os.environ["QEVAL_CACHE"], q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert sorted(q.get(timeout=5) for _ in procs) == [EXIT_OK, EXIT_OK]
    with Store(store) as s:
        runs = s.runs("nightly")
        assert len(s) == 4 and s.integrity_ok()  # each cell stored once
        assert sorted(len(r["computed"]) for r in runs) == [0, 4]  # one waited, then reused everything


def test_typos_in_thresholds_are_bad_input_reported_together(plan_path, tmp_path, capsys):
    plan_path.write_text(plan_path.read_text().replace("min_recovery: 0.0", """min_recovery: 0.0
  per_arm: {bnb-nf44: 0.4}
  per_metric: {word_perplexty: 1.0}
  warn_below: {"qeval_analogy:accc": 0.5}"""))
    code = main(["nightly", str(plan_path), "--store", str(tmp_path / "store.sqlite")])
    err = capsys.readouterr().err
    assert code == 2
    assert "'bnb-nf4'" in err and "'word_perplexity'" in err and "'qeval_analogy:acc'" in err  # did you mean
    assert not (tmp_path / "store.sqlite").exists() or not Store(tmp_path / "store.sqlite").runs()


def test_unexpected_error_exits_3_and_marks_the_run_failed(plan_path, tmp_path, monkeypatch, capsys):
    import qeval.gates.nightly as nightly_mod

    def bug(*a, **k):
        raise RuntimeError("a bug, not a regression")

    monkeypatch.setattr(nightly_mod, "run_plan", bug)
    store = tmp_path / "store.sqlite"
    code = main(["nightly", str(plan_path), "--store", str(store)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qeval:")]
    assert code == EXIT_COULD_NOT_RUN and len(err) == 1 and "could not finish" in err[0]  # one line, no traceback
    with Store(store) as s:
        (run,) = s.runs("nightly")
    assert run["status"] == "failed" and "a bug" in run["error"]


def test_candidate_environment_is_compared_with_the_locked_nightly(plan_path, tmp_path, monkeypatch, capsys):
    """`make nightly-upgrade`: a run with newer libraries is recorded as a candidate, compared with
    the last nightly of the locked environment, says which versions differ from the lock file, and
    leaves the nightly history alone."""
    import qeval.cli.nightly as cli

    store = tmp_path / "store.sqlite"
    lock = tmp_path / "requirements-lock.txt"
    lock.write_text("# test lock\n" + "".join(f"{k}=={v}\n" for k, v in env.versions().items() if k != "python"))
    monkeypatch.setattr(cli, "LOCK_FILE", str(lock))
    assert main(["nightly", str(plan_path), "--store", str(store)]) == EXIT_OK
    assert "not the locked environment" not in capsys.readouterr().err

    _upgrade(monkeypatch, "9.9.9")
    real = jobs.evaluate

    def broken_release(loaded, task, spec, *rest):
        out = real(loaded, task, spec, *rest)
        if loaded.fmt.name == "bnb-nf4" and task.task == "qeval_analogy":
            for s in out.samples:
                s["acc"] = 0.0
            out.metrics["acc"].value = 0.0
        return out

    monkeypatch.setattr(jobs, "evaluate", broken_release)
    code = main(["nightly", str(plan_path), "--store", str(store), "--candidate"])
    captured = capsys.readouterr()
    assert code == EXIT_REGRESSION
    assert "candidate environment: bitsandbytes" in captured.err and "-> 9.9.9" in captured.err
    (line,) = [x for x in captured.out.splitlines() if x.startswith("REGRESSION")]
    assert "bnb-nf4 / qeval_analogy acc" in line and "9.9.9" in line
    with Store(store) as s:
        assert [r["status"] for r in s.runs("nightly")] == ["ok"]  # the locked history is untouched
        assert [r["status"] for r in s.runs("candidate")] == ["regression"]


def test_lock_drift_names_the_libraries_that_moved(tmp_path):
    lock = tmp_path / "lock.txt"
    assert env.lock_drift(lock) == {}  # no lock file (an installed qeval): nothing to drift from
    lock.write_text("# comment\nbitsandbytes==0.0.1\nlm_eval==%s\nunrelated==1.0\n" % env.versions()["lm_eval"])
    assert env.lock_drift(lock) == {"bitsandbytes": ("0.0.1", env.versions()["bitsandbytes"])}
