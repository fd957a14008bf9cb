"""The one list of report columns: what `qeval.stats.compare` builds and `qeval.report` reads and
writes (results.csv, memory.csv), in that order. Plain lists, no pandas: the store layer defines the
shape of what is derived from its records, every stage above reads it from here."""
from __future__ import annotations

# One row per (model, quant, adapter, task, metric): the value beside the baseline's, and what
# derives from the two. `arm` (the plan's arm name) and `recovery_undefined` (baseline 0) last.
RESULT_COLUMNS = ["model", "quant", "adapter", "task", "metric", "higher_is_better", "primary", "value",
                  "stderr", "n", "baseline_value", "baseline_stderr", "delta", "recovery", "ratio",
                  "weight_bytes", "device", "key", "arm", "recovery_undefined"]
# One row per variant: measured bytes split by kind, theory, ratios, and time costs. `baseline_bytes` is
# the checkpoint's as stored (dtype `checkpoint_dtype`), `compute_baseline_bytes` the baseline measured
# in memory (the compute dtype's copy); the two differ when e.g. a bf16 checkpoint computes in float32.
MEMORY_COLUMNS = ["model", "quant", "adapter", "total_bytes", "quantized_weight_bytes", "quant_state_bytes",
                  "unquantized_bytes", "theory_bytes", "baseline_bytes", "ratio_to_baseline", "ratio_to_theory",
                  "measured_bits_per_weight", "theory_bits_per_weight", "load_s", "eval_s", "peak_bytes", "device",
                  "checkpoint_dtype", "compute_baseline_bytes"]
# divergence.csv: the statistics llama.cpp's `llama-perplexity --kl-divergence` prints, per variant
# (qeval.eval.divergence.summarize), beside kl_mean / kl_p90 / kl_p99 / kl_max / top1_agree; empty
# (NaN) for records written before qeval stored them.
KL_STAT_COLUMNS = ["kl_se", "kl_median", "kl_p95", "kl_p999", "top1_se", "dp_mean", "dp_se", "dp_rms", "dp_rms_se"]
