"""A slot moved to another master while its runs are written and watched.

The slot is migrated the way ``redis-cli --cluster reshard`` does it (IMPORTING /
MIGRATING, MIGRATE of its keys, SETSLOT NODE), in a thread, while progress events
keep being appended to runs in that slot: every append succeeds (``MOVED`` and
``ASK`` are followed by the client, never surfaced), the events all arrive in
order, and a watcher of a moved run is either woken or told its watch is lost (the
old node drops the channel), never left waiting silently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis

from service.store.redis import RedisRunStore
from service.store.redis_keys import KeyLayout, run_key
from tests.integration.test_store_contract import Listener, created, event_types, progress
from tests.topology.cluster import RedisClusterNodes

pytestmark = pytest.mark.topology


@pytest.fixture
async def cluster_store(redis_cluster: RedisClusterNodes) -> AsyncIterator[RedisRunStore]:
    store = RedisRunStore(redis_cluster.url, retention_seconds=3600)
    await store.start()
    yield store
    await store.close()


def node_id(port: int) -> str:
    with redis.Redis(port=port) as client:
        return str(client.execute_command("CLUSTER", "MYID").decode())


def move_slot(slot: int, source: int, target: int, others: list[int]) -> None:
    """Migrate one slot from master ``source`` to master ``target`` key by key; ``others``
    are the remaining masters."""
    source_id, target_id = node_id(source), node_id(target)
    with redis.Redis(port=source) as src, redis.Redis(port=target) as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            time.sleep(0.05)  # let writes meet the slot half-migrated (ASK, TRYAGAIN)
        for port in (target, source, *others):
            with redis.Redis(port=port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_writes_and_watches_follow_a_slot_that_moves(
    cluster_store: RedisRunStore, redis_cluster: RedisClusterNodes
) -> None:
    record = await created(cluster_store)
    with redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0]) as client:
        slot = client.keyslot(run_key(record.run_id))
    source = redis_cluster.master_of(run_key(record.run_id))
    target = next(port for port in redis_cluster.masters() if port != source)
    others = [port for port in redis_cluster.masters() if port not in (source, target)]

    appended: list[str | None] = []
    async with cluster_store.watch(record.run_id) as watch:
        woken = asyncio.create_task(watch.wait())
        moving = asyncio.create_task(asyncio.to_thread(move_slot, slot, source, target, others))
        step = 0
        while not moving.done():
            step += 1
            appended.append(await cluster_store.append(record.run_id, progress(step), seq=step))
            await asyncio.sleep(0.01)
        await moving
        for _ in range(3):  # after the move, on the new owner
            step += 1
            appended.append(await cluster_store.append(record.run_id, progress(step), seq=step))
        await asyncio.wait_for(woken, 3.0)

    assert redis_cluster.master_of(run_key(record.run_id)) == target
    assert None not in appended
    assert (
        await event_types(cluster_store, record.run_id) == ["run_started"] + ["run_progress"] * step
    )
    assert await cluster_store.get(record.run_id) == record
    # A new watch of the moved run is served by the new owner.
    async with cluster_store.watch(record.run_id) as again:
        woken = asyncio.create_task(again.wait())
        await asyncio.sleep(0.2)
        await cluster_store.append(record.run_id, progress(step + 1))
        await asyncio.wait_for(woken, 3.0)


async def test_cancels_reach_a_worker_whose_channel_slot_moved(
    redis_cluster: RedisClusterNodes,
) -> None:
    owner = RedisRunStore(redis_cluster.url, retention_seconds=3600)
    other = RedisRunStore(redis_cluster.url, retention_seconds=3600)
    listener = Listener()
    owner.listen_for_cancels("worker-moved", listener)
    await owner.start()
    await other.start()
    try:
        channel = KeyLayout(cluster=True).cancel_channel("worker-moved")
        with redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0]) as client:
            slot = client.keyslot(channel)
        source = redis_cluster.master_of(channel)
        target = next(port for port in redis_cluster.masters() if port != source)
        others = [port for port in redis_cluster.masters() if port not in (source, target)]
        await asyncio.to_thread(move_slot, slot, source, target, others)
        record = await created(other, worker_id="worker-moved")
        # The owner's listener follows the channel to its new node; until it has,
        # a cancel sent meanwhile is re-checked on its reconnect (the resync).
        deadline = time.monotonic() + 10
        while not listener.cancelled and time.monotonic() < deadline:
            await other.request_cancel(record.run_id)
            await asyncio.sleep(0.5)
        assert listener.cancelled[:1] == [record.run_id]
        assert redis_cluster.master_of(channel) == target
    finally:
        await owner.close()
        await other.close()
