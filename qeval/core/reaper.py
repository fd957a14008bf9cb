"""Processes that must not outlive the one that started them, however it ends (kill -9 included).

`Reaper(pids)` starts a small watcher process holding the read end of a pipe whose write end only
this process holds: when this process exits, for any reason, the kernel closes the write end, the
watcher reads EOF and kills the processes it was told about. A local Ray needs this: `ray.init()`
starts a dozen processes, and after a kill -9 of the driver its dashboard and runtime-env agents
(reparented to init) ran on for good. Each pid travels with its start time, so a pid the system
has since given to another process is never killed.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Iterable

GRACE_S = 3.0  # SIGTERM first (Ray's processes clean up their sockets), then SIGKILL


def descendants() -> list[int]:
    """Every process this one started, and theirs (the live ones)."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


class Reaper:
    """A watcher that kills this process's descendants, except those in `spare` (running before the
    ones to watch were started), once this process is gone or `close`s. `watch` tells it about the
    descendants started since (it is called once at the start, and again whenever more may exist)."""

    def __init__(self, spare: Iterable[int] = ()):
        # its own session: a Ctrl-C in the terminal reaches the driver (which shuts down what it
        # started) but not the watcher, which must outlive it
        # run as a script in isolated mode (-I): no qeval import, no folder of it on sys.path
        self._proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
        self._sent: set[tuple[int, float]] = set()
        self._spare = set(spare) | {self._proc.pid}
        self.watch()

    def watch(self) -> None:
        import psutil

        found = set()
        for pid in set(descendants()) - self._spare:
            with contextlib.suppress(psutil.Error):
                found.add((pid, psutil.Process(pid).create_time()))
        new = sorted(found - self._sent)
        if not new or self._proc.stdin is None:
            return
        with contextlib.suppress(OSError):  # the watcher died: nothing to tell
            self._proc.stdin.write(json.dumps(new).encode() + b"\n")
            self._proc.stdin.flush()
            self._sent.update(new)

    def close(self, wait_s: float = 2 * GRACE_S) -> None:
        """Kill what is left of the processes now (after an orderly shutdown: normally nothing)."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(wait_s)


def reap(procs: Iterable[tuple[int, float]]) -> None:
    """SIGTERM each process still running with the start time it had, then SIGKILL what is left."""
    import psutil

    alive = []
    for pid, started in procs:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 0.01:
                alive.append(p)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=GRACE_S)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    procs: list[tuple[int, float]] = []
    for line in sys.stdin.buffer:  # ends at EOF: the watched process exited or closed the pipe
        with contextlib.suppress(ValueError):
            procs += [tuple(p) for p in json.loads(line)]
    reap(procs)


if __name__ == "__main__":
    main()
