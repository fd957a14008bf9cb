"""`qeval history CELL`: one cell's primary metric over the last nightly runs, as the nightly names the
cell ('model @ arm / task', or 'arm / task')."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qeval.core.errors import QevalError, did_you_mean
from qeval.gates.nightly import cell_matches
from qeval.store.store import Store


@dataclass(frozen=True)
class Night:
    run_id: int
    started_at: str
    status: str
    value: float
    stderr: float | None
    computed: bool  # the cell was computed that night (else its stored result was reused)
    versions_changed: str  # library versions that differ from the previous run ("" none)
    key: str


def cell_history(store_path: Path, cell: str, nights: int) -> tuple[str, str, list[Night]]:
    """(cell name, metric, its last `nights` finished nightly runs, oldest first). An unknown cell is
    one error line listing the cells the history has, with the closest one."""
    from qeval.stats.compare import history_frame

    with Store(store_path, readonly=True) as s:
        runs = s.runs("nightly")
        hist = history_frame(runs, s.get)
    status = {r["run_id"]: r["status"] for r in runs}
    if hist.empty:
        raise QevalError("--store", str(store_path), "a store with finished nightly runs",
                         "run `qeval nightly PLAN --store ...` first")
    hist = hist.assign(cell=hist["model"] + " @ " + hist["arm"] + " / " + hist["task"])
    known = sorted(hist["cell"].unique())
    matches = [c for c in known if cell_matches(c, cell)]
    if len(matches) != 1:
        shown = ", ".join(f"'{c}'" for c in (matches or known)[:20]) + (", ..." if len(matches or known) > 20 else "")
        hint = did_you_mean(cell, known) or did_you_mean(cell, [c.split(" @ ", 1)[-1] for c in known])
        raise QevalError("cell", cell, ("one of the cells it matches: " if matches else "a cell of the nightly history: ")
                         + shown, hint or "copy the cell name from the nightly output")
    g = hist[hist["cell"] == matches[0]].sort_values("run_id").tail(nights)
    rows = [Night(int(r.run_id), str(r.started_at), status[int(r.run_id)], float(r.value),
                  None if r.stderr is None or r.stderr != r.stderr else float(r.stderr), bool(r.computed),
                  str(r.versions_changed), str(r.key)) for r in g.itertuples(index=False)]
    return matches[0], str(g["metric"].iloc[-1]), rows


def render(cell: str, metric: str, rows: list[Night]) -> str:
    """The history as a table; a change of the result key (new inputs) marked `*`."""
    lines = [f"{cell}: {metric}, last {len(rows)} nightly run{'' if len(rows) == 1 else 's'}",
             f"{'run':>5}  {'started (UTC)':19}  {'status':10}  {'value':>10}  {'stderr':>8}  result  versions changed"]
    prev = None
    for n in rows:
        what = "computed" if n.computed else "reused"
        if prev is not None and n.key != prev:
            what += "*"
        prev = n.key
        err = "" if n.stderr is None else f"{n.stderr:.3g}"
        lines.append(f"{n.run_id:>5}  {n.started_at[:19]:19}  {n.status:10}  {n.value:>10.4g}  {err:>8}  "
                     f"{what:8}{n.versions_changed or '-'}")
    lines.append("* the result key changed since the run before (new library versions or inputs)")
    return "\n".join(lines)
