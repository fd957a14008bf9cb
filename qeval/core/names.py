"""Names and codes that several stages must agree on, defined once.

A literal repeated in two stages drifts apart silently (a report that calls another format the
baseline, a nightly whose exit code means something else to the CLI); these are imported instead.
This module imports nothing, so the CLI can read it before any heavy library loads.
"""
from __future__ import annotations

# The unquantized format every other arm is compared with (recovery, divergence references).
BASELINE = "none"

# What a plan measures when it names nothing: the embedded model, the baseline and the bitsandbytes
# presets, in the order reports list them (baseline first).
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_FORMATS = (BASELINE, "bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq")



def metric_id(metric: str, filter_name: str) -> str:
    """How qeval names a metric under a filter: `acc` (lm-eval's filter "none") or
    `exact_match,strict-match` -- lm-eval's own result key, so it reads the same in both."""
    return metric if filter_name == "none" else f"{metric},{filter_name}"


# Process exit codes (`qeval` and the nightly job a scheduler runs).
EXIT_OK = 0
EXIT_REGRESSION = 1  # nightly: a regression; `qeval run`: some cells failed
EXIT_BAD_INPUT = 2  # the user's input: one line per problem, nothing written
EXIT_COULD_NOT_RUN = 3  # not the input: a lock held too long, failed cells in a nightly, an internal error
