"""The one place a run is finalized, whichever way it ends.

A run ends when its task returns or raises, on a user cancel, at its deadline, at the
end of a drain's grace, or — its worker lost — by a reaper. Every one of those paths
hands its terminal record to a :class:`Finisher`, which writes it through the store's
compare-and-set and, only when that write won, does what a finished run calls for:
``quiesce_runs_finished_total``, ``quiesce_run_failures_total``,
``quiesce_run_duration_seconds`` (from the run's ``created_at``, so runs finalized by
a reaper are measured too), one ``run_finished`` log line that names the run itself
(a drain writes runs outside their log context), and the completion callback.

A run created with a retry policy (``retry``) may not be finished by an attempt's
end: when the attempt failed with a reason the policy lists and attempts remain,
the same call *requeues* it instead — ``queued``, a ``run_requeued`` event, into the
pending queue (``RunStore.requeue``) — and only the last attempt's end is terminal
(with its metrics, its log line and its callback, once). Every path above therefore
requeues the same way, whichever replica or reaper ends the attempt.

A drain writes thousands of runs at once within a budget of about a second:
:meth:`Finisher.finish_many` sends every write together (the store batches them) and
waits for them all at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final

import msgspec
import structlog

from service.errors import StoreUnavailable
from service.metrics import Metrics
from service.schemas import RunRecord, RunRequeued, RunRequeuedData, utcnow
from service.store.base import RunStore

log = structlog.get_logger(__name__)

FINALIZE_RETRY_FIRST_SECONDS: Final = 0.1
FINALIZE_RETRY_MAX_SECONDS: Final = 5.0


class Finisher:
    def __init__(
        self,
        *,
        store: RunStore,
        metrics: Metrics,
        on_finished: Callable[[RunRecord], None] | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._metrics = metrics
        #: The completion callback (``CallbackSender.send``).
        self._on_finished = on_finished
        self._now = now

    async def finish(self, record: RunRecord, *, retry: bool = False) -> bool:
        """Write the terminal ``record``; True when this write won.

        With ``retry`` the write is repeated while the store is unavailable (the run's
        owner must not give up on it); without, StoreUnavailable reaches the caller.
        """
        delay = FINALIZE_RETRY_FIRST_SECONDS
        while True:
            try:
                return await self._write(record)
            except StoreUnavailable as exc:
                if not retry:
                    raise
                log.warning(
                    "finalize_retrying", run_id=record.run_id, error=str(exc), retry_in=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, FINALIZE_RETRY_MAX_SECONDS)

    async def finish_queued(self, record: RunRecord) -> bool:
        """Write the terminal ``record`` (a cancel) of a run waiting in the queue."""
        won = await self._store.finalize_queued(record)
        if won:
            self._finished(record)
        return won

    def requeue_of(self, record: RunRecord) -> RunRecord | None:
        """The ``queued`` record that replaces the terminal ``record`` when its retry
        policy runs the run again; None when ``record`` is final."""
        policy, error = record.retry, record.error
        if policy is None or error is None or record.status != "failed":
            return None
        if not policy.retries(error.reason, record.attempt):
            return None
        return msgspec.structs.replace(
            record,
            status="queued",
            updated_at=self._now(),
            finished_at=None,
            output=None,
            error=None,
        )

    async def _write(self, record: RunRecord) -> bool:
        queued = self.requeue_of(record)
        if queued is not None:
            return await self._requeue(queued, record)
        won = await self._store.finalize(record)
        if won:
            self._finished(record)
        else:
            log.info("run_already_terminal", run_id=record.run_id, attempted=record.status)
        return won

    async def _requeue(self, queued: RunRecord, ended: RunRecord) -> bool:
        assert ended.error is not None
        reason = ended.error.reason
        event = RunRequeued(
            created_at=queued.updated_at,
            data=RunRequeuedData(
                attempt=ended.attempt,
                reason=reason,  # type: ignore[arg-type]  # a RetryReason: requeue_of checked it
                worker_id=ended.worker_id,
            ),
        )
        won = await self._store.requeue(queued, event)
        if won:
            self._metrics.runs_requeued.labels(ended.task, reason).inc()
            log.info(
                "run_requeued",
                run_id=ended.run_id,
                task=ended.task,
                attempt=ended.attempt,
                max_attempts=ended.max_attempts,
                reason=reason,
            )
        else:
            log.info("run_not_requeued", run_id=ended.run_id, attempt=ended.attempt)
        return won

    async def finish_many(
        self, records: Sequence[RunRecord], *, within: float
    ) -> list[bool | None]:
        """Write every record at once, waiting at most ``within`` seconds.

        Per record: True (won), False (another terminal state was there) or None (no
        answer in time, or the store was unavailable).
        """
        if not records:
            return []
        writes = [asyncio.ensure_future(self._write(record)) for record in records]
        _, pending = await asyncio.wait(writes, timeout=max(within, 0.0))
        for write in pending:
            write.cancel()
        results: list[bool | None] = []
        for write in writes:
            if write in pending or write.exception() is not None:
                results.append(None)
                continue
            results.append(write.result())
        return results

    def _finished(self, record: RunRecord) -> None:
        """After a won terminal write: the metrics, the log line and the callback."""
        task, status = record.task, record.status
        reason = None if record.error is None else record.error.reason
        duration = max((self._now() - record.created_at).total_seconds(), 0.0)
        self._metrics.runs_finished_of(task, status).inc()
        if status == "failed" and reason is not None:
            self._metrics.run_failures.labels(task, reason).inc()
        self._metrics.run_duration_of(task, status).observe(duration)
        log.info(
            "run_finished",
            run_id=record.run_id,
            task=task,
            status=status,
            reason=reason,
            duration_s=round(duration, 3),
        )
        if self._on_finished is not None:
            self._on_finished(record)
