"""`qeval history CELL`: a cell's primary metric over the last nightly runs."""
from __future__ import annotations

from pathlib import Path

from qeval.cli.base import Command, positive_int, register, store_path


def arguments(p) -> None:
    p.add_argument("cell", metavar="CELL", help="the cell as the nightly prints it, e.g. 'bnb-nf4 / qeval_capitals' "
                   "(the model may be left out when the store has one)")
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--nights", type=positive_int, default=14, metavar="N", help="the last N nightly runs (default 14)")


def cmd_history(args) -> int:
    from qeval.gates.history import cell_history, render

    cell, metric, rows = cell_history(store_path(args), args.cell, args.nights)
    print(render(cell, metric, rows))
    return 0


register(Command("history", "a cell's primary metric over the last nightly runs", cmd_history, arguments))
