"""Adoption: a ready replica with spare slots takes queued runs for their next attempt.

A run created with ``retry`` whose attempt ended with a listed reason waits in the
store's pending queue (``service.finish`` put it there). Every replica runs one
:class:`Adopter`, which claims queued runs (``RunStore.adopt``: an atomic claim per
run, so a run never has two owners) and starts each as a new attempt:

* **prompt**: it wakes on the store's notification that a run was queued, and when a
  run of its own ends (a slot came free); a slow poll (``POLL_SECONDS``, jittered) is
  the backstop for a lost notification;
* **fair**: it claims at most its spare slots, in batches of ``BATCH``, after a short
  random delay — so the replica that heard first does not take everything, and a
  busy replica leaves the queue to idle ones;
* **never while draining**: once the drain has closed the table it stops, and a run
  claimed in that very moment is stopped again at once (requeued as ``shutdown``).

It also keeps the pending queue's length in ``quiesce_queued_runs`` while it holds
the store's reporter lease, so that exactly one replica exports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, Final

import msgspec
import structlog

from service.errors import InvalidInput, StoreUnavailable, UnknownTask
from service.finish import Finisher
from service.metrics import Metrics
from service.progress import ProgressOutbox
from service.runs.active import ActiveRun, ActiveRuns
from service.runs.supervision import Supervisor, stopped_record
from service.schemas import RunError, RunRecord, RunStarted, RunStartedData, utcnow
from service.store.base import Adopted, RunStore
from service.tasks.base import TaskRegistry

log = structlog.get_logger(__name__)
#: Its own generator: jitter must not touch the global one (tests seed and watch it).
_random = random.Random()  # noqa: S311 - jitter, not security

#: The backstop poll, when no notification came.
POLL_SECONDS: Final = 2.0
#: The most runs claimed in one go (fairness: others get the rest).
BATCH: Final = 4
#: A random pause before claiming, so replicas woken together take turns.
JITTER_SECONDS: Final = 0.05
#: The reporter lease (export of quiesce_queued_runs) lasts this many polls.
REPORTER_LEASE_POLLS: Final = 3


class Adopter:
    def __init__(
        self,
        *,
        store: RunStore,
        registry: TaskRegistry,
        runs: ActiveRuns,
        supervisor: Supervisor,
        finisher: Finisher,
        metrics: Metrics,
        worker_id: str,
        now: Callable[[], datetime] = utcnow,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._store = store
        self._registry = registry
        self._runs = runs
        self._supervisor = supervisor
        self._finisher = finisher
        self._metrics = metrics
        self._worker_id = worker_id
        self._now = now
        self._poll = poll_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="quiesce-adopter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._metrics.queued_runs.report(None)

    def nudge(self) -> None:
        """A slot came free here: look at the queue now."""
        self._wake.set()

    async def adopt_once(self) -> int:
        """Claim and start as many queued runs as there are spare slots (at most BATCH)."""
        spare = self._runs.max_active_runs - len(self._runs)
        if spare <= 0 or self._runs.closed:
            return 0
        adopted = await self._store.adopt(self._worker_id, min(spare, BATCH), self._claim)
        for item in adopted:
            self._start(item)
        return len(adopted)

    # --- internals ------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run(self) -> None:
        beats = 0
        while not self._runs.closed:
            try:
                if beats % REPORTER_LEASE_POLLS == 0 or beats < 2:
                    await self._report()
                while await self.adopt_once() and not self._runs.closed:
                    pass  # a full batch: there may be more
            except StoreUnavailable as exc:
                log.info("adoption_deferred", error=str(exc))
            beats += 1
            await self._sleep()
        self._metrics.queued_runs.report(None)

    async def _sleep(self) -> None:
        """Until a run is queued somewhere, a slot frees up here, or the poll is due."""
        wake = asyncio.ensure_future(self._wake.wait())
        queued = asyncio.ensure_future(
            self._store.wait_for_queued(self._poll * _random.uniform(0.8, 1.2))
        )
        try:
            await asyncio.wait([wake, queued], return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            queued.cancel()
        self._wake.clear()
        await asyncio.sleep(_random.uniform(0, JITTER_SECONDS))

    async def _report(self) -> None:
        ttl = self._poll * REPORTER_LEASE_POLLS * 1.5
        if await self._store.hold_reporter(self._worker_id, ttl):
            self._metrics.queued_runs.report(await self._store.queued_count())
        else:
            self._metrics.queued_runs.report(None)

    def _claim(self, queued: RunRecord) -> tuple[RunRecord, RunStarted]:
        """The next attempt of a queued run, on this worker."""
        now = self._now()
        attempt = queued.attempt + 1
        running = msgspec.structs.replace(
            queued, status="running", attempt=attempt, worker_id=self._worker_id, updated_at=now
        )
        started = RunStarted(
            created_at=now, data=RunStartedData(worker_id=self._worker_id, attempt=attempt)
        )
        return running, started

    def _start(self, item: Adopted) -> None:
        record = item.record
        loop_now = asyncio.get_running_loop().time()
        deadline = loop_now + record.timeout_seconds  # per attempt
        try:
            task = self._registry.get(record.task)
            params = task.parse_input(item.input)
        except (UnknownTask, InvalidInput) as exc:
            # A replica of another version, without this task (or with another input):
            # the run cannot run here, and would not anywhere like it.
            log.error("adopted_run_unrunnable", run_id=record.run_id, error=exc.message)
            failed = terminal_record_for(record, exc.message, self._now())
            self._spawn(self._finisher.finish(failed, retry=True))
            return
        active = ActiveRun(
            record=record,
            task=task,
            params=params,
            admitted_at=loop_now,
            deadline=deadline,
            outbox=ProgressOutbox(self._store, record.run_id, deadline=deadline, now=self._now),
        )
        if not self._runs.take(active):
            # The drain began while it was being claimed: this attempt ends at once.
            active.cancel_reason = "shutdown"
            ending = stopped_record(active, "shutdown", self._now())
            self._spawn(self._finisher.finish(ending, retry=True))
            return
        log.info("run_adopted", run_id=record.run_id, task=record.task, attempt=record.attempt)
        self._supervisor.start(active, adopted=True)


def terminal_record_for(record: RunRecord, message: str, now: datetime) -> RunRecord:
    """A failed record (no retry: the policy is dropped) for a run this replica cannot run."""
    return msgspec.structs.replace(
        record,
        status="failed",
        updated_at=now,
        finished_at=now,
        error=RunError(reason="error", message=message),
        retry=None,
    )
