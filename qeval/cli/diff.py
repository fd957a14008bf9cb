"""`qeval diff STORE_A STORE_B`: the same cells in two stores (two machines, GPUs, drivers, library
versions) compared per document; exit 1 when something got worse beyond the margin."""
from __future__ import annotations

import argparse
from pathlib import Path

from qeval.cli.base import Command, QevalError, fraction, register

DESCRIPTION = ("Compare the cells two stores share (matched on model, arm, task, limit and seed: not on versions, "
               "device or dtype, which are what differs) with the paired per-document statistics, all "
               "comparisons under Benjamini-Hochberg FDR control, and print one table: what changed beyond "
               "noise and the margin, what did not, and cells only in one store. Exit 0 nothing got worse, "
               "1 something got worse beyond the margin, 2 bad input. Use it as a gate when upgrading a "
               "driver, a GPU or a library: run the plan into a new store, then diff it against the old one.")


def margin(text: str):
    """`--margin 0.02` (every metric) or `--margin right_wrong=0.02,word_perplexity=0.01` (by kind or
    metric, like thresholds.min_effect)."""
    def num(t: str) -> float:
        try:
            v = float(t)
        except ValueError:
            v = -1.0
        if not v >= 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a number >= 0 (e.g. 0.02) or KIND_OR_METRIC=NUMBER,... "
                "(e.g. right_wrong=0.02,loglikelihood_ratio=0.01)")
        return v

    if "=" not in text:
        return num(text)
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not name.strip():
            num("x")
        out[name.strip()] = num(value.strip())
    return out


def arguments(p) -> None:
    p.add_argument("store_a", type=Path, metavar="STORE_A", help="the reference store (e.g. the old driver)")
    p.add_argument("store_b", type=Path, metavar="STORE_B", help="the store compared with it (e.g. the new driver)")
    p.add_argument("--margin", type=margin, default=None, metavar="X",
                   help="the smallest change that counts: a number for every metric (absolute for accuracies, "
                        "relative for perplexities) or KIND_OR_METRIC=X,...; default each kind's minimum "
                        "meaningful effect (1 accuracy point, 0.5%% perplexity)")
    p.add_argument("--fdr", type=fraction, default=None, metavar="Q",
                   help="false discovery rate over the table's comparisons (default 0.05, as the nightly)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the table to FILE (Markdown)")


def cmd_diff(args) -> int:
    from qeval.core.files import atomic_write
    from qeval.gates.diff import diff, render
    from qeval.run.plan import DEFAULT_FDR

    if args.out is not None and (args.out.is_dir() or (args.out.parent.exists() and not args.out.parent.is_dir())):
        raise QevalError("--out", str(args.out), "a file path in a folder", "name a file, e.g. diff.md")
    if args.fdr is not None and args.fdr >= 1:
        raise QevalError("--fdr", args.fdr, "a false discovery rate below 1, e.g. 0.05")
    d = diff(args.store_a, args.store_b, args.margin, args.fdr or DEFAULT_FDR)
    text = render(d, args.store_a, args.store_b)
    if args.out is not None:
        atomic_write(args.out, text)
    print(text, end="")
    return d.exit_code


register(Command("diff", "compare the same cells in two stores (exit 1 if something got worse)", cmd_diff,
                 arguments, dict(description=DESCRIPTION)))
