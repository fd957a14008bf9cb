"""The former home of the runner, kept importable: its names now live in the modules that own them.

qeval.run.plan (Plan, load_plan, validate, Resolved, Arm), qeval.run.cells (Cell, make_cells,
expand), qeval.run.record (build_record) and qeval.run.driver (run_plan, RunSummary). The stage
functions jobs call (load_model, evaluate, finetune) are patched on qeval.run.jobs, not here.
"""
from qeval.run.cells import Cell, expand, make_cells  # noqa: F401
from qeval.run.driver import RunSummary, run_plan  # noqa: F401
from qeval.run.plan import Arm, Plan, Resolved, load_plan, plan_from, validate  # noqa: F401
from qeval.run.record import build_record  # noqa: F401
