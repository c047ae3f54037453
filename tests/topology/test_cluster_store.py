"""The Redis store on a real 3-master, 3-replica cluster: mode, key layout, notifications.

The contract suite (tests/integration/test_store_contract.py) already runs every
store operation on the cluster; a script or pipeline touching two slots would fail
there with CROSSSLOT. These tests pin what is specific to the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import redis

from service.config import ConfigError, Settings
from service.store.redis import RedisRunStore
from service.store.redis_cluster import CLUSTER_MIN_VERSION, RedisModeMismatch, _version
from service.store.redis_keys import LEASE_SHARDS, KeyLayout, events_key, run_key
from tests.conftest import REPO, RedisServer
from tests.integration.test_store_contract import created, progress
from tests.topology.cluster import RedisClusterNodes

pytestmark = pytest.mark.topology


@pytest.fixture
async def cluster_store(redis_cluster: RedisClusterNodes) -> AsyncIterator[RedisRunStore]:
    store = RedisRunStore(redis_cluster.url, retention_seconds=3600)
    await store.start()
    yield store
    await store.close()


def test_the_mode_variable_accepts_the_four_modes_and_nothing_else() -> None:
    for mode in ("auto", "standalone", "cluster", "sentinel"):
        assert Settings.from_env({"QUIESCE_REDIS_MODE": mode}).redis_mode == mode
    assert Settings.from_env({}).redis_mode == "auto"
    with pytest.raises(ConfigError, match=r"^QUIESCE_REDIS_MODE: expected one of"):
        Settings.from_env({"QUIESCE_REDIS_MODE": "clustered"})


async def test_auto_detects_a_cluster_node_and_a_single_server(
    redis_cluster: RedisClusterNodes, redis_server: RedisServer
) -> None:
    on_cluster = RedisRunStore(redis_cluster.url, retention_seconds=3600)
    on_server = RedisRunStore(redis_server.url, retention_seconds=3600)
    try:
        await on_cluster.start()
        await on_server.start()
        assert on_cluster.cluster
        assert not on_server.cluster
        # A run lands on whichever master owns its slot, not only the URL's node.
        records = [await created(on_cluster) for _ in range(12)]
        owners = {redis_cluster.master_of(run_key(r.run_id)) for r in records}
        assert len(owners) > 1
        for record in records:
            assert await on_cluster.get(record.run_id) == record
    finally:
        await on_cluster.close()
        await on_server.close()


@pytest.mark.parametrize(
    ("mode", "target", "says"),
    [
        ("standalone", "redis_cluster", "is a Redis Cluster node"),
        ("cluster", "redis_server", "is not a Redis Cluster node"),
    ],
)
async def test_a_forced_mode_the_server_contradicts_stops_start_up(
    mode: str, target: str, says: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(target).url
    store = RedisRunStore(url, retention_seconds=3600, mode=mode)  # type: ignore[arg-type]
    try:
        with pytest.raises(RedisModeMismatch, match=f"^QUIESCE_REDIS_MODE: '{mode}', .*{says}"):
            await store.start()
    finally:
        await store.close()


def test_serve_reports_a_contradicted_mode_in_one_line(redis_cluster: RedisClusterNodes) -> None:
    env = {
        **os.environ,
        "QUIESCE_REDIS_URL": redis_cluster.url,
        "QUIESCE_REDIS_MODE": "standalone",
        "QUIESCE_API_TOKEN": "t" * 32,
        "PORT": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "configuration error: QUIESCE_REDIS_MODE: 'standalone', but the server at the URL "
        "is a Redis Cluster node (unset it to detect the mode)"
    ]


async def test_keys_of_a_run_share_one_slot(
    cluster_store: RedisRunStore, redis_cluster: RedisClusterNodes
) -> None:
    record = await created(cluster_store)
    await cluster_store.append(record.run_id, progress(1))
    with redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0]) as client:
        slots = {client.keyslot(key) for key in (run_key(record.run_id), events_key(record.run_id))}
        slots.add(client.keyslot(KeyLayout(cluster=True).events_channel(record.run_id)))
        assert len(slots) == 1
        assert client.exists(run_key(record.run_id), events_key(record.run_id)) == 2


async def test_leases_spread_over_shards_that_the_reaper_reads_in_one_pass(
    cluster_store: RedisRunStore, redis_cluster: RedisClusterNodes
) -> None:
    layout = KeyLayout(cluster=True)
    workers = [f"worker-{i}" for i in range(24)]
    for worker in workers:
        await cluster_store.heartbeat(worker, 0.05)
    await asyncio.sleep(0.1)
    with redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0]) as client:
        used = [key for key in layout.lease_keys() if client.zcard(key)]
        owners = {redis_cluster.master_of(key) for key in used}
    assert len(layout.lease_keys()) == LEASE_SHARDS
    assert len(used) > 2
    assert len(owners) > 1
    assert sorted(await cluster_store.expired_workers()) == sorted(workers)
    for worker in workers:
        await cluster_store.forget(worker, [])
    assert await cluster_store.expired_workers() == []


async def test_events_are_announced_on_the_owning_node_only(
    cluster_store: RedisRunStore, redis_cluster: RedisClusterNodes
) -> None:
    record = await created(cluster_store)
    channel = KeyLayout(cluster=True).events_channel(record.run_id)
    owner = redis_cluster.master_of(channel)
    async with cluster_store.watch(record.run_id) as watch:
        await asyncio.sleep(0.2)  # subscribed
        with redis.Redis(port=owner) as client:
            assert client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1
            assert client.execute_command("PUBSUB", "NUMSUB", channel)[1] == 0
        waiter = asyncio.create_task(watch.wait())
        await cluster_store.append(record.run_id, progress(1))
        await asyncio.wait_for(waiter, 2.0)
    # One Pub/Sub connection per master, however many runs are watched.
    async with contextlib.AsyncExitStack() as watching:
        for _ in range(20):
            watched = await created(cluster_store)
            await watching.enter_async_context(cluster_store.watch(watched.run_id))
        await asyncio.sleep(0.2)
        for port in redis_cluster.masters():
            with redis.Redis(port=port) as client:
                subscribers = [c for c in client.client_list() if int(c.get("ssub", 0) or 0) > 0]
                assert len(subscribers) == 1, port


async def test_a_lease_renewal_writes_back_a_running_run_the_store_lost(
    cluster_store: RedisRunStore, redis_cluster: RedisClusterNodes
) -> None:
    record = await created(cluster_store, worker_id="worker-a")
    cluster_store.on_reset(running=lambda: [record], reset=lambda: None)
    with redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0]) as client:
        # What a failover that lost the master's last writes leaves behind.
        client.delete(run_key(record.run_id), events_key(record.run_id))
        client.delete("quiesce:{worker:worker-a}:runs")
    assert await cluster_store.get(record.run_id) is None
    await cluster_store.heartbeat("worker-a", 15)
    assert await cluster_store.get(record.run_id) == record
    assert await cluster_store.runs_of("worker-a") == [record.run_id]


def test_cluster_mode_needs_redis_7_for_sharded_pubsub() -> None:
    assert _version("6.2.14") < CLUSTER_MIN_VERSION <= _version("7.0.15")
    assert _version("7.2.4") >= CLUSTER_MIN_VERSION
    assert _version("") < CLUSTER_MIN_VERSION  # unknown: refused, not guessed


def test_a_connection_lost_inside_a_cluster_pipeline_is_an_outage_not_an_error() -> None:
    """The cluster pipeline returns a node's lost connection as a command's result."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from service.errors import StoreUnavailable
    from service.store.redis_commands import _as_unavailable

    assert isinstance(_as_unavailable(RedisConnectionError("reset")), StoreUnavailable)
    assert isinstance(_as_unavailable(TimeoutError()), StoreUnavailable)
    assert _as_unavailable(b"reply") == b"reply"


def test_quiesce_check_passes_on_a_cluster(redis_cluster: RedisClusterNodes) -> None:
    env = {**os.environ, "QUIESCE_REDIS_URL": redis_cluster.url, "QUIESCE_API_TOKEN": "t" * 32}
    result = subprocess.run(
        [sys.executable, "-m", "service", "check"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "probe key written, read and deleted; scripts loaded" in result.stdout
    # The topology it found: three masters and their three replicas.
    assert "mode cluster" in result.stdout, result.stdout
    assert result.stdout.count("(master)") == 3, result.stdout
    assert result.stdout.count("(replica)") == 3, result.stdout
