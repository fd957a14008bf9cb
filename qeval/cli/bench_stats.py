"""`qeval bench-stats`: the coverage of every statistics kind's interval (writes reports/bench/stats.md)."""
from __future__ import annotations

from pathlib import Path

from qeval.cli.base import Command, positive_int, register
from qeval.core import env


def arguments(p) -> None:
    p.add_argument("--out", type=Path, default=None, help="default ./reports/bench (or $QEVAL_HOME/reports/bench)")
    p.add_argument("--reps", type=positive_int, default=1000, help="simulated comparisons per t-test cell")
    p.add_argument("--boot-reps", type=positive_int, default=200, help="per bootstrap (mean) cell")
    p.add_argument("--corpus-reps", type=positive_int, default=60,
                   help="per corpus cell (each resamples the corpus 1,000 times)")


def cmd_bench_stats(args) -> int:
    from qeval.bench.coverage import bench_stats  # scipy and the kinds: not at --help time

    out = args.out or env.home() / "reports" / "bench"
    text, _ = bench_stats(out, args.reps, args.boot_reps, args.corpus_reps)
    print(text)
    print(out / "stats.md")
    return 0


register(Command("bench-stats", "coverage of each statistics kind's 95%% interval, simulated with a known truth "
                 "(writes reports/bench/stats.md; 10-20 min on 2 CPU cores)", cmd_bench_stats, arguments))
