"""`qeval report`: render reports/latest/ from the store."""
from __future__ import annotations

from pathlib import Path

from qeval.cli.base import Command, QevalError, gib, register, store_path
from qeval.core import env


def arguments(rep) -> None:
    rep.add_argument("--store", type=Path, default=None)
    rep.add_argument("--out", type=Path, default=None,
                     help="output folder (default ./reports/latest, or $QEVAL_HOME/reports/latest)")
    rep.add_argument("--memory-budget", type=gib, metavar="GIB",
                     help="training memory you have, in GiB: the LoRA-vs-QLoRA verdict picks within it")
    rep.add_argument("--plan", type=Path, help="take the minimum meaningful effects and the FDR level from this "
                     "plan's thresholds: section (default: the built-in defaults)")


def cmd_report(args) -> int:
    from qeval.report.build import build_report

    out = args.out or env.default_report_dir()
    bad = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if bad is not None:
        raise QevalError("--out", str(out), "a folder (or a path where one can be created)",
                         f"{bad} is a file; pass another --out")
    for p in build_report(store_path(args), out, plan=args.plan, memory_budget=args.memory_budget):
        print(p)
    return 0


register(Command("report", "render reports/latest/ from the store", cmd_report, arguments))
