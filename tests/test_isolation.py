"""Failures stay contained: errors cross the training process boundary intact, a child that dies
does not hang the parent, a load or training failure is a failed cell (exit 1), locks time out."""
from __future__ import annotations

import os
import pickle
import signal
import time

import pytest

from qeval.core.errors import ChildError, CouldNotFinish, QevalError, QevalErrors


def test_qeval_errors_pickle():
    e = QevalError("what", "v", "something", "do this")
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) and back.fix == "do this"
    many = QevalErrors([e, QevalError("x", 1, "y")])
    back = pickle.loads(pickle.dumps(many))
    assert str(back) == str(many) and len(back.errors) == 2
    c = pickle.loads(pickle.dumps(ChildError("OutOfMemoryError", "CUDA out of memory", "tb")))
    assert str(c) == "OutOfMemoryError: CUDA out of memory" and c.trace == "tb"
    assert pickle.loads(pickle.dumps(CouldNotFinish("lock", "p", "free"))).exit_code == 3


def _raise_qeval():
    raise QevalError("seq_len", 4096, "shorter than the training text", "lower seq_len")


class _Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.lock = __import__("threading").Lock()


def _raise_unpicklable():
    raise _Unpicklable("boom", 2)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _ok():
    return None


def test_child_errors_cross_the_boundary():
    from qeval.train.child import run_in_child

    run_in_child(_ok, ())
    with pytest.raises(QevalError, match="seq_len 4096"):
        run_in_child(_raise_qeval, ())
    with pytest.raises(ChildError, match="_Unpicklable: boom"):
        run_in_child(_raise_unpicklable, ())


def test_killed_child_does_not_hang_the_parent():
    from qeval.train.child import run_in_child

    t0 = time.perf_counter()
    with pytest.raises(ChildError, match="exited with code -9"):
        run_in_child(_die, ())
    assert time.perf_counter() - t0 < 60


def test_lock_times_out_with_exit_3(tmp_path, capsys):
    import multiprocessing

    from qeval.core.files import store_lock

    store = tmp_path / "s.sqlite"
    with store_lock(store, "nightly"):
        # a second process cannot take it (filelock is re-entrant within one process)
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_try_lock, args=(str(store), q))
        p.start()
        p.join(60)
        kind, msg = q.get(timeout=5)
    assert kind == "CouldNotFinish" and "QEVAL_LOCK_TIMEOUT" in msg


def _try_lock(store, q):
    from pathlib import Path

    from qeval.core.files import store_lock

    try:
        with store_lock(Path(store), "nightly", timeout=1):
            q.put(("acquired", ""))
    except Exception as e:  # noqa: BLE001
        q.put((type(e).__name__, str(e)))


def test_load_failure_is_a_failed_cell(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An OOM while loading one arm fails that arm's cells (exit 1); the other arm is stored."""
    from qeval.run import jobs
    from qeval.cli import main
    from qeval.store.store import Store

    real = jobs.load_model

    def flaky(resolved, fmt, device, dtype=None):
        if fmt.name == "bnb-nf4":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(resolved, fmt, device, dtype)

    monkeypatch.setattr(jobs, "load_model", flaky)
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ntasks:\n  - {task: qeval_analogy, limit: 4, batch_size: 4}\n")
    code = main(["run", "--model", str(tiny_model_dir), "--formats", "none,bnb-nf4", "--suite", str(suite),
                 "--store", str(tmp_path / "s.sqlite"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "qeval: failed: [2/2]" in err and "RuntimeError: CUDA out of memory" in err
    assert "corrupt" not in err and "Traceback" not in err
    with Store(tmp_path / "s.sqlite", readonly=True) as s:
        assert [r.variant.quant for r in s.records()] == ["none"]


def test_training_failure_is_a_failed_cell(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from qeval.run import jobs
    from qeval.cli import main

    def crash(*a, **k):
        raise ChildError("OutOfMemoryError", "CUDA out of memory")

    monkeypatch.setattr(jobs, "finetune", crash)
    plan = tmp_path / "p.yaml"
    plan.write_text(f"models: ['{tiny_model_dir}']\nformats: []\nsuite: {tmp_path / 's.yaml'}\ndevice: cpu\n"
                    "adapters: {a: {method: lora, steps: 1}}\narms: [{name: lora, quant: none, adapter: a}]\n")
    (tmp_path / "s.yaml").write_text("name: s\ntasks:\n  - {task: qeval_analogy, limit: 4, batch_size: 4}\n")
    code = main(["run", "--plan", str(plan), "--store", str(tmp_path / "s.sqlite")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "OutOfMemoryError: CUDA out of memory" in err


def test_full_disk_is_one_line(tmp_path, monkeypatch):
    """SQLite's 'database or disk is full' becomes a QevalError naming the store."""
    from qeval.store.store import Store
    from tests.records import make_record

    with Store(tmp_path / "s.sqlite") as s:
        s._db.execute("PRAGMA max_page_count=8")  # a tiny quota: SQLITE_FULL, as on a full disk
        with pytest.raises(QevalError, match="free disk space"):
            for i in range(200):
                s.put(make_record(key=f"k{i}", variant_id="v", task={"name": "t"}, created_at="x",
                                  pad="x" * 4000), [{"x": "y" * 4000}])


def test_internal_error_in_nightly_exits_3(tmp_path, monkeypatch, capsys):
    from qeval import cli

    def boom(*a, **k):
        raise KeyError("unexpected")

    monkeypatch.setattr("qeval.gates.nightly.nightly", boom)
    plan = tmp_path / "p.yaml"
    plan.write_text("formats: [none]\n")
    assert cli.main(["nightly", str(plan), "--store", str(tmp_path / "s.sqlite")]) == 3
    assert "internal error: KeyError" in capsys.readouterr().err


def test_second_run_on_a_busy_store_waits_then_gives_up_with_exit_3(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Two `qeval run` on one store take turns (a lock beside the store); a holder that never lets
    go makes the waiter give up after QEVAL_LOCK_TIMEOUT with exit 3, the store untouched."""
    import multiprocessing

    from qeval.cli import main

    store = tmp_path / "s.sqlite"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_run_lock, args=(str(store), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        monkeypatch.setenv("QEVAL_LOCK_TIMEOUT", "3")
        code = main(["run", "--model", str(tiny_model_dir), "--formats", "none", "--tasks", "qeval_analogy",
                     "--limit", "2", "--store", str(store)])
    finally:
        release.set()
        holder.join(30)
    err = capsys.readouterr().err
    assert code == 3, err
    assert "waiting for another qeval process" in err and "QEVAL_LOCK_TIMEOUT" in err
    assert not store.exists()


def _hold_run_lock(store, ready, release):
    from pathlib import Path

    from qeval.core.files import store_lock

    with store_lock(Path(store), "run"):
        ready.set()
        release.wait(120)


def _sleep_forever(pidfile):
    from pathlib import Path

    Path(pidfile).write_text(str(os.getpid()))
    time.sleep(600)


def _run_sleeper(pidfile):
    from qeval.train.child import run_in_child

    run_in_child(_sleep_forever, (pidfile,))


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)  # a zombie is dead
    except FileNotFoundError:
        return True


def test_training_child_exits_when_its_parent_is_killed(tmp_path):
    """kill -9 of a run must not leave its training process burning the CPU."""
    import multiprocessing

    pidfile = tmp_path / "child.pid"
    parent = multiprocessing.get_context("spawn").Process(target=_run_sleeper, args=(str(pidfile),))
    parent.start()
    deadline = time.time() + 120
    while not pidfile.is_file() or not pidfile.read_text():
        assert time.time() < deadline, "the training child never started"
        time.sleep(0.2)
    child = int(pidfile.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.join()
    deadline = time.time() + 15
    while not _gone(child):
        assert time.time() < deadline, "the training child outlived its killed parent"
        time.sleep(0.2)
