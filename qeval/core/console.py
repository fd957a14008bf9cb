"""The terminal during a run: qeval's own lines, one progress bar for the plan, everything else in a log.

A run loads lm-eval, transformers, datasets, torch and the quantization backends, and each of them
prints: tqdm bars per task ("Tokenizing inputs", "100%|##| 50/50"), FutureWarnings, "Failed to load
<kernel>.so". Hundreds of such lines hid qeval's own few. `session` gives a command that runs a plan:

- a `Console`: the run's `progress` callback. It prints qeval's lines as before and keeps one overall
  bar with an ETA below them (a redrawn line on a terminal; a plain status line every few cells or
  ~30 s elsewhere: CI and log files get no carriage returns);
- unless -v: file descriptors 1 and 2 pointed at the log beside the store (`results/qeval.log`,
  appended under a header per run, rotated past ROTATE_BYTES). At the descriptor level, because
  the noise comes from everywhere: C extensions, handlers libraries attached to the stderr of their
  import time, tqdm, the warnings module, and child processes, which inherit the descriptors (the
  adapter trainer; Ray's driver prints its workers' output here). Until the run's first line the log
  is held in an anonymous temporary file: a run stopped by bad input (exit 2) writes nothing;
- qeval's own warnings (a WARNING of the `qeval` logger: the tree-vs-rows fallback of
  qeval.eval.lm, which moves numbers) still reach the terminal, once per run.

A child process never writes to the terminal itself: its lines (`say`) travel to its parent
(`forward_to`), which prints them through its Console.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, TextIO

from qeval.core.errors import QevalError

LOG_NAME = "qeval.log"  # beside the store
ROTATE_BYTES = 8 * 2**20  # a log past this size moves to qeval.log.1 when a run starts
STATUS_EVERY_S = 30.0  # not a terminal: a status line at least this often (when anything happens)
STATUS_LINES = 10  # ... and about this many over the plan (every total/10 cells)
BAR_WIDTH = 24
WARNING = "warning: "  # how a line that is a qeval warning starts (shown once per run)


# ---------------------------------------------------------------- the arithmetic


def eta(done: int, total: int, elapsed_s: float) -> float | None:
    """Seconds left at the pace so far (elapsed per finished cell, times the cells left); None
    before the first cell, when there is no pace to go by."""
    if done <= 0 or total <= 0:
        return None
    return elapsed_s / done * max(total - done, 0)


def duration(seconds: float) -> str:
    """7 -> '0:07', 65 -> '1:05', 3725 -> '1:02:05'."""
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def status(done: int, total: int, elapsed_s: float, bar: bool = False, paced_s: float | None = None,
           trainings: int = 0) -> str:
    """'3/8 cells (38%), 1:05 elapsed, ~1:48 left', with an ASCII bar in front on a terminal.

    `paced_s`: the part of the elapsed time the cells' pace is read from (the run's time less the
    stretches when only adapters were training: no cell can finish then, and counting them once put
    "~1:05:33 left" on a 17-minute `make report`); `trainings`: adapter trainings not yet finished,
    named after the estimate, which cannot say how long they take."""
    left = eta(done, total, elapsed_s if paced_s is None else paced_s)
    pct = 100 * done // total if total else 0
    text = (f"{done}/{total} cells ({pct}%), {duration(elapsed_s)} elapsed, "
            + ("~" + duration(left) + " left" if left is not None else "time left unknown"))
    if trainings:
        text += f" + {trainings} adapter training{'s' if trainings > 1 else ''}"
    if not bar:
        return text
    filled = BAR_WIDTH * done // total if total else 0
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "] " + text


# ---------------------------------------------------------------- the console


class Console:
    """qeval's lines and the plan's progress bar on one stream. Callable with a line: it is the
    `progress` callback run_plan and nightly take; `expect` / `advance` (called through the module
    functions of the same names, which a plain callback ignores) move the bar. A line starting
    with WARNING reaches the stream once per Console (the log: every time)."""

    def __init__(self, stream: TextIO, tty: bool | None = None, log: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, every_s: float = STATUS_EVERY_S,
                 on_line: Callable[[], None] | None = None):
        self.stream = stream
        self.tty = _isatty(stream) if tty is None else tty
        self.log = log  # the log's stream: qeval's lines go there too, so it reads in order
        self.clock = clock
        self.every_s = every_s
        self.on_line = on_line  # called before each line (the session: the run has begun)
        self.total = self.done = 0
        self.t0: float | None = None
        self.last_status = 0.0
        self.last_done = 0
        self.drawn = False
        self.warned: set[str] = set()
        self.held_s, self.held_since, self.trainings = 0.0, None, 0  # see `hold`

    def __call__(self, line: str) -> None:
        if self.on_line is not None:
            self.on_line()
        self._write_log(line)
        if line.startswith(WARNING):  # it changes a number: the user must read it, but once a run
            if line in self.warned:
                return
            self.warned.add(line)
        self._clear()
        self.stream.write(line + "\n")
        self._status()
        self.stream.flush()

    def expect(self, cells: int) -> None:
        """`cells` more cells will be computed (the bar's total); the clock starts at the first."""
        if self.t0 is None:
            self.t0 = self.last_status = self.clock()
        self.total += cells
        self._status()
        self.stream.flush()

    def advance(self, cells: int = 1) -> None:
        """`cells` cells finished (stored or finally failed)."""
        self.done += cells
        self._status()
        self.stream.flush()

    def hold(self, on: bool, trainings: int = 0) -> None:
        """Stop (on) or restart the clock the cells' pace is read from: held while only adapter
        trainings run. `trainings`: how many have not finished (shown after the estimate)."""
        now = self.clock()
        if on and self.held_since is None:
            self.held_since = now
        elif not on and self.held_since is not None:
            self.held_s += now - self.held_since
            self.held_since = None
        self.trainings = trainings

    def close(self) -> None:
        self._clear()
        self.stream.flush()

    def _status(self) -> None:
        if not self.total:
            return
        now = self.clock()
        held = self.held_s + (now - self.held_since if self.held_since is not None else 0.0)
        elapsed = now - (self.t0 or now)
        text = status(self.done, self.total, elapsed, bar=self.tty, paced_s=max(0.0, elapsed - held),
                      trainings=self.trainings)
        if self.tty:  # redrawn in place below the last line, no newline
            self.stream.write("\r\x1b[K" + text)
            self.drawn = True
            return
        step = max(1, -(-self.total // STATUS_LINES))
        if self.done // step > self.last_done // step or now - self.last_status >= self.every_s or \
                (self.done == self.total and self.last_done < self.total):
            self.stream.write("progress: " + text + "\n")
            self._write_log("progress: " + text)
            self.last_status, self.last_done = now, self.done

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False

    def _write_log(self, line: str) -> None:
        if self.log is not None:
            self.log.write(line + "\n")
            self.log.flush()


def expect(progress: Callable[[str], None], cells: int) -> None:
    """Tell a Console `cells` more cells are coming; any other progress callback ignores it."""
    fn = getattr(progress, "expect", None)
    if fn is not None:
        fn(cells)


def hold(progress: Callable[[str], None], on: bool, trainings: int = 0) -> None:
    """Tell a Console whether only adapter trainings are running (`Console.hold`); others ignore it."""
    fn = getattr(progress, "hold", None)
    if fn is not None:
        fn(on, trainings)


def advance(progress: Callable[[str], None], cells: int = 1) -> None:
    """Tell a Console `cells` cells finished; any other progress callback ignores it."""
    fn = getattr(progress, "advance", None)
    if fn is not None and cells:
        fn(cells)


# ---------------------------------------------------------------- lines from anywhere in the process

_active: Console | None = None  # the session's console (one terminal per process)
_forward: Callable[[str], None] | None = None  # in a child: sends lines to the parent


def say(line: str) -> None:
    """A qeval line from code that has no progress callback (the adapter trainer): to the parent
    process (in a child), the session's Console, or stderr."""
    if _forward is not None:
        _forward(line)
    elif _active is not None:
        _active(line)
    else:
        print(line, file=sys.stderr, flush=True)


def forward_to(send: Callable[[str], None]) -> None:
    """In a child process: `say` lines and qeval's warnings go to `send` (to the parent, which
    prints them with `say`); the child's own stderr is the parent's log."""
    global _forward
    _forward = send
    logging.getLogger("qeval").addHandler(_QevalHandler(send, logging.WARNING))


class _QevalHandler(logging.Handler):
    """The `qeval` logger's records as console lines; a warning's line starts with WARNING."""

    def __init__(self, write: Callable[[str], None], level: int = logging.NOTSET):
        super().__init__(level)
        self.write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            self.write(WARNING + text if record.levelno >= logging.WARNING else text)
        except Exception:  # noqa: BLE001 -- logging must never raise into the run
            self.handleError(record)


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """qeval's warnings in this process meanwhile, as console lines, for a worker to send to its
    driver (a Ray worker's own stderr reaches the driver's log only)."""
    got: list[str] = []
    handler = _QevalHandler(got.append, logging.WARNING)
    logging.getLogger("qeval").addHandler(handler)
    try:
        yield got
    finally:
        logging.getLogger("qeval").removeHandler(handler)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (not the stream of the first
    call): a main() embedded in another program, or run under pytest's capture, never writes into
    a closed stream. During a quiet session: the log."""

    @property
    def stream(self):
        return _library_stream or sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


_library_stream: TextIO | None = None  # file descriptor 2 (the log) during a quiet session


# ---------------------------------------------------------------- the session


class _Capture:
    """File descriptors 1 and 2 into an anonymous buffer, then (`promote`) into the log."""

    def __init__(self, log_path: Path, header: str):
        self.log_path, self.header = log_path, header
        _flush_std()
        self.saved = {fd: os.dup(fd) for fd in (1, 2)}
        self.buffer = tempfile.TemporaryFile()
        self.log = None
        for fd in (1, 2):
            os.dup2(self.buffer.fileno(), fd)
        self.stream = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)

    def terminal(self) -> TextIO:
        """Where qeval's lines go: the terminal stderr was (sys.stderr itself when it is not fd 2,
        e.g. pytest's capture)."""
        try:
            on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):
            on_fd2 = False
        if not on_fd2:
            return sys.stderr
        return open(self.saved[2], "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                     errors="replace", closefd=False)

    def promote(self) -> None:
        """The run has begun: the log beside the store takes the buffer and what follows."""
        if self.log is not None or self.buffer is None:
            return
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if self.log_path.is_file() and self.log_path.stat().st_size > ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
            self.log = open(self.log_path, "ab")  # O_APPEND: children append beside us
        except OSError:
            return  # an unwritable folder: the run reports it; the noise stays in the buffer
        _flush_std()
        self.stream.flush()
        for fd in (1, 2):
            os.dup2(self.log.fileno(), fd)
        self.log.write(self.header.encode())
        self.buffer.seek(0)
        self.log.write(self.buffer.read())
        self.log.flush()
        self.buffer.close()
        self.buffer = None

    def close(self, keep: bool) -> None:
        if keep:
            self.promote()
        _flush_std()
        self.stream.close()
        for fd in (1, 2):
            os.dup2(self.saved[fd], fd)
            os.close(self.saved[fd])
        for f in (self.buffer, self.log):
            if f is not None:
                f.close()


@contextlib.contextmanager
def session(log_path: Path, verbose: bool, title: str) -> Iterator[Console]:
    """A Console for one command that runs a plan; unless `verbose`, the process's output (and its
    children's) goes to the log at `log_path` meanwhile. A run that ends in bad input (a QevalError
    with exit code 2) before its first line leaves no log behind."""
    global _active, _library_stream
    qlog = logging.getLogger("qeval")
    if verbose:  # everything on the terminal as it comes: no redrawn bar between library lines
        console = Console(sys.stderr, tty=False)
        _active = console
        try:
            yield console
        finally:
            _active = None
            console.close()
        return
    header = f"\n===== {datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}: {title} =====\n"
    cap = _Capture(Path(log_path), header)
    terminal = cap.terminal()
    console = Console(terminal, log=cap.stream, on_line=cap.promote)
    handler = _QevalHandler(console)
    propagate = qlog.propagate
    qlog.addHandler(handler)
    qlog.propagate = False  # the console writes qeval's lines to the log itself (once)
    _active, _library_stream = console, cap.stream
    keep = True
    try:
        yield console
    except BaseException as e:
        bad_input = isinstance(e, QevalError) and getattr(e, "exit_code", 2) == 2
        keep = not bad_input or cap.log is not None
        raise
    finally:
        _active, _library_stream = None, None
        qlog.removeHandler(handler)
        qlog.propagate = propagate
        console.close()
        if terminal is not sys.stderr:
            terminal.close()  # before cap.close: it closes the descriptor under this stream
        cap.close(keep)


def log_path(store_path: Path) -> Path:
    return Path(store_path).parent / LOG_NAME


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _flush_std() -> None:
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
