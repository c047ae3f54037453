"""The runs of this process, put together: admission → supervision → finish, and the drain.

The scheduler is the core: it receives the store, the task registry, a maker of run
contexts and a clock, and does no I/O of its own beyond calling them. Each stage is
its own unit under ``service.runs``; this module wires them and answers what the web
layer and the store's notifications ask of this process's runs (create, cancel, the
list of active runs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, Final

import msgspec

from service.errors import RunNotFound, StoreUnavailable
from service.finish import Finisher
from service.metrics import Metrics
from service.runs.active import ActiveRuns
from service.runs.admission import Admission, Admitter, KeyNamespace, new_run_id, run_id_for_key
from service.runs.adoption import Adopter
from service.runs.drain import DRAIN_FINALIZE_BUDGET_SECONDS, Drain, DrainProgress
from service.runs.supervision import Supervisor
from service.schemas import CreateRunRequest, RunError, RunRecord, utcnow
from service.store.base import CancelOutcome, RunStore
from service.tasks.base import RunContexts, TaskRegistry

__all__ = [
    "DRAIN_FINALIZE_BUDGET_SECONDS",
    "Admission",
    "DrainProgress",
    "Scheduler",
    "new_run_id",
    "run_id_for_key",
]

#: The drain's grace when none is configured (QUIESCE_SHUTDOWN_GRACE_SECONDS's default).
DEFAULT_GRACE_SECONDS = 25.0
#: A cancel of a queued run that keeps losing to adoptions gives up after this many.
QUEUED_CANCEL_ATTEMPTS: Final = 3


class Scheduler:
    def __init__(
        self,
        *,
        store: RunStore,
        registry: TaskRegistry,
        metrics: Metrics,
        contexts: RunContexts,
        worker_id: str,
        max_active_runs: int,
        default_timeout_seconds: float,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        handoff_on_drain: bool = False,
        now: Callable[[], datetime] = utcnow,
        on_finished: Callable[[RunRecord], None] | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._worker_id = worker_id
        self._background: set[asyncio.Future[Any]] = set()
        self.runs = ActiveRuns(metrics=metrics, max_active_runs=max_active_runs)
        self.finisher = Finisher(store=store, metrics=metrics, on_finished=on_finished, now=now)
        self.supervisor = Supervisor(
            runs=self.runs, finisher=self.finisher, metrics=metrics, contexts=contexts, now=now
        )
        self.admitter = Admitter(
            store=store,
            registry=registry,
            runs=self.runs,
            supervisor=self.supervisor,
            worker_id=worker_id,
            default_timeout_seconds=default_timeout_seconds,
            spawn=self._spawn,
            now=now,
        )
        #: Takes queued runs for their next attempt (started by the app once ready).
        self.adopter = Adopter(
            store=store,
            registry=registry,
            runs=self.runs,
            supervisor=self.supervisor,
            finisher=self.finisher,
            metrics=metrics,
            worker_id=worker_id,
            now=now,
        )
        self.runs.on_change = self.adopter.nudge
        #: The one drain of this process (``drain.begin`` is its only entry point).
        self.drain = Drain(
            runs=self.runs,
            finisher=self.finisher,
            metrics=metrics,
            grace_seconds=grace_seconds,
            stop=self.supervisor.stop,
            handoff=handoff_on_drain,
            now=now,
        )
        self._now = now
        store.listen_for_cancels(worker_id, self)

    # --- state ----------------------------------------------------------------------

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def max_active_runs(self) -> int:
        return self.runs.max_active_runs

    def active_runs(self) -> list[tuple[RunRecord, float]]:
        """(record, age in seconds) of every run this process holds, oldest first."""
        now = asyncio.get_running_loop().time()
        return [(run.record, now - run.admitted_at) for run in self.runs]

    # --- admission ------------------------------------------------------------------

    async def create(
        self,
        request: CreateRunRequest,
        *,
        idempotency_key: str | None = None,
        key_namespace: KeyNamespace = "client",
    ) -> Admission:
        """Admit, persist and start a run (``service.runs.admission``)."""
        return await self.admitter.create(
            request, idempotency_key=idempotency_key, key_namespace=key_namespace
        )

    # --- cancellation ---------------------------------------------------------------

    async def cancel(self, run_id: str) -> CancelOutcome:
        """Request cancellation of a run wherever it runs (RunNotFound if none).

        A run waiting in the queue has no owner to tell: it is written ``cancelled``
        here, unless a replica adopted it in the meantime (then its owner is told).
        """
        for _ in range(QUEUED_CANCEL_ATTEMPTS):
            outcome = await self._store.request_cancel(run_id)
            if outcome is CancelOutcome.REQUESTED:
                self.cancel_requested(run_id)  # ours? no need to wait for the notification
            if outcome is not CancelOutcome.QUEUED:
                return outcome
            if await self._cancel_queued(run_id):
                return CancelOutcome.REQUESTED
        return CancelOutcome.REQUESTED  # adopted and queued again meanwhile, repeatedly

    async def _cancel_queued(self, run_id: str) -> bool:
        record = await self._store.get(run_id)
        if record is None:
            raise RunNotFound(f"run {run_id} not found")
        if record.status != "queued":
            return False
        now = self._now()
        cancelled = msgspec.structs.replace(
            record,
            status="cancelled",
            updated_at=now,
            finished_at=now,
            error=RunError(reason="cancelled", message="cancelled by request while queued"),
        )
        won = await self.finisher.finish_queued(cancelled)
        if won:
            self._metrics.run_cancellations.labels(record.task, "user").inc()
        return won

    def cancel_requested(self, run_id: str) -> None:
        """CancelListener: a user cancel for a run of this worker."""
        self.supervisor.stop(run_id, "user")

    def resync(self) -> None:
        """CancelListener: notifications may have been missed; re-read the flags."""
        if len(self.runs):
            self._spawn(self._resync())

    async def _resync(self) -> None:
        try:
            flagged = await self._store.cancel_requested([run.run_id for run in self.runs])
        except StoreUnavailable:
            return  # the listener resyncs again after its next reconnect
        for run_id in flagged:
            self.supervisor.stop(run_id, "user")

    # --- internals ------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
