"""Supervision: one task per run that runs the task function and decides how it ended.

The supervisor enforces the run's deadline and reacts to a cancel request. The
outcome is decided in one place: if the task function has finished, its result
stands; otherwise the first reason to stop it (user cancel, shutdown, timeout) does.
The run's progress events go through its outbox (``service.progress``), which is
flushed before the terminal write; the write itself, and what follows it, is
``service.finish``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Final

import msgspec
import structlog

from service.finish import Finisher
from service.metrics import Metrics
from service.runs.active import ActiveRun, ActiveRuns, CancelReason
from service.schemas import RunError, RunRecord, RunStatus, utcnow
from service.tasks.base import RunContexts

log = structlog.get_logger(__name__)

#: How long a cancelled task function gets to unwind before its run is finalized
#: anyway (a task that swallows CancelledError is left behind, and logged).
CANCEL_WAIT_SECONDS: Final = 0.5

_OUTCOME_MESSAGES: Final[dict[CancelReason, tuple[RunStatus, str]]] = {
    # reason → (status, message)
    "user": ("cancelled", "cancelled by request"),
    "shutdown": ("failed", "the worker shut down before the run finished"),
    "timeout": ("failed", "the run exceeded its timeout"),
}


class Supervisor:
    def __init__(
        self,
        *,
        runs: ActiveRuns,
        finisher: Finisher,
        metrics: Metrics,
        contexts: RunContexts,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._now = now
        self._runs = runs
        self._finisher = finisher
        self._metrics = metrics
        self._contexts = contexts

    def start(self, active: ActiveRun, *, adopted: bool = False) -> None:
        """Run it: a new run (counted as started) or a queued run's next attempt."""
        if adopted:
            self._metrics.runs_adopted.labels(active.task.name).inc()
        else:
            self._metrics.runs_started_of(active.task.name).inc()
        # A fresh context: the run must not inherit the request's bound log context.
        active.supervisor = asyncio.create_task(
            self._supervise(active),
            name=f"quiesce-run-{active.run_id}",
            context=contextvars.Context(),
        )

    def stop(self, run_id: str, reason: CancelReason) -> None:
        """Ask a run of this process to stop (the first reason wins)."""
        active = self._runs.get(run_id)
        if active is None or active.cancel_reason is not None or active.outcome is not None:
            return
        active.cancel_reason = reason
        if active.wake is not None and not active.wake.done():
            active.wake.set_result(None)

    async def _supervise(self, active: ActiveRun) -> None:
        structlog.contextvars.bind_contextvars(run_id=active.run_id, task=active.task.name)
        log.info(
            "run_started",
            timeout_seconds=active.record.timeout_seconds,
            attempt=active.record.attempt,
        )
        try:
            active.outcome = await self._execute(active)
            # Every progress event accepted so far goes first: the terminal one is last.
            await active.outbox.close()
            await self._finisher.finish(active.outcome, retry=True)
            active.settled = True
        finally:
            if active.settled:  # (a drain that cancelled this supervisor writes the run)
                active.outbox.abandon()
            self._runs.release(active)

    async def _execute(self, active: ActiveRun) -> RunRecord:
        """Run the task function; return the terminal record its ending calls for."""
        if active.cancel_reason is not None:  # cancelled while being admitted
            return stopped_record(active, active.cancel_reason, self._now())
        loop = asyncio.get_running_loop()
        # The deadline is this attempt's: ``timeout_seconds`` from its start.
        context = self._contexts.make(
            run_id=active.run_id,
            emit=active.outbox.emit,
            log=log,
            deadline=self._now() + timedelta(seconds=max(0.0, active.deadline - loop.time())),
            attempt=active.record.attempt,
        )
        work: asyncio.Task[Any] = asyncio.create_task(active.task.fn(context, active.params))
        # One future wakes the supervisor: the function's end, a stop request or the
        # deadline (a timer). (asyncio.wait would do the same with machinery of its
        # own that every run holds for its whole life.)
        wake = active.wake = loop.create_future()
        work.add_done_callback(partial(_resolve, wake))
        timer = loop.call_at(active.deadline, _resolve, wake)
        try:
            await wake
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            timer.cancel()
        if work.done():
            return _finished_record(active, work, self._now())
        reason: CancelReason = active.cancel_reason or "timeout"
        active.cancel_reason = reason
        self._metrics.run_cancellations.labels(active.task.name, reason).inc()
        log.info("run_cancelling", reason=reason)
        work.cancel()
        await asyncio.wait([work], timeout=CANCEL_WAIT_SECONDS)
        if not work.done():
            log.warning("task_ignored_cancellation", waited_seconds=CANCEL_WAIT_SECONDS)
        return stopped_record(active, reason, self._now())


def _resolve(future: asyncio.Future[None], *_: object) -> None:
    if not future.done():
        future.set_result(None)


def _finished_record(active: ActiveRun, work: asyncio.Task[Any], now: datetime) -> RunRecord:
    if work.cancelled():
        return terminal_record(
            active, "failed", RunError(reason="error", message="CancelledError"), now
        )
    exc = work.exception()
    if exc is not None:
        log.warning("run_task_raised", exc_info=exc)
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return terminal_record(active, "failed", RunError(reason="error", message=message), now)
    try:
        output = msgspec.to_builtins(work.result())
    except (TypeError, ValueError) as exc:
        message = f"the task returned a value that is not JSON: {exc}"
        return terminal_record(active, "failed", RunError(reason="error", message=message), now)
    return terminal_record(active, "succeeded", None, now, output=output)


def stopped_record(active: ActiveRun, reason: CancelReason, now: datetime) -> RunRecord:
    """The terminal record of a run stopped for ``reason`` before its task returned."""
    status, message = _OUTCOME_MESSAGES[reason]
    if reason == "timeout":
        message = f"{message} of {active.record.timeout_seconds:g}s"
    failure = "cancelled" if reason == "user" else reason
    return terminal_record(active, status, RunError(reason=failure, message=message), now)


def terminal_record(
    active: ActiveRun, status: RunStatus, error: RunError | None, now: datetime, output: Any = None
) -> RunRecord:
    return msgspec.structs.replace(
        active.record,
        status=status,
        updated_at=now,
        finished_at=now,
        output=output,
        error=error,
    )
