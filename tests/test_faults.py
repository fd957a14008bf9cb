"""Faults, injected: a driver killed with -9 while an adapter trains or while Ray runs its jobs, a
full disk during a store write, corrupt cached adapters and references, and the store's lock files.

Each test checks what a user would: no process qeval started survives its killed driver, the rerun
completes with every cell stored once, the store stays readable with nothing half-written, a corrupt
file is noticed by its hash and recomputed (the numbers are those of the first computation), and
no lock file is left while two runs still exclude each other.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qeval.core.errors import CouldNotFinish

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    """The test's environment (its private QEVAL_CACHE included) for a qeval subprocess."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def _qeval(*args: str) -> list[str]:
    return [sys.executable, "-m", "qeval", *args]


def _gone(pids) -> list[int]:
    """Those of `pids` still running (a zombie has exited: only its parent has not read its status)."""
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := _gone(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _read_until(proc: subprocess.Popen, pattern: str, seconds: float) -> list[str]:
    """The driver's stderr lines up to the first that matches `pattern` (or fail, with them)."""
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    for line in proc.stderr:
        lines.append(line.rstrip())
        if re.search(pattern, line):
            return lines
        assert time.monotonic() < deadline, f"no line matching {pattern!r} in {seconds} s:\n" + "\n".join(lines[-20:])
    raise AssertionError(f"the driver ended (code {proc.wait()}) before {pattern!r}:\n" + "\n".join(lines[-20:]))


def _flip_byte(path: Path, offset_from_end: int = 16) -> None:
    """Corrupt a file in place as a bad disk or a partial copy would: one byte, same size."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _records(store: Path) -> dict:
    from qeval.store.store import Store

    with Store(store, readonly=True) as s:
        return {r.key: r for r in s.records()}


# -- lock files ----------------------------------------------------------------------------------------

LOCKER = """
import os, sys, time
from pathlib import Path
from qeval.core.files import store_lock
store, inside, turns = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for _ in range(turns):
    with store_lock(store, "run", timeout=120):
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError: two holders at once
        time.sleep(0.002)
        os.close(fd)
        os.unlink(inside)
"""


def test_lock_file_is_removed_and_runs_still_exclude_each_other(tmp_path):
    """The lock file goes with its holder, yet four processes taking it 40 times each never hold it
    together: a holder removes the file while it still holds it, and a waiter that then gets the
    lock on the removed file starts over on the new one."""
    from qeval.core.files import store_lock

    store = tmp_path / "s.sqlite"
    with store_lock(store, "run"):
        assert (tmp_path / "s.sqlite.run.lock").read_text().strip() == str(os.getpid())  # who holds it
    assert not list(tmp_path.glob("*.lock"))
    procs = [subprocess.Popen([sys.executable, "-c", LOCKER, str(store), str(tmp_path / "inside"), "40"],
                              env=_env(), stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    assert not list(tmp_path.glob("*.lock")) and not (tmp_path / "inside").exists()


def test_a_lock_left_by_a_killed_holder_is_taken_and_removed(tmp_path):
    """kill -9 cannot remove the file: the OS lock goes with the process, the file stays, and the
    next holder takes it at once and removes it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from qeval.core.files import store_lock\n"
                               "with store_lock(Path(sys.argv[1]), 'nightly'):\n    print('held', flush=True)\n"
                               "    time.sleep(600)\n", str(tmp_path / "s.sqlite")],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert (tmp_path / "s.sqlite.nightly.lock").is_file()
    from qeval.core.files import store_lock

    t = time.monotonic()
    with store_lock(tmp_path / "s.sqlite", "nightly", timeout=5):
        assert time.monotonic() - t < 2
    assert not list(tmp_path.glob("*.lock"))


# -- integrity of cached files ------------------------------------------------------------------------

def test_seals_detect_a_changed_byte_and_adopt_unsealed_files(tmp_path, capsys):
    from qeval.core.files import folder_intact, intact, seal, seal_path, sha256_file, verified

    f = tmp_path / "ref.safetensors"
    f.write_bytes(bytes(range(256)) * 64)
    assert intact(f)  # written before seals existed: sealed now, trusted
    assert seal_path(f).read_text().strip() == sha256_file(f)
    assert verified(f, sha256_file(f)) and not verified(tmp_path / "missing", "0" * 64)
    _flip_byte(f)
    assert not intact(f, "divergence reference")
    assert not f.exists() and not seal_path(f).exists()  # removed, so that it is recomputed
    assert "divergence reference" in capsys.readouterr().err
    f.write_bytes(b"new")
    seal(f)
    assert intact(f)

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "w.safetensors").write_bytes(b"x" * 1000)
    (folder / "meta.json").write_text("{}")
    assert folder_intact(folder, "sums.json") and (folder / "sums.json").is_file()
    assert folder_intact(folder, "sums.json")
    _flip_byte(folder / "w.safetensors")
    assert not folder_intact(folder, "sums.json", "adapter artifact")
    assert not folder.exists()
    assert "adapter artifact" in capsys.readouterr().err


def test_corrupt_cached_adapter_and_reference_are_recomputed(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """One byte changed in a cached adapter's weights and in a divergence reference: the next run
    says so in one line each, trains and records them again, and its numbers are the first run's
    (an undetected flip would have moved them, or passed unseen)."""
    from qeval.core import env
    from qeval.run import jobs, runner
    from qeval.train.recipe import finetune as real

    monkeypatch.setattr(jobs, "finetune", lambda *a, **k: real(*a, **{**k, "isolate": False}))
    (tmp_path / "s.yaml").write_text("name: s\ntasks:\n  - {task: qeval_lee_ppl, limit: 2, divergence: true}\n")
    plan = runner.plan_from(dict(models=(str(tiny_model_dir),), suite=str(tmp_path / "s.yaml"), device="cpu",
                                 formats=("none",), adapters={"a": {"steps": 2, "batch_size": 2, "seq_len": 32}},
                                 arms=({"name": "lora", "quant": "none", "adapter": "a"},)))
    first = runner.run_plan(plan, tmp_path / "a.sqlite", progress=lambda s: None)
    assert not first.failed and len(first.trained) == 1
    again = runner.run_plan(plan, tmp_path / "b.sqlite", progress=lambda s: None)  # the caches, intact
    assert not again.trained and "corrupt" not in capsys.readouterr().err

    cache = env.cache_dir()
    (weights,) = (cache / "adapters").glob("*/adapter_model.safetensors")
    (reference,) = (cache / "references").glob("*.safetensors")
    _flip_byte(weights)
    _flip_byte(reference)
    third = runner.run_plan(plan, tmp_path / "c.sqlite", progress=lambda s: None)
    err = capsys.readouterr().err
    assert f"adapter artifact {weights.parent} is corrupt" in err, err
    assert f"divergence reference {reference} is corrupt" in err, err
    assert not third.failed and third.trained == first.trained
    a, c = _records(tmp_path / "a.sqlite"), _records(tmp_path / "c.sqlite")
    assert set(a) == set(c) and len(a) == 2
    for key in a:
        assert a[key].metrics == c[key].metrics  # bit-identical: the same adapter and reference again
    assert not list(tmp_path.glob("*.lock"))


# -- a full disk --------------------------------------------------------------------------------------

def test_a_full_disk_during_an_atomic_write_leaves_the_old_file(tmp_path):
    """ENOSPC halfway through writing a cache file (simulated: the writer raises it): the target
    keeps its old version, no temporary file is left, and the error is one line, exit 3."""
    import errno

    from qeval.core.files import atomic_write, atomic_write_with

    target = tmp_path / "ref.json"
    atomic_write(target, "old")

    def half_then_full(tmp: str) -> None:
        Path(tmp).write_text("half of the new ver")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CouldNotFinish, match="free disk space") as e:
        atomic_write_with(target, half_then_full)
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ref.json"]


FULL_DISK = """set -u
# 192k: room for the store's schema (five tables), its WAL and shm, and one or two records, not four
mount -t tmpfs -o size=192k qeval-full "$D" || exit 77
"$PY" -m qeval run --model "$MODEL" --formats none,gguf:q8_0,gguf:q4_0,gguf:q5_0 --suite "$SUITE" \
    --store "$D/s.sqlite" --device cpu 2>"$OUT/err1"
echo $? > "$OUT/rc1"
"$PY" "$CHECK" "$D" > "$OUT/check1"
mount -o remount,size=4m "$D"   # space freed: the rerun finishes what is missing
"$PY" -m qeval run --model "$MODEL" --formats none,gguf:q8_0,gguf:q4_0,gguf:q5_0 --suite "$SUITE" \
    --store "$D/s.sqlite" --device cpu 2>"$OUT/err2"
echo $? > "$OUT/rc2"
"$PY" "$CHECK" "$D" > "$OUT/check2"
"""

CHECK = """import json, sys
from pathlib import Path
from qeval.store.store import Store
d = Path(sys.argv[1])
with Store(d / "s.sqlite", readonly=True) as s:
    print(json.dumps({"integrity": s.integrity_ok(), "keys": [r.key for r in s.records()],
                      "samples": [len(s.samples(r.key)) for r in s.records()],
                      "files": sorted(p.name for p in d.iterdir())}))
"""


@pytest.mark.slow  # two runs in a subprocess; the simulated full disks (above, test_isolation.py) are fast
def test_a_full_disk_during_a_store_write(tiny_model_dir, tmp_path):
    """A real full disk (a 192 KiB tmpfs in a private mount namespace: `unshare`, no root needed
    where user namespaces are allowed) under the store: the run stops with one line and exit 3, the
    store opens and passes SQLite's integrity check with whole records only, no lock or temporary
    file is left, and once there is space the rerun computes only what is missing."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare: the simulated full disk (test_isolation.py::test_full_disk_is_one_line) covers it")
    (tmp_path / "s.yaml").write_text("name: s\ntasks:\n  - {task: qeval_analogy, limit: 40, batch_size: 8}\n")
    (tmp_path / "check.py").write_text(CHECK)
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").mkdir()
    env = {**_env(), "D": str(tmp_path / "disk"), "PY": sys.executable, "MODEL": str(tiny_model_dir),
           "SUITE": str(tmp_path / "s.yaml"), "CHECK": str(tmp_path / "check.py"), "OUT": str(tmp_path / "out")}
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", FULL_DISK], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode == 77 or "unshare:" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:120]}); test_isolation.py simulates it")
    out = tmp_path / "out"
    err1 = (out / "err1").read_text()
    assert (out / "rc1").read_text().strip() == "3", err1
    errors = [line for line in err1.splitlines() if line.startswith("qeval:")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "free space and rerun" in errors[0], err1
    assert "Traceback" not in err1
    first = json.loads((out / "check1").read_text())
    assert first["integrity"] and 1 <= len(first["keys"]) < 4, first  # stored until the disk filled
    assert first["samples"] == [40] * len(first["keys"])  # whole records, each with all its samples
    assert not [f for f in first["files"] if f.endswith((".lock", ".tmp"))], first
    err2 = (out / "err2").read_text()
    assert (out / "rc2").read_text().strip() == "0", err2
    assert f"{4 - len(first['keys'])} computed, {len(first['keys'])} reused" in err2, err2
    second = json.loads((out / "check2").read_text())
    assert second["integrity"] and len(second["keys"]) == len(set(second["keys"])) == 4
    assert set(first["keys"]) <= set(second["keys"]) and second["samples"] == [40] * 4
    assert not [f for f in second["files"] if f.endswith((".lock", ".tmp"))], second


# -- kill -9 of the driver ----------------------------------------------------------------------------

def test_killed_driver_stops_its_training_child_and_the_rerun_trains(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """kill -9 of `qeval run` while its adapter trains in a child process: the child (and every
    other process the driver started) exits within seconds, no artifact is left half made, and the
    rerun trains the adapter and stores every cell once."""
    from qeval.cli import main
    from qeval.core import env
    from qeval.run import jobs
    from qeval.train.recipe import finetune as real_finetune

    (tmp_path / "s.yaml").write_text("name: s\ntasks:\n  - {task: qeval_lee_ppl, limit: 2}\n")
    plan = tmp_path / "p.yaml"
    plan.write_text(f"models: ['{tiny_model_dir}']\nformats: []\nsuite: {tmp_path / 's.yaml'}\ndevice: cpu\n"
                    "adapters: {a: {method: lora, steps: 16, batch_size: 2, seq_len: 32, eval_every: 8}}\n"
                    "arms: [{name: lora, quant: none, adapter: a}]\n")
    store = tmp_path / "s.sqlite"
    driver = subprocess.Popen(_qeval("run", "--plan", str(plan), "--store", str(store)), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _read_until(driver, r"held-out loss before training", 300)  # the child is training
        import psutil

        children = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
        assert children, "training runs in a child process"
        driver.kill()
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not _wait_gone(children, 20), "a process the killed driver started is still running"
    adapters_dir = env.cache_dir() / "adapters"
    assert not list(adapters_dir.glob("*/qeval-artifact.json")), "killed after training finished: test too slow?"

    real = real_finetune
    monkeypatch.setattr(jobs, "finetune", lambda *a, **k: real(*a, **{**k, "isolate": False}))  # imports
    assert main(["run", "--plan", str(plan), "--store", str(store)]) == 0
    err = capsys.readouterr().err
    assert "adapter a trained" in err and "FAILED" not in err, err
    assert len(_records(store)) == 1 and "1 computed, 0 reused, 0 failed" in err
    assert [p.name for p in adapters_dir.iterdir()] == [p.parent.name for p in adapters_dir.glob("*/qeval-artifact.json")]
    assert not list(tmp_path.glob("*.lock"))


RAY_PLAN = """models: ['{model}']
formats: [none, bnb-nf4, gguf:q8_0]
suite: {suite}
device: cpu
executor: ray
ray: {{num_cpus: 2}}
"""


@pytest.mark.slow
def test_killed_driver_leaves_no_ray_process_and_the_rerun_completes(tiny_model_dir, tmp_path):
    """kill -9 of a `qeval run` on a local Ray it started: every Ray process (its agents included,
    which Ray alone leaves running) is gone within seconds, and the rerun stores each missing cell
    once, reusing what the killed run stored."""
    pytest.importorskip("ray")
    (tmp_path / "s.yaml").write_text("name: s\ntasks:\n  - {task: qeval_analogy, limit: 8, batch_size: 8}\n"
                                     "  - {task: qeval_lee_ppl, limit: 2, divergence: true}\n")
    plan = tmp_path / "p.yaml"
    plan.write_text(RAY_PLAN.format(model=tiny_model_dir, suite=tmp_path / "s.yaml"))
    store = tmp_path / "s.sqlite"
    import psutil

    driver = subprocess.Popen(_qeval("run", "--plan", str(plan), "--store", str(store)), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _read_until(driver, r"qeval_analogy acc=", 600)  # a cell is stored; other jobs are running
        started = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
        assert len(started) > 3, started  # gcs_server, raylet, agents, workers
        driver.kill()
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not _wait_gone(started, 30), "a Ray process the killed driver started is still running"
    stored = len(_records(store))
    assert 1 <= stored < 6
    rerun = subprocess.run(_qeval("run", "--plan", str(plan), "--store", str(store)), env=_env(),
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"done: {6 - stored} computed, {stored} reused, 0 failed" in rerun.stderr, rerun.stderr[-3000:]
    assert len(_records(store)) == 6
    assert not list(tmp_path.glob("*.lock"))
