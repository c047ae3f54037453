"""Progress events ride out a store stall: in order, each once, and no run fails for it.

A stall is a real one: the test's redis-server is stopped with SIGSTOP. It accepts
connections and commands but answers nothing, so store calls give up after 2 s on the
client while their commands wait in Redis — and run once it continues. That is the
case the sequence numbers of appends are for.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
import structlog
from litestar.testing import AsyncTestClient
from redis.exceptions import ResponseError

from service.config import Settings
from service.progress import ProgressOutbox
from service.schemas import RunProgress, event_type, utcnow
from service.store import RunStore
from service.store.redis import RedisRunStore
from service.web.app import create_app
from tests.conftest import AUTH, RedisServer
from tests.integration.support import Client, sleep_body
from tests.integration.test_redis_outage import freeze
from tests.integration.test_store_contract import created, progress, terminal

#: Longer than a store call's 2 s limit, so calls made during it give up and are retried.
STALL_SECONDS = 8.0
RUNS = 200
STEPS = 6
RUN_SECONDS = 12.0


@pytest.fixture
def frozen_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The test's own redis-server, to be frozen with SIGSTOP (always thawed after)."""
    yield redis_server
    freeze(redis_server, frozen=False)


async def until(condition: Callable[[], bool], *, within: float) -> None:
    """Wait for ``condition`` (bounded only so that a broken outbox fails the test)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


async def steps_of(store: RunStore, run_id: str) -> list[Any]:
    events = await store.events(run_id, after=None, limit=1000)
    assert events is not None
    return [e.data["step"] if event_type(e) == "run_progress" else event_type(e) for e in events]


async def test_an_append_repeated_with_its_sequence_number_is_written_once(
    store: RunStore,
) -> None:
    record = await created(store)
    first = await store.append(record.run_id, progress(1), seq=1)
    assert first is not None
    assert await store.append(record.run_id, progress(1), seq=1) == first
    second = await store.append(record.run_id, progress(2), seq=2)
    assert second is not None
    assert second != first
    assert await store.append(record.run_id, progress(1), seq=1) == second  # the last one's id
    assert await steps_of(store, record.run_id) == ["run_started", 1, 2]


async def test_a_batch_sent_again_with_more_events_appends_only_the_new_ones(
    store: RunStore,
) -> None:
    record = await created(store)
    first = await store.append_many(record.run_id, [progress(1), progress(2)], first_seq=1)
    assert first is not None
    # The same batch again (its first send landed after all), now with two more.
    batch = [progress(step) for step in (1, 2, 3, 4)]
    last = await store.append_many(record.run_id, batch, first_seq=1)
    assert last is not None
    assert last != first
    assert await store.append_many(record.run_id, batch[:3], first_seq=1) == last
    assert await steps_of(store, record.run_id) == ["run_started", 1, 2, 3, 4]
    events = await store.events(record.run_id, after=None, limit=10)
    assert events is not None
    assert events[-1].id == last


async def test_a_batch_is_refused_whole_once_the_run_has_ended(store: RunStore) -> None:
    record = await created(store)
    assert await store.append_many(record.run_id, [progress(1)], first_seq=1) is not None
    assert await store.finalize(terminal(record, "succeeded")) is True
    batch = [progress(step) for step in (2, 3)]
    assert await store.append_many(record.run_id, batch, first_seq=2) is None
    assert await steps_of(store, record.run_id) == ["run_started", 1, "run_succeeded"]


async def test_a_task_emitting_faster_than_the_store_writes_keeps_every_event_in_order(
    store: RunStore,
) -> None:
    record = await created(store)
    loop = asyncio.get_running_loop()
    outbox = ProgressOutbox(
        store, record.run_id, deadline=loop.time() + 60, now=utcnow, capacity=50
    )
    for step in range(1, 501):  # ten times the outbox: emit waits for room, batches go out
        assert await outbox.emit({"step": step}) is True
    await outbox.close()
    assert outbox.pending == 0
    assert await store.finalize(terminal(record, "succeeded")) is True
    assert await steps_of(store, record.run_id) == ["run_started", *range(1, 501), "run_succeeded"]


class RefusingStore:
    """A store that refuses (as Redis refuses a command) any batch holding an event
    marked ``bad``; everything else goes to the real store."""

    def __init__(self, inner: RunStore) -> None:
        self.inner = inner
        self.batches: list[int] = []

    async def append_many(
        self, run_id: str, events: Sequence[RunProgress], *, first_seq: int | None = None
    ) -> str | None:
        self.batches.append(len(events))
        if any(event.data.get("bad") for event in events):
            raise ResponseError("ERR refused")
        return await self.inner.append_many(run_id, events, first_seq=first_seq)


async def test_an_event_the_store_refuses_is_dropped_alone(store: RunStore) -> None:
    record = await created(store)
    refusing = RefusingStore(store)
    loop = asyncio.get_running_loop()
    outbox = ProgressOutbox(
        refusing,  # type: ignore[arg-type]
        record.run_id,
        deadline=loop.time() + 60,
        now=utcnow,
    )
    with structlog.testing.capture_logs() as logs:
        for step in range(1, 41):
            await outbox.emit({"step": step, "bad": step == 17})
        await outbox.close()
    assert [e["seq"] for e in logs if e["event"] == "progress_refused"] == [17]
    steps = await steps_of(store, record.run_id)
    assert steps == ["run_started", *(step for step in range(1, 41) if step != 17)]
    assert refusing.batches[0] == 40  # one batch, until the refusal split it


async def test_emit_returns_during_a_stall_and_waits_only_when_the_outbox_is_full(
    redis_store: RedisRunStore, frozen_redis: RedisServer
) -> None:
    record = await created(redis_store)
    loop = asyncio.get_running_loop()
    outbox = ProgressOutbox(
        redis_store, record.run_id, deadline=loop.time() + 60, now=utcnow, capacity=3
    )
    freeze(frozen_redis, frozen=True)
    with structlog.testing.capture_logs() as logs:
        for step in (1, 2, 3):
            assert await outbox.emit({"step": step}) is True  # queued, not waiting for Redis
        fourth = asyncio.create_task(outbox.emit({"step": 4}))
        # Until the first append has given up on the client and is being retried.
        await until(lambda: any(e["event"] == "progress_delayed" for e in logs), within=10)
    assert not fourth.done(), "a full outbox must make emit wait (backpressure)"
    freeze(frozen_redis, frozen=False)
    assert await fourth is True
    await outbox.close()
    assert outbox.pending == 0
    assert await steps_of(redis_store, record.run_id) == ["run_started", 1, 2, 3, 4]
    assert await outbox.emit({"step": 5}) is False  # closed: the run has ended


async def test_what_the_store_cannot_take_by_the_deadline_is_dropped_not_raised(
    redis_store: RedisRunStore, frozen_redis: RedisServer
) -> None:
    record = await created(redis_store)
    loop = asyncio.get_running_loop()
    outbox = ProgressOutbox(redis_store, record.run_id, deadline=loop.time() + 0.5, now=utcnow)
    freeze(frozen_redis, frozen=True)
    with structlog.testing.capture_logs() as logs:
        assert await outbox.emit({"step": 1}) is True
        await outbox.close()  # returns once the deadline has passed
    assert outbox.pending == 0
    assert [e["events"] for e in logs if e["event"] == "progress_dropped"] == [1]
    freeze(frozen_redis, frozen=False)
    # The append that was under way when Redis stopped may land (it was sent once).
    assert (await steps_of(redis_store, record.run_id))[0] == "run_started"


@pytest.fixture
async def client(settings: Settings, redis_server: RedisServer) -> AsyncIterator[Client]:
    app = create_app(replace(settings, redis_url=redis_server.url, max_active_runs=RUNS))
    async with AsyncTestClient(app) as test_client:
        test_client.headers.update(AUTH)
        yield test_client


@pytest.mark.slow
async def test_runs_stepping_through_a_store_stall_all_succeed_with_every_event_once(
    client: Client, frozen_redis: RedisServer
) -> None:
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        run_ids = []
        for _ in range(RUNS):
            response = await client.post("/v1/runs", json=sleep_body(RUN_SECONDS, STEPS))
            assert response.status_code == 202, response.text
            run_ids.append(response.json()["run_id"])
        await asyncio.sleep(1.0)
        freeze(frozen_redis, frozen=True)
        await asyncio.sleep(STALL_SECONDS)
        freeze(frozen_redis, frozen=False)

        records: dict[str, dict[str, Any]] = {}
        while len(records) < RUNS:
            assert time.monotonic() - started < 60, f"{RUNS - len(records)} runs never ended"
            for run_id in set(run_ids) - set(records):
                response = await client.get(f"/v1/runs/{run_id}")
                assert response.status_code == 200, response.text
                if response.json()["status"] != "running":
                    records[run_id] = response.json()
            await asyncio.sleep(0.5)
    wall = time.monotonic() - started

    outcomes = Counter(
        f"{r['status']}/{r['error']['reason']}" if r["error"] else r["status"]
        for r in records.values()
    )
    progress_events = 0
    for run_id in run_ids:
        response = await client.get(f"/v1/runs/{run_id}/events", params={"limit": 100})
        assert response.status_code == 200
        events = response.json()["events"]
        types = [e["type"] for e in events]
        assert types == ["run_started"] + ["run_progress"] * STEPS + ["run_succeeded"], types
        assert [e["data"] for e in events[1:-1]] == [
            {"step": i, "of": STEPS} for i in range(1, STEPS + 1)
        ]
        progress_events += len(events) - 2
    log_counts = Counter(e["event"] for e in logs)
    print(
        f"\nstall test: {RUNS} sleep runs x {STEPS} steps over {RUN_SECONDS:g} s, Redis stopped "
        f"{STALL_SECONDS:g} s; outcomes {dict(outcomes)}; run_progress events "
        f"{progress_events}/{RUNS * STEPS}, each once and in order; emits delayed in "
        f"{log_counts['progress_delayed']} runs, dropped {log_counts['progress_dropped']}; "
        f"wall {wall:.1f} s"
    )
    assert outcomes == {"succeeded": RUNS}
    assert log_counts["progress_delayed"] > 0  # the stall did reach the runs' emits
    assert log_counts["progress_dropped"] == 0
