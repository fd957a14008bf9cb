"""Statistics over stored records: the paired comparison (qeval.stats.paired, its kinds under
qeval.stats.kinds) and the comparison frames (qeval.stats.compare).

Public names are re-exported lazily (module `__getattr__`): importing `qeval.stats` costs nothing,
and `from qeval.stats import compare_pair` loads only scipy, never pandas for the frames.
"""
from __future__ import annotations

from qeval.core.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "comparison": ("ALPHA", "POWER", "BETTER", "WORSE", "NOISE", "SMALL", "UNDEFINED", "MIN_N_T", "MIN_N_BOOTSTRAP",
                   "Comparison", "verdict_at"),
    "kind": ("Kind", "KINDS"),
    "paired": ("AGGREGATION", "LEGACY_AGGREGATION", "aggregation_of", "kind_of", "default_min_effect", "compare_pair",
               "compare_values", "mde_at", "paired_mde", "paired_power"),
    "multiple": ("FDR_METHOD", "fdr_adjust", "fdr_verdicts"),
    "recovery": ("recovery", "recovery_undefined", "recovery_fails", "recovery_interval", "LossVerdicts",
                 "LOSS_VERDICTS", "NO_LOSS", "SMALL_LOSS", "UNCLEAR_LOSS", "LARGE_LOSS", "NOT_TESTED"),
    "seeds": ("SeedSpread", "seed_spread", "seeds_differ"),
    "compare": ("BASELINE", "adapter_label", "latest", "results_frame", "memory_frame", "adapter_frames",
                "paired_frame", "task_mde", "divergence_frame", "with_paired", "history_frame", "decision",
                "sort_frame"),
}, first='qeval.stats.paired')
