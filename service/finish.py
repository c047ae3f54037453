"""The one place a run is finalized, whichever way it ends.

A run ends when its task returns or raises, on a user cancel, at its deadline, at the
end of a drain's grace, or — its worker lost — by a reaper. Every one of those paths
hands its terminal record to a :class:`Finisher`, which writes it through the store's
compare-and-set and, only when that write won, does what a finished run calls for:
``quiesce_runs_finished_total``, ``quiesce_run_failures_total``,
``quiesce_run_duration_seconds`` (from the run's ``created_at``, so runs finalized by
a reaper are measured too), one ``run_finished`` log line that names the run itself
(a drain writes runs outside their log context), and the completion callback.

A drain writes thousands of runs at once within a budget of about a second:
:meth:`Finisher.finish_many` sends every write together (the store batches them) and
waits for them all at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final

import structlog

from service.errors import StoreUnavailable
from service.metrics import Metrics
from service.schemas import RunRecord, utcnow
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
                won = await self._store.finalize(record)
                break
            except StoreUnavailable as exc:
                if not retry:
                    raise
                log.warning(
                    "finalize_retrying", run_id=record.run_id, error=str(exc), retry_in=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, FINALIZE_RETRY_MAX_SECONDS)
        if won:
            self._finished(record)
        else:
            log.info("run_already_terminal", run_id=record.run_id, attempted=record.status)
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
        writes = [asyncio.ensure_future(self._store.finalize(record)) for record in records]
        _, pending = await asyncio.wait(writes, timeout=max(within, 0.0))
        for write in pending:
            write.cancel()
        results: list[bool | None] = []
        for record, write in zip(records, writes, strict=True):
            if write in pending or write.exception() is not None:
                results.append(None)
                continue
            won = write.result()
            if won:
                self._finished(record)
            results.append(won)
        return results

    def _finished(self, record: RunRecord) -> None:
        """After a won terminal write: the metrics, the log line and the callback."""
        task, status = record.task, record.status
        reason = None if record.error is None else record.error.reason
        duration = max((self._now() - record.created_at).total_seconds(), 0.0)
        self._metrics.runs_finished.labels(task, status).inc()
        if status == "failed" and reason is not None:
            self._metrics.run_failures.labels(task, reason).inc()
        self._metrics.run_duration.labels(task, status).observe(duration)
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
