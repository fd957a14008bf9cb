"""Run a plan: its schema, cells, jobs, executors and the driver that writes records.

plan (the typed schema, load_plan, validate) -> cells (the matrix and its keys) -> dag + jobs (what
runs, and the work itself) -> executors (where it runs) -> driver (run_plan: the store's one writer).
Names are re-exported lazily: importing `qeval.run` (or its schema, for `--help`) loads no torch.
"""
from __future__ import annotations

import importlib

_OWNERS = {
    "Plan": "plan", "Arm": "plan", "RaySettings": "plan", "Thresholds": "plan", "Resolved": "plan",
    "load_plan": "plan", "plan_from": "plan", "plan_keys": "plan", "validate": "plan",
    "Cell": "cells", "make_cells": "cells", "expand": "cells",
    "build_record": "record", "run_plan": "driver", "RunSummary": "driver",
}
__all__ = sorted(_OWNERS)


def __getattr__(name: str):
    if name in _OWNERS:
        return getattr(importlib.import_module(f"qeval.run.{_OWNERS[name]}"), name)
    raise AttributeError(f"module 'qeval.run' has no attribute {name!r}")
