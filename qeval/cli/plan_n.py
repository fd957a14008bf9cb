"""`qeval plan-n`: how many documents a task needs to tell a loss of a non-inferiority margin apart
from none (80% power, alpha 0.05), at a flip rate or spread given or measured in a store."""
from __future__ import annotations

from pathlib import Path

from qeval.cli.base import Command, QevalError, number, register, store_path

flip_rate = number(float, lambda v: 0 <= v < 1, "a flip rate in [0, 1), e.g. 0.05 (5% of documents flip)")
spread = number(float, lambda v: v > 0, "a positive standard deviation, e.g. 0.3")


def arguments(p) -> None:
    p.add_argument("task", metavar="TASK", help="a shipped task (its rate measured in --store), or any name with "
                                                "--flip-rate or --sd")
    p.add_argument("--margin", required=True, help="the loss to tell apart: accuracy points (1pt, 0.5pt) or a "
                                                   "percent of a perplexity-like metric (1%%)")
    p.add_argument("--flip-rate", type=flip_rate, default=None,
                   help="right/wrong metrics: the share of documents whose answer flips between the two models")
    p.add_argument("--sd", type=spread, default=None,
                   help="other metrics: the standard deviation of the per-document change, in the margin's units "
                        "(metric units for points: 0.3; a relative change for percent: 0.05)")
    p.add_argument("--store", type=Path, default=None, help="a store that measured TASK (default: the default store)")


def cmd_plan_n(args) -> int:
    from qeval.stats.margin import documents_right_wrong, documents_spread, margin_text, parse_margin

    margin, relative = parse_margin(args.margin)
    label = margin_text(margin, relative)
    if args.flip_rate is not None and args.sd is not None:
        raise QevalError("--flip-rate and --sd", f"{args.flip_rate} and {args.sd}", "one of them",
                         "--flip-rate for right/wrong metrics, --sd for the others")
    power = "with 80% power at alpha 0.05"
    if args.flip_rate is not None:
        if relative:
            raise QevalError("--margin", args.margin, "accuracy points with --flip-rate (right/wrong metrics), e.g. 1pt",
                             "a percent margin is for perplexity-like metrics: pass --sd")
        n = documents_right_wrong(margin, args.flip_rate)
        print(f"{args.task}: {_n(n)} to tell a loss of {label} apart from none {power} "
              f"(paired score test, {args.flip_rate:.2%} of documents flipping)")
        return 0
    if args.sd is not None:
        n = documents_spread(margin, args.sd)
        print(f"{args.task}: {_n(n)} to tell a loss of {label} apart from none {power} "
              f"(paired t, per-document sd {args.sd:g})")
        return 0
    return _from_store(args, margin, relative, label, power)


def _from_store(args, margin: float, relative: bool, label: str, power: str) -> int:
    from qeval.eval.tasks import shipped_tasks
    from qeval.stats.compare import paired_frame
    from qeval.stats.kind import KINDS
    from qeval.stats.margin import task_documents
    from qeval.store.store import Store

    path = store_path(args)
    pairs = None
    if path.is_file():
        with Store(path, readonly=True) as s:
            records = [r for r in s.records() if r.task.name == args.task]
            if records:
                pairs = paired_frame(records, s.samples, margin={args.task: margin})
    if pairs is None or pairs.empty:
        if args.task not in shipped_tasks():
            from qeval.core.errors import unknown_name

            raise unknown_name("task", args.task, shipped_tasks(), "or give --flip-rate R or --sd S for any task")
        raise QevalError("plan-n", args.task, f"a flip rate or spread: the store {path} has no paired results of it",
                         "pass --flip-rate R (right/wrong metrics) or --sd S (others), or --store a store that measured it")
    pairs = pairs[pairs["task"] == args.task]
    kind = KINDS.get(str(pairs["kind"].iloc[0]))
    if kind.relative != relative:
        raise QevalError("--margin", args.margin, f"a margin {'in percent, e.g. 1%' if kind.relative else 'in points, e.g. 1pt'} "
                         f"for {args.task} ({kind.name})")
    for d in task_documents(pairs):
        noise = f"the median flip rate of {len(pairs)} variants ({d['flip_rate']:.2%})" \
            if d["flip_rate"] == d["flip_rate"] else f"the median per-document spread of {len(pairs)} variants"
        spread = "" if d["n_min"] == d["n_max"] else f"; {_n(d['n_min'], '')} .. {_n(d['n_max'], '')} from the closest variant to the farthest"
        print(f"{d['task']} ({d['metric']}, n = {d['n']} in {path}): {_n(d['n_needed'])} to tell a loss of {label} "
              f"apart from none {power} at {noise}{spread}" + (f" ({d['floor_note']})" if d.get("floor_note") else ""))
    return 0


def _n(n, unit: str = " documents") -> str:
    from qeval.stats.margin import MAX_DOCUMENTS

    return f"more than {MAX_DOCUMENTS:,}{unit}" if n is None else f"{n:,}{unit}"


register(Command("plan-n", "documents a task needs to tell a loss of a margin apart from none (80%% power)",
                 cmd_plan_n, arguments,
                 dict(description="Sample size for a non-inferiority margin (qeval.stats.margin): the documents a "
                                  "paired test needs to tell a loss of --margin apart from none with 80% power at "
                                  "alpha 0.05 -- the paired score test's exact power at --flip-rate for right/wrong metrics, a "
                                  "paired t at --sd for the others, or the rate measured in --store.")))
