"""Resolve a model spec to local weights and load it at a quantization format; memory measurement.

load (resolve_model, load_model, LoadedModel, ResolvedModel, compute dtypes), memory (peak memory
of a stage: PeakMemory, PhasePeaks, own_weights, the measuring allocator). Names are re-exported
lazily: `import qeval.models` imports neither (nor torch, which both load only when they run).
"""
from __future__ import annotations

import importlib

_HOMES = {
    "load": ("EMBEDDED", "DEFAULT_MODEL", "ResolvedModel", "LoadedModel", "resolve_model", "check_folder",
             "linear_in_features", "compute_dtype", "compute_dtype_problem", "load_model", "COMPUTE_DTYPES"),
    "memory": ("PeakMemory", "PhasePeaks", "own_weights", "release_freed_heap", "tune_allocator", "allocator_tuned",
               "high_water", "ALLOCATOR"),
}
_HOME = {name: mod for mod, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"qeval.models.{_HOME[name]}"), name)
    raise AttributeError(f"module 'qeval.models' has no attribute {name!r}")
