"""QUIESCE_REDIS_MIN_REPLICAS on a Redis Cluster: a 202 means the run's record is on
the replica of the master that owns its slot.

WAIT counts the replicas of the one node it is sent to, so the store sends one to
every node a confirmed write went to. The replicas are paused (SIGSTOP) to make
WAIT time out — what a lagging or partitioned replica looks like to its master.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
import redis
from litestar.testing import AsyncTestClient
from redis.asyncio.cluster import RedisCluster

from service.config import Settings
from service.errors import StoreUnavailable
from service.scheduler import run_id_for_key
from service.store.redis_commands import CommandPipeline
from service.store.redis_keys import run_key, worker_runs_key
from service.web.app import create_app
from tests.conftest import AUTH, REPO
from tests.integration.support import sleep_body, wait_for_run
from tests.topology.cluster import RedisClusterNodes
from tests.topology.conftest import wait_for

pytestmark = pytest.mark.topology


@pytest.fixture
async def client(
    settings: Settings, redis_cluster: RedisClusterNodes
) -> AsyncIterator[AsyncTestClient[Any]]:
    confirmed = replace(
        settings,
        redis_url=redis_cluster.url,
        redis_min_replicas=1,
        redis_wait_timeout_seconds=0.3,
    )
    async with AsyncTestClient(create_app(confirmed)) as test_client:
        test_client.headers.update(AUTH)
        yield test_client


def replica_of(nodes: RedisClusterNodes, master: int) -> int:
    with redis.Redis(port=master) as client:
        info = client.info("replication")
    return int(info["slave0"]["port"])


def on_replica(nodes: RedisClusterNodes, run_id: str) -> bytes | None:
    """The run's record as the replica of its slot's master has it (READONLY)."""
    key = run_key(run_id)
    replica = replica_of(nodes, nodes.master_of(key))
    with redis.Redis(port=replica, single_connection_client=True) as client:
        client.execute_command("READONLY")
        value: bytes | None = client.hget(key, "record")
        return value


@contextmanager
def replicas_frozen(nodes: RedisClusterNodes) -> Iterator[None]:
    replicas = [port for port in nodes.alive() if port not in nodes.masters()]
    assert len(replicas) == 3
    for port in replicas:
        nodes.processes[port].send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for port in replicas:
            nodes.processes[port].send_signal(signal.SIGCONT)


async def test_a_202_means_the_record_is_on_the_replica_of_its_slot(
    client: AsyncTestClient[Any], redis_cluster: RedisClusterNodes
) -> None:
    run_ids = []
    for _ in range(12):  # spread over the three masters
        response = await client.post("/v1/runs", json=sleep_body(0))
        assert response.status_code == 202, response.text
        run_ids.append(response.json()["run_id"])
        # Read at once: the 202 was sent only after WAIT counted the replica.
        assert on_replica(redis_cluster, run_ids[-1]) is not None
    masters = {redis_cluster.master_of(run_key(run_id)) for run_id in run_ids}
    assert len(masters) > 1  # several nodes' WAITs in play, not one
    for run_id in run_ids:
        assert (await wait_for_run(client, run_id))["status"] == "succeeded"


async def test_an_unconfirmed_create_is_a_503_and_its_retry_gets_the_run(
    client: AsyncTestClient[Any], redis_cluster: RedisClusterNodes
) -> None:
    key = {"Idempotency-Key": "cluster-confirm-me"}
    run_id = run_id_for_key("cluster-confirm-me")
    with replicas_frozen(redis_cluster):
        refused = await client.post("/v1/runs", json=sleep_body(0), headers=key)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert "replicas confirmed" in refused.json()["detail"]
        # Not admitted: no run to read (the unconfirmed write was taken back).
        assert (await client.get(f"/v1/runs/{run_id}")).status_code == 404

    master = redis_cluster.master_of(run_key(run_id))

    def caught_up() -> bool:
        with redis.Redis(port=master) as client:
            return client.execute_command("WAIT", 1, 100) == 1

    wait_for(caught_up, "the replica to catch up")
    retried = await client.post("/v1/runs", json=sleep_body(0), headers=key)
    assert retried.status_code == 202, retried.text
    assert retried.json()["run_id"] == run_id
    assert on_replica(redis_cluster, run_id) is not None
    record = await wait_for_run(client, run_id)
    assert record["status"] == "succeeded"


async def test_each_create_is_judged_by_the_replica_of_its_own_master(
    client: AsyncTestClient[Any], redis_cluster: RedisClusterNodes, settings: Settings
) -> None:
    """One master's replica paused: sent together (one pipeline), the creates whose
    run is on that master get 503 and the others 202 — each node's WAIT counts for
    the writes sent to it. (A create also lists the run under its worker, a key on
    another slot: the paused master is chosen not to hold it.)"""
    worker_master = redis_cluster.master_of(worker_runs_key(settings.worker_id))
    keys = [f"cluster-judged-{n}" for n in range(24)]
    master_of = {key: redis_cluster.master_of(run_key(run_id_for_key(key))) for key in keys}
    paused = next(port for port in redis_cluster.masters() if port != worker_master)
    assert paused in master_of.values(), "no run on the paused master"
    assert set(master_of.values()) - {paused}, "every run on the paused master"
    replica = replica_of(redis_cluster, paused)
    redis_cluster.processes[replica].send_signal(signal.SIGSTOP)
    try:
        responses = await asyncio.gather(
            *(
                client.post("/v1/runs", json=sleep_body(0), headers={"Idempotency-Key": key})
                for key in keys
            )
        )
    finally:
        redis_cluster.processes[replica].send_signal(signal.SIGCONT)
    statuses = {key: response.status_code for key, response in zip(keys, responses, strict=True)}
    expected = {key: 503 if master_of[key] == paused else 202 for key in keys}
    assert statuses == expected, [r.text for r in responses]


async def test_one_pipeline_over_three_masters_judges_each_write_by_its_node(
    redis_cluster: RedisClusterNodes,
) -> None:
    """Writes queued together go out in one cluster pipeline; with one master's
    replica paused, exactly the writes on that master are unconfirmed."""
    cluster = RedisCluster.from_url(redis_cluster.url)
    pipeline = CommandPipeline(
        cluster, scripts=[], timeout=5, max_in_flight=1, min_replicas=1, wait_timeout=0.3
    )
    keys = [f"judged:{n}" for n in range(30)]
    master_of = {key: redis_cluster.master_of(key) for key in keys}
    paused = master_of[keys[0]]
    replica = replica_of(redis_cluster, paused)
    redis_cluster.processes[replica].send_signal(signal.SIGSTOP)
    try:
        # Queued in one loop turn: the first flush carries them all.
        outcomes = await asyncio.gather(
            *(pipeline.run([("SET", key, "v")], confirm=True) for key in keys),
            return_exceptions=True,
        )
    finally:
        redis_cluster.processes[replica].send_signal(signal.SIGCONT)
        await pipeline.close()
        await cluster.aclose()
    refused = {
        key
        for key, outcome in zip(keys, outcomes, strict=True)
        if isinstance(outcome, StoreUnavailable)
    }
    assert refused == {key for key in keys if master_of[key] == paused}
    assert all(
        outcome == [True] for key, outcome in zip(keys, outcomes, strict=True) if key not in refused
    )


def node_id(port: int) -> str:
    with redis.Redis(port=port) as client:
        return str(client.execute_command("CLUSTER", "MYID").decode())


@contextmanager
def frozen(nodes: RedisClusterNodes, port: int) -> Iterator[None]:
    nodes.processes[port].send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        nodes.processes[port].send_signal(signal.SIGCONT)


async def test_a_redirected_write_is_confirmed_where_it_ran(
    redis_cluster: RedisClusterNodes,
) -> None:
    """A slot being migrated (ASK), then moved (MOVED): the confirmed write runs on
    the new owner, and that node's replica is the one WAIT counts — with it paused
    the write is unconfirmed although the old owner's replica is well."""
    cluster = RedisCluster.from_url(redis_cluster.url)
    pipeline = CommandPipeline(cluster, scripts=[], timeout=5, min_replicas=1, wait_timeout=0.3)
    source = redis_cluster.master_of("{asked}")
    target = next(port for port in redis_cluster.masters() if port != source)
    target_replica = replica_of(redis_cluster, target)
    slot = cluster.keyslot("{asked}")
    try:
        assert await pipeline.run([("SET", "{asked}:0", "v")], confirm=True) == [True]
        with redis.Redis(port=source) as src, redis.Redis(port=target) as dst:
            # Only new keys from here on: every write in the slot is answered ASK.
            src.delete("{asked}:0")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(target))
        assert await pipeline.run([("SET", "{asked}:1", "v")], confirm=True) == [True]
        with redis.Redis(port=target_replica) as replica:
            assert b"{asked}:1" in replica.keys("{asked}:*")
        with (
            frozen(redis_cluster, target_replica),
            pytest.raises(StoreUnavailable, match="replicas confirmed"),
        ):
            await pipeline.run([("SET", "{asked}:2", "v")], confirm=True)
        for port in redis_cluster.masters():
            with redis.Redis(port=port) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id(target))
        with (
            frozen(redis_cluster, target_replica),
            pytest.raises(StoreUnavailable, match="replicas confirmed"),
        ):
            await pipeline.run([("SET", "{asked}:3", "v")], confirm=True)
        assert await pipeline.run([("SET", "{asked}:4", "v")], confirm=True) == [True]
        with redis.Redis(port=target_replica) as replica:
            assert b"{asked}:4" in replica.keys("{asked}:*")
        # Unconfirmed commands are still followed as the cluster client does.
        assert await pipeline.run([("GET", "{asked}:4")]) == [b"v"]
    finally:
        await pipeline.close()
        await cluster.aclose()


def _check(nodes: RedisClusterNodes) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "QUIESCE_REDIS_URL": nodes.url,
        "QUIESCE_REDIS_MIN_REPLICAS": "1",
        # The longest confirmation allowed: the replicas share two busy cores.
        "QUIESCE_REDIS_WAIT_TIMEOUT_SECONDS": "1.5",
        "QUIESCE_API_TOKEN": "t" * 32,
    }
    return subprocess.run(
        [sys.executable, "-m", "service", "check"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_quiesce_check_confirms_its_probe_on_the_replica_of_its_node(
    redis_cluster: RedisClusterNodes,
) -> None:
    passed = _check(redis_cluster)
    assert passed.returncode == 0, passed.stderr
    assert "confirmed by 1 replicas" in passed.stdout, passed.stdout
    with replicas_frozen(redis_cluster):
        refused = _check(redis_cluster)
    assert refused.returncode == 1, refused.stdout
    assert "replicas confirmed the probe write" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
