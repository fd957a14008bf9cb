"""The run's console: qeval's lines and one progress bar on stderr, library output in the log beside
the store (qeval.core.console)."""
import io
import os
import subprocess
import sys
from pathlib import Path

from qeval.core import console
from qeval.core.console import Console, duration, eta, status


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_eta_is_the_pace_so_far_times_the_cells_left():
    assert eta(0, 8, 30.0) is None  # no cell finished: no pace to go by
    assert eta(2, 8, 60.0) == 180.0  # 30 s a cell, 6 left
    assert eta(8, 8, 240.0) == 0.0
    assert eta(9, 8, 240.0) == 0.0  # never negative
    assert eta(1, 0, 5.0) is None
    assert [duration(s) for s in (0, 7, 65, 3725, -3)] == ["0:00", "0:07", "1:05", "1:02:05", "0:00"]
    assert status(3, 8, 65) == "3/8 cells (37%), 1:05 elapsed, ~1:48 left"
    assert status(0, 8, 5) == "0/8 cells (0%), 0:05 elapsed, time left unknown"
    assert status(4, 8, 10, bar=True).startswith("[" + "#" * 12 + "-" * 12 + "] 4/8 cells (50%)")


def test_not_a_terminal_plain_status_lines_every_few_cells_or_30_s():
    out, clock = io.StringIO(), Clock()
    c = Console(out, tty=False, clock=clock)
    c("2 jobs for 40 cells")  # before the total is known: just the line
    c.expect(40)
    for i in range(12):
        clock.t += 1
        c.advance()
        c(f"cell {i}")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no redrawing in a log file
    # every 4 cells (a tenth of the plan), each a line of its own
    assert [ln for ln in lines if ln.startswith("progress:")] == [
        "progress: 4/40 cells (10%), 0:04 elapsed, ~0:36 left",
        "progress: 8/40 cells (20%), 0:08 elapsed, ~0:32 left",
        "progress: 12/40 cells (30%), 0:12 elapsed, ~0:28 left"]
    clock.t += 31  # a slow cell: a status line on the next line after ~30 s, though no cell finished
    c("still evaluating")
    assert out.getvalue().splitlines()[-1] == "progress: 12/40 cells (30%), 0:43 elapsed, ~1:40 left"
    c("next line")
    assert out.getvalue().splitlines()[-1] == "next line"  # not again until 30 s more


def test_not_a_terminal_last_cell_always_reported():
    out, clock = io.StringIO(), Clock()
    c = Console(out, tty=False, clock=clock)
    c.expect(25)  # every 3 cells: 24 is one, 25 would not be
    clock.t += 50
    c.advance(24)
    c.advance()
    assert out.getvalue().splitlines()[-1].startswith("progress: 25/25 cells (100%)")


def test_terminal_bar_is_redrawn_below_the_lines():
    out, clock = io.StringIO(), Clock()
    c = Console(out, tty=True, clock=clock)
    c.expect(4)
    clock.t += 10
    c.advance()
    c("[1/2] m @ none: qeval_analogy acc=0.5")
    text = out.getvalue()
    # the line first clears the bar, then is printed whole; the bar comes back under it, no newline
    assert "\r\x1b[K[1/2] m @ none: qeval_analogy acc=0.5\n\r\x1b[K[######------------------] 1/4 cells" in text
    assert text.endswith("~0:30 left")
    c.close()
    assert out.getvalue().endswith("\r\x1b[K")  # the terminal is left clean


def test_a_warning_reaches_the_terminal_once_and_the_log_every_time():
    out, log = io.StringIO(), io.StringIO()
    c = Console(out, tty=False, log=log)
    for _ in range(3):
        c("warning: scoring row by row")
        c("an ordinary line")
    assert out.getvalue().count("scoring row by row") == 1 and out.getvalue().count("an ordinary line") == 3
    assert log.getvalue().count("scoring row by row") == 3


def test_a_workers_warnings_are_collected_as_lines():
    import logging

    with console.collected_warnings() as got:
        logging.getLogger("qeval.eval.lm").warning("scoring row by row")
        logging.getLogger("qeval").info("not a warning")
    logging.getLogger("qeval").warning("after: not collected")
    assert got == ["warning: scoring row by row"]


def test_plain_callbacks_ignore_the_bar():
    seen = []
    console.expect(seen.append, 3)
    console.advance(seen.append)
    assert seen == []


def _say_from_child(text):
    console.say(text)


def test_a_child_says_its_lines_through_its_parent(capsys):
    from qeval.train.child import run_in_child

    run_in_child(_say_from_child, ("a line from the training process",))
    assert "a line from the training process" in capsys.readouterr().err


def test_bad_input_writes_no_log(tmp_path, capsys):
    from qeval.cli import main

    store = tmp_path / "st" / "store.sqlite"
    assert main(["run", "--formats", "nope", "--store", str(store)]) == 2
    assert not (tmp_path / "st").exists()
    err = capsys.readouterr().err
    assert err.startswith("qeval: error: ") and "nope" in err


WRAPPER = """
import logging, sys, warnings
import qeval.run.jobs as jobs  # the stage functions are looked up there

real = jobs.evaluate

def evaluate(*a, **k):  # a library's FutureWarning and a number-moving qeval warning, every cell
    warnings.warn("a library deprecation", FutureWarning)
    logging.getLogger("qeval").warning("scoring row by row (test)")
    return real(*a, **k)

jobs.evaluate = evaluate
from qeval.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_cli(tmp_path, model, store, *extra):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("QEVAL_DEBUG", None)
    return subprocess.run([sys.executable, "-c", WRAPPER, "run", "--model", str(model), "--formats", "none",
                           "--tasks", "qeval_analogy,qeval_similarity", "--limit", "4", "--store", str(store), *extra],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


BAR_MARKS = ("\r", "█", "it/s]", "Tokenizing inputs")


def test_a_run_is_quiet_and_the_log_holds_the_rest(tmp_path, tiny_model_dir):
    store = tmp_path / "st" / "store.sqlite"
    res = _run_cli(tmp_path, tiny_model_dir, store)
    assert res.returncode == 0, res.stderr
    err = res.stderr
    for mark in BAR_MARKS + ("FutureWarning",):
        assert mark not in err, f"{mark!r} on the console:\n{err}"
    # qeval's own lines as before, the overall progress, the summary; the warning once, in words
    for line in ("1 jobs for 2 cells on the local executor", "[1/1]", "qeval_analogy acc=", "qeval_similarity acc=",
                 "progress: 2/2 cells (100%)", "done: 2 computed, 0 reused, 0 failed"):
        assert line in err, f"{line!r} missing:\n{err}"
    assert err.count("warning: scoring row by row (test)") == 1, err
    assert res.stdout == ""
    log = (tmp_path / "st" / "qeval.log").read_text()
    assert "=====" in log and "--store" in log  # the run's header
    assert "FutureWarning: a library deprecation" in log
    assert "Tokenizing inputs" in log or "█" in log  # lm-eval's bars
    assert "done: 2 computed" in log and log.count("scoring row by row (test)") == 2  # in order, every time
    # a second run appends under its own header
    res = _run_cli(tmp_path, tiny_model_dir, store)
    assert res.returncode == 0 and "0 computed, 2 reused" in res.stderr
    assert (tmp_path / "st" / "qeval.log").read_text().count("=====") == 4


def test_verbose_shows_the_library_output(tmp_path, tiny_model_dir):
    store = tmp_path / "st" / "store.sqlite"
    res = _run_cli(tmp_path, tiny_model_dir, store, "-v")
    assert res.returncode == 0, res.stderr
    assert "FutureWarning" in res.stderr and "Tokenizing inputs" in res.stderr
    assert "done: 2 computed" in res.stderr and "[1/1]" in res.stderr
    assert not (tmp_path / "st" / "qeval.log").exists()


def test_the_pace_clock_stops_while_only_adapters_train():
    """No cell can finish while only trainings run: that stretch does not slow the cells' pace (a
    cold `make report` said "~1:05:33 left" during its trainings and took 17 minutes); the trainings
    still to finish are named after the estimate."""
    out, clock = io.StringIO(), Clock()
    c = Console(out, tty=False, clock=clock, every_s=1e9)
    c.expect(10)
    c.hold(False, trainings=2)
    clock.t += 20
    c.advance(2)  # 10 s a cell
    assert out.getvalue().splitlines()[-1] == "progress: 2/10 cells (20%), 0:20 elapsed, ~1:20 left + 2 adapter trainings"
    c.hold(True, trainings=2)
    clock.t += 300  # a training: held
    c.hold(False, trainings=1)
    clock.t += 30
    c.advance(3)  # 50 s of cells for 5: still 10 s a cell, though 350 s have passed
    assert out.getvalue().splitlines()[-1] == "progress: 5/10 cells (50%), 5:50 elapsed, ~0:50 left + 1 adapter training"
    c.hold(True, trainings=1)
    clock.t += 100
    c.advance(0)
    c.hold(False, trainings=0)
    clock.t += 50
    c.advance(5)
    assert out.getvalue().splitlines()[-1] == "progress: 10/10 cells (100%), 8:20 elapsed, ~0:00 left"
    assert status(5, 10, 350, paced_s=50, trainings=1) == "5/10 cells (50%), 5:50 elapsed, ~0:50 left + 1 adapter training"
