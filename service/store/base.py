"""The ``RunStore`` interface that both stores implement, and the rules they share.

A store owns the durable state of runs: the record, the event log and the
idempotency claim. It also carries two kinds of notification between replicas:
"a cancel was requested for a run you own" and "a run has new events".

The rules every implementation keeps (``tests/integration/test_store_contract.py``
checks each against both stores):

* a run is created exactly once, with its ``run_started`` event;
* terminal finalization is one compare-and-set: the first terminal write wins, the
  status and the terminal event are written together, and a later finalize changes
  nothing and returns False;
* nothing is appended to a run's events after its terminal event;
* a progress event sent again with the same sequence number is appended once;
* event cursors increase, and ``after`` is exclusive;
* a run is listed under its worker (``runs_of``) from its creation until its
  finalization, so the runs of a worker whose lease expired can be found.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol

from service.errors import InvalidCursor, StoreUnavailable
from service.schemas import Event, RunProgress, RunRecord, RunRequeued, RunStarted

#: Makes a queued run's next attempt: its running record and its ``run_started`` event.
Claim = Callable[[RunRecord], "tuple[RunRecord, RunStarted]"]


@dataclass(frozen=True, slots=True)
class Adopted:
    """A queued run this worker now owns: its record and the input it was created with."""

    record: RunRecord
    input: dict[str, Any]


#: Events kept per run; older progress events are trimmed first (the terminal event
#: is always the newest, so it is never trimmed).
MAX_EVENTS_PER_RUN: Final = 10_000

#: How long an idempotency claim lives while its create is being admitted. Admission
#: takes milliseconds; the bound only matters when a process dies mid-admission.
CLAIM_TTL_SECONDS: Final = 30

_CURSOR_RE: Final = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
MAX_CURSOR_PART: Final = 2**64 - 1


def parse_cursor(cursor: str) -> tuple[int, int]:
    """Check a client-supplied cursor (``<ms>-<seq>``, as Redis stream ids are)."""
    if not _CURSOR_RE.match(cursor):
        raise InvalidCursor(f"invalid cursor {cursor[:64]!r}: expected the id of an event")
    ms, seq = (int(part) for part in cursor.split("-"))
    if ms > MAX_CURSOR_PART or seq > MAX_CURSOR_PART or ms == seq == MAX_CURSOR_PART:
        # Redis stream ids are two unsigned 64-bit numbers: it refuses a larger one, and
        # an exclusive range cannot start after the largest.
        raise InvalidCursor(
            f"invalid cursor {cursor[:64]!r}: each part must fit in 64 bits, "
            "and no event can follow the largest id"
        )
    return ms, seq


class CancelOutcome(enum.Enum):
    REQUESTED = "requested"
    #: The run waits in the pending queue: the caller writes it cancelled itself
    #: (:meth:`RunStore.finalize_queued`), as no worker runs it.
    QUEUED = "queued"
    ALREADY_CANCELLED = "already_cancelled"
    FINISHED = "finished"


class CancelListener(Protocol):
    """What the scheduler gives the store to hear about cancels of its runs."""

    def cancel_requested(self, run_id: str) -> None:
        """A cancel was requested (on any replica) for a run this worker owns."""

    def resync(self) -> None:
        """Notifications may have been missed (e.g. a reconnect): check the flags again."""


class EventWatch(Protocol):
    async def wait(self) -> None:
        """Return once the run may have new events since the last call.

        Raises StoreUnavailable once the store's notifications were lost: the
        watcher cannot tell any more when to read, so it should stop watching.
        """

    @property
    def exact(self) -> bool:
        """Whether every event appended since the watch began comes with a notice
        (the watch was live before the watcher's first read): only then may the
        events of ``carried()`` be used instead of a read."""

    def carried(self) -> list[Event] | None:
        """The events the notices since the last call announced, oldest first (their
        ids set); None when a notice came without its event (read the store)."""


class Watch:
    """The EventWatch both stores hand out: notified by the store, awaited by a stream."""

    def __init__(self, *, exact: bool = False) -> None:
        self._changed = asyncio.Event()
        self._lost = False
        self._carried: list[Event] | None = []
        #: Set by the store once notices cannot be missed (see EventWatch.exact).
        self.exact = exact

    def notify(self, event: Event | None = None) -> None:
        """New events: ``event`` when the notice carried the one it announces."""
        if event is None or self._carried is None:
            self._carried = None
        else:
            self._carried.append(event)
        self._changed.set()

    def lose(self) -> None:
        """The notification connection went down: wake the watcher, for good."""
        self._lost = True
        self._changed.set()

    async def wait(self) -> None:
        await self._changed.wait()
        self._changed.clear()
        if self._lost:
            raise StoreUnavailable("the store's notifications were interrupted")

    def carried(self) -> list[Event] | None:
        carried, self._carried = self._carried, []
        return carried


class RunStore(Protocol):
    """The durable state of runs. Errors reaching the store raise StoreUnavailable."""

    async def start(self) -> None:
        """Open connections and start background listeners."""

    async def close(self) -> None:
        """Stop listeners and close connections; every write has completed before."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers now."""

    def listen_for_cancels(self, worker_id: str, listener: CancelListener) -> None:
        """Deliver cancel requests for runs owned by ``worker_id``. Call before start()."""

    def on_reset(
        self, running: Callable[[], Collection[RunRecord]], reset: Callable[[], None]
    ) -> None:
        """Survive a store that lost its data (restarted empty, flushed, evicting).

        When the store notices such a reset it calls ``reset()`` once and writes the
        ``running()`` runs back (record, ``run_started`` event, worker list), so they
        stay readable and their terminal write succeeds. A store that cannot be reset
        behind the process's back (the memory store) ignores this. Call before start().
        """

    async def claim_idempotency(
        self, run_id: str, fingerprint: str, token: str
    ) -> RunRecord | None:
        """Reserve ``run_id`` (derived from an idempotency key) for a create.

        Returns None when this caller holds the claim and must create the run (or
        release the claim), or the run's original record when the key was already
        used with the same body. Raises IdempotencyMismatch for a different body and
        IdempotencyInProgress while another request holds the claim. ``token`` is
        unique to the claiming request: claiming again with it (a retry) succeeds.
        """

    async def release_idempotency(self, run_id: str, token: str) -> None:
        """Give up the claim ``token`` holds, so the key can be used again."""

    async def create(
        self, record: RunRecord, started: RunStarted, *, input: dict[str, Any] | None = None
    ) -> None:
        """Persist a new run with its ``run_started`` event (and settle its claim).

        ``input`` is kept with a run that may be retried, for the replica that adopts it.
        """

    async def get(self, run_id: str) -> RunRecord | None:
        """The run's current record, or None if it does not exist."""

    async def append(
        self, run_id: str, event: RunProgress, *, seq: int | None = None
    ) -> str | None:
        """Append a progress event; its cursor, or None when the run is already terminal.

        ``seq`` (1, 2, ... per run) makes the append idempotent: a sequence number at
        or below the last one appended is not appended again, and the cursor of the
        last sequenced event is returned. A caller that was told StoreUnavailable can
        therefore send the same event again without risking a duplicate.
        """

    async def append_many(
        self, run_id: str, events: Sequence[RunProgress], *, first_seq: int | None = None
    ) -> str | None:
        """Append progress events in order, as one write (a run's outbox sends whatever
        is waiting this way); the cursor of the last one appended, or None when the run
        is already terminal.

        With ``first_seq`` the events are numbered ``first_seq``, ``first_seq + 1``, …
        and each is idempotent as in :meth:`append`: a batch sent again, whole or
        with more events after it, appends only the numbers not appended yet (when
        none is new, the cursor of the last sequenced event is returned).
        """

    async def finalize(self, record: RunRecord) -> bool:
        """Write a terminal record and its terminal event if the run is still running.

        Returns True when this call won, False when another terminal state was there.
        """

    async def events(self, run_id: str, *, after: str | None, limit: int) -> list[Event] | None:
        """Up to ``limit`` events after the cursor, oldest first; None if no such run."""

    def watch(self, run_id: str) -> AbstractAsyncContextManager[EventWatch]:
        """Be told about new events of one run. Enter before reading so nothing is missed."""

    async def request_cancel(self, run_id: str) -> CancelOutcome:
        """Flag a running run for cancellation and notify its owner wherever it runs.

        Raises RunNotFound when there is no such run.
        """

    async def cancel_requested(self, run_ids: Collection[str]) -> set[str]:
        """Which of these runs have a pending cancel request (for resyncs)."""

    # --- retries: the pending queue (see service.runs.adoption) -----------------------

    async def requeue(self, queued: RunRecord, event: RunRequeued) -> bool:
        """Put a run whose attempt ended back in the pending queue, in two steps.

        First, on the run alone: compare-and-set ``running`` (attempt ``queued.attempt``
        on worker ``queued.worker_id``) → ``queued``, writing ``queued`` and appending
        ``event``. Then, if that won, the run is added to the queue. True when this
        call won (also when the same write is repeated after a lost answer).
        """

    async def adopt(self, worker_id: str, limit: int, claim: Claim) -> list[Adopted]:
        """Take up to ``limit`` queued runs for ``worker_id``.

        Each candidate from the queue is claimed with a compare-and-set ``queued`` →
        ``running`` on the run alone, writing ``claim(record)`` (the new attempt's
        record and its ``run_started`` event); a candidate someone else claimed (or
        cancelled) is dropped from the queue and skipped. A run never has two owners.
        """

    async def enqueue(self, queued: RunRecord) -> None:
        """Put a ``queued`` run (back) in the queue (the recovery of an interrupted
        requeue; a run in the queue twice is claimed once)."""

    async def finalize_queued(self, record: RunRecord) -> bool:
        """Write a terminal record (a cancel) for a run that is ``queued``; True if won."""

    async def queued_count(self) -> int:
        """How many runs wait in the queue."""

    async def wait_for_queued(self, within: float) -> None:
        """Return when a run may have been queued (a notification), or after ``within`` seconds."""

    async def hold_reporter(self, worker_id: str, ttl_seconds: float) -> bool:
        """Take or renew the one lease that says which replica exports the queue length."""

    # --- worker leases (see service.reaper) ------------------------------------------

    async def heartbeat(self, worker_id: str, ttl_seconds: float) -> None:
        """Hold (or renew) ``worker_id``'s lease for ``ttl_seconds`` of the store's clock."""

    async def retire(self, worker_id: str) -> None:
        """Give up the lease of a worker that stopped with none of its runs running."""

    async def expired_workers(self) -> list[str]:
        """Workers whose lease has expired (oldest first, a bounded batch)."""

    async def runs_of(self, worker_id: str) -> list[str]:
        """Ids of the runs created by ``worker_id`` that it has not finalized."""

    async def orphans(self, worker_id: str) -> list[str]:
        """Runs still listed under this process's own ``worker_id`` that it does not
        execute (a failover lost their terminal write); the reaper finalizes them."""

    async def forget(self, worker_id: str, run_ids: Collection[str]) -> None:
        """Drop reaped runs from a lost worker's list, and the worker if its lease is
        still expired (a worker that came back keeps its lease)."""
