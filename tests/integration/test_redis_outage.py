"""Redis goes away and comes back: 503s (never 500s, never hangs), then recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
import structlog
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.scheduler import run_id_for_key
from service.web.app import create_app
from tests.conftest import AUTH, RedisServer
from tests.integration.support import (
    Client,
    events_of,
    metric,
    metrics_text,
    raw_get,
    sleep_body,
    wait_for_run,
)

#: "No hang": a store call gives up after 2 s, so a request answers well within this.
ANSWER_WITHIN_SECONDS = 5.0


@pytest.fixture
async def client(settings: Settings, redis_server: RedisServer) -> AsyncIterator[Client]:
    app = create_app(replace(settings, redis_url=redis_server.url))
    async with AsyncTestClient(app) as test_client:
        test_client.headers.update(AUTH)
        yield test_client


async def timed(request: Any) -> tuple[Any, float]:
    started = time.monotonic()
    response = await request
    return response, time.monotonic() - started


async def store_errors(client: Client) -> float:
    total = 0.0
    text = await metrics_text(client)
    for line in text.splitlines():
        if line.startswith("quiesce_store_errors_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_an_outage_is_503_and_the_app_recovers_without_a_restart(
    client: Client, redis_server: RedisServer
) -> None:
    record = await client.post("/v1/runs", json=sleep_body(0))
    assert record.status_code == 202
    run_id = record.json()["run_id"]
    await wait_for_run(client, run_id)
    assert await store_errors(client) == 0

    redis_server.stop()

    create, elapsed = await timed(client.post("/v1/runs", json=sleep_body(0)))
    assert create.status_code == 503, create.text
    assert int(create.headers["retry-after"]) >= 1
    assert create.json()["status_code"] == 503
    assert elapsed < ANSWER_WITHIN_SECONDS

    for path in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/events"):
        read, elapsed = await timed(client.get(path))
        assert read.status_code == 503, (path, read.text)
        assert elapsed < ANSWER_WITHIN_SECONDS
    cancel, elapsed = await timed(client.post(f"/v1/runs/{run_id}/cancel"))
    assert cancel.status_code == 503
    assert elapsed < ANSWER_WITHIN_SECONDS

    ready, elapsed = await timed(client.get("/readyz"))
    assert ready.status_code == 503
    assert ready.json() == {"status": "store_unavailable"}
    assert elapsed < ANSWER_WITHIN_SECONDS
    health = await client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["state"] == "ready"

    assert await store_errors(client) >= 4
    text = await metrics_text(client)
    assert metric(text, "quiesce_runs_rejected_total", reason="store_unavailable") == 1
    assert metric(text, "quiesce_active_runs") == 0  # the refused create holds no slot
    assert metric(text, "quiesce_http_requests_total", status="500") is None

    redis_server.start()  # empty: the earlier run is gone

    deadline = time.monotonic() + 5
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, "readiness did not recover within 5 s"
        await asyncio.sleep(0.05)
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    # The empty restart is noticed (once) as a store reset; a stream open at that
    # moment would end with a retry hint, so the one below opens after it.
    deadline = time.monotonic() + 5
    while metric(await metrics_text(client), "quiesce_store_resets_total") != 1:
        assert time.monotonic() < deadline, "the store reset was not noticed within 5 s"
        await asyncio.sleep(0.05)

    deadline = time.monotonic() + 5
    while (created := await client.post("/v1/runs", json=sleep_body(0.3, 3))).status_code != 202:
        assert created.status_code == 503, created.text
        assert time.monotonic() < deadline, "creates did not recover within 5 s"
        await asyncio.sleep(0.05)
    new_id = created.json()["run_id"]
    # The event notifications are back too: a live stream follows the new run to its end.
    stream = await raw_get(client, f"/v1/runs/{new_id}/events/stream", max_seconds=5)
    assert stream.ended
    assert [m["event"] for m in events_of(stream.text)][-1] == "run_succeeded"
    assert (await client.get(f"/v1/runs/{run_id}")).status_code == 404


async def test_a_run_that_finishes_during_an_outage_is_recorded_once_redis_is_back(
    client: Client, redis_server: RedisServer
) -> None:
    """The terminal write is retried; it lands when Redis answers again.

    Redis comes back empty, so the record is gone and the write finds no run: the
    scheduler must give up cleanly (no crash, the slot is freed), not loop forever.
    """
    created = await client.post("/v1/runs", json=sleep_body(0.2))
    assert created.status_code == 202
    redis_server.stop()
    await asyncio.sleep(0.5)  # the run ends while Redis is away
    redis_server.start()
    deadline = time.monotonic() + 8
    while metric(await metrics_text(client), "quiesce_active_runs") != 0:
        assert time.monotonic() < deadline, "the run's slot was never freed"
        await asyncio.sleep(0.1)


@pytest.fixture
def frozen_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The test's own redis-server, to be frozen with SIGSTOP (always thawed after)."""
    yield redis_server
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGCONT)


def freeze(server: RedisServer, *, frozen: bool) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP if frozen else signal.SIGCONT)


async def test_a_redis_that_stops_answering_is_503_within_seconds(
    client: Client, frozen_redis: RedisServer
) -> None:
    """A frozen Redis (a partition, a stalled primary) accepts connections but never
    replies: only the client's timeouts stand between a request and a hang. The README
    promises "never a hang: a store call gives up after 2 s"."""
    key = "frozen-create"
    freeze(frozen_redis, frozen=True)

    ready, elapsed = await timed(client.get("/readyz"))
    assert ready.status_code == 503
    assert ready.json() == {"status": "store_unavailable"}
    assert elapsed < 1.5  # a probe's timeout is 1 s by default

    create, elapsed = await timed(
        client.post("/v1/runs", json=sleep_body(0), headers={"Idempotency-Key": key})
    )
    assert create.status_code == 503, create.text
    assert "retry-after" in create.headers
    assert elapsed < ANSWER_WITHIN_SECONDS, f"a create took {elapsed:.1f}s to fail"

    read, elapsed = await timed(client.get("/v1/runs/run_" + "b" * 26))
    assert read.status_code == 503
    assert elapsed < ANSWER_WITHIN_SECONDS, f"a read took {elapsed:.1f}s to fail"
    assert (await client.get("/healthz")).status_code == 200

    freeze(frozen_redis, frozen=False)
    deadline = time.monotonic() + 5
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, "readiness did not recover within 5 s"
        await asyncio.sleep(0.05)
    # The client's retry of the refused create is admitted and runs. The refused
    # create's claim lands when Redis thaws and is released by its undo a moment later
    # (its first try may time out with the freeze); meanwhile the key answers 409.
    deadline = time.monotonic() + 5
    while (
        retried := await client.post(
            "/v1/runs", json=sleep_body(0), headers={"Idempotency-Key": key}
        )
    ).status_code == 409:
        assert time.monotonic() < deadline, "the refused create's claim was never released"
        await asyncio.sleep(0.1)
    assert retried.status_code == 202, retried.text
    assert retried.json()["run_id"] == run_id_for_key(key)
    assert (await wait_for_run(client, run_id_for_key(key)))["status"] == "succeeded"


async def test_a_create_refused_with_503_never_appears_later(
    client: Client, frozen_redis: RedisServer
) -> None:
    """The frozen Redis keeps the create it was sent and runs it once thawed, after the
    client was told 503: the store then removes it, so the 503 stays true."""
    warm = await client.post("/v1/runs", json=sleep_body(0))  # Redis knows the scripts
    await wait_for_run(client, warm.json()["run_id"])
    freeze(frozen_redis, frozen=True)
    with structlog.testing.capture_logs() as logs:
        await undone_create(client, frozen_redis)
    assert "late_create_discarded" in [e["event"] for e in logs]  # it landed, then went


async def undone_create(client: Client, frozen_redis: RedisServer) -> None:
    refused = await client.post("/v1/runs", json=sleep_body(30))
    assert refused.status_code == 503
    freeze(frozen_redis, frozen=False)
    with frozen_redis.client() as redis:

        def leftovers() -> list[bytes]:
            runs = redis.keys("quiesce:{run_*}:run")
            running = [key for key in runs if redis.hget(key, "status") != b"succeeded"]
            return [*running, *redis.smembers("quiesce:{worker:worker-a}:runs")]

        # The queued create and its undo both run once Redis is back.
        deadline = time.monotonic() + 8
        while leftovers():
            assert time.monotonic() < deadline, leftovers()
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        assert leftovers() == []
    assert metric(await metrics_text(client), "quiesce_active_runs") == 0


async def test_a_drain_that_cannot_write_says_what_it_left_running(
    client: Client, frozen_redis: RedisServer
) -> None:
    """Redis stops answering just before a drain: the drain still ends on time, and
    reports the runs it could not finalize (a peer reaps them once the lease lapses)."""
    for _ in range(3):
        assert (await client.post("/v1/runs", json=sleep_body(60))).status_code == 202
    freeze(frozen_redis, frozen=True)
    try:
        started = time.monotonic()
        drained = await client.post("/admin/drain", params={"wait": 5})
        assert time.monotonic() - started < 0.5 + 2  # the grace and the write budget
        drain = drained.json()["drain"]
        assert drain["finished"] is True
        assert drain["left_running"] == 3
    finally:
        freeze(frozen_redis, frozen=False)
