"""A Redis that lost its data (FLUSHALL, an empty restart) is noticed, and the runs
this process is executing are written back and finish properly.

Without the generation marker, such a run answers 404 for the rest of its life and
its terminal write finds nothing; nothing in the logs or metrics says why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import structlog
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.store.redis import RedisRunStore
from service.web.app import create_app
from tests.conftest import AUTH, RedisServer
from tests.integration.support import Client, metric, metrics_text, services, sleep_body
from tests.integration.test_store_contract import (
    event_types as store_event_types,
)
from tests.integration.test_store_contract import (
    running_record,
    started,
    terminal,
)

pytestmark = pytest.mark.slow

#: The shortest lease the settings allow: the store checks its marker every ~1 s.
SHORT_LEASE_SECONDS = 3.0


@dataclass
class Replica:
    client: Client
    #: What the app logged so far (structlog's capture, filled in as it logs).
    logs: list[dict[str, Any]]


async def replica(settings: Settings, server: RedisServer, lease: float) -> AsyncIterator[Replica]:
    app = create_app(replace(settings, redis_url=server.url, lease_ttl_seconds=lease))
    # After create_app, which configures logging: the capture replaces it.
    with structlog.testing.capture_logs() as logs:
        async with AsyncTestClient(app) as client:
            client.headers.update(AUTH)
            yield Replica(client, logs)


@pytest.fixture
async def app(settings: Settings, redis_server: RedisServer) -> AsyncIterator[Replica]:
    async for instance in replica(settings, redis_server, SHORT_LEASE_SECONDS):
        yield instance


@pytest.fixture
async def slow_lease_app(settings: Settings, redis_server: RedisServer) -> AsyncIterator[Replica]:
    """Lease renewals 20 s apart: within a test, only the run's own writes notice a reset."""
    async for instance in replica(settings, redis_server, 60.0):
        yield instance


async def poll_run(client: Client, run_id: str, *, until: str, within: float) -> dict[str, Any]:
    """The run's record once it is readable with status ``until`` (404s meanwhile)."""
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        response = await client.get(f"/v1/runs/{run_id}")
        last = response.status_code, response.text
        if response.status_code == 200 and response.json()["status"] == until:
            record: dict[str, Any] = response.json()
            return record
        assert response.status_code in (200, 404), last
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} not {until} after {within}s: {last}")


async def event_types(client: Client, run_id: str) -> list[str]:
    response = await client.get(f"/v1/runs/{run_id}/events")
    assert response.status_code == 200, response.text
    return [event["type"] for event in response.json()["events"]]


def resets(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "store_reset"]


async def started_run(client: Client, seconds: float) -> str:
    created = await client.post("/v1/runs", json=sleep_body(seconds, 4))
    assert created.status_code == 202, created.text
    run_id: str = created.json()["run_id"]
    assert (await client.get(f"/v1/runs/{run_id}")).status_code == 200
    return run_id


async def assert_restored_and_finished(
    client: Client, server: RedisServer, run_id: str, logs: list[dict[str, Any]]
) -> None:
    # Written back while still running: readable, listed under its worker, leased.
    running = await poll_run(client, run_id, until="running", within=5)
    assert running["worker_id"] == "worker-a"
    with server.client() as redis:
        assert redis.sismember("quiesce:{worker:worker-a}:runs", run_id)
        assert redis.get("quiesce:generation") is not None
    finished = await poll_run(client, run_id, until="succeeded", within=10)
    assert finished["output"] == {"slept": 4.0}
    types = await event_types(client, run_id)
    assert types[0] == "run_started"
    assert types[-1] == "run_succeeded"
    assert types.count("run_succeeded") == 1
    (reset,) = resets(logs)
    assert reset["log_level"] == "warning"
    assert reset["old_generation"]
    assert reset["old_generation"] != reset["generation"]
    text = await metrics_text(client)
    assert metric(text, "quiesce_store_resets_total") == 1
    assert metric(text, "quiesce_runs_finished_total", task="sleep", status="succeeded") == 1


async def test_flushall_during_a_run_is_noticed_and_the_run_finishes(
    app: Replica, redis_server: RedisServer
) -> None:
    client = app.client
    assert metric(await metrics_text(client), "quiesce_store_resets_total") == 0
    run_id = await started_run(client, 4.0)
    redis_server.flush()
    assert (await client.get(f"/v1/runs/{run_id}")).status_code == 404  # gone, for now
    await assert_restored_and_finished(client, redis_server, run_id, app.logs)


async def test_an_empty_restart_during_a_run_is_noticed_and_the_run_finishes(
    app: Replica, redis_server: RedisServer
) -> None:
    client = app.client
    run_id = await started_run(client, 4.0)
    redis_server.stop()
    await asyncio.sleep(0.5)
    redis_server.start()
    await assert_restored_and_finished(client, redis_server, run_id, app.logs)


async def test_a_terminal_write_that_finds_its_run_gone_writes_it_back_first(
    redis_store: RedisRunStore, redis_server: RedisServer
) -> None:
    """No lease renewal and no progress event between the reset and the run's end: the
    terminal write itself finds the run gone, which is the sign of a reset."""
    record = running_record()
    resets_seen: list[None] = []
    redis_store.on_reset(running=lambda: [record], reset=lambda: resets_seen.append(None))
    await redis_store.create(record, started(record))
    await redis_store.heartbeat("worker-a", 60)  # the generation is known
    redis_server.flush()
    assert await redis_store.get(record.run_id) is None

    assert await redis_store.finalize(terminal(record, "succeeded")) is True
    stored = await redis_store.get(record.run_id)
    assert stored is not None
    assert stored.status == "succeeded"
    assert await store_event_types(redis_store, record.run_id) == ["run_started", "run_succeeded"]
    assert resets_seen == [None]
    # Noticed once: the marker is back, so the next renewal finds nothing to report.
    await redis_store.heartbeat("worker-a", 60)
    assert resets_seen == [None]


async def test_a_store_that_keeps_its_data_reports_no_reset(app: Replica) -> None:
    client = app.client
    created = await client.post("/v1/runs", json=sleep_body(2.5, 2))
    run_id = created.json()["run_id"]
    await poll_run(client, run_id, until="succeeded", within=5)  # two renewals, at least
    assert resets(app.logs) == []
    assert metric(await metrics_text(client), "quiesce_store_resets_total") == 0


async def test_a_repeated_idempotency_key_names_the_restored_run(
    app: Replica, redis_server: RedisServer
) -> None:
    """The key's claim is lost with the data; a retry must not start a second run."""
    client = app.client
    body = sleep_body(3.0, 2)
    headers = {"Idempotency-Key": "restored-key"}
    first = await client.post("/v1/runs", json=body, headers=headers)
    run_id = first.json()["run_id"]
    redis_server.flush()
    await poll_run(client, run_id, until="running", within=5)
    other_app = create_app(replace(services(client).settings, worker_id="worker-b"))
    async with AsyncTestClient(other_app) as other:  # another replica
        other.headers.update(AUTH)
        again = await other.post("/v1/runs", json=body, headers=headers)
        assert again.status_code == 202, again.text
        assert again.json()["run_id"] == run_id
        assert again.json()["worker_id"] == "worker-a"
        state = await other.get("/admin/state")
        assert state.json()["active_count"] == 0
    await poll_run(client, run_id, until="succeeded", within=5)


async def test_a_progress_event_after_a_reset_writes_the_run_back_and_is_kept(
    slow_lease_app: Replica, redis_server: RedisServer
) -> None:
    """No lease renewal before the run's next progress event: that append finds its run
    gone, the run is written back at once, and the event is not lost."""
    client = slow_lease_app.client
    created = await client.post("/v1/runs", json=sleep_body(2.0, 4))
    run_id = created.json()["run_id"]
    redis_server.flush()  # before the first step ends (0.5 s)
    await poll_run(client, run_id, until="running", within=1.5)  # back before its end (2 s)
    await poll_run(client, run_id, until="succeeded", within=5)
    response = await client.get(f"/v1/runs/{run_id}/events")
    events = response.json()["events"]
    assert [e["type"] for e in events] == ["run_started", *["run_progress"] * 4, "run_succeeded"]
    assert [e["data"]["step"] for e in events[1:5]] == [1, 2, 3, 4]
    assert len(resets(slow_lease_app.logs)) == 1


async def test_each_replica_notices_once_and_writes_back_only_its_own_runs(
    settings: Settings, redis_server: RedisServer
) -> None:
    app_a = create_app(replace(settings, redis_url=redis_server.url, lease_ttl_seconds=3))
    app_b = create_app(
        replace(settings, redis_url=redis_server.url, lease_ttl_seconds=3, worker_id="worker-b")
    )
    with structlog.testing.capture_logs() as logs:
        async with AsyncTestClient(app_a) as a, AsyncTestClient(app_b) as b:
            a.headers.update(AUTH)
            b.headers.update(AUTH)
            run_a = await started_run(a, 3.0)
            run_b = await started_run(b, 3.0)
            redis_server.flush()
            for client, run_id in ((a, run_a), (b, run_b)):
                await poll_run(client, run_id, until="succeeded", within=8)
            # Each run ended on its own worker, which took it off its list.
            lists = ("quiesce:{worker:worker-a}:runs", "quiesce:{worker:worker-b}:runs")
            with redis_server.client() as redis:
                deadline = time.monotonic() + 2
                while redis.exists(*lists):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            for client in (a, b):
                assert metric(await metrics_text(client), "quiesce_store_resets_total") == 1
            record_b = (await a.get(f"/v1/runs/{run_b}")).json()
            assert record_b["worker_id"] == "worker-b"
    assert len(resets(logs)) == 2
