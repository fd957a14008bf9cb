"""One error type for everything a user can get wrong.

A `QevalError` renders as one line: the offending value, what was expected, and the fix. The CLI
prints it and exits 2; no traceback, and nothing is written to the store before validation passes.
"""
from __future__ import annotations

import difflib
from typing import Iterable

from qeval.core.names import EXIT_COULD_NOT_RUN


class QevalError(Exception):
    """A user-facing error: `value` is what was given, `expected` what would work, `fix` what to do."""

    def __init__(self, what: str, value: object, expected: str, fix: str = ""):
        self.what, self.value, self.expected, self.fix = what, value, expected, fix
        msg = f"{what} {value!r}: expected {expected}"
        if fix:
            msg += f"; {fix}"
        super().__init__(msg)

    def __reduce__(self):
        # Exceptions pickle as `cls(*self.args)`, which is one argument here: without this, an error
        # raised in the training child process cannot be unpickled in the parent.
        return (self.__class__, (self.what, self.value, self.expected, self.fix))


class CouldNotFinish(QevalError):
    """Not the user's input: qeval could not finish (a lock held too long, ...). Exit 3, not 2."""

    exit_code = EXIT_COULD_NOT_RUN


class QevalErrors(QevalError):
    """Several problems found in one validation pass, reported together (one per line)."""

    def __init__(self, errors: list[QevalError]):
        self.errors = errors
        Exception.__init__(self, "\n".join(str(e) for e in errors))

    def __reduce__(self):
        return (self.__class__, (self.errors,))


class ChildError(Exception):
    """An unexpected exception from a child process, carried over as its type name and message
    (the original may not be picklable, or its class may not exist in the parent)."""

    def __init__(self, type_name: str, message: str, trace: str = ""):
        self.type_name, self.message, self.trace = type_name, message, trace
        super().__init__(f"{type_name}: {message}")

    def __reduce__(self):
        return (self.__class__, (self.type_name, self.message, self.trace))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """'did you mean X?' for the closest known name, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, name: str, known: Iterable[str], fix: str = "") -> QevalError:
    """The standard 'unknown <kind>' error: lists the known names and a closest match."""
    known = sorted(known)
    hint = did_you_mean(name, known)
    parts = [p for p in (hint, fix) if p]
    # lm-eval knows thousands of task names: a line that lists them all is not "one clear line"
    shown = ", ".join(known[:MAX_LISTED]) + (f", ... ({len(known) - MAX_LISTED} more)" if len(known) > MAX_LISTED else "")
    return QevalError(f"unknown {kind}", name, "one of " + shown, "; ".join(parts))


MAX_LISTED = 30  # names an "unknown <kind>" line lists before it says how many more there are
