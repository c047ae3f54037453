"""The RunStore contract, run against every store and Redis topology.

The ``store`` fixture (tests/conftest.py) is parametrized here over the memory
store, one Redis server and a 3-master, 3-replica Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import msgspec
import pytest

from service.errors import (
    IdempotencyInProgress,
    IdempotencyMismatch,
    InvalidCursor,
    InvalidInput,
    RunNotFound,
)
from service.scheduler import new_run_id
from service.schemas import (
    RunError,
    RunProgress,
    RunRecord,
    RunStarted,
    RunStartedData,
    event_type,
    utcnow,
)
from service.store import CancelOutcome, RunStore


@pytest.fixture(params=["memory", "redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


def running_record(run_id: str | None = None, worker_id: str = "worker-a") -> RunRecord:
    now = utcnow()
    return RunRecord(
        run_id=run_id or new_run_id(),
        task="sleep",
        status="running",
        created_at=now,
        updated_at=now,
        worker_id=worker_id,
        metadata={"k": "v"},
        timeout_seconds=60,
    )


def started(record: RunRecord) -> RunStarted:
    return RunStarted(created_at=record.created_at, data=RunStartedData(worker_id=record.worker_id))


def progress(step: int) -> RunProgress:
    return RunProgress(created_at=utcnow(), data={"step": step})


def terminal(record: RunRecord, status: str) -> RunRecord:
    now = utcnow()
    if status == "succeeded":
        return msgspec.structs.replace(
            record, status="succeeded", output={"ok": True}, updated_at=now, finished_at=now
        )
    reason = "cancelled" if status == "cancelled" else "error"
    return msgspec.structs.replace(
        record,
        status=status,
        error=RunError(reason=reason, message=status),
        updated_at=now,
        finished_at=now,
    )


async def created(store: RunStore, **kwargs: str) -> RunRecord:
    record = running_record(**kwargs)
    await store.create(record, started(record))
    return record


async def event_types(store: RunStore, run_id: str) -> list[str]:
    events = await store.events(run_id, after=None, limit=1000)
    assert events is not None
    return [event_type(event) for event in events]


class Listener:
    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.resyncs = 0
        self.notified = asyncio.Event()

    def cancel_requested(self, run_id: str) -> None:
        self.cancelled.append(run_id)
        self.notified.set()

    def resync(self) -> None:
        self.resyncs += 1


async def test_create_then_get_returns_the_record_and_its_started_event(store: RunStore) -> None:
    record = await created(store)
    assert await store.get(record.run_id) == record
    events = await store.events(record.run_id, after=None, limit=10)
    assert events is not None
    assert [event_type(e) for e in events] == ["run_started"]
    assert events[0].id
    assert events[0].data == RunStartedData(worker_id="worker-a")


async def test_unknown_run_reads_as_none(store: RunStore) -> None:
    assert await store.get(new_run_id()) is None
    assert await store.events(new_run_id(), after=None, limit=10) is None


async def test_cursors_increase_and_after_is_exclusive(store: RunStore) -> None:
    record = await created(store)
    cursors = [await store.append(record.run_id, progress(i)) for i in range(5)]
    assert all(cursors)
    events = await store.events(record.run_id, after=None, limit=100)
    assert events is not None
    ids = [e.id for e in events]
    assert ids[1:] == cursors
    assert ids == sorted(ids, key=lambda c: tuple(int(p) for p in c.split("-")))
    page = await store.events(record.run_id, after=ids[2], limit=2)
    assert page is not None
    assert [e.id for e in page] == ids[3:5]
    assert [e.data for e in page] == [{"step": 2}, {"step": 3}]


async def test_a_malformed_cursor_is_a_store_error_naming_no_http_parameter(
    store: RunStore,
) -> None:
    record = await created(store)
    with pytest.raises(InvalidCursor) as caught:
        await store.events(record.run_id, after="not-a-cursor", limit=10)
    assert not isinstance(caught.value, InvalidInput)
    assert caught.value.extra == {}  # which parameter carried it is the web layer's business


async def test_first_terminal_write_wins_and_later_ones_change_nothing(store: RunStore) -> None:
    record = await created(store)
    succeeded = terminal(record, "succeeded")
    assert await store.finalize(succeeded) is True
    assert await store.finalize(terminal(record, "cancelled")) is False
    assert await store.finalize(terminal(record, "failed")) is False
    assert await store.get(record.run_id) == succeeded
    assert await event_types(store, record.run_id) == ["run_started", "run_succeeded"]


async def test_repeating_the_winning_write_reports_success_without_a_second_event(
    store: RunStore,
) -> None:
    # A retry after a lost reply must not make the winner think it lost.
    record = await created(store)
    failed = terminal(record, "failed")
    assert await store.finalize(failed) is True
    assert await store.finalize(failed) is True
    assert await event_types(store, record.run_id) == ["run_started", "run_failed"]


async def test_concurrent_terminal_writes_leave_exactly_one_terminal_event(store: RunStore) -> None:
    for _ in range(20):
        record = await created(store)
        candidates = [terminal(record, s) for s in ("succeeded", "failed", "cancelled")]
        results = await asyncio.gather(*(store.finalize(c) for c in candidates))
        assert results.count(True) == 1
        winner = candidates[results.index(True)]
        assert await store.get(record.run_id) == winner
        types = await event_types(store, record.run_id)
        assert types == ["run_started", f"run_{winner.status}"]


async def test_no_event_is_accepted_after_the_terminal_event(store: RunStore) -> None:
    record = await created(store)
    assert await store.append(record.run_id, progress(1)) is not None
    await store.finalize(terminal(record, "failed"))
    assert await store.append(record.run_id, progress(2)) is None
    assert await event_types(store, record.run_id) == ["run_started", "run_progress", "run_failed"]


async def test_append_to_a_missing_run_is_refused(store: RunStore) -> None:
    assert await store.append(new_run_id(), progress(1)) is None


async def test_terminal_event_carries_the_outcome(store: RunStore) -> None:
    record = await created(store)
    await store.finalize(terminal(record, "cancelled"))
    events = await store.events(record.run_id, after=None, limit=10)
    assert events is not None
    last = msgspec.to_builtins(events[-1])
    assert last["type"] == "run_cancelled"
    assert last["data"] == {"reason": "cancelled"}


async def test_idempotency_claim_pending_mismatch_and_replay(store: RunStore) -> None:
    run_id = new_run_id()
    assert await store.claim_idempotency(run_id, "fp-1", "request-a") is None
    # The same request again (its first reply lost) still holds the claim ...
    assert await store.claim_idempotency(run_id, "fp-1", "request-a") is None
    # ... another request with the same key waits for the first one ...
    with pytest.raises(IdempotencyInProgress):
        await store.claim_idempotency(run_id, "fp-1", "request-b")
    # ... and one with a different body is refused.
    with pytest.raises(IdempotencyMismatch):
        await store.claim_idempotency(run_id, "fp-2", "request-c")
    assert await store.get(run_id) is None  # a claim is not a run

    record = await created(store, run_id=run_id)
    await store.finalize(terminal(record, "succeeded"))
    # The replay is the original response: the record as it was created.
    assert await store.claim_idempotency(run_id, "fp-1", "request-d") == record
    with pytest.raises(IdempotencyMismatch):
        await store.claim_idempotency(run_id, "fp-2", "request-e")


async def test_only_the_claiming_request_releases_its_claim_and_a_run_is_never_released(
    store: RunStore,
) -> None:
    run_id = new_run_id()
    assert await store.claim_idempotency(run_id, "fp-1", "request-a") is None
    await store.release_idempotency(run_id, "request-other")  # not its claim: kept
    with pytest.raises(IdempotencyInProgress):
        await store.claim_idempotency(run_id, "fp-1", "request-b")
    await store.release_idempotency(run_id, "request-a")
    assert await store.claim_idempotency(run_id, "fp-other", "request-c") is None
    record = await created(store, run_id=run_id)
    await store.release_idempotency(run_id, "request-c")
    assert await store.get(run_id) == record


async def test_cancel_request_outcomes(store: RunStore) -> None:
    with pytest.raises(RunNotFound):
        await store.request_cancel(new_run_id())
    running = await created(store)
    assert await store.request_cancel(running.run_id) is CancelOutcome.REQUESTED
    assert await store.cancel_requested([running.run_id, new_run_id()]) == {running.run_id}

    cancelled = await created(store)
    await store.finalize(terminal(cancelled, "cancelled"))
    assert await store.request_cancel(cancelled.run_id) is CancelOutcome.ALREADY_CANCELLED

    succeeded = await created(store)
    await store.finalize(terminal(succeeded, "succeeded"))
    assert await store.request_cancel(succeeded.run_id) is CancelOutcome.FINISHED


async def test_cancel_request_reaches_the_owners_listener_only(
    store_kind: str, new_store: Callable[[], RunStore]
) -> None:
    # Two stores on one backend stand for two replicas (the memory store is one process).
    owner_store = new_store()
    other_store = owner_store if store_kind == "memory" else new_store()
    owner, other = Listener(), Listener()
    owner_store.listen_for_cancels("worker-a", owner)
    other_store.listen_for_cancels("worker-b", other)
    try:
        await owner_store.start()
        await other_store.start()
        await asyncio.sleep(0.2)  # both subscribed
        record = await created(owner_store, worker_id="worker-a")
        assert await other_store.request_cancel(record.run_id) is CancelOutcome.REQUESTED
        await asyncio.wait_for(owner.notified.wait(), 2.0)
        assert owner.cancelled == [record.run_id]
        await asyncio.sleep(0.1)
        assert other.cancelled == []
    finally:
        await owner_store.close()
        if other_store is not owner_store:
            await other_store.close()


async def test_a_watcher_is_woken_by_new_events(store: RunStore) -> None:
    record = await created(store)
    async with store.watch(record.run_id) as watch:
        # A store whose listener is still connecting wakes every watch once when it
        # is live (a resync: a watcher re-reads on every wake-up); let that pass.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.wait(), 0.3)
        waiter = asyncio.create_task(watch.wait())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await store.append(record.run_id, progress(1))
        await asyncio.wait_for(waiter, 1.0)
        waiter = asyncio.create_task(watch.wait())
        await store.finalize(terminal(record, "succeeded"))
        await asyncio.wait_for(waiter, 1.0)
