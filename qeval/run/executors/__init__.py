"""Executors: where jobs run. One small interface (`base.Executor`), one registry (`EXECUTORS`).

- `local` (default): in this process, one job at a time, in the DAG's order.
- `ray`: each job a Ray task on a local Ray or a cluster (the optional extra `qeval[ray]`).

An executor is added in its own file here (a subclass of `Executor`), registered below, plus a
test. Executors know nothing of plans or jobs beyond the interface: a job runs itself
(`job.pieces(inputs)`), so this package imports neither (the plan's schema imports it). Importing it
loads no heavy library: `ray` is imported when a Ray executor starts.
"""
from __future__ import annotations

from typing import Callable

from qeval.core.registry import Registry
from qeval.run.executors.base import Event, Executor
from qeval.run.executors.local import LocalExecutor
from qeval.run.executors.ray import RayExecutor, RaySettings

__all__ = ["EXECUTORS", "Event", "Executor", "LocalExecutor", "RayExecutor", "RaySettings", "make_executor"]

EXECUTORS: Registry[Callable[[RaySettings], Executor]] = Registry("executor")
EXECUTORS.add("local", LocalExecutor)
EXECUTORS.add("ray", RayExecutor)


def make_executor(name: str, settings: RaySettings) -> Executor:
    return EXECUTORS.get(name)(settings)
