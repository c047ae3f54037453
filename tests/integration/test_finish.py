"""Every way a run ends goes through one finalization: one ``run_finished`` line that
names the run, the finished/failure counters, the duration histogram, one callback.

The log is captured without the contextvars processor, so a line only names its run
when the finalization names it itself (the drain writes runs outside their context).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import httpx
import msgspec
import pytest
import structlog

from service.metrics import Metrics
from service.reaper import Reaper
from service.scheduler import Scheduler
from service.schemas import RunRecord, utcnow
from service.store import RunStore
from service.store.redis import RedisRunStore
from service.tasks import RunContexts, TaskRegistry
from service.tasks.sleep import sleep as sleep_task
from tests.conftest import build_store
from tests.integration.support import drained, metric
from tests.integration.test_scheduler import settled, sleep_request, wait_terminal
from tests.integration.test_store_contract import running_record, started

FIELDS = {"run_id", "task", "status", "reason", "duration_s"}


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
async def store(store_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[RunStore]:
    instance = build_store(store_kind, request)
    yield instance
    await instance.close()


class Finished:
    """What the app gives the scheduler and the reaper as the completion callback."""

    def __init__(self) -> None:
        self.records: list[RunRecord] = []

    def __call__(self, record: RunRecord) -> None:
        self.records.append(record)


@pytest.fixture
async def setup(store: RunStore) -> AsyncIterator[tuple[Scheduler, Metrics, Finished]]:
    registry = TaskRegistry()
    registry.add(sleep_task, origin="test")
    metrics = Metrics(max_active_runs=5, task_names=["sleep"])
    callbacks = Finished()
    async with httpx.AsyncClient() as http:
        scheduler = Scheduler(
            store=store,
            registry=registry,
            metrics=metrics,
            contexts=RunContexts(http),
            worker_id="worker-a",
            max_active_runs=5,
            default_timeout_seconds=30,
            on_finished=callbacks,
        )
        await store.start()
        yield scheduler, metrics, callbacks
        await drained(scheduler, 0)


def check_finished(
    logs: list[dict[str, Any]],
    metrics: Metrics,
    callbacks: Finished,
    run_id: str,
    status: str,
    reason: str | None,
) -> dict[str, Any]:
    """Exactly one line, the counters, one histogram sample, one callback; the line."""
    lines = [e for e in logs if e["event"] == "run_finished" and e.get("run_id") == run_id]
    assert len(lines) == 1, [e for e in logs if e["event"] == "run_finished"]
    line = lines[0]
    assert set(line) >= FIELDS
    assert (line["task"], line["status"], line["reason"]) == ("sleep", status, reason)
    assert isinstance(line["duration_s"], float)
    assert line["duration_s"] >= 0
    text = metrics.render().decode()
    assert metric(text, "quiesce_runs_finished_total", task="sleep", status=status) == 1
    if status == "failed":
        assert reason is not None
        assert metric(text, "quiesce_run_failures_total", task="sleep", reason=reason) == 1
    count = "quiesce_run_duration_seconds_count"
    assert metric(text, count, task="sleep", status=status) == 1
    assert [r.run_id for r in callbacks.records] == [run_id]
    assert callbacks.records[0].status == status
    return line


async def test_a_task_that_ends_is_finished_once(
    setup: tuple[Scheduler, Metrics, Finished], store: RunStore, logs: list[dict[str, Any]]
) -> None:
    scheduler, metrics, callbacks = setup
    run_id = (await scheduler.create(sleep_request(0.05, steps=2))).record.run_id
    await wait_terminal(store, run_id)
    await settled(scheduler)
    check_finished(logs, metrics, callbacks, run_id, "succeeded", None)


async def test_a_user_cancel_is_finished_once(
    setup: tuple[Scheduler, Metrics, Finished], store: RunStore, logs: list[dict[str, Any]]
) -> None:
    scheduler, metrics, callbacks = setup
    run_id = (await scheduler.create(sleep_request(30))).record.run_id
    await scheduler.cancel(run_id)
    await wait_terminal(store, run_id)
    await settled(scheduler)
    check_finished(logs, metrics, callbacks, run_id, "cancelled", "cancelled")


async def test_a_timeout_is_finished_once(
    setup: tuple[Scheduler, Metrics, Finished], store: RunStore, logs: list[dict[str, Any]]
) -> None:
    scheduler, metrics, callbacks = setup
    request = sleep_request(30, timeout_seconds=0.1)
    run_id = (await scheduler.create(request)).record.run_id
    await wait_terminal(store, run_id)
    await settled(scheduler)
    check_finished(logs, metrics, callbacks, run_id, "failed", "timeout")


async def test_a_drain_finishes_each_run_once_with_its_run_id(
    setup: tuple[Scheduler, Metrics, Finished], store: RunStore, logs: list[dict[str, Any]]
) -> None:
    scheduler, metrics, callbacks = setup
    run_id = (await scheduler.create(sleep_request(30, steps=30))).record.run_id
    await asyncio.sleep(1.1)  # a progress event is written before the drain
    progress = await drained(scheduler, 0)
    assert progress.cancelled == 1
    assert scheduler.drain.left_running == []
    check_finished(logs, metrics, callbacks, run_id, "failed", "shutdown")
    events = await store.events(run_id, after=None, limit=100)
    assert events is not None
    assert [type(e).__name__ for e in events] == ["RunStarted", "RunProgress", "RunFailed"]


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_a_reaped_run_is_finished_once_and_timed_from_its_creation(
    store: RunStore, logs: list[dict[str, Any]]
) -> None:
    assert isinstance(store, RedisRunStore)
    await store.start()
    created_at = utcnow() - timedelta(seconds=42)
    record = running_record(worker_id="lost")
    record = msgspec.structs.replace(record, created_at=created_at, updated_at=created_at)
    await store.create(record, started(record))
    await store.heartbeat("lost", 0.05)
    await asyncio.sleep(0.1)
    metrics = Metrics(max_active_runs=1, task_names=["sleep"])
    callbacks = Finished()
    reaper = Reaper(
        store=store,
        metrics=metrics,
        worker_id="reaper",
        lease_ttl_seconds=3,
        on_finished=callbacks,
    )
    assert await reaper.reap_expired() == 1
    line = check_finished(logs, metrics, callbacks, record.run_id, "failed", "worker_lost")
    assert line["duration_s"] >= 42
    text = metrics.render().decode()
    total = metric(text, "quiesce_run_duration_seconds_sum", task="sleep", status="failed")
    assert total is not None
    assert total >= 42
    assert metric(text, "quiesce_orphans_reaped_total") == 1
