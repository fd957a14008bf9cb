"""Stage: fine-tune adapters (LoRA, QLoRA, full) and put them on a base.

spec (AdapterSpec, adapter_key, lora_config, labels; no torch), child (process isolation), recipe
(the training loop: finetune), artifact (AdapterArtifact, loading), merge (attach, merge), estimate
(the analytic training-memory model; no torch). Names are re-exported lazily: `import qeval.train`
imports none of them.
"""
from __future__ import annotations

from qeval.core.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "spec": ("METHODS", "MERGES", "ADAPTER_SCHEMA", "AdapterSpec", "SEED_TAG", "seed_base", "expand_seeds",
             "lora_config", "peft_problems", "not_converged", "adapter_key", "lora_base_problem", "merge_problem"),
    "child": ("run_in_child",),
    "recipe": ("finetune", "HELDOUT_BATCH"),
    "artifact": ("AdapterArtifact", "load_artifact", "load_finetuned"),
    "merge": ("attach", "dequantize_base"),
    "estimate": ("Shape", "MemoryEstimate", "estimate", "fits_table"),
})
