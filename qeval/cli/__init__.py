"""qeval's command line: one module per command (or family) under `qeval.cli`, registered in
`qeval.cli.base.COMMANDS`; this module builds the parser from the registry and runs one command.

Exit codes: 0 success; 1 failed cells (run) or a regression (nightly); 2 bad input -- one line on
stderr per problem (the value, what was expected, the fix), nothing written; 3 qeval could not
finish (a lock held too long, an internal error: one line, the traceback with -v or QEVAL_DEBUG=1).
Heavy libraries (torch, transformers, lm-eval) are imported inside the commands that need them, so
`qeval --help` and `qeval --version` answer at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from qeval import __version__
# Imported for their registration; the order is the order `qeval --help` lists them in.
from qeval.cli import (run, report, nightly, history, diff, bench, bench_stats, store, memory, plan_n,  # noqa: F401
                       parity, info)
from qeval.cli.base import COMMANDS, ORDER, Parser
from qeval.core.console import StderrHandler
from qeval.core.errors import QevalError
from qeval.core.names import EXIT_BAD_INPUT, EXIT_COULD_NOT_RUN


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qeval", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=run.EPILOG,
        description="Measure what quantization costs an LLM: accuracy per task, bytes, time. "
                    "Results go to a SQLite store (computed once, reused on reruns); reports are "
                    "rendered from the store.")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs and tracebacks")
    p.add_argument("--version", action="version", version=f"qeval {__version__}")
    # -v after the subcommand too (`qeval run -v`): SUPPRESS keeps a subparser from resetting it
    common = Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show library logs and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in ORDER:
        cmd = COMMANDS.get(name)
        cmd.arguments(sub.add_parser(name, parents=[common], help=cmd.help, **cmd.parser))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the log's run header
    verbose = bool(getattr(args, "verbose", False))
    debug = verbose or bool(os.environ.get("QEVAL_DEBUG"))
    setup_logging(verbose)
    try:
        return COMMANDS.get(args.command).run(args)
    except QevalError as e:
        for line in str(e).splitlines():
            print(f"qeval: error: {line}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return getattr(e, "exit_code", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("qeval: interrupted; finished cells are stored, rerun to continue", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a bug or an unforeseen environment: 3, never 1 ("regression")
        if debug:
            traceback.print_exc()
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"qeval: could not finish: internal error: {type(e).__name__}: {msg}; "
              "rerun with -v/QEVAL_DEBUG=1 for the traceback",
              file=sys.stderr)
        return EXIT_COULD_NOT_RUN


def setup_logging(verbose: bool) -> None:
    """qeval's own progress at INFO; library logs only with -v (run and nightly: in the log beside the
    store, `base.console`). Configured per main() call (not frozen at first use, not muted for good), so
    -v in a later call takes effect."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(h)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("qeval").setLevel(logging.DEBUG if verbose else logging.INFO)
    # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16 (documented
    # behaviour of the format, thousands of times a run): shown with -v only
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET if verbose else logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
