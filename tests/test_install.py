"""A real install: the package, not the checkout. Build a wheel, install it (non-editable) into a
fresh venv, then from an empty folder run the smoke suite on the embedded model and render the report.

The fresh venv sees the dependencies through a .pth line pointing at the test interpreter's
site-packages (installing torch & co. again would take minutes and the network); a .pth *path*
line does not run that folder's own .pth files, so the checkout's editable finder cannot leak in --
the test asserts that `qeval` is imported from the fresh venv.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QEVAL_HOME", "QEVAL_STORE",
                                                          "QEVAL_SUITE_DATA", "VIRTUAL_ENV")}
    return {**env, "QEVAL_DEBUG": "1", **extra}


def test_pip_install_then_run_and_report_from_an_empty_folder(tmp_path):
    t0 = time.perf_counter()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, env=_clean_env(), cwd=tmp_path)
    (wheel,) = wheels.glob("qeval-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, env=_clean_env())
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, env=_clean_env()).stdout.strip())
    (site / "shared-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "empty"
    work.mkdir()
    env = _clean_env()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import qeval, qeval.eval.suites as s; "
                            "print(qeval.__file__); print(s.SUITES_DIR)"], check=True, capture_output=True,
                           text=True, env=env, cwd=work).stdout.split()
    assert all(p.startswith(str(venv)) for p in where), where  # the installed copy, not the checkout
    install_s = time.perf_counter() - t0

    qeval = str(venv / "bin" / "qeval")
    t1 = time.perf_counter()
    run = subprocess.run([qeval, "run", "--model", "smollm2-135m", "--formats", "none,bnb-nf4", "--suite", "smoke"],
                         capture_output=True, text=True, env=env, cwd=work, timeout=900)
    run_s = time.perf_counter() - t1
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fatal:" not in run.stderr and "Traceback" not in run.stderr
    rep = subprocess.run([qeval, "report"], capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert (work / "results" / "qeval.sqlite").is_file()
    md = (work / "reports" / "latest" / "report.md").read_text(encoding="utf-8")
    assert "bnb-nf4" in md and "qeval_analogy" in md
    assert (work / "reports" / "latest" / "report.html").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["reports", "results"]  # nothing else, nowhere else
    version = subprocess.run([qeval, "--version"], capture_output=True, text=True, env=env, cwd=work)
    assert version.stdout.strip() == "qeval 0.1.0"
    print(f"install {install_s:.1f} s, smoke run {run_s:.1f} s, total {time.perf_counter() - t0:.1f} s")
