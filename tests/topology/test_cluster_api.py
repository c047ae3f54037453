"""The HTTP API end to end on a real Redis Cluster (Litestar's test client, two replicas).

The cross-replica tests of tests/integration run here again, on the cluster: a
cancel sent to replica B reaches the run on replica A through sharded Pub/Sub, and
a stream on B follows a run on A live.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.store.redis import RedisRunStore
from service.web.app import create_app
from tests.conftest import AUTH
from tests.integration.support import Client, events_of, raw_get, sleep_body, wait_for_run
from tests.integration.test_cross_replica import (
    test_a_run_on_a_is_cancelled_through_b,
    test_a_stream_on_b_follows_a_run_on_a_live,
)
from tests.integration.test_store_contract import created
from tests.topology.cluster import RedisClusterNodes

pytestmark = pytest.mark.topology

__all__ = [
    "test_a_run_on_a_is_cancelled_through_b",
    "test_a_stream_on_b_follows_a_run_on_a_live",
]


@pytest.fixture
async def replicas(
    settings: Settings, redis_cluster: RedisClusterNodes
) -> AsyncIterator[tuple[Client, Client]]:
    """Replicas A and B on the cluster, each given the URL of a different node."""
    shared = replace(settings, lease_ttl_seconds=3)
    url_b = f"redis://127.0.0.1:{redis_cluster.ports[1]}"
    app_a = create_app(replace(shared, worker_id="worker-a", redis_url=redis_cluster.url))
    app_b = create_app(replace(shared, worker_id="worker-b", redis_url=url_b))
    async with AsyncTestClient(app_a) as a, AsyncTestClient(app_b) as b:
        a.headers.update(AUTH)
        b.headers.update(AUTH)
        yield a, b


async def test_runs_are_created_paged_and_streamed(replicas: tuple[Client, Client]) -> None:
    a, _ = replicas
    run_ids = []
    for _ in range(10):  # spread over the cluster's slots
        response = await a.post("/v1/runs", json=sleep_body(0.2, 2))
        assert response.status_code == 202, response.text
        run_ids.append(response.json()["run_id"])
    for run_id in run_ids:
        assert (await wait_for_run(a, run_id))["status"] == "succeeded"
        page = (await a.get(f"/v1/runs/{run_id}/events", params={"limit": 2})).json()
        assert [e["type"] for e in page["events"]] == ["run_started", "run_progress"]
        rest = await a.get(f"/v1/runs/{run_id}/events", params={"after": page["next_cursor"]})
        assert [e["type"] for e in rest.json()["events"]] == ["run_progress", "run_succeeded"]
    stream = await raw_get(a, f"/v1/runs/{run_ids[0]}/events/stream", max_seconds=5)
    assert stream.status == 200
    assert stream.ended
    assert [m["event"] for m in events_of(stream.text)][-1] == "run_succeeded"


async def test_an_idempotent_create_is_replayed_on_the_other_replica(
    replicas: tuple[Client, Client],
) -> None:
    a, b = replicas
    headers = {"Idempotency-Key": "cluster-key-1"}
    first = await a.post("/v1/runs", json=sleep_body(0.1), headers=headers)
    again = await b.post("/v1/runs", json=sleep_body(0.1), headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["run_id"] == first.json()["run_id"]


async def test_a_lost_workers_run_is_reaped_by_a_live_replica(
    replicas: tuple[Client, Client], redis_cluster: RedisClusterNodes
) -> None:
    a, _ = replicas
    lost = RedisRunStore(redis_cluster.url, retention_seconds=3600)
    await lost.start()
    try:
        orphans = [await created(lost, worker_id="worker-gone") for _ in range(5)]
        await lost.heartbeat("worker-gone", 0.05)
    finally:
        await lost.close()
    for orphan in orphans:
        record = await wait_for_run(a, orphan.run_id, within=10.0)
        assert record["status"] == "failed"
        assert record["error"]["reason"] == "worker_lost"
        events = (await a.get(f"/v1/runs/{orphan.run_id}/events")).json()["events"]
        assert [e["type"] for e in events] == ["run_started", "run_failed"]


async def test_a_run_left_running_under_a_live_worker_is_ended_by_that_worker(
    replicas: tuple[Client, Client], redis_cluster: RedisClusterNodes
) -> None:
    """What a failover that lost a terminal write leaves: a run that reads running,
    listed under worker A, which is alive (its lease never expires) but no longer
    executes it. A ends it within two reaper passes."""
    a, _ = replicas
    writer = RedisRunStore(redis_cluster.url, retention_seconds=3600)
    await writer.start()
    try:
        stale = await created(writer, worker_id="worker-a")
    finally:
        await writer.close()
    record = await wait_for_run(a, stale.run_id, within=15.0)
    assert record["status"] == "failed"
    assert record["error"] == {
        "reason": "worker_lost",
        "message": "worker worker-a no longer executes the run",
    }
    assert (await a.get("/admin/state")).json()["active_count"] == 0
