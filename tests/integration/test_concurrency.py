"""A burst of concurrent creates on one replica with Redis: no 5xx, every run recorded.

``AsyncTestClient`` serializes requests (each one blocks until the app, on its own
loop, has answered), so the burst is sent from inside the app's loop with an
``httpx.ASGITransport``: the requests really are in flight at the same time, while
the app and its lifespan are the ones the test client runs.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.web.app import create_app
from tests.conftest import AUTH, RedisServer
from tests.integration.support import Client, metric, metrics_text, sleep_body

BURST = 256


@pytest.fixture
async def client(settings: Settings, redis_server: RedisServer) -> AsyncIterator[Client]:
    app = create_app(replace(settings, redis_url=redis_server.url, max_active_runs=1000))
    async with AsyncTestClient(app) as test_client:
        test_client.headers.update(AUTH)
        yield test_client


async def burst(client: Client, bodies: list[dict[str, Any]], **headers: str) -> list[Any]:
    """POST every body at once, on the app's loop; the responses in order."""

    async def send_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers={**AUTH, **headers}
        ) as http:
            return await asyncio.gather(*(http.post("/v1/runs", json=body) for body in bodies))

    return await asyncio.to_thread(client.blocking_portal.call, send_all)


async def test_a_burst_of_creates_is_all_202_and_all_recorded(
    client: Client, redis_server: RedisServer
) -> None:
    bodies = [sleep_body(0.05, metadata={"n": str(i)}) for i in range(BURST)]
    responses = await burst(client, bodies)
    statuses = Counter(response.status_code for response in responses)
    assert statuses == {202: BURST}, statuses

    run_ids = [response.json()["run_id"] for response in responses]
    assert len(set(run_ids)) == BURST
    for i, run_id in enumerate(run_ids):
        read = await client.get(f"/v1/runs/{run_id}")
        assert read.status_code == 200
        assert read.json()["metadata"] == {"n": str(i)}
    with redis_server.client() as redis:
        stored = {key.decode() for key in redis.scan_iter(match="quiesce:{run_*}:run")}
    assert stored == {f"quiesce:{{{run_id}}}:run" for run_id in run_ids}

    # Every run also finishes, and the gauge comes back to zero.
    for _ in range(100):
        text = await metrics_text(client)
        if metric(text, "quiesce_active_runs") == 0:
            break
        await asyncio.sleep(0.05)
    assert metric(text, "quiesce_active_runs") == 0
    assert metric(text, "quiesce_runs_started_total", task="sleep") == BURST
    assert metric(text, "quiesce_runs_finished_total", task="sleep", status="succeeded") == BURST
    assert metric(text, "quiesce_http_requests_total", route="/v1/runs", status="500") is None


async def test_a_burst_with_one_idempotency_key_makes_one_run(client: Client) -> None:
    responses = await burst(client, [sleep_body(0)] * 32, **{"Idempotency-Key": "same"})
    statuses = Counter(response.status_code for response in responses)
    assert set(statuses) <= {202, 409}, statuses
    admitted = [r for r in responses if r.status_code == 202]
    assert len({r.json()["run_id"] for r in admitted}) == 1
    assert sum(1 for r in admitted if "idempotent-replayed" not in r.headers) == 1
    text = await metrics_text(client)
    assert metric(text, "quiesce_runs_started_total", task="sleep") == 1
