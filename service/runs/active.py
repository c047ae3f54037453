"""The runs this process holds, and the one place that admits them into that table.

A reservation is a synchronous check-and-insert: refuse once the table is closed
(the drain has begun; Draining → 503) or full (AtCapacity → 429), else insert. No
``await`` separates the check from the insert, which is what makes it atomic under
asyncio. Closing the table is the only "draining" flag admission reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from service.errors import AtCapacity, Draining
from service.metrics import Metrics
from service.progress import ProgressOutbox
from service.schemas import RunRecord
from service.tasks.base import Task

#: Why a run is being stopped before its task function returned.
CancelReason = Literal["user", "shutdown", "timeout"]


@dataclass(eq=False, slots=True)
class ActiveRun:
    record: RunRecord
    task: Task[Any]
    params: msgspec.Struct
    admitted_at: float
    deadline: float
    #: Its progress events not yet written.
    outbox: ProgressOutbox
    cancel_reason: CancelReason | None = None
    #: Resolved by a cancel request, to wake the supervisor.
    wake: asyncio.Future[None] | None = None
    supervisor: asyncio.Task[None] | None = None
    #: The terminal record once decided, before it is written.
    outcome: RunRecord | None = None
    #: Of the create request, when it came with an idempotency key.
    fingerprint: str | None = None
    #: The terminal write has been answered (won or lost); nothing more to write.
    settled: bool = False
    #: It has left the table (its slot is free).
    released: bool = False
    #: What :meth:`when_released` handed out and is not resolved yet (made on demand:
    #: ten thousand runs that nobody waits for hold none).
    _waiters: list[asyncio.Future[None]] | None = field(default=None, init=False, repr=False)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def when_released(self) -> asyncio.Future[None]:
        """A future resolved once the run has left the table (a new one per call, so
        cancelling it concerns only its caller)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.released:
            future.set_result(None)
        elif self._waiters is None:
            self._waiters = [future]
        else:
            self._waiters.append(future)
        return future

    def mark_released(self) -> None:
        self.released = True
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_result(None)


class ActiveRuns:
    """run id → :class:`ActiveRun`, kept in step with ``quiesce_active_runs``."""

    def __init__(self, *, metrics: Metrics, max_active_runs: int) -> None:
        self._metrics = metrics
        self.max_active_runs = max_active_runs
        self._runs: dict[str, ActiveRun] = {}
        self._closed = False
        #: Called when a slot frees up or the table closes (the adopter listens).
        self.on_change: Callable[[], None] = _nothing

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Iterator[ActiveRun]:
        return iter(list(self._runs.values()))

    def get(self, run_id: str) -> ActiveRun | None:
        return self._runs.get(run_id)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Admit nothing from now on (the drain has begun)."""
        self._closed = True
        self.on_change()

    def reserve(self, active: ActiveRun) -> None:
        if self._closed:
            raise Draining("this replica is draining and admits no new runs")
        if len(self._runs) >= self.max_active_runs:
            raise AtCapacity(
                f"this replica is at its limit of {self.max_active_runs} active runs",
                max_active_runs=self.max_active_runs,
            )
        self._runs[active.run_id] = active
        self._metrics.active_runs.set(len(self._runs))

    def take(self, active: ActiveRun) -> bool:
        """Hold an adopted run: False once the table is closed (the drain began while
        it was being claimed). Its slot was counted before the claim, so a create that
        came in meanwhile may leave the table over its limit by that batch, briefly."""
        if self._closed:
            return False
        self._runs[active.run_id] = active
        self._metrics.active_runs.set(len(self._runs))
        return True

    def release(self, active: ActiveRun) -> None:
        if self._runs.get(active.run_id) is active:
            del self._runs[active.run_id]
            self._metrics.active_runs.set(len(self._runs))
            self.on_change()
        active.mark_released()


def _nothing() -> None:
    return None
