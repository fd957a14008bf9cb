"""Compatibility name for `qeval.data.suite_data`, kept on purpose.

The shipped task helper `suites/tasks/qeval_data.py` imports `qeval.suite_data`, and that file's
bytes are part of every shipped task's fingerprint (so of every result key): editing its import
would make every existing store recompute. This module is that import's stable address.
"""
from qeval.data.suite_data import suite_data_dir

__all__ = ["suite_data_dir"]
