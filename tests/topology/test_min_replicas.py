"""QUIESCE_REDIS_MIN_REPLICAS: a 202 means the run's record is on that many replicas.

A master and one replica of our own; the replica is paused (SIGSTOP) to make WAIT
time out, which is what a lagging or partitioned replica looks like to the master.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from litestar.testing import AsyncTestClient

from service.config import Settings
from service.scheduler import run_id_for_key
from service.web.app import create_app
from tests.conftest import AUTH, TOKEN, free_port
from tests.integration.support import sleep_body, wait_for_run
from tests.topology.conftest import Processes, wait_for

pytestmark = pytest.mark.topology


@dataclass
class Pair:
    master: int
    replica: int
    processes: Processes

    def replica_process(self) -> Any:
        return self.processes.started[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    directory: Path = tmp_path_factory.mktemp("pair")
    processes = Processes(directory)
    master, replica = free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
    try:
        processes.spawn("master", ["--port", str(master), *common])
        processes.spawn(
            "replica", ["--port", str(replica), *common, "--replicaof", "127.0.0.1", str(master)]
        )

        def in_sync() -> bool:
            with redis.Redis(port=replica) as client:
                return client.info("replication").get("master_link_status") == "up"

        wait_for(in_sync, "the replica to sync")
        yield Pair(master, replica, processes)
    finally:
        processes.stop()


@pytest.fixture
async def client(pair: Pair) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = Settings(
        worker_id="worker-a",
        api_token=TOKEN,
        shutdown_grace_seconds=0.5,
        log_format="json",
        redis_url=f"redis://127.0.0.1:{pair.master}/0",
        redis_min_replicas=1,
        redis_wait_timeout_seconds=0.3,
    )
    with redis.Redis(port=pair.master) as admin:
        admin.flushall()
    async with AsyncTestClient(create_app(settings)) as test_client:
        test_client.headers.update(AUTH)
        yield test_client


def on_replica(pair: Pair, run_id: str) -> bytes | None:
    with redis.Redis(port=pair.replica) as replica:
        value: bytes | None = replica.hget(f"quiesce:{{{run_id}}}:run", "record")
        return value


async def test_a_202_means_the_record_is_already_on_the_replica(
    client: AsyncTestClient[Any], pair: Pair
) -> None:
    response = await client.post("/v1/runs", json=sleep_body(0))
    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]
    # Read at once: the 202 was sent only after WAIT counted the replica.
    assert on_replica(pair, run_id) is not None
    record = await wait_for_run(client, run_id)
    assert record["status"] == "succeeded"


async def test_an_unconfirmed_create_is_a_503_and_its_retry_gets_the_run(
    client: AsyncTestClient[Any], pair: Pair
) -> None:
    key = {"Idempotency-Key": "confirm-me-please"}
    run_id = run_id_for_key("confirm-me-please")
    replica = pair.replica_process()
    replica.send_signal(signal.SIGSTOP)
    try:
        refused = await client.post("/v1/runs", json=sleep_body(0), headers=key)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert "replicas confirmed" in refused.json()["detail"]
        # Not admitted: no run to read (the unconfirmed write was taken back).
        assert (await client.get(f"/v1/runs/{run_id}")).status_code == 404
    finally:
        replica.send_signal(signal.SIGCONT)

    def caught_up() -> bool:
        with redis.Redis(port=pair.master) as master:
            return master.execute_command("WAIT", 1, 100) == 1

    wait_for(caught_up, "the replica to catch up")
    retried = await client.post("/v1/runs", json=sleep_body(0), headers=key)
    assert retried.status_code == 202, retried.text
    assert retried.json()["run_id"] == run_id
    assert on_replica(pair, run_id) is not None
    again = await client.post("/v1/runs", json=sleep_body(0), headers=key)
    assert again.status_code == 202
    assert again.json()["run_id"] == run_id
    record = await wait_for_run(client, run_id)
    assert record["status"] == "succeeded"


async def test_a_terminal_write_waits_for_the_replica(
    client: AsyncTestClient[Any], pair: Pair
) -> None:
    response = await client.post("/v1/runs", json=sleep_body(0.5))
    assert response.status_code == 202
    run_id = response.json()["run_id"]
    replica = pair.replica_process()
    replica.send_signal(signal.SIGSTOP)
    try:
        # The run ends while the replica is away: its terminal write is not confirmed,
        # so its owner keeps repeating it (the record on the master says succeeded
        # already; nothing is acknowledged yet).
        with structlog.testing.capture_logs() as logs:
            with redis.Redis(port=pair.master) as master:
                for _ in range(100):
                    if master.hget(f"quiesce:{{{run_id}}}:run", "status") == b"succeeded":
                        break
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the owner's first repeats
    finally:
        replica.send_signal(signal.SIGCONT)
    retries = [entry for entry in logs if entry["event"] == "finalize_retrying"]
    assert retries, logs
    assert all(entry["run_id"] == run_id for entry in retries)
    assert "replicas confirmed" in retries[0]["error"]
    record = await wait_for_run(client, run_id, within=10)
    assert record["status"] == "succeeded"
    raw = on_replica(pair, run_id)
    assert raw is not None
    assert b'"succeeded"' in raw
