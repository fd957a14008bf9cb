"""Run a plan: its schema, cells, jobs, executors and the driver that writes records.

plan (the typed schema, load_plan, validate) -> cells (the matrix and its keys) -> dag + jobs (what
runs, and the work itself) -> executors (where it runs) -> driver (run_plan: the store's one writer).
Names are re-exported lazily: importing `qeval.run` (or its schema, for `--help`) loads no torch.
"""
from __future__ import annotations

from qeval.core.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "plan": ("Plan", "Arm", "RaySettings", "Thresholds", "Resolved", "load_plan", "plan_from", "plan_keys", "validate"),
    "cells": ("Cell", "make_cells", "expand"),
    "record": ("build_record",),
    "driver": ("run_plan", "RunSummary"),
})
