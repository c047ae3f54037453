"""Two replicas on one Redis: cancel and event streams work from either of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.web.app import create_app
from tests.conftest import AUTH, RedisServer
from tests.integration.support import Client, events_of, raw_get, sleep_body, wait_for_run


@pytest.fixture
async def replicas(
    settings: Settings, redis_server: RedisServer
) -> AsyncIterator[tuple[Client, Client]]:
    """Replica A (worker-a) and replica B (worker-b), each with its own app and loop."""
    shared = replace(settings, redis_url=redis_server.url)
    app_a = create_app(replace(shared, worker_id="worker-a"))
    app_b = create_app(replace(shared, worker_id="worker-b"))
    async with AsyncTestClient(app_a) as a, AsyncTestClient(app_b) as b:
        a.headers.update(AUTH)
        b.headers.update(AUTH)
        yield a, b


async def test_a_run_on_a_is_cancelled_through_b(replicas: tuple[Client, Client]) -> None:
    a, b = replicas
    created = await a.post("/v1/runs", json=sleep_body(30, 3))
    assert created.status_code == 202
    run_id = created.json()["run_id"]
    assert created.json()["worker_id"] == "worker-a"
    on_b = await b.get(f"/v1/runs/{run_id}")
    assert on_b.status_code == 200
    assert on_b.json()["status"] == "running"
    assert (await b.get("/admin/state")).json()["active_count"] == 0

    cancel = await b.post(f"/v1/runs/{run_id}/cancel")
    assert cancel.status_code == 202
    record = await wait_for_run(b, run_id, within=1.0)
    assert record["status"] == "cancelled"
    assert record["error"]["reason"] == "cancelled"
    assert record["worker_id"] == "worker-a"
    # A's slot is free again: the cancel reached the task, not just the record.
    for _ in range(50):
        if (await a.get("/admin/state")).json()["active_count"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await a.get("/admin/state")).json()["active_count"] == 0
    page = (await a.get(f"/v1/runs/{run_id}/events")).json()
    assert [e["type"] for e in page["events"]] == ["run_started", "run_cancelled"]
    assert (await b.post(f"/v1/runs/{run_id}/cancel")).status_code == 200


async def test_a_stream_on_b_follows_a_run_on_a_live(replicas: tuple[Client, Client]) -> None:
    a, b = replicas
    created = await a.post("/v1/runs", json=sleep_body(0.6, 3))
    assert created.status_code == 202
    run_id = created.json()["run_id"]

    stream = await raw_get(b, f"/v1/runs/{run_id}/events/stream", max_seconds=5)
    assert stream.status == 200
    assert stream.ended, "the stream on B did not end with the terminal event"
    messages = events_of(stream.text)
    assert [m["event"] for m in messages] == [
        "run_started", "run_progress", "run_progress", "run_progress", "run_succeeded",
    ]  # fmt: skip
    assert messages[0]["data"]["data"] == {"worker_id": "worker-a", "attempt": 1}
    # Live, through B's notifications: progress arrived as A produced it.
    times = [at for at, chunk in stream.chunks if b"event: run_progress" in chunk]
    assert times[-1] - times[0] >= 0.3
    record = (await b.get(f"/v1/runs/{run_id}")).json()
    assert record["status"] == "succeeded"
