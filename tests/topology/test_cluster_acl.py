"""The README's ACL rule plus its cluster line is exactly enough on a Redis Cluster.

Every node gets a user with the rule of "Redis requirements" and the additions of
"Redis topologies"; the service then creates, streams, cancels and reaps as that
user, and no node's ``ACL LOG`` may hold a refusal afterwards.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.metrics import Metrics
from service.reaper import Reaper
from service.store.redis import RedisRunStore
from service.web.app import create_app
from tests.conftest import AUTH
from tests.deploy.conftest import ROOT
from tests.deploy.test_redis_acl import PASSWORD, USER, readme_acl_rules
from tests.integration.support import sleep_body, wait_for_run
from tests.integration.test_store_contract import created, progress
from tests.topology.cluster import RedisClusterNodes

pytestmark = pytest.mark.topology


def cluster_acl_rules() -> list[str]:
    """The additions of the ``ACL SETUSER`` line in "Redis topologies"."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Redis topologies")
    section = readme[start : readme.index("\n## ", start)]
    (line,) = re.findall(r"^\s*(ACL SETUSER .*)$", section, flags=re.MULTILINE)
    words = shlex.split(line)
    assert words[:3] == ["ACL", "SETUSER", USER]
    return words[3:]


def acl_logs(nodes: RedisClusterNodes) -> list[object]:
    entries: list[object] = []
    for port in nodes.alive():
        with redis.Redis(port=port) as admin:
            entries.extend(admin.execute_command("ACL", "LOG"))
    return entries


@pytest.fixture
def acl_url(redis_cluster: RedisClusterNodes) -> Iterator[str]:
    rules = [*readme_acl_rules(), *cluster_acl_rules()]
    for port in redis_cluster.alive():
        with redis.Redis(port=port) as admin:
            admin.execute_command("ACL", "SETUSER", USER, "reset", *rules)
            admin.execute_command("ACL", "LOG", "RESET")
    try:
        yield f"redis://{USER}:{PASSWORD}@127.0.0.1:{redis_cluster.ports[0]}"
    finally:
        for port in redis_cluster.alive():
            with redis.Redis(port=port) as admin:
                admin.execute_command("ACL", "DELUSER", USER)
                admin.execute_command("ACL", "LOG", "RESET")


async def test_the_service_runs_on_a_cluster_under_the_readme_rules(
    acl_url: str, redis_cluster: RedisClusterNodes, settings: Settings
) -> None:
    app = create_app(replace(settings, redis_url=acl_url, worker_id="acl-worker"))
    async with AsyncTestClient(app) as client:
        client.headers.update(AUTH)
        assert (await client.get("/readyz")).status_code == 200
        headers = {"Idempotency-Key": "acl-cluster"}
        created_run = await client.post("/v1/runs", json=sleep_body(0.3, 3), headers=headers)
        assert created_run.status_code == 202, created_run.text
        run_id = created_run.json()["run_id"]
        stream = await client.get(f"/v1/runs/{run_id}/events/stream")
        assert "event: run_succeeded" in stream.text
        long_run = (await client.post("/v1/runs", json=sleep_body(30))).json()["run_id"]
        assert (await client.post(f"/v1/runs/{long_run}/cancel")).status_code == 202
        assert (await wait_for_run(client, long_run))["status"] == "cancelled"

    store = RedisRunStore(acl_url, retention_seconds=3600)
    await store.start()
    try:
        lost = await created(store, worker_id="lost-worker")
        async with store.watch(lost.run_id) as watch:
            woken = asyncio.create_task(watch.wait())
            assert await store.append(lost.run_id, progress(1)) is not None
            await asyncio.wait_for(woken, 2.0)
        await store.heartbeat("lost-worker", 0.05)
        await asyncio.sleep(0.1)
        reaper = Reaper(
            store=store, metrics=Metrics(max_active_runs=1), worker_id="r", lease_ttl_seconds=3
        )
        assert await reaper.reap_expired() == 1
    finally:
        await store.close()
    assert acl_logs(redis_cluster) == []
