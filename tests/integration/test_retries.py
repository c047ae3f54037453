"""Opt-in retries: an attempt that ends with a listed reason is queued and adopted —
on both stores, with two schedulers (two "replicas") sharing one store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import msgspec
import pytest

from service.finish import Finisher
from service.metrics import Metrics
from service.reaper import Reaper
from service.scheduler import Scheduler
from service.schemas import (
    CreateRunRequest,
    RetryPolicy,
    RunRecord,
    RunRequeued,
    RunRequeuedData,
    event_type,
    utcnow,
)
from service.store import CancelOutcome, RunStore
from service.tasks import RunContext, RunContexts, TaskRegistry, task
from tests.conftest import build_store
from tests.integration.support import drained
from tests.integration.test_store_contract import created, started

TASKS = ["flaky", "patient"]


class Flaky(msgspec.Struct, forbid_unknown_fields=True):
    #: Attempts that raise; the others return {"attempt": n}.
    fail_on: list[int] = []
    #: How long each attempt sleeps first, by attempt (the last one for later attempts).
    seconds: list[float] = msgspec.field(default_factory=lambda: [0.0])


@task("flaky")
async def flaky(ctx: RunContext, params: Flaky) -> dict[str, int]:
    await asyncio.sleep(params.seconds[min(ctx.attempt, len(params.seconds)) - 1])
    if ctx.attempt in params.fail_on:
        raise ValueError(f"attempt {ctx.attempt} broke")
    return {"attempt": ctx.attempt}


@task("patient", retry=RetryPolicy(max_attempts=2, on=["error"]))
async def patient(ctx: RunContext, params: Flaky) -> dict[str, int]:
    """The same work, with a default retry policy declared by the task."""
    return await flaky.fn(ctx, params)  # type: ignore[no-any-return]


def registry() -> TaskRegistry:
    tasks = TaskRegistry()
    tasks.add(flaky, origin="test")
    tasks.add(patient, origin="test")
    return tasks


def flaky_request(
    *, fail_on: list[int] | None = None, seconds: list[float] | None = None, **kwargs: Any
) -> CreateRunRequest:
    return CreateRunRequest(
        task="flaky",
        input={"fail_on": fail_on or [], "seconds": seconds or [0.0]},
        **kwargs,
    )


Replica = Callable[..., Awaitable[Scheduler]]


@pytest.fixture
async def replica(
    store: RunStore, store_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[Replica]:
    """Make schedulers ("replicas"), each drained at the end. With Redis each has its
    own store on the one server, as pods do; the memory store is shared (one process)."""
    made: list[tuple[Scheduler, RunStore]] = []
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient())
        finished: list[RunRecord] = []

        async def make(worker_id: str, *, adopt: bool = True, **options: Any) -> Scheduler:
            own = store if store_kind == "memory" else build_store(store_kind, request)
            scheduler = Scheduler(
                store=own,
                registry=registry(),
                metrics=Metrics(max_active_runs=5, task_names=TASKS),
                contexts=RunContexts(http),
                worker_id=worker_id,
                max_active_runs=5,
                default_timeout_seconds=30,
                on_finished=finished.append,
                **options,
            )
            if own is not store:
                await own.start()
            made.append((scheduler, own))
            if adopt:
                scheduler.adopter.start()
            return scheduler

        make.finished = finished  # type: ignore[attr-defined]
        yield make
        for scheduler, own in made:
            await drained(scheduler, 0)
            await scheduler.adopter.stop()
            if own is not store:
                await own.close()


async def history(store: RunStore, run_id: str) -> list[tuple[str, Any]]:
    """(type, attempt or reason) of each event but progress."""
    events = await store.events(run_id, after=None, limit=1000)
    assert events is not None
    out: list[tuple[str, Any]] = []
    for event in events:
        kind = event_type(event)
        data = msgspec.to_builtins(event.data)
        if kind == "run_started":
            out.append((kind, data.get("attempt")))
        elif kind == "run_requeued":
            out.append((kind, (data["attempt"], data["reason"])))
        elif kind != "run_progress":
            out.append((kind, data.get("reason")))
    return out


async def terminal(store: RunStore, run_id: str, within: float = 10.0) -> RunRecord:
    """Bounded only so that a broken retry fails the test instead of hanging it."""
    deadline = time.monotonic() + within
    while True:
        record = await store.get(run_id)
        assert record is not None
        if record.is_terminal:
            return record
        assert time.monotonic() < deadline, f"still {record.status}: {record}"
        await asyncio.sleep(0.02)


def sample(metric: Any, *labels: str) -> float:
    value: float = metric.labels(*labels)._value.get()
    return value


# --- the policy ---------------------------------------------------------------------


async def test_without_retry_an_error_is_final_as_before(replica: Replica, store: RunStore) -> None:
    a = await replica("worker-a")
    admission = await a.create(flaky_request(fail_on=[1]))
    assert admission.record.attempt == 1
    assert admission.record.max_attempts == 1
    record = await terminal(store, admission.record.run_id)
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.reason == "error"
    assert await history(store, record.run_id) == [("run_started", 1), ("run_failed", "error")]


async def test_an_error_listed_in_the_policy_runs_again_and_succeeds(
    replica: Replica, store: RunStore
) -> None:
    a = await replica("worker-a")
    policy = RetryPolicy(max_attempts=3, on=["error"])
    admission = await a.create(flaky_request(fail_on=[1, 2], retry=policy))
    assert admission.record.max_attempts == 3
    record = await terminal(store, admission.record.run_id)
    assert record.status == "succeeded", record
    assert record.output == {"attempt": 3}
    assert record.attempt == 3
    assert await history(store, record.run_id) == [
        ("run_started", 1),
        ("run_requeued", (1, "error")),
        ("run_started", 2),
        ("run_requeued", (2, "error")),
        ("run_started", 3),
        ("run_succeeded", None),
    ]
    assert sample(a._metrics.runs_requeued, "flaky", "error") == 2
    assert sample(a._metrics.runs_adopted, "flaky") == 2
    assert sample(a._metrics.runs_started, "flaky") == 1
    # The callback (and the finished counter) once, at the terminal state.
    await asyncio.sleep(0)
    assert [r.run_id for r in replica.finished] == [record.run_id]  # type: ignore[attr-defined]
    assert sample(a._metrics.runs_finished, "flaky", "succeeded") == 1


async def test_the_last_attempt_is_terminal_with_exactly_one_terminal_event(
    replica: Replica, store: RunStore
) -> None:
    a = await replica("worker-a")
    policy = RetryPolicy(max_attempts=2, on=["error"])
    admission = await a.create(flaky_request(fail_on=[1, 2], retry=policy))
    record = await terminal(store, admission.record.run_id)
    assert record.status == "failed"
    assert record.attempt == 2
    assert await history(store, record.run_id) == [
        ("run_started", 1),
        ("run_requeued", (1, "error")),
        ("run_started", 2),
        ("run_failed", "error"),
    ]


async def test_a_task_may_declare_its_default_policy_and_a_create_overrides_it(
    replica: Replica, store: RunStore
) -> None:
    a = await replica("worker-a")
    body = {"fail_on": [1], "seconds": [0.0]}
    by_task = await a.create(CreateRunRequest(task="patient", input=body))
    assert by_task.record.max_attempts == 2
    record = await terminal(store, by_task.record.run_id)
    assert (record.status, record.attempt) == ("succeeded", 2)
    no_retry = RetryPolicy(max_attempts=1)
    by_create = await a.create(CreateRunRequest(task="patient", input=body, retry=no_retry))
    record = await terminal(store, by_create.record.run_id)
    assert (record.status, record.attempt) == ("failed", 1)


async def test_a_reason_not_listed_is_final(replica: Replica, store: RunStore) -> None:
    a = await replica("worker-a")
    admission = await a.create(flaky_request(fail_on=[1], retry=RetryPolicy(max_attempts=5)))
    record = await terminal(store, admission.record.run_id)
    assert record.status == "failed"  # the default policy lists shutdown and worker_lost
    assert [kind for kind, _ in await history(store, record.run_id)] == [
        "run_started",
        "run_failed",
    ]


async def test_timeout_applies_per_attempt(replica: Replica, store: RunStore) -> None:
    a = await replica("worker-a")
    policy = RetryPolicy(max_attempts=2, on=["timeout"])
    request = flaky_request(seconds=[5.0, 0.2], timeout_seconds=0.4, retry=policy)
    admission = await a.create(request)
    record = await terminal(store, admission.record.run_id)
    # The second attempt took 0.2 s of its own 0.4 s, after the first used up its 0.4 s.
    assert record.status == "succeeded", record
    assert await history(store, record.run_id) == [
        ("run_started", 1),
        ("run_requeued", (1, "timeout")),
        ("run_started", 2),
        ("run_succeeded", None),
    ]


# --- the drain and the reaper ---------------------------------------------------------


async def test_a_drain_requeues_retryable_runs_and_another_replica_finishes_them(
    replica: Replica, store: RunStore
) -> None:
    a = await replica("worker-a", adopt=False)
    admission = await a.create(
        flaky_request(seconds=[30.0, 0.0], retry=RetryPolicy(max_attempts=2))
    )
    plain = await a.create(flaky_request(seconds=[30.0]))
    progress = await drained(a, 0.1)
    assert progress.cancelled == 2
    queued = await store.get(admission.record.run_id)
    assert queued is not None
    assert queued.status == "queued"
    assert queued.attempt == 1
    failed = await store.get(plain.record.run_id)
    assert failed is not None
    assert failed.status == "failed"  # no retry: as before

    await replica("worker-b")
    record = await terminal(store, admission.record.run_id)
    assert record.status == "succeeded"
    assert record.worker_id == "worker-b"
    assert await history(store, record.run_id) == [
        ("run_started", 1),
        ("run_requeued", (1, "shutdown")),
        ("run_started", 2),
        ("run_succeeded", None),
    ]


async def test_a_draining_replica_never_adopts(replica: Replica, store: RunStore) -> None:
    a = await replica("worker-a")
    a.drain.begin("test", grace_seconds=30)
    b = await replica("worker-b", adopt=False)
    admission = await b.create(
        flaky_request(seconds=[30.0, 0.0], retry=RetryPolicy(max_attempts=2))
    )
    await drained(b, 0)
    assert await a.adopter.adopt_once() == 0
    record = await store.get(admission.record.run_id)
    assert record is not None
    assert record.status == "queued"


async def test_with_handoff_a_drain_stops_retryable_runs_at_its_start(
    replica: Replica, store: RunStore
) -> None:
    a = await replica("worker-a", adopt=False, handoff_on_drain=True, grace_seconds=300)
    retryable = await a.create(
        flaky_request(seconds=[60.0, 0.0], retry=RetryPolicy(max_attempts=2))
    )
    short = await a.create(flaky_request(seconds=[0.3]))
    a.drain.begin("SIGTERM")
    # Bounded only so that a drain that waits out its 300 s grace fails the test.
    progress = await asyncio.wait_for(a.drain.wait(), 10)
    assert progress is not None
    assert progress.cancelled == 1
    done = await store.get(short.record.run_id)
    assert done is not None
    assert done.status == "succeeded"  # the grace still served the run without retry
    await replica("worker-b")
    record = await terminal(store, retryable.record.run_id)
    assert record.status == "succeeded"
    assert ("run_requeued", (1, "shutdown")) in await history(store, record.run_id)


async def test_the_reaper_requeues_a_lost_workers_retryable_run(
    replica: Replica, store: RunStore, store_kind: str
) -> None:
    if store_kind == "memory":
        pytest.skip("the memory store has no other worker to lose")
    ghost = await replica("worker-ghost", adopt=False)
    admission = await ghost.create(
        flaky_request(seconds=[60.0, 0.0], retry=RetryPolicy(max_attempts=2))
    )
    # The ghost's lease, short and never renewed: as if its process was SIGKILLed.
    await store.heartbeat("worker-ghost", 0.05)
    await asyncio.sleep(0.1)
    b = await replica("worker-b")
    reaper = Reaper(
        store=store,
        metrics=Metrics(max_active_runs=1),
        worker_id="worker-b",
        lease_ttl_seconds=10,
        finisher=b.finisher,
    )
    assert await reaper.reap_expired() == 1
    record = await terminal(store, admission.record.run_id)
    assert record.status == "succeeded"
    assert record.worker_id == "worker-b"
    assert await history(store, record.run_id) == [
        ("run_started", 1),
        ("run_requeued", (1, "worker_lost")),
        ("run_started", 2),
        ("run_succeeded", None),
    ]
    for run in list(ghost.runs):  # the ghost's task, still sleeping in this process
        ghost.runs.release(run)


# --- cancel, the claim, the queue ------------------------------------------------------


async def test_a_queued_run_can_be_cancelled(replica: Replica, store: RunStore) -> None:
    a = await replica("worker-a", adopt=False)
    admission = await a.create(
        flaky_request(seconds=[30.0, 0.0], retry=RetryPolicy(max_attempts=3))
    )
    await drained(a, 0)
    run_id = admission.record.run_id
    assert (await store.get(run_id)).status == "queued"  # type: ignore[union-attr]
    b = await replica("worker-b", adopt=False)
    assert await b.cancel(run_id) is CancelOutcome.REQUESTED
    record = await store.get(run_id)
    assert record is not None
    assert record.status == "cancelled"
    assert await history(store, run_id) == [
        ("run_started", 1),
        ("run_requeued", (1, "shutdown")),
        ("run_cancelled", "cancelled"),
    ]
    assert await b.cancel(run_id) is CancelOutcome.ALREADY_CANCELLED
    assert await b.adopter.adopt_once() == 0  # its queue entry is dropped, not run


async def test_a_queued_run_has_one_owner_however_many_replicas_claim_it(
    replica: Replica, store: RunStore
) -> None:
    record = await created(store)
    record = msgspec.structs.replace(record, retry=RetryPolicy(max_attempts=2), max_attempts=2)
    queued = msgspec.structs.replace(record, status="queued", updated_at=utcnow())
    requeued = RunRequeued(
        created_at=utcnow(),
        data=RunRequeuedData(attempt=1, reason="shutdown", worker_id=record.worker_id),
    )
    assert await store.requeue(queued, requeued) is True
    assert await store.requeue(queued, requeued) is True  # repeated after a lost answer
    await store.enqueue(queued)  # and queued twice (a recovery that raced)
    claims: list[str] = []

    def claim_for(worker: str) -> Callable[[RunRecord], Any]:
        def claim(current: RunRecord) -> Any:
            claims.append(worker)
            running = msgspec.structs.replace(
                current, status="running", attempt=2, worker_id=worker
            )
            return running, started(running)

        return claim

    results = await asyncio.gather(*(store.adopt(f"w{i}", 5, claim_for(f"w{i}")) for i in range(4)))
    owners = [adopted.record.worker_id for batch in results for adopted in batch]
    assert len(owners) == 1
    final = await store.get(record.run_id)
    assert final is not None
    assert final.status == "running"
    assert final.worker_id == owners[0]
    kinds = [event_type(e) for e in await store.events(record.run_id, after=None, limit=99) or []]
    assert kinds == ["run_started", "run_requeued", "run_started"]
    assert await store.queued_count() == 0
    assert await store.adopt("late", 5, claim_for("late")) == []


async def test_a_requeue_of_a_run_that_moved_on_does_not_win(store: RunStore) -> None:
    record = await created(store, worker_id="worker-a")
    queued = msgspec.structs.replace(
        record, status="queued", worker_id="worker-other", retry=RetryPolicy(max_attempts=2)
    )
    requeued = RunRequeued(
        created_at=utcnow(),
        data=RunRequeuedData(attempt=1, reason="worker_lost", worker_id="worker-other"),
    )
    assert await store.requeue(queued, requeued) is False  # another worker's attempt
    assert (await store.get(record.run_id)).status == "running"  # type: ignore[union-attr]


async def test_only_one_replica_reports_the_queue_length(
    replica: Replica, store: RunStore, store_kind: str
) -> None:
    if store_kind == "memory":
        pytest.skip("one replica only")
    assert await store.hold_reporter("worker-a", 5) is True
    assert await store.hold_reporter("worker-b", 5) is False
    assert await store.hold_reporter("worker-a", 5) is True  # renewed


def test_a_finisher_requeues_only_what_its_policy_lists() -> None:
    finisher = Finisher(store=None, metrics=Metrics(max_active_runs=1))  # type: ignore[arg-type]
    now = utcnow()
    base = RunRecord(
        run_id="run_" + "a" * 26,
        task="flaky",
        status="failed",
        created_at=now,
        updated_at=now,
        worker_id="w",
        timeout_seconds=1,
        retry=RetryPolicy(max_attempts=2, on=["timeout"]),
        max_attempts=2,
    )
    from service.schemas import RunError

    def ended(reason: str, attempt: int = 1) -> RunRecord:
        return msgspec.structs.replace(
            base,
            error=RunError(reason=reason, message="x"),
            attempt=attempt,  # type: ignore[arg-type]
        )

    assert finisher.requeue_of(ended("timeout")) is not None
    assert finisher.requeue_of(ended("timeout", attempt=2)) is None
    assert finisher.requeue_of(ended("error")) is None
    assert finisher.requeue_of(ended("cancelled")) is None
    assert finisher.requeue_of(msgspec.structs.replace(ended("timeout"), retry=None)) is None


async def test_a_cut_off_worker_cannot_end_the_attempt_that_now_runs_elsewhere(
    store: RunStore,
) -> None:
    """Worker A was cut off past its lease: its run was requeued and adopted by B.
    When A comes back with its (first) attempt's result, that write does not win."""
    record = await created(store, worker_id="worker-a")
    record = msgspec.structs.replace(record, retry=RetryPolicy(max_attempts=2), max_attempts=2)
    queued = msgspec.structs.replace(record, status="queued")
    requeued = RunRequeued(
        created_at=utcnow(),
        data=RunRequeuedData(attempt=1, reason="worker_lost", worker_id="worker-a"),
    )
    assert await store.requeue(queued, requeued) is True

    def claim(current: RunRecord) -> Any:
        running = msgspec.structs.replace(current, status="running", attempt=2, worker_id="b")
        return running, started(running)

    (adopted,) = await store.adopt("b", 1, claim)
    now = utcnow()
    late = msgspec.structs.replace(
        record, status="succeeded", output={"from": "a"}, updated_at=now, finished_at=now
    )
    assert await store.finalize(late) is False
    current = await store.get(record.run_id)
    assert current is not None
    assert (current.status, current.worker_id) == ("running", "b")
    mine = msgspec.structs.replace(adopted.record, status="succeeded", finished_at=now)
    assert await store.finalize(mine) is True
