"""The names qeval.train.adapters held before it was split (spec, child, recipe, artifact, merge),
re-exported for the modules that still import them from here; new code imports qeval.train."""
from qeval.train.artifact import AdapterArtifact, load_artifact, load_finetuned  # noqa: F401
from qeval.train.child import run_in_child  # noqa: F401
from qeval.train.merge import attach, dequantize_base  # noqa: F401
from qeval.train.recipe import finetune  # noqa: F401
from qeval.train.spec import (ADAPTER_SCHEMA, MERGES, METHODS, SEED_TAG, AdapterSpec, adapter_key,  # noqa: F401
                              expand_seeds, lora_base_problem, lora_config, merge_problem, not_converged,
                              peft_problems, seed_base)
