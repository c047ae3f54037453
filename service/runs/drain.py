"""The drain: one object, one entry point, for every way a replica is told to stop.

``POST /admin/drain`` (the preStop hook), SIGTERM/SIGINT (through
``service.granian_bridge``), the death of Granian's main process, and a server that
stops without any of those all call :meth:`Drain.begin`. The first call closes
admission and flips readiness in the same event-loop turn, and starts the one drain
task; a later call never restarts or extends it, but may *shorten* what is left of
the grace (the main process died during a normal drain: there is no time left to
wait). The drain then

1. waits until the grace ends for the active runs to finish — except, with
   ``handoff`` (``QUIESCE_HANDOFF_ON_DRAIN``), runs that will be retried on
   ``shutdown``: those are stopped at once, so another replica adopts them while
   the rollout goes on;
2. stops the rest, and writes each one ``failed``/``shutdown`` through the
   :class:`~service.finish.Finisher` (which requeues a run whose retry policy lists
   ``shutdown`` instead), all at once, within :data:`DRAIN_FINALIZE_BUDGET_SECONDS`;
3. sets :attr:`Drain.stopped` and runs the ``on_stopped`` callbacks (under Granian,
   that is where the server is told to stop).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import structlog

from service.finish import Finisher
from service.metrics import Metrics
from service.runs.active import ActiveRun, ActiveRuns, CancelReason
from service.runs.supervision import stopped_record
from service.schemas import RunRecord, utcnow

log = structlog.get_logger(__name__)

#: After the grace: the most a drain spends cancelling and writing what is left.
#: With the server's own stop (about 0.2 s) this keeps "drain start to exit" within
#: grace + 2 s; bench/drain_timing.py shows 5,000 runs written in about 1.3 s.
DRAIN_FINALIZE_BUDGET_SECONDS: Final = 1.5


@dataclass
class DrainProgress:
    started_at: datetime
    grace_seconds: float
    active_at_start: int
    cancelled: int = 0
    finished: bool = False


class Drain:
    def __init__(
        self,
        *,
        runs: ActiveRuns,
        finisher: Finisher,
        metrics: Metrics,
        grace_seconds: float,
        stop: Callable[[str, CancelReason], None],
        handoff: bool = False,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._runs = runs
        self._stop = stop
        self._handoff = handoff
        self._finisher = finisher
        self._metrics = metrics
        self._grace = grace_seconds
        self._now = now
        #: Set when the drain begins; open event streams end on it.
        self.draining = asyncio.Event()
        #: Set when the drain has finished (every run finalized, or reported as left).
        self.stopped = asyncio.Event()
        #: What began the drain (``admin``, ``SIGTERM``, ``parent_exited`` …).
        self.trigger: str | None = None
        #: Event-loop time at which the drain began, and at which the grace ends.
        self.started: float | None = None
        self._cancel_at: float | None = None
        self._shortened = asyncio.Event()
        self.progress: DrainProgress | None = None
        #: After the drain: runs whose terminal write could not be made in time.
        self.left_running: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._on_stopped: list[Callable[[], None]] = []

    @property
    def grace_seconds(self) -> float:
        """The grace of this drain (shorter than configured once a trigger shortened it)."""
        return self._grace

    @property
    def cancel_at(self) -> float | None:
        """Event-loop time at which the grace ends (None before the drain)."""
        return self._cancel_at

    def on_stopped(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the drain has finished."""
        self._on_stopped.append(callback)

    def begin(self, trigger: str, *, grace_seconds: float | None = None) -> None:
        """Start the drain, or — when it runs already — shorten its grace to
        ``grace_seconds`` from now if that ends it sooner (never later)."""
        loop = asyncio.get_running_loop()
        if self._task is not None:
            log.info("drain_already_running", trigger=trigger, first_trigger=self.trigger)
            if grace_seconds is not None:
                self._shorten(loop.time() + max(grace_seconds, 0.0), trigger)
            return
        self._runs.close()
        self._metrics.draining.set(1)
        if grace_seconds is not None:
            self._grace = min(self._grace, max(grace_seconds, 0.0))
        self.trigger = trigger
        self.started = loop.time()
        self._cancel_at = self.started + self._grace
        self.progress = DrainProgress(
            started_at=self._now(), grace_seconds=self._grace, active_at_start=len(self._runs)
        )
        self.draining.set()
        log.info("drain_triggered", trigger=trigger)
        self._task = loop.create_task(self._run(self.progress), name="quiesce-drain")

    async def wait(self) -> DrainProgress | None:
        """Wait until the drain has finished; its progress."""
        await self.stopped.wait()
        return self.progress

    def _shorten(self, cancel_at: float, trigger: str) -> None:
        if self._cancel_at is None or self.started is None or cancel_at >= self._cancel_at:
            return
        self._cancel_at = cancel_at
        self._grace = cancel_at - self.started
        if self.progress is not None:
            self.progress.grace_seconds = self._grace
        self._shortened.set()
        log.info("drain_grace_shortened", trigger=trigger, grace_seconds=round(self._grace, 3))

    async def _run(self, progress: DrainProgress) -> None:
        try:
            log.info("drain_started", active_runs=len(self._runs), grace_seconds=self._grace)
            if self._handoff:
                self._hand_off(progress)
            await self._wait_for_runs(lambda: self._cancel_at or 0.0)
            if len(self._runs):
                await self._stop_leftovers(progress)
            progress.finished = True
            log.info(
                "drain_finished", cancelled=progress.cancelled, left_running=len(self.left_running)
            )
        finally:
            self.stopped.set()
            for callback in self._on_stopped:
                callback()

    def _hand_off(self, progress: DrainProgress) -> None:
        """Stop now every run that will be requeued for a shutdown (its next attempt
        starts on another replica); the others keep their grace."""
        handed = 0
        for active in self._runs:
            policy = active.record.retry
            if policy is not None and policy.retries("shutdown", active.record.attempt):
                self._stop(active.run_id, "shutdown")
                handed += 1
        progress.cancelled += handed
        log.info("drain_handing_off", runs=handed)

    async def _wait_for_runs(self, until: Callable[[], float]) -> None:
        """Until every run present now is done, or the loop time ``until()`` (which a
        shortened grace moves earlier)."""
        waits = [run.when_released() for run in self._runs]
        if not waits:
            return
        loop = asyncio.get_running_loop()
        everything: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*waits))
        try:
            while not everything.done():
                remaining = until() - loop.time()
                if remaining <= 0:
                    return
                self._shortened.clear()
                shortened: asyncio.Future[Any] = asyncio.ensure_future(self._shortened.wait())
                await asyncio.wait(
                    [everything, shortened], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                shortened.cancel()
        finally:
            if not everything.done():
                everything.cancel()
                # A cancelled gather ends with CancelledError as its exception, which
                # asyncio would log as never retrieved: take it.
                everything.add_done_callback(_take_outcome)

    async def _stop_leftovers(self, progress: DrainProgress) -> None:
        # A collection pass over thousands of runs' objects would eat the budget.
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._write_leftovers(progress)
        finally:
            if collecting:
                gc.enable()

    async def _write_leftovers(self, progress: DrainProgress) -> None:
        """After the grace: stop every run still here and write each one failed/shutdown,
        all at once, within DRAIN_FINALIZE_BUDGET_SECONDS.

        The writes go out together (the store batches them), not one supervisor at a
        time, so thousands of runs fit in the budget. A run whose supervisor is already
        writing its own outcome, or that is still being admitted, finishes on its own
        path (an admission that completes now finalizes as shutdown at once).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_FINALIZE_BUDGET_SECONDS
        leftovers = list(self._runs)
        log.info("drain_cancelling", runs=len(leftovers))
        stopping: list[tuple[ActiveRun, RunRecord]] = []
        now = self._now()
        for active in leftovers:
            if active.outcome is not None:
                continue  # its supervisor is writing it
            if active.cancel_reason is None:  # (else a cancel or timeout was under way)
                active.cancel_reason = "shutdown"
                self._metrics.run_cancellations.labels(active.task.name, "shutdown").inc()
                progress.cancelled += 1
            if active.supervisor is None:
                continue  # being admitted: it finalizes as soon as it starts
            record = active.outcome = stopped_record(active, active.cancel_reason, now)
            active.supervisor.cancel()  # it cancels the task function and frees the slot
            stopping.append((active, record))
        # Progress the runs emitted before they were stopped is written first (usually
        # nothing is pending); half the budget at most, the rest is for the writes.
        flushes = [
            asyncio.ensure_future(active.outbox.close())
            for active, _ in stopping
            if active.outbox.pending
        ]
        if flushes:
            _, late = await asyncio.wait(flushes, timeout=(deadline - loop.time()) / 2)
            for flush in late:
                flush.cancel()  # (the sender goes on until the terminal write is made)
        answers = await self._finisher.finish_many(
            [record for _, record in stopping], within=deadline - loop.time()
        )
        for (active, _), answer in zip(stopping, answers, strict=True):
            active.settled = answer is not None
        await self._wait_for_runs(lambda: deadline)
        for active in leftovers:
            if active.supervisor is not None and not active.supervisor.done():
                active.supervisor.cancel()
            active.outbox.abandon()
        self.left_running = [a.run_id for a in leftovers if not a.settled]
        if self.left_running:
            log.error(
                "runs_left_running",
                count=len(self.left_running),
                run_ids=self.left_running[:20],
                detail="their terminal write did not complete in time; once this worker's "
                "lease expires, a peer records them as worker_lost",
            )


def _take_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
