"""The embedded store: everything in this process's memory.

It is the default when no Redis URL is configured, for local use and tests. It
keeps the same rules as the Redis store (see ``base``), but nothing survives the
process and replicas cannot share it. Its pending queue of retried runs is
therefore this process's own: a run queued after a ``timeout`` or ``error`` attempt
is adopted again here, one queued by a drain is lost with the process. Every
method runs without awaiting anything in between its reads and writes, which is
what makes each one atomic under asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from bisect import bisect_right
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec

from service.errors import IdempotencyInProgress, IdempotencyMismatch, RunNotFound
from service.schemas import (
    Event,
    RunProgress,
    RunRecord,
    RunRequeued,
    RunStarted,
    terminal_event_for,
)
from service.store.base import (
    CLAIM_TTL_SECONDS,
    MAX_EVENTS_PER_RUN,
    Adopted,
    CancelListener,
    CancelOutcome,
    Claim,
    EventWatch,
    Watch,
    parse_cursor,
)


@dataclass(eq=False)
class _Entry:
    expires_at: float
    record: RunRecord | None = None
    initial: RunRecord | None = None
    fingerprint: str | None = None
    token: str | None = None
    events: list[Event] = field(default_factory=list)
    keys: list[tuple[int, int]] = field(default_factory=list)
    cancel_requested: bool = False
    #: The last sequenced progress event: its number and cursor.
    seq: int = 0
    seq_id: str = ""
    watches: set[Watch] = field(default_factory=set)
    #: Kept for a run that may be retried (the input of its next attempt).
    input: dict[str, Any] | None = None


class MemoryRunStore:
    """A RunStore in a dict; runs expire after the retention period."""

    def __init__(self, *, retention_seconds: float, max_events: int = MAX_EVENTS_PER_RUN) -> None:
        self._retention = retention_seconds
        self._max_events = max_events
        self._runs: dict[str, _Entry] = {}
        self._expiry: list[tuple[float, str]] = []  # a heap of (expires_at, run_id)
        self._listeners: dict[str, CancelListener] = {}
        #: The pending queue: run ids, oldest first (see service.runs.adoption).
        self._queue: deque[str] = deque()
        self._queued = asyncio.Event()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def listen_for_cancels(self, worker_id: str, listener: CancelListener) -> None:
        self._listeners[worker_id] = listener

    def on_reset(
        self, running: Callable[[], Collection[RunRecord]], reset: Callable[[], None]
    ) -> None:
        """Nothing to do: this store lives and dies with the process."""

    # --- creation -------------------------------------------------------------

    async def claim_idempotency(
        self, run_id: str, fingerprint: str, token: str
    ) -> RunRecord | None:
        entry = self._live(run_id)
        if entry is None:
            entry = self._runs[run_id] = _Entry(
                expires_at=0.0, fingerprint=fingerprint, token=token
            )
            self._expire_in(run_id, entry, CLAIM_TTL_SECONDS)
            return None
        if entry.fingerprint != fingerprint:
            raise IdempotencyMismatch("the idempotency key was used with a different request body")
        if entry.initial is not None:
            return entry.initial
        if entry.token == token:
            return None
        raise IdempotencyInProgress("a request with this idempotency key is being admitted")

    async def release_idempotency(self, run_id: str, token: str) -> None:
        entry = self._runs.get(run_id)
        if entry is not None and entry.record is None and entry.token == token:
            del self._runs[run_id]

    async def create(
        self, record: RunRecord, started: RunStarted, *, input: dict[str, Any] | None = None
    ) -> None:
        self._expire()
        entry = self._runs.get(record.run_id)
        if entry is None:
            entry = self._runs[record.run_id] = _Entry(expires_at=0.0)
        # As in Redis: a running run outlives the retention by its own timeout.
        self._expire_in(record.run_id, entry, self._retention + record.timeout_seconds)
        entry.record = entry.initial = record
        entry.input = input
        self._add_event(entry, started)

    # --- reads ------------------------------------------------------------------

    async def get(self, run_id: str) -> RunRecord | None:
        entry = self._live(run_id)
        return None if entry is None else entry.record

    async def events(self, run_id: str, *, after: str | None, limit: int) -> list[Event] | None:
        entry = self._live(run_id)
        if entry is None or entry.record is None:
            return None
        start = 0 if after is None else bisect_right(entry.keys, parse_cursor(after))
        return entry.events[start : start + limit]

    @asynccontextmanager
    async def watch(self, run_id: str) -> AsyncIterator[EventWatch]:
        entry = self._live(run_id)
        watch = Watch(exact=True)  # notified in the same step as each append
        if entry is not None:
            entry.watches.add(watch)
        try:
            yield watch
        finally:
            if entry is not None:
                entry.watches.discard(watch)

    # --- writes -----------------------------------------------------------------

    async def append(
        self, run_id: str, event: RunProgress, *, seq: int | None = None
    ) -> str | None:
        return await self.append_many(run_id, (event,), first_seq=seq)

    async def append_many(
        self, run_id: str, events: Sequence[RunProgress], *, first_seq: int | None = None
    ) -> str | None:
        entry = self._live(run_id)
        if entry is None or entry.record is None or entry.record.is_terminal:
            return None
        cursor: str | None = None
        for offset, event in enumerate(events):
            seq = None if first_seq is None else first_seq + offset
            if seq is not None and seq <= entry.seq:
                continue  # a repeat, as in Redis
            cursor = self._add_event(entry, event)
            if seq is not None:
                entry.seq, entry.seq_id = seq, cursor
        if cursor is None:
            return entry.seq_id or None
        return cursor

    async def finalize(self, record: RunRecord) -> bool:
        entry = self._live(record.run_id)
        if entry is None or entry.record is None:
            return False
        if entry.record.is_terminal:
            return entry.record == record  # the same write again wins again, as in Redis
        if entry.record.status != "running" or entry.record.worker_id != record.worker_id:
            return False  # queued (only finalize_queued ends it), or another worker's attempt
        entry.record = record
        self._expire_in(record.run_id, entry, self._retention)
        self._add_event(entry, terminal_event_for(record))
        return True

    async def request_cancel(self, run_id: str) -> CancelOutcome:
        entry = self._live(run_id)
        if entry is None or entry.record is None:
            raise RunNotFound(f"run {run_id} not found")
        record = entry.record
        if record.status == "cancelled":
            return CancelOutcome.ALREADY_CANCELLED
        if record.is_terminal:
            return CancelOutcome.FINISHED
        if record.status == "queued":
            return CancelOutcome.QUEUED
        entry.cancel_requested = True
        listener = self._listeners.get(record.worker_id)
        if listener is not None:
            # Delivered on a later loop turn, as a notification from Redis would be.
            asyncio.get_running_loop().call_soon(listener.cancel_requested, run_id)
        return CancelOutcome.REQUESTED

    async def cancel_requested(self, run_ids: Collection[str]) -> set[str]:
        return {
            run_id
            for run_id in run_ids
            if (entry := self._live(run_id)) is not None and entry.cancel_requested
        }

    # --- retries: one process, so the queue is a deque and its only adopter is here ---

    async def requeue(self, queued: RunRecord, event: RunRequeued) -> bool:
        entry = self._live(queued.run_id)
        if entry is None or entry.record is None:
            return False
        current = entry.record
        if current == queued:
            return True  # the same write again
        if (
            current.status != "running"
            or current.attempt != queued.attempt
            or current.worker_id != queued.worker_id
        ):
            return False
        entry.record = queued
        entry.cancel_requested = False
        self._add_event(entry, event)
        await self.enqueue(queued)
        return True

    async def adopt(self, worker_id: str, limit: int, claim: Claim) -> list[Adopted]:
        adopted: list[Adopted] = []
        while self._queue and len(adopted) < limit:
            run_id = self._queue.popleft()
            entry = self._live(run_id)
            if entry is None or entry.record is None or entry.record.status != "queued":
                continue
            record, started = claim(entry.record)
            entry.record = record
            self._expire_in(run_id, entry, self._retention + record.timeout_seconds)
            self._add_event(entry, started)
            adopted.append(Adopted(record=record, input=entry.input or {}))
        return adopted

    async def enqueue(self, queued: RunRecord) -> None:
        if queued.run_id not in self._queue:
            self._queue.append(queued.run_id)
        self._queued.set()

    async def finalize_queued(self, record: RunRecord) -> bool:
        entry = self._live(record.run_id)
        if entry is None or entry.record is None or entry.record.status != "queued":
            return False
        entry.record = record
        self._expire_in(record.run_id, entry, self._retention)
        self._add_event(entry, terminal_event_for(record))
        return True

    async def queued_count(self) -> int:
        return len(self._queue)

    async def wait_for_queued(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queued.wait(), within)
        self._queued.clear()

    async def hold_reporter(self, worker_id: str, ttl_seconds: float) -> bool:
        return True  # the only replica

    # --- worker leases: one process, so nobody else could reap its runs ---------------

    async def heartbeat(self, worker_id: str, ttl_seconds: float) -> None:
        return None

    async def retire(self, worker_id: str) -> None:
        return None

    async def expired_workers(self) -> list[str]:
        return []

    async def runs_of(self, worker_id: str) -> list[str]:
        return [
            run_id
            for run_id, entry in self._runs.items()
            if entry.record is not None
            and entry.record.worker_id == worker_id
            and not entry.record.is_terminal
        ]

    async def forget(self, worker_id: str, run_ids: Collection[str]) -> None:
        return None

    async def orphans(self, worker_id: str) -> list[str]:
        return []  # one process: nothing it wrote can be lost by a failover

    # --- internals --------------------------------------------------------------

    def _live(self, run_id: str) -> _Entry | None:
        entry = self._runs.get(run_id)
        if entry is not None and entry.expires_at <= time.monotonic():
            del self._runs[run_id]
            return None
        return entry

    def _add_event(self, entry: _Entry, event: Event) -> str:
        now_ms = int(time.time() * 1000)
        if entry.keys and entry.keys[-1][0] >= now_ms:
            key = (entry.keys[-1][0], entry.keys[-1][1] + 1)
        else:
            key = (now_ms, 0)
        cursor = f"{key[0]}-{key[1]}"
        added = msgspec.structs.replace(event, id=cursor)
        entry.events.append(added)
        entry.keys.append(key)
        if len(entry.events) > self._max_events:
            del entry.events[0], entry.keys[0]
        for watch in entry.watches:
            watch.notify(added)
        return cursor

    def _expire_in(self, run_id: str, entry: _Entry, seconds: float) -> None:
        entry.expires_at = time.monotonic() + seconds
        heapq.heappush(self._expiry, (entry.expires_at, run_id))

    def _expire(self) -> None:
        """Drop runs whose time has come, soonest first; a heap entry made stale by a
        later ``_expire_in`` of the same run is skipped."""
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            _, run_id = heapq.heappop(self._expiry)
            entry = self._runs.get(run_id)
            if entry is not None and entry.expires_at <= now:
                del self._runs[run_id]
