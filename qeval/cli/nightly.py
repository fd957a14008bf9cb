"""`qeval nightly`: a plan as a regression job (exit 1 on a regression); `qeval bench-gates`: its
false alarms and detection, simulated on a store."""
from __future__ import annotations

import sys
from pathlib import Path

from qeval.cli.base import Command, QevalError, console, positive_int, register, store_path
from qeval.core.errors import CouldNotFinish
from qeval.core import env

LOCK_FILE = "requirements-lock.txt"  # the known-good environment `make` installs (Makefile LOCK)

DESCRIPTION = ("Run PLAN incrementally, record the run, compare every cell and metric with the "
               "previous nightly run (Tango's score test / paired t on log-likelihoods, "
               "Benjamini-Hochberg FDR over the run, minimum meaningful effects) and with the "
               "plan's thresholds. A regression stays open until fixed or acknowledged "
               "(--ack CELL --reason TEXT). Exit 0 clean, 1 regression, 2 bad input, "
               "3 could not finish.")


def arguments(nig) -> None:
    nig.add_argument("plan", type=Path, help="plan YAML (with an optional thresholds: section)")
    nig.add_argument("--store", type=Path, default=None)
    nig.add_argument("--ack", metavar="CELL", help="acknowledge the open regressions of CELL (as printed, e.g. "
                     "'bnb-nf4 / qeval_capitals') instead of running; needs --reason")
    nig.add_argument("--reason", help="why the regression is accepted (recorded in the store's history)")
    nig.add_argument("--candidate", action="store_true",
                     help="run in a candidate environment (newer libraries, `make nightly-upgrade`): recorded as a "
                          "'candidate' run and compared with the last nightly of the locked environment; the "
                          "nightly history and its open regressions are left alone")
    nig.add_argument("--junit", type=Path, metavar="FILE",
                     help="also write the run as JUnit XML for CI: one testcase per gate, a failure per regression "
                          "(written even when the run exits 1)")
    nig.add_argument("--summary-md", type=Path, metavar="FILE",
                     help="also write a compact Markdown summary (regressions, acknowledgements, fixes, what the "
                          "nightly can detect), e.g. to $GITHUB_STEP_SUMMARY")


def cmd_nightly(args) -> int:
    from qeval.store.store import check_store_path

    outputs = [(o, p) for o, p in (("--junit", args.junit), ("--summary-md", args.summary_md)) if p is not None]
    for option, path in outputs:
        check_output_path(option, path)
    if args.ack and outputs:
        raise QevalError(outputs[0][0], str(outputs[0][1]), "no report file with --ack (it runs nothing)",
                         "drop it, or run the nightly without --ack")
    if args.reason and not args.ack:
        raise QevalError("--reason", args.reason, "--ack CELL beside it", "add --ack with the cell to acknowledge")
    if args.ack:
        from qeval.gates.nightly import acknowledge

        ids = acknowledge(store_path(args), args.ack, args.reason or "")
        print(f"acknowledged {len(ids)} open regression(s) of {args.ack}: {args.reason}")
        return 0
    check_store_path(store_path(args), write=True)
    drift = env.lock_drift(Path(LOCK_FILE))
    if drift:
        label = "candidate environment" if args.candidate else "warning: not the locked environment"
        print(f"{label}: " + ", ".join(f"{k} {locked} -> {now}" for k, (locked, now) in drift.items())
              + f" (vs {LOCK_FILE})", file=sys.stderr)
    # an unexpected exception is "could not finish" (exit 3, one line: main()), never "regression";
    # nightly() marks its run failed before it propagates
    kind = "candidate" if args.candidate else "nightly"
    with console(args) as progress:
        from qeval.gates.nightly import nightly  # here: the warnings of its imports go to the log

        try:
            res = nightly(args.plan, store_path(args), progress=progress, run_kind=kind, compare_with="nightly")
        except Exception as e:
            if not isinstance(e, QevalError) or isinstance(e, CouldNotFinish):  # bad input writes nothing
                _write_error(args, kind, f"{type(e).__name__}: {e}")
            raise
        write_outputs(args, res)
    print(f"{'candidate' if args.candidate else 'nightly'} run {res.run_id}: {res.computed} computed, {res.reused} reused, {len(res.failed)} failed, "
          f"{sum(f.kind == 'regression' for f in res.findings)} regressions in {res.wall_s:.1f} s; "
          f"{res.method or 'no comparisons'}")
    for f in res.findings:
        print(f.line())
    for line in res.failed:
        print(f"COULD NOT RUN: {line}")
    return res.exit_code


def check_output_path(option: str, path: Path) -> None:
    """A report file must be creatable: checked before the run, so a typo costs no night."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise QevalError(option, str(path), "a file path, not a folder", "name a file, e.g. results/junit.xml")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise QevalError(option, str(path), "a path inside a folder", f"{existing} is a file")


def write_outputs(args, res) -> None:
    """The CI files of a finished run, each written atomically (a reader never sees half of one)."""
    from qeval.core.files import atomic_write

    if args.junit:
        from qeval.gates.junit import junit_xml

        atomic_write(args.junit, junit_xml(res))
    if args.summary_md:
        from qeval.gates.nightly import thresholds_of
        from qeval.run.plan import load_plan
        from qeval.gates.summary_md import detectable, summary_md

        th = thresholds_of(load_plan(args.plan))
        mdes, tests = detectable(store_path(args), res.run_id, th)
        atomic_write(args.summary_md, summary_md(res, th.fdr, mdes, tests))


def _write_error(args, kind: str, message: str) -> None:
    from qeval.core.files import atomic_write

    message = message.splitlines()[0][:500] if message else "unknown error"
    if args.junit:
        from qeval.gates.junit import error_xml

        atomic_write(args.junit, error_xml(kind, message))
    if args.summary_md:
        atomic_write(args.summary_md, f"## qeval {kind}: could not finish (exit 3)\n\n{message}\n")


def gates_arguments(bg) -> None:
    bg.add_argument("--store", type=Path, default=None, help="a store holding the default plan's results")
    bg.add_argument("--nights", type=positive_int, default=1000)
    bg.add_argument("--plan", type=Path, default=Path("plans/default.yaml"),
                    help="the plan whose gates are simulated (default plans/default.yaml)")
    bg.add_argument("--out", type=Path, default=None, help="default ./reports/bench (or $QEVAL_HOME/reports/bench)")


def cmd_bench_gates(args) -> int:
    from qeval.gates.bench_gates import run

    text = run(store_path(args), args.out or env.home() / "reports" / "bench",
               nights=args.nights, plan_path=args.plan)
    print(text)
    return 0


register(Command("nightly", "run a plan as a nightly regression job (exit 1 on regression)", cmd_nightly,
                 arguments, dict(description=DESCRIPTION)))
register(Command("bench-gates", "false alarms and detection of the nightly gates, simulated on a store",
                 cmd_bench_gates, gates_arguments))
