"""A run's progress events on their way to the store, so a store stall fails no run.

``ctx.emit`` used to write each event before returning, and raised StoreUnavailable
into the task when the store did not answer within 2 s: a few seconds of a stalled
Redis failed runs whose work was fine. Now ``emit`` puts the event in the run's
outbox and returns; one sender per run writes the outbox to the store in order —
whatever is waiting (up to half the outbox) in one write, one write in flight per
run, so a task emitting fast fills the next batch while the last one is on its way —
retrying while the store is unavailable until the run's deadline (past it the run
times out anyway, and what is left is dropped and logged). The store's group commit
carries the writes of many runs in one pipeline.

Each event carries the run's next sequence number (a batch, its first one), and the
store's append skips a number it has already appended. That is what makes a retry
safe: a call that gave up after 2 s may still have reached Redis (the command waits
in its socket while Redis is stopped) and land later, next to its retry.

The outbox is bounded (``PENDING_EVENTS_PER_RUN``): when it is full, ``emit`` waits
for room — backpressure, as the old synchronous write was — instead of dropping.
Before its terminal write a run's outbox is closed and flushed, so the terminal event
comes after every progress event that was accepted. The memory store goes through
the same outbox, so a task sees the same behaviour with either store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import msgspec
import structlog

from service.errors import StoreUnavailable
from service.schemas import RunProgress
from service.store.base import RunStore

log = structlog.get_logger(__name__)

#: Events a run may have waiting for the store before ``emit`` waits for room.
PENDING_EVENTS_PER_RUN: Final = 1000
RETRY_FIRST_SECONDS: Final = 0.1
RETRY_MAX_SECONDS: Final = 1.0


class ProgressOutbox:
    """The progress events of one run that the store has not taken yet."""

    __slots__ = (
        "_capacity", "_closed", "_deadline", "_next_seq", "_now", "_pending", "_refused",
        "_room", "_run_id", "_sender", "_store",
    )  # fmt: skip

    def __init__(
        self,
        store: RunStore,
        run_id: str,
        *,
        deadline: float,
        now: Callable[[], datetime],
        capacity: int = PENDING_EVENTS_PER_RUN,
    ) -> None:
        self._store = store
        self._run_id = run_id
        #: Event-loop time after which an unavailable store is no longer waited for.
        self._deadline = deadline
        self._now = now
        self._capacity = capacity
        #: Accepted, not yet taken by the store; the first has number
        #: ``_next_seq - len(_pending)``.
        self._pending: list[RunProgress] = []  # (an empty deque is ten times larger)
        self._next_seq = 1
        self._sender: asyncio.Task[None] | None = None
        #: Made when an emit first has to wait for room (most runs never do).
        self._room: asyncio.Event | None = None
        self._closed = False
        #: The store's last answer said the run has ended (it refused the event).
        self._refused = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def emit(self, data: dict[str, Any]) -> bool:
        """Queue a ``run_progress`` event; False once the run has ended (it is dropped)."""
        pending = self._pending
        while not self._closed and len(pending) >= self._capacity:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()
        if self._closed:
            return False
        pending.append(RunProgress(created_at=self._now(), data=msgspec.to_builtins(data)))
        self._next_seq += 1
        if self._sender is None:
            self._sender = asyncio.create_task(
                self._send(), name=f"quiesce-progress-{self._run_id}"
            )
        return not self._refused

    async def close(self) -> None:
        """Take no more events; return once every accepted one is written (or dropped)."""
        self._closed = True
        self._wake()  # an emit waiting for room returns False
        if self._sender is not None:
            # (wait, not await: neither the sender's fate nor a cancel of the caller
            # crosses over; the terminal write must follow either way)
            await asyncio.wait([self._sender])

    def abandon(self) -> None:
        """Take no more events and stop sending (the run is finalized, or the process
        stops); what is still pending is dropped."""
        self._closed = True
        self._wake()
        if self._sender is not None:
            self._sender.cancel()
        self._drop("the run ended before the store took them")

    def _wake(self) -> None:
        if self._room is not None:
            self._room.set()

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_FIRST_SECONDS
        pending = self._pending
        # At most half the outbox per write: while one batch is on its way, the task
        # can queue the next (one write in flight per run keeps the order). A write
        # that did not make it in time is tried again at half the size (large events
        # on a slow link), down to one event; each success doubles it back.
        largest = most = max(self._capacity // 2, 1)
        try:
            while pending:
                batch = pending[:most]
                first_seq = self._next_seq - len(pending)
                try:
                    cursor = await self._store.append_many(self._run_id, batch, first_seq=first_seq)
                except StoreUnavailable as exc:
                    left = self._deadline - loop.time()
                    if left <= 0:
                        self._drop("the store was unavailable until the run's deadline")
                        return
                    if delay == RETRY_FIRST_SECONDS:
                        log.warning(
                            "progress_delayed",
                            run_id=self._run_id,
                            pending=len(pending),
                            error=str(exc),
                        )
                    await asyncio.sleep(min(delay, left))
                    delay = min(delay * 2, RETRY_MAX_SECONDS)
                    most = max(most // 2, 1)
                    continue
                except Exception as exc:  # the store refused an event (e.g. too large)
                    if len(batch) > 1:
                        # Send the batch in halves, until the one refused is alone.
                        most = max(len(batch) // 2, 1)
                        continue
                    log.warning(
                        "progress_refused",
                        run_id=self._run_id,
                        seq=first_seq,
                        events=len(batch),
                        error=repr(exc),
                    )
                    cursor = ""
                if delay != RETRY_FIRST_SECONDS:
                    log.info("progress_resumed", run_id=self._run_id, pending=len(pending))
                    delay = RETRY_FIRST_SECONDS
                del pending[: len(batch)]
                most = min(most * 2, largest)
                self._refused = cursor is None
                self._wake()
        finally:
            self._sender = None

    def _drop(self, why: str) -> None:
        if self._pending:
            log.warning("progress_dropped", run_id=self._run_id, events=len(self._pending), why=why)
            self._pending.clear()
