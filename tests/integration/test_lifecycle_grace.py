"""A trigger may shorten the drain's grace (the death of Granian's main process does:
it cannot wait), never lengthen it; the runs still active are finalized at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.scheduler import Scheduler
from service.schemas import CreateRunRequest
from service.store import RunStore
from service.tasks import TaskRegistry
from service.tasks.sleep import sleep as sleep_task
from tests.conftest import build_store


@pytest.fixture
def store(request: pytest.FixtureRequest) -> RunStore:
    return build_store("memory", request)


@pytest.fixture
async def scheduler(store: RunStore) -> AsyncIterator[Scheduler]:
    registry = TaskRegistry()
    registry.add(sleep_task, origin="test")
    async with httpx.AsyncClient() as http:
        instance = Scheduler(
            store=store,
            registry=registry,
            metrics=Metrics(max_active_runs=3, task_names=["sleep"]),
            http=http,
            worker_id="worker-a",
            max_active_runs=3,
            default_timeout_seconds=300,
        )
        await store.start()
        yield instance
        await instance.drain(0)
        await store.close()


async def test_a_drain_with_no_grace_finalizes_active_runs_at_once(
    scheduler: Scheduler, store: RunStore
) -> None:
    lifecycle = Lifecycle(scheduler, grace_seconds=300)
    lifecycle.mark_ready()
    admission = await scheduler.create(
        CreateRunRequest(task="sleep", input={"seconds": 120, "steps": 1})
    )
    lifecycle.begin_drain("parent_exited", grace_seconds=0)
    assert lifecycle.grace_seconds == 0
    # Bounded only so that a broken drain fails the test instead of hanging it.
    progress = await asyncio.wait_for(lifecycle.wait_stopped(), 10)
    assert progress is not None
    assert progress.grace_seconds == 0
    assert progress.cancelled == 1
    assert lifecycle.state == "stopped"
    assert lifecycle.trigger == "parent_exited"
    record = await store.get(admission.record.run_id)
    assert record is not None
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.reason == "shutdown"


async def test_a_trigger_never_lengthens_the_grace(scheduler: Scheduler) -> None:
    lifecycle = Lifecycle(scheduler, grace_seconds=0.1)
    lifecycle.begin_drain("parent_exited", grace_seconds=30)
    assert lifecycle.grace_seconds == 0.1
    await asyncio.wait_for(lifecycle.wait_stopped(), 10)


async def test_a_second_trigger_does_not_change_the_grace(scheduler: Scheduler) -> None:
    lifecycle = Lifecycle(scheduler, grace_seconds=0.2)
    lifecycle.begin_drain("SIGTERM")
    lifecycle.begin_drain("parent_exited", grace_seconds=0)
    assert lifecycle.grace_seconds == 0.2
    assert lifecycle.trigger == "SIGTERM"
    await asyncio.wait_for(lifecycle.wait_stopped(), 10)
