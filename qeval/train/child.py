"""Process isolation for training: `run_in_child` runs a function in a fresh spawned process, so its
peak memory is its own and a crash or kill reaches the parent as an error, never a hang."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable

from qeval.core.console import forward_to, say
from qeval.core.errors import ChildError, QevalError
from qeval.models.memory import tune_allocator

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_in_child(fn: Callable, args: tuple) -> None:
    """Run `fn(*args)` in a fresh (spawned) process and re-raise its error here.

    A pool would hang the parent forever when the child dies (OOM killer, kill -9) or when its
    error cannot be unpickled; a plain Process with a pipe lets us watch both the result and the
    child's exit code. QevalErrors cross intact (they pickle); anything else arrives as ChildError
    with its type name and message."""
    import multiprocessing

    # spawn, not fork: a forked child would inherit this process's memory and threads
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, fn, args, os.getpid()))
    proc.start()
    send.close()  # only the child holds the writing end: EOF on recv means it is gone
    try:
        while True:
            while not recv.poll(0.5):
                if not proc.is_alive() and not recv.poll(0.5):
                    raise ChildError("ChildProcessDied", f"the training process exited with code {proc.exitcode} "
                                     "before reporting (killed, or out of memory?)")
            try:
                message = recv.recv()
            except EOFError:
                proc.join(5)
                raise ChildError("ChildProcessDied", f"the training process exited with code {proc.exitcode} "
                                 "before reporting (killed, or out of memory?)") from None
            if message[0] != "line":
                break
            say(message[1])  # the child's progress line, printed here (its own stderr is the log)
        ok, error = message
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if not ok:
        raise error


def _child_main(send, fn: Callable, args: tuple, parent_pid: int) -> None:
    import traceback

    _exit_with_parent(parent_pid)
    forward_to(lambda line: send.send(("line", line)))  # qeval's lines to the parent's console
    tune_allocator()  # freed memory goes back to the OS: RSS is what the child holds (qeval.models.memory)
    try:
        fn(*args)
        result = (True, None)
    except QevalError as e:
        result = (False, e)
    except BaseException as e:  # noqa: BLE001 -- everything must reach the parent as a value
        result = (False, ChildError(type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "",
                                    traceback.format_exc()))
    send.send(result)
    send.close()


def _exit_with_parent(parent_pid: int) -> None:
    """A parent killed with -9 cannot stop its child: without this, a training process would go on
    burning the CPU (and writing the cache) for minutes after its run was killed.

    On Linux the kernel kills it the moment the parent dies (PR_SET_PDEATHSIG; it fires when the
    *thread* that started the child ends, and that thread waits in `run_in_child` until the child
    is done). Elsewhere, and as a second line, a thread polls the parent's pid once a second."""
    import signal
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="qeval-exit-with-parent").start()
