"""Leases and the reaper on a real Redis: runs of a lost worker end as ``worker_lost``."""

from __future__ import annotations

import asyncio

import pytest

from service.metrics import Metrics
from service.reaper import Reaper
from service.schemas import RunRecord, event_type
from service.store.redis import WORKERS_KEY, RedisRunStore, worker_runs_key
from tests.conftest import RedisServer
from tests.integration.test_store_contract import created, terminal


@pytest.fixture
def store(redis_store: RedisRunStore) -> RedisRunStore:
    return redis_store


def reaper(store: RedisRunStore, worker_id: str, metrics: Metrics | None = None) -> Reaper:
    return Reaper(
        store=store,
        metrics=metrics or Metrics(max_active_runs=1),
        worker_id=worker_id,
        lease_ttl_seconds=3,
    )


async def history(store: RedisRunStore, run_id: str) -> list[str]:
    events = await store.events(run_id, after=None, limit=100)
    assert events is not None
    return [event_type(e) for e in events]


async def test_runs_are_listed_under_their_worker_until_finalized(store: RedisRunStore) -> None:
    first = await created(store, worker_id="w-1")
    second = await created(store, worker_id="w-1")
    await created(store, worker_id="w-2")
    assert await store.runs_of("w-1") == sorted([first.run_id, second.run_id])
    await store.finalize(terminal(first, "succeeded"))
    assert await store.runs_of("w-1") == [second.run_id]


async def test_a_lease_expires_unless_renewed(store: RedisRunStore) -> None:
    await store.heartbeat("alive", 10)
    await store.heartbeat("dying", 0.05)
    await asyncio.sleep(0.1)
    assert await store.expired_workers() == ["dying"]
    await store.heartbeat("dying", 10)  # it came back
    assert await store.expired_workers() == []


async def test_the_runs_of_a_lost_worker_fail_as_worker_lost(
    store: RedisRunStore, redis_server: RedisServer
) -> None:
    lost = [await created(store, worker_id="lost") for _ in range(3)]
    finished = await created(store, worker_id="lost")
    await store.finalize(terminal(finished, "succeeded"))
    alive = await created(store, worker_id="alive")
    await store.heartbeat("lost", 0.05)
    await store.heartbeat("alive", 30)
    await asyncio.sleep(0.1)

    metrics = Metrics(max_active_runs=1, task_names=["sleep"])
    called_back: list[RunRecord] = []  # what goes to completion callbacks
    reaping = Reaper(
        store=store,
        metrics=metrics,
        worker_id="reaper",
        lease_ttl_seconds=3,
        on_finished=called_back.append,
    )
    assert await reaping.reap_expired() == 3
    assert sorted(r.run_id for r in called_back) == sorted(r.run_id for r in lost)
    assert {r.error.reason for r in called_back if r.error} == {"worker_lost"}

    for run in lost:
        record = await store.get(run.run_id)
        assert record is not None
        assert record.status == "failed"
        assert record.error is not None
        assert record.error.reason == "worker_lost"
        assert "lost" in record.error.message
        assert await history(store, run.run_id) == ["run_started", "run_failed"]
    finished_record = await store.get(finished.run_id)
    alive_record = await store.get(alive.run_id)
    assert finished_record is not None
    assert finished_record.status == "succeeded"  # a finished run is left alone
    assert alive_record is not None
    assert alive_record.status == "running"
    assert metrics.orphans_reaped._value.get() == 3
    # The lost worker is forgotten; the live one keeps its lease and its runs.
    with redis_server.client() as client:
        assert client.zscore(WORKERS_KEY, "lost") is None
        assert client.zscore(WORKERS_KEY, "alive") is not None
        assert not client.exists(worker_runs_key("lost"))
    assert await store.runs_of("alive") == [alive.run_id]


async def test_racing_reapers_write_exactly_one_terminal_event_per_run(
    store: RedisRunStore, redis_server: RedisServer
) -> None:
    runs = [await created(store, worker_id="gone") for _ in range(20)]
    await store.heartbeat("gone", 0.05)
    await asyncio.sleep(0.1)
    others = [RedisRunStore(redis_server.url, retention_seconds=3600) for _ in range(2)]
    for other in others:
        await other.start()
    try:
        metrics = [Metrics(max_active_runs=1) for _ in range(3)]
        reapers = [
            reaper(s, f"reaper-{i}", m)
            for i, (s, m) in enumerate(zip([store, *others], metrics, strict=True))
        ]
        won = await asyncio.gather(*(r.reap_expired() for r in reapers))
    finally:
        for other in others:
            await other.close()
    assert sum(won) == 20
    assert sum(m.orphans_reaped._value.get() for m in metrics) == 20
    for run in runs:
        assert await history(store, run.run_id) == ["run_started", "run_failed"]


async def test_a_restarted_worker_reaps_what_its_earlier_process_left(
    store: RedisRunStore,
) -> None:
    # Same worker id as a process that died: its runs cannot belong to anyone alive.
    left = await created(store, worker_id="pod-1")
    await store.heartbeat("pod-1", 30)  # the dead process's lease has not even expired
    restarted = reaper(store, "pod-1")
    await restarted.start()
    try:
        record = await store.get(left.run_id)
        assert record is not None
        assert record.status == "failed"
        assert record.error is not None
        assert record.error.reason == "worker_lost"
        assert "restarted" in record.error.message
    finally:
        await restarted.stop(retire=True)
    assert await store.expired_workers() == []


async def test_a_reaper_keeps_its_own_lease_alive(store: RedisRunStore) -> None:
    keeper = Reaper(
        store=store, metrics=Metrics(max_active_runs=1), worker_id="keeper", lease_ttl_seconds=0.3
    )
    await keeper.start()
    try:
        await asyncio.sleep(1.0)  # more than three TTLs
        assert await store.expired_workers() == []
    finally:
        await keeper.stop(retire=False)
    await asyncio.sleep(0.4)
    assert await store.expired_workers() == ["keeper"]
