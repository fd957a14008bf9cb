"""`corpus_points`: sacrebleu's corpus metrics (bleu, chrf, ter: (ref, pred) per document), on a
0..100 point scale. The same paired bootstrap over documents as `corpus` (test, interval, MDE, no
simulated noise); only the scale differs, so the default minimum meaningful effect is one point.
"""
from __future__ import annotations

from qeval.stats.kind import KINDS
from qeval.stats.kinds.corpus import Corpus


class CorpusPoints(Corpus):
    __slots__ = ()
    name = "corpus_points"
    default_min_effect = 1.0
    aggregations = ("bleu", "chrf", "chrf++", "ter")


CORPUS_POINTS = KINDS.add(CorpusPoints.name, CorpusPoints())
