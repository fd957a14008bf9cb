"""What every executor is: one small interface the driver schedules through.

The driver (`qeval.run.driver.run_plan`) schedules: it submits a job once what it needs exists,
reads events, writes records, retries. An executor only starts jobs and reports what they yield:
`Event(job, "piece", piece, handle)` per yielded piece (`handle`: the piece as this executor
passes it on to other jobs, a Ray object ref, so an artifact need not be copied through the driver;
the driver keeps the handles of artifacts only), `Event(job, "done")` at the end, or
`Event(job, "error", error=e)` when the job raised or its worker was lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Event:
    job: Any
    kind: str  # piece | done | error
    piece: Any = None
    handle: Any = None
    error: BaseException | None = None


class Executor:
    name = "base"
    shares_cache = True  # jobs see the driver's cache folder: adapters need not travel as bytes

    def check_device(self, device: str) -> None:
        """Raise a QevalError when jobs cannot run on `device` (cpu | cuda) here."""

    def put(self, value: Any) -> Any:
        """A handle for an input artifact the driver has (loaded from its cache)."""
        return value

    def submit(self, job, inputs: dict[str, Any]) -> None:
        raise NotImplementedError

    def next_event(self) -> Event:
        raise NotImplementedError

    def running(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass
