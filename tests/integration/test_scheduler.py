"""The scheduler against both stores: outcomes, cancellation, capacity, drain, races."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from service.errors import (
    AtCapacity,
    Draining,
    IdempotencyInProgress,
    IdempotencyMismatch,
    InvalidInput,
    UnknownTask,
)
from service.metrics import Metrics
from service.scheduler import DRAIN_FINALIZE_BUDGET_SECONDS, Scheduler
from service.schemas import CreateRunRequest, RunRecord, event_type
from service.store import CancelOutcome, RunStore
from service.tasks import RunContext, RunContexts, TaskRegistry, task
from service.tasks.sleep import sleep as sleep_task
from tests.conftest import build_store
from tests.integration.support import drained


class Nothing(msgspec.Struct, forbid_unknown_fields=True):
    seconds: float = 0.0


@task("boom")
async def boom(ctx: RunContext, params: Nothing) -> None:
    raise ValueError("it broke")


@task("stubborn")
async def stubborn(ctx: RunContext, params: Nothing) -> str:
    """Ignores cancellation, then tries to report progress after its run has ended."""
    try:
        await asyncio.sleep(params.seconds)
    except asyncio.CancelledError:
        await asyncio.sleep(1.5)
        ctx.log.info("still here")
        await ctx.emit({"after": "cancel"})
    return "never recorded"


@task("opaque")
async def opaque(ctx: RunContext, params: Nothing) -> object:
    return object()


def make_registry() -> TaskRegistry:
    registry = TaskRegistry()
    for t in (sleep_task, boom, stubborn, opaque):
        registry.add(t, origin="test")
    return registry


@pytest.fixture
async def store(store_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[RunStore]:
    """Unstarted here: the scheduler registers its cancel listener first, then starts it."""
    instance = build_store(store_kind, request)
    yield instance
    await instance.close()


@pytest.fixture
async def scheduler(store: RunStore) -> AsyncIterator[Scheduler]:
    async with httpx.AsyncClient() as http:
        instance = Scheduler(
            store=store,
            registry=make_registry(),
            metrics=Metrics(max_active_runs=3, task_names=["sleep", "boom", "stubborn", "opaque"]),
            contexts=RunContexts(http),
            worker_id="worker-a",
            max_active_runs=3,
            default_timeout_seconds=30,
        )
        await store.start()
        yield instance
        await drained(instance, 0)  # as the app does: nothing may outlive the store


def sleep_request(seconds: float, steps: int = 1, **kwargs: Any) -> CreateRunRequest:
    return CreateRunRequest(task="sleep", input={"seconds": seconds, "steps": steps}, **kwargs)


async def wait_terminal(store: RunStore, run_id: str, within: float = 3.0) -> RunRecord:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        record = await store.get(run_id)
        assert record is not None
        if record.is_terminal:
            return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id} still running after {within}s")


async def settled(scheduler: Scheduler, within: float = 3.0) -> None:
    """Wait until every supervisor is done (the store may show a run terminal first)."""
    deadline = time.monotonic() + within
    while scheduler.active_runs():
        assert time.monotonic() < deadline, "runs still held by the scheduler"
        await asyncio.sleep(0.01)


async def event_types(store: RunStore, run_id: str) -> list[str]:
    events = await store.events(run_id, after=None, limit=1000)
    assert events is not None
    return [event_type(e) for e in events]


def sample(metric: Any, *labels: str) -> float:
    value: float = metric.labels(*labels)._value.get()
    return value


async def test_a_run_succeeds_with_its_output_and_progress(
    scheduler: Scheduler, store: RunStore
) -> None:
    admission = await scheduler.create(sleep_request(0.05, steps=2, metadata={"team": "a"}))
    assert admission.replayed is False
    assert admission.record.status == "running"
    record = await wait_terminal(store, admission.record.run_id)
    assert record.status == "succeeded"
    assert record.output == {"slept": 0.05}
    assert record.metadata == {"team": "a"}
    assert record.finished_at is not None
    assert await event_types(store, record.run_id) == [
        "run_started", "run_progress", "run_progress", "run_succeeded",
    ]  # fmt: skip


async def test_a_raising_task_fails_with_the_exception_but_no_traceback(
    scheduler: Scheduler, store: RunStore
) -> None:
    admission = await scheduler.create(CreateRunRequest(task="boom"))
    record = await wait_terminal(store, admission.record.run_id)
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.reason == "error"
    assert record.error.message == "ValueError: it broke"
    assert await event_types(store, record.run_id) == ["run_started", "run_failed"]


async def test_output_that_is_not_json_fails_the_run(scheduler: Scheduler, store: RunStore) -> None:
    admission = await scheduler.create(CreateRunRequest(task="opaque"))
    record = await wait_terminal(store, admission.record.run_id)
    assert record.status == "failed"
    assert record.error is not None
    assert "not JSON" in record.error.message


async def test_the_deadline_fails_the_run_with_reason_timeout(
    scheduler: Scheduler, store: RunStore
) -> None:
    admission = await scheduler.create(sleep_request(10, timeout_seconds=0.1))
    record = await wait_terminal(store, admission.record.run_id)
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.reason == "timeout"
    assert "0.1s" in record.error.message
    await settled(scheduler)
    assert sample(scheduler._metrics.run_cancellations, "sleep", "timeout") == 1
    assert sample(scheduler._metrics.run_failures, "sleep", "timeout") == 1


async def test_a_user_cancel_stops_the_task_within_a_second(
    scheduler: Scheduler, store: RunStore
) -> None:
    admission = await scheduler.create(sleep_request(30))
    started = time.monotonic()
    assert await scheduler.cancel(admission.record.run_id) is CancelOutcome.REQUESTED
    record = await wait_terminal(store, admission.record.run_id, within=1.0)
    assert time.monotonic() - started < 1.0
    assert record.status == "cancelled"
    assert record.error is not None
    assert record.error.reason == "cancelled"
    assert await event_types(store, record.run_id) == ["run_started", "run_cancelled"]
    assert await scheduler.cancel(record.run_id) is CancelOutcome.ALREADY_CANCELLED
    assert scheduler.active_runs() == []


async def test_unknown_task_and_bad_input_create_no_run(scheduler: Scheduler) -> None:
    with pytest.raises(UnknownTask):
        await scheduler.create(CreateRunRequest(task="missing"))
    with pytest.raises(InvalidInput) as caught:
        await scheduler.create(CreateRunRequest(task="sleep", input={"seconds": -1}))
    assert caught.value.extra["field"] == "input.seconds"
    assert "`$.input.seconds`" in caught.value.message
    with pytest.raises(InvalidInput) as caught:
        await scheduler.create(CreateRunRequest(task="sleep", input={"seconds": 1, "extra": 1}))
    assert "extra" in caught.value.message
    assert scheduler.active_runs() == []
    assert sample(scheduler._metrics.runs_started, "sleep") == 0


async def test_admission_refuses_at_capacity_and_recovers(
    scheduler: Scheduler, store: RunStore
) -> None:
    first = await scheduler.create(sleep_request(0.2))
    await scheduler.create(sleep_request(5))
    await scheduler.create(sleep_request(5))
    with pytest.raises(AtCapacity):
        await scheduler.create(sleep_request(0))
    await wait_terminal(store, first.record.run_id)
    await asyncio.sleep(0.01)
    await scheduler.create(sleep_request(0))  # a slot is free again


async def test_idempotent_create_replays_and_rejects_a_different_body(
    scheduler: Scheduler, store: RunStore
) -> None:
    request = sleep_request(0.01)
    first = await scheduler.create(request, idempotency_key="order-42")
    again = await scheduler.create(sleep_request(0.01), idempotency_key="order-42")
    assert again.replayed is True
    assert again.record == first.record
    await wait_terminal(store, first.record.run_id)
    after_finish = await scheduler.create(request, idempotency_key="order-42")
    assert after_finish.record == first.record  # the original response, not the current state
    with pytest.raises(IdempotencyMismatch):
        await scheduler.create(sleep_request(0.02), idempotency_key="order-42")
    assert sample(scheduler._metrics.runs_started, "sleep") == 1


async def test_concurrent_creates_with_one_key_hold_one_run(
    scheduler: Scheduler, store: RunStore
) -> None:
    admissions = await asyncio.gather(
        *(scheduler.create(sleep_request(30), idempotency_key="k") for _ in range(3)),
        return_exceptions=True,
    )
    records = [a.record for a in admissions if not isinstance(a, BaseException)]
    assert records, admissions
    run_id = records[0].run_id
    assert {r.run_id for r in records} == {run_id}
    assert all(isinstance(a, IdempotencyInProgress) for a in admissions if isinstance(a, Exception))
    # One entry, still cancellable, counted once — and a repeat now replays it.
    assert [record.run_id for record, _ in scheduler.active_runs()] == [run_id]
    again = await scheduler.create(sleep_request(30), idempotency_key="k")
    assert again.replayed is True
    with pytest.raises(IdempotencyMismatch):
        await scheduler.create(sleep_request(31), idempotency_key="k")
    await scheduler.cancel(run_id)
    assert (await wait_terminal(store, run_id)).status == "cancelled"
    await settled(scheduler)


async def test_draining_refuses_new_runs_at_once(scheduler: Scheduler) -> None:
    scheduler.drain.begin("test")
    with pytest.raises(Draining):
        await scheduler.create(sleep_request(0))
    assert scheduler.active_runs() == []


async def test_drain_lets_short_runs_finish_and_fails_the_rest_as_shutdown(
    scheduler: Scheduler, store: RunStore
) -> None:
    short = await scheduler.create(sleep_request(0.1))
    long = await scheduler.create(sleep_request(30))
    grace = 0.4
    started = time.monotonic()
    progress = await drained(scheduler, grace)
    took = time.monotonic() - started
    assert grace <= took < grace + DRAIN_FINALIZE_BUDGET_SECONDS
    assert progress.finished is True
    assert progress.active_at_start == 2
    assert progress.cancelled == 1

    short_record = await store.get(short.record.run_id)
    long_record = await store.get(long.record.run_id)
    assert short_record is not None
    assert long_record is not None
    assert short_record.status == "succeeded"
    assert long_record.status == "failed"
    assert long_record.error is not None
    assert long_record.error.reason == "shutdown"
    assert await event_types(store, long.record.run_id) == ["run_started", "run_failed"]
    assert sample(scheduler._metrics.run_cancellations, "sleep", "shutdown") == 1
    assert scheduler.active_runs() == []


async def test_a_drain_stops_hundreds_of_runs_within_its_budget(store: RunStore) -> None:
    many = 300
    async with httpx.AsyncClient() as http:
        scheduler = Scheduler(
            store=store,
            registry=make_registry(),
            metrics=Metrics(max_active_runs=many, task_names=["sleep"]),
            contexts=RunContexts(http),
            worker_id="worker-a",
            max_active_runs=many,
            default_timeout_seconds=60,
        )
        await store.start()
        runs = [(await scheduler.create(sleep_request(60))).record.run_id for _ in range(many)]
        started = time.monotonic()
        progress = await drained(scheduler, 0.1)
        assert time.monotonic() - started < 0.1 + DRAIN_FINALIZE_BUDGET_SECONDS
    assert progress.cancelled == many
    assert scheduler.drain.left_running == []
    assert scheduler.active_runs() == []
    for run_id in runs[:: many // 10]:
        record = await store.get(run_id)
        assert record is not None
        assert record.error is not None
        assert record.error.reason == "shutdown"
        assert await event_types(store, run_id) == ["run_started", "run_failed"]
    assert sample(scheduler._metrics.run_cancellations, "sleep", "shutdown") == many
    assert sample(scheduler._metrics.runs_finished, "sleep", "failed") == many


async def test_drain_is_idempotent_and_never_extended(scheduler: Scheduler) -> None:
    await scheduler.create(sleep_request(30))
    started = time.monotonic()
    first = asyncio.create_task(drained(scheduler, 0.3))
    await asyncio.sleep(0.2)
    second = await drained(scheduler, 5.0)  # a later trigger waits for the same drain
    assert second is await first
    assert second.grace_seconds == 0.3
    assert time.monotonic() - started < 0.3 + DRAIN_FINALIZE_BUDGET_SECONDS


async def test_drain_with_nothing_running_returns_at_once(scheduler: Scheduler) -> None:
    started = time.monotonic()
    progress = await drained(scheduler, 10)
    assert time.monotonic() - started < 0.5
    assert progress.active_at_start == 0


async def test_a_task_ignoring_cancellation_is_still_finalized_and_cannot_emit_after(
    scheduler: Scheduler, store: RunStore
) -> None:
    admission = await scheduler.create(CreateRunRequest(task="stubborn", input={"seconds": 30}))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await drained(scheduler, 0.1)
    assert time.monotonic() - started < 0.1 + DRAIN_FINALIZE_BUDGET_SECONDS
    record = await store.get(admission.record.run_id)
    assert record is not None
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.reason == "shutdown"
    await asyncio.sleep(1.6)  # the stubborn task now emits: the store must refuse it
    assert await event_types(store, admission.record.run_id) == ["run_started", "run_failed"]


@pytest.mark.parametrize("rival", ["timeout", "cancel", "drain"])
async def test_exactly_one_terminal_event_when_success_races_a_rival(
    scheduler: Scheduler, store: RunStore, rival: str
) -> None:
    """The task finishes at the very moment its rival strikes; one outcome is written."""
    duration = 0.05
    run_ids = []
    for _ in range(3):
        kwargs: dict[str, Any] = {"timeout_seconds": duration} if rival == "timeout" else {}
        run_ids.append((await scheduler.create(sleep_request(duration, **kwargs))).record.run_id)
    await asyncio.sleep(duration)
    if rival == "cancel":
        await asyncio.gather(
            *(scheduler.cancel(run_id) for run_id in run_ids), return_exceptions=True
        )
    elif rival == "drain":
        await drained(scheduler, 0.0)
    for run_id in run_ids:
        record = await wait_terminal(store, run_id)
        types = await event_types(store, run_id)
        terminal = [t for t in types if t in ("run_succeeded", "run_failed", "run_cancelled")]
        assert len(terminal) == 1, types
        assert types[-1] == terminal[0]
        assert terminal[0] == f"run_{record.status}"
