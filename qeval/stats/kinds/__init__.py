"""The statistics kinds, one module each; importing this package registers them all in `KINDS`.

Registration order is the order below; `KINDS` iterates by name, so it does not matter.
"""
from qeval.stats.kinds import right_wrong, loglikelihood_ratio, mean, corpus, corpus_points  # noqa: F401
