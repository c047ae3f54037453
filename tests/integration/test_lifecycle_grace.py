"""A trigger may shorten the drain's grace (the death of Granian's main process does:
it cannot wait), never lengthen it — also when it comes while a drain is already
under way; the runs still active are then finalized at once."""

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
from service.tasks import RunContexts, TaskRegistry
from service.tasks.sleep import sleep as sleep_task
from tests.conftest import build_store
from tests.integration.support import drained


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
            contexts=RunContexts(http),
            worker_id="worker-a",
            max_active_runs=3,
            default_timeout_seconds=300,
            grace_seconds=300,
        )
        await store.start()
        yield instance
        await drained(instance, 0)
        await store.close()


async def test_a_drain_with_no_grace_finalizes_active_runs_at_once(
    scheduler: Scheduler, store: RunStore
) -> None:
    lifecycle = Lifecycle(scheduler)
    lifecycle.mark_ready()
    admission = await scheduler.create(
        CreateRunRequest(task="sleep", input={"seconds": 120, "steps": 1})
    )
    scheduler.drain.begin("parent_exited", grace_seconds=0)
    assert scheduler.drain.grace_seconds == 0
    assert lifecycle.state == "draining"
    # Bounded only so that a broken drain fails the test instead of hanging it.
    progress = await asyncio.wait_for(scheduler.drain.wait(), 10)
    assert progress is not None
    assert progress.grace_seconds == 0
    assert progress.cancelled == 1
    assert lifecycle.state == "stopped"
    assert scheduler.drain.trigger == "parent_exited"
    record = await store.get(admission.record.run_id)
    assert record is not None
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.reason == "shutdown"


async def test_a_trigger_never_lengthens_the_grace(scheduler: Scheduler) -> None:
    scheduler.drain.begin("SIGTERM", grace_seconds=0.1)
    scheduler.drain.begin("parent_exited", grace_seconds=30)
    assert scheduler.drain.grace_seconds == 0.1
    assert scheduler.drain.trigger == "SIGTERM"
    await asyncio.wait_for(scheduler.drain.wait(), 10)


async def test_a_later_trigger_shortens_a_drain_under_way(
    scheduler: Scheduler, store: RunStore
) -> None:
    """The main process dies during a normal drain (300 s of grace): the runs still
    active are stopped now, not when that grace would have ended."""
    admission = await scheduler.create(
        CreateRunRequest(task="sleep", input={"seconds": 120, "steps": 1})
    )
    scheduler.drain.begin("admin")
    assert scheduler.drain.grace_seconds == 300
    await asyncio.sleep(0)  # the drain is waiting for the run
    assert not scheduler.drain.stopped.is_set()
    scheduler.drain.begin("parent_exited", grace_seconds=0)
    assert scheduler.drain.trigger == "admin"
    assert scheduler.drain.grace_seconds < 300
    # Bounded only so that a drain that still waits out its grace fails the test.
    progress = await asyncio.wait_for(scheduler.drain.wait(), 10)
    assert progress is not None
    assert progress.cancelled == 1
    assert progress.grace_seconds < 300
    record = await store.get(admission.record.run_id)
    assert record is not None
    assert record.error is not None
    assert record.error.reason == "shutdown"
