"""One error type for everything a user can get wrong.

A `QevalError` renders as one line: the offending value, what was expected, and the fix. The CLI
prints it and exits 2; no traceback, and nothing is written to the store before validation passes.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class QevalError(Exception):
    """A user-facing error: `value` is what was given, `expected` what would work, `fix` what to do."""

    def __init__(self, what: str, value: object, expected: str, fix: str = ""):
        self.what, self.value, self.expected, self.fix = what, value, expected, fix
        msg = f"{what} {value!r}: expected {expected}"
        if fix:
            msg += f"; {fix}"
        super().__init__(msg)


class QevalErrors(QevalError):
    """Several problems found in one validation pass, reported together (one per line)."""

    def __init__(self, errors: list[QevalError]):
        self.errors = errors
        Exception.__init__(self, "\n".join(str(e) for e in errors))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """'did you mean X?' for the closest known name, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, name: str, known: Iterable[str], fix: str = "") -> QevalError:
    """The standard 'unknown <kind>' error: lists the known names and a closest match."""
    known = sorted(known)
    hint = did_you_mean(name, known)
    parts = [p for p in (hint, fix) if p]
    return QevalError(f"unknown {kind}", name, "one of " + ", ".join(known), "; ".join(parts))
