"""The command registry and what every command shares: argument types, the store path, the console.

A command is a `Command` in its own module under `qeval.cli`, registered in `COMMANDS`; `qeval.cli`
builds the parser from the registry. Modules here import only the standard library and `qeval.core`
at import time (the heavy stages inside `run`), so `qeval --help` answers at once.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qeval import __version__
from qeval.core import env
from qeval.core.console import log_path, session
from qeval.core.errors import QevalError
from qeval.core.names import EXIT_BAD_INPUT
from qeval.core.registry import Registry


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other user error (exit 2)."""

    def error(self, message: str):
        print(f"qeval: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help, how it adds its arguments, and what it runs (-> exit code)."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    parser: dict = field(default_factory=dict)  # extra add_parser keywords: description, epilog, ...


COMMANDS: Registry[Command] = Registry("command")
ORDER: list[str] = []  # registration order: `qeval --help` lists commands as their modules are imported


def register(cmd: Command) -> Command:
    COMMANDS.add(cmd.name, cmd)
    ORDER.append(cmd.name)
    return cmd


def number(parse, ok, expected: str):
    """An argparse type: `parse` the text, check it with `ok`, else one line naming the value and
    what was expected."""
    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value
    return convert


positive_int = number(int, lambda v: v >= 1, "a whole number, 1 or more (e.g. 1000)")
fraction = number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1], e.g. 0.25")
positive_gib = number(float, lambda v: v > 0, "a positive number of GiB, e.g. 4 or 2.5")


def gib(text: str) -> float:
    return positive_gib(text) * 2**30


def store_path(args) -> Path:
    return getattr(args, "store", None) or env.default_store_path()


def console(args):
    """qeval's lines and one progress bar on the terminal; library output in qeval.log beside the
    store (on the terminal with -v)."""
    return session(log_path(store_path(args)), bool(getattr(args, "verbose", False)),
                   f"qeval {__version__}: qeval " + " ".join(args.argv))


def comma_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


__all__ = ["Command", "COMMANDS", "ORDER", "Parser", "QevalError", "comma_list", "console", "fraction", "gib",
           "number", "positive_gib", "positive_int", "register", "store_path"]
