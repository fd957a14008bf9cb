"""Scheduler overhead per job: jobs that do nothing, run one at a time through each executor.

What a job costs beyond its own work: submit, start on a worker (the worker checks its library
versions and suite data), stream its pieces back, finish. Usage:
    PYTHONPATH=. .venv/bin/python scripts/executor_overhead.py [N]
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

from qeval.run.executors import RaySettings, make_executor
from qeval.run.jobs import Job, Log, Origin  # an executor runs a job with job.pieces(inputs) (run_job)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Nothing(Job):
    def run(self, inputs):
        yield Log("nothing")


def per_job(name: str, n: int) -> tuple[list[float], float]:
    ex = make_executor(name, RaySettings(num_cpus=2))
    origin = Origin.here()
    out, first = [], 0.0
    try:
        for i in range(n + 2):  # the first two warm the workers up (imports), not counted
            job = Nothing(id=f"j{i}", label=f"j{i}", model=None, device="cpu", origin=origin)
            t0 = time.perf_counter()
            ex.submit(job, {})
            while ex.next_event().kind != "done":
                pass
            if i >= 2:
                out.append(time.perf_counter() - t0)
            elif i == 0:
                first = time.perf_counter() - t0
    finally:
        ex.close()
    return out, first


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    for name in ("local", "ray"):
        t0 = time.perf_counter()
        t, first = per_job(name, n)
        t.sort()
        print(f"{name}: {n} empty jobs, per job median {statistics.median(t) * 1000:.2f} ms, "
              f"p90 {t[int(0.9 * (len(t) - 1))] * 1000:.2f} ms; first job (cold worker) {first:.2f} s; "
              f"executor start to close {time.perf_counter() - t0:.1f} s")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
