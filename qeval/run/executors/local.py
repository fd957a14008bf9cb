"""The `local` executor (the default): jobs in this process, one at a time, in the DAG's order."""
from __future__ import annotations

from typing import Any

from qeval.run.executors.base import Event, Executor
from qeval.run.executors.ray import RaySettings


class LocalExecutor(Executor):
    """In this process, one job at a time: jobs run in submission order."""

    name = "local"

    def __init__(self, settings: RaySettings | None = None):
        self._queue: list = []
        self._current = None  # (job, generator)

    def submit(self, job, inputs: dict[str, Any]) -> None:
        self._queue.append((job, inputs))

    def running(self) -> int:
        return int(self._current is not None)

    def next_event(self) -> Event:
        if self._current is None:
            job, inputs = self._queue.pop(0)
            self._current = (job, job.pieces(inputs))
        job, gen = self._current
        try:
            piece = next(gen)
        except StopIteration:
            self._current = None
            return Event(job, "done")
        except Exception as e:  # noqa: BLE001 -- reported to the driver, which retries or records it
            self._current = None
            return Event(job, "error", error=e)
        return Event(job, "piece", piece, piece)

    def close(self) -> None:
        if self._current is not None:
            self._current[1].close()
            self._current = None
