"""A crash (SIGKILL of the whole pod) still leaves no run ``running``: leases expire
and a surviving replica, or the restarted worker itself, reaps the runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from service.store.redis import RedisRunStore
from tests.conftest import RedisServer
from tests.e2e.conftest import start_server, stop, terminal_history
from tests.e2e.test_drain import create_sleep, metric

pytestmark = pytest.mark.e2e

LEASE_SECONDS = 3.0


async def wait_reaped(store: RedisRunStore, run_ids: list[str], within: float) -> float:
    """Poll until every run is failed/worker_lost; how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        records = [await store.get(run_id) for run_id in run_ids]
        if all(r is not None and r.status == "failed" for r in records):
            for record in records:
                assert record is not None
                assert record.error is not None
                assert record.error.reason == "worker_lost"
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"runs still running {within}s after the crash")


async def test_a_surviving_replica_reaps_the_runs_of_a_crashed_one(
    tmp_path: Path, redis_server: RedisServer, redis_store: RedisRunStore
) -> None:
    lease = {"QUIESCE_LEASE_TTL_SECONDS": str(LEASE_SECONDS)}
    crashed = start_server(tmp_path, redis_server.url, QUIESCE_WORKER_ID="pod-a", **lease)
    survivor = start_server(tmp_path, redis_server.url, QUIESCE_WORKER_ID="pod-b", **lease)
    try:
        async with httpx.AsyncClient(base_url=crashed.url, timeout=5) as http:
            run_ids = [await create_sleep(http, 60) for _ in range(2)]
        crashed.crash()
        # The lease lapses within its TTL; the survivor reaps twice per TTL.
        await wait_reaped(redis_store, run_ids, within=3 * LEASE_SECONDS)
        for run_id in run_ids:
            _, history = await terminal_history(redis_store, run_id)
            assert history == ["run_started", "run_failed"]
        async with httpx.AsyncClient(base_url=survivor.url, timeout=5) as http:
            text = (await http.get("/metrics")).text
        assert metric(text, "quiesce_orphans_reaped_total") == 2
    finally:
        stop(crashed)
        stop(survivor)


async def test_a_worker_restarted_under_the_same_id_reaps_its_runs_at_start(
    tmp_path: Path, redis_server: RedisServer, redis_store: RedisRunStore
) -> None:
    first = start_server(tmp_path, redis_server.url, QUIESCE_WORKER_ID="pod-x")
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=5) as http:
            run_id = await create_sleep(http, 60)
        first.crash()
    finally:
        stop(first)
    # A long lease (15 s by default): only the restart can reap this quickly.
    second = start_server(tmp_path, redis_server.url, QUIESCE_WORKER_ID="pod-x")
    try:
        record, history = await terminal_history(redis_store, run_id)
        assert record.status == "failed"
        assert record.error is not None
        assert record.error.reason == "worker_lost"
        assert history == ["run_started", "run_failed"]
    finally:
        stop(second)
