"""`qeval nightly`: a plan as a regression job (exit 1 on a regression); `qeval bench-gates`: its
false alarms and detection, simulated on a store."""
from __future__ import annotations

import sys
from pathlib import Path

from qeval.cli.base import Command, QevalError, console, positive_int, register, store_path
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


def cmd_nightly(args) -> int:
    from qeval.store.store import check_store_path

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
    with console(args) as progress:
        from qeval.gates.nightly import nightly  # here: the warnings of its imports go to the log

        res = nightly(args.plan, store_path(args), progress=progress,
                      run_kind="candidate" if args.candidate else "nightly", compare_with="nightly")
    print(f"{'candidate' if args.candidate else 'nightly'} run {res.run_id}: {res.computed} computed, {res.reused} reused, {len(res.failed)} failed, "
          f"{sum(f.kind == 'regression' for f in res.findings)} regressions in {res.wall_s:.1f} s; "
          f"{res.method or 'no comparisons'}")
    for f in res.findings:
        print(f.line())
    for line in res.failed:
        print(f"COULD NOT RUN: {line}")
    return res.exit_code


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
