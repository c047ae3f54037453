"""The replica's lifecycle: ``starting → ready → draining → stopped``.

One idempotent drain serves every trigger (``POST /admin/drain``, SIGTERM,
SIGINT, the death of Granian's main process): a trigger only calls
:meth:`Lifecycle.begin_drain`, which flips the state synchronously — readiness reads
503 and creates are refused from the next request on — and starts the single drain
task. Once the scheduler has finalized every run, the state becomes ``stopped`` and
the ``on_stopped`` callbacks run; under Granian that is where the server is told to
stop (``service.granian_bridge``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from service.scheduler import DrainProgress, Scheduler
from service.schemas import LifecycleState

log = structlog.get_logger(__name__)


class Lifecycle:
    def __init__(self, scheduler: Scheduler, *, grace_seconds: float) -> None:
        self._scheduler = scheduler
        self._grace = grace_seconds
        self.state: LifecycleState = "starting"
        #: Set when the drain begins; open event streams end on it.
        self.draining = asyncio.Event()
        #: Set when the drain has finished (every run finalized, or reported as left).
        self.stopped = asyncio.Event()
        self.trigger: str | None = None
        #: Event-loop time at which the drain began.
        self.drain_started: float | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._on_stopped: list[Callable[[], None]] = []

    @property
    def grace_seconds(self) -> float:
        """The grace of the drain (shorter than configured when its trigger asked)."""
        return self._grace

    def mark_ready(self) -> None:
        if self.state == "starting":
            self.state = "ready"
            log.info("ready", worker_id=self._scheduler.worker_id)

    def on_stopped(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the drain has finished."""
        self._on_stopped.append(callback)

    def begin_drain(self, trigger: str, *, grace_seconds: float | None = None) -> None:
        """Start the drain (idempotent: a second trigger neither restarts nor extends it).

        ``grace_seconds`` shortens the configured grace for this drain — for a trigger
        that cannot wait for it, such as the death of Granian's main process.
        """
        if self._drain_task is not None:
            log.info("drain_already_running", trigger=trigger, first_trigger=self.trigger)
            return
        loop = asyncio.get_running_loop()
        if grace_seconds is not None:
            self._grace = min(self._grace, max(grace_seconds, 0.0))
        self.trigger = trigger
        self.drain_started = loop.time()
        self.state = "draining"
        drain = self._scheduler.start_drain(self._grace)
        self.draining.set()
        log.info("drain_triggered", trigger=trigger)
        self._drain_task = loop.create_task(self._finish(drain), name="quiesce-drain")

    async def wait_stopped(self) -> DrainProgress | None:
        await self.stopped.wait()
        return self._scheduler.drain_progress

    async def _finish(self, drain: asyncio.Task[DrainProgress]) -> None:
        try:
            await drain
        finally:
            self.state = "stopped"
            self.stopped.set()
            for callback in self._on_stopped:
                callback()
