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

# Bounds of the hardened YAML loader (qeval.core.yaml_safe) for every plan, suite, task and
# thresholds file: far above any real one (the shipped files: < 8 KiB, < 500 nodes, depth < 8),
# far below what hangs or crashes a parser ("billion laughs" aliases, 10,000-deep brackets).
YAML_MAX_BYTES = 2 * 1024 * 1024
YAML_MAX_NODES = 100_000  # nodes after alias expansion
YAML_MAX_DEPTH = 64

# Upper bounds of the numeric options checked before the store is opened: beyond them a value is a
# typo (or hostile), and a bigger one fails only at run time (lm-eval's int casts, numpy's seeds).
MAX_LIMIT = 10**9  # documents per task
MAX_FEWSHOT = 1_000
MAX_BATCH = 65_536
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_BOOTSTRAP_ITERS = 10**7
MAX_RETRIES = 100
MAX_STEPS = 10**7  # optimizer steps of one adapter
