"""Statistics over stored records: the paired comparison (qeval.stats.paired, its kinds under
qeval.stats.kinds) and the comparison frames (qeval.stats.compare).

Public names are re-exported lazily (module `__getattr__`): importing `qeval.stats` costs nothing,
and `from qeval.stats import compare_pair` loads only scipy, never pandas for the frames.
"""
from __future__ import annotations

import importlib

_HOME = {
    **dict.fromkeys(("ALPHA", "POWER", "BETTER", "WORSE", "NOISE", "SMALL", "UNDEFINED", "MIN_N_T", "MIN_N_BOOTSTRAP",
                     "Comparison", "verdict_at"), "qeval.stats.comparison"),
    **dict.fromkeys(("Kind", "KINDS"), "qeval.stats.kind"),
    **dict.fromkeys(("AGGREGATION", "LEGACY_AGGREGATION", "aggregation_of", "kind_of", "default_min_effect",
                     "compare_pair", "compare_values", "mde_at", "mcnemar_mde", "mcnemar_power"), "qeval.stats.paired"),
    **dict.fromkeys(("FDR_METHOD", "fdr_adjust", "fdr_verdicts"), "qeval.stats.multiple"),
    **dict.fromkeys(("recovery", "recovery_undefined", "recovery_fails", "recovery_interval", "LossVerdicts",
                     "LOSS_VERDICTS", "NO_LOSS", "SMALL_LOSS", "UNCLEAR_LOSS", "LARGE_LOSS", "NOT_TESTED"),
                    "qeval.stats.recovery"),
    **dict.fromkeys(("SeedSpread", "seed_spread", "seeds_differ"), "qeval.stats.seeds"),
    **dict.fromkeys(("BASELINE", "adapter_label", "latest", "results_frame", "memory_frame", "adapter_frames",
                     "paired_frame", "task_mde", "divergence_frame", "with_paired", "history_frame", "decision",
                     "sort_frame"), "qeval.stats.compare"),
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'qeval.stats' has no attribute {name!r}")
    # the kinds register when qeval.stats.paired is imported; KINDS read through here must be full
    importlib.import_module("qeval.stats.paired")
    return getattr(importlib.import_module(_HOME[name]), name)
