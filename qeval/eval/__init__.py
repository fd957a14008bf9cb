"""Evaluate a loaded model: suites and tasks, the lm-eval model, divergence from the baseline."""
