"""The main process dies while a normal drain is under way (the preStop hook started
it, with a long grace): the worker cuts what is left of that grace, records its runs
``failed``/``shutdown`` and exits — not after the grace it would have waited out."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.store.redis import RedisRunStore
from tests.conftest import RedisServer
from tests.e2e.conftest import ON_EVERY_LOOP, Server, start_server, stop, terminal_history
from tests.e2e.test_drain import create_sleep
from tests.e2e.test_orphan import EXIT_WITHIN_SECONDS, is_running, wait_gone, worker_pid

pytestmark = [pytest.mark.e2e, ON_EVERY_LOOP]

#: Far longer than the test may take: only a shortened grace lets the worker exit.
LONG_GRACE_SECONDS = 120


@pytest.fixture
def patient_server(tmp_path: Path, redis_server: RedisServer, worker_loop: str) -> Iterator[Server]:
    instance = start_server(
        tmp_path,
        redis_server.url,
        worker_loop=worker_loop,
        QUIESCE_SHUTDOWN_GRACE_SECONDS=str(LONG_GRACE_SECONDS),
    )
    yield instance
    stop(instance)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_the_main_process_dying_mid_drain_cuts_the_grace(
    patient_server: Server, redis_store: RedisRunStore
) -> None:
    server = patient_server
    pid = worker_pid(server)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            run_id = await create_sleep(http, 600)
            drain = await http.post("/admin/drain")
            assert drain.status_code == 202
            assert drain.json()["drain"]["grace_seconds"] == LONG_GRACE_SECONDS
            assert (await http.get("/readyz")).status_code == 503

            os.kill(server.process.pid, signal.SIGKILL)  # Granian's main process only
            server.process.wait()
            await asyncio.to_thread(wait_gone, pid, EXIT_WITHIN_SECONDS)
    finally:
        if is_running(pid):
            os.kill(pid, signal.SIGKILL)

    record, history = await terminal_history(redis_store, run_id)
    assert record.status == "failed", record
    assert record.error is not None
    assert record.error.reason == "shutdown"
    assert history == ["run_started", "run_failed"]
    events = server.log_events()
    triggers = [e["trigger"] for e in events if e.get("event") == "drain_triggered"]
    assert triggers == ["admin"]
    shortened = [e for e in events if e.get("event") == "drain_grace_shortened"]
    assert [e["trigger"] for e in shortened] == ["parent_exited"], server.log()
    assert "orphan_exit_forced" not in [e.get("event") for e in events]
