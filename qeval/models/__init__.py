"""Resolve a model spec to local weights and load it at a quantization format; memory measurement.

load (resolve_model, load_model, LoadedModel, ResolvedModel, compute dtypes), memory (peak memory
of a stage: PeakMemory, PhasePeaks, own_weights, the measuring allocator). Names are re-exported
lazily: `import qeval.models` imports neither (nor torch, which both load only when they run).
"""
from __future__ import annotations

from qeval.core.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "load": ("EMBEDDED", "DEFAULT_MODEL", "ResolvedModel", "LoadedModel", "resolve_model", "check_folder",
             "linear_in_features", "compute_dtype", "compute_dtype_problem", "load_model", "COMPUTE_DTYPES"),
    "memory": ("PeakMemory", "PhasePeaks", "own_weights", "release_freed_heap", "tune_allocator", "allocator_tuned",
               "allocator_description", "allocator_tunable", "relax_allocator", "high_water", "reset_high_water", "ALLOCATOR"),
})
