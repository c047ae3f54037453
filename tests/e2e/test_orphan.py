"""A worker whose Granian main process died (SIGKILL outside a container) does not
live on as an orphan: it drains — its runs recorded ``failed``/``shutdown``, none
left ``running`` — and exits, instead of serving and renewing its lease forever."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from service.store.redis import RedisRunStore
from tests.e2e.conftest import ON_EVERY_LOOP, Server, terminal_history
from tests.e2e.test_drain import create_sleep, read_stream

pytestmark = [pytest.mark.e2e, ON_EVERY_LOOP]

#: The bound the test allows (the service's own is 2 s, see bench/orphan_exit.py).
EXIT_WITHIN_SECONDS = 5.0


def worker_pid(server: Server) -> int:
    """The worker's PID, from Granian's "Spawning worker-1 with PID: N" line."""
    for event in server.log_events():
        match = re.match(r"Spawning worker-\d+ with PID: (\d+)", str(event.get("event")))
        if match:
            return int(match.group(1))
    raise AssertionError(f"no worker PID in the log:\n{server.log()}")


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie left for its new parent to reap."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not is_running(pid):
            return
        time.sleep(0.02)
    raise AssertionError(f"worker {pid} still running {within}s after its parent died")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_a_worker_whose_main_process_died_drains_and_exits(
    server: Server, redis_store: RedisRunStore
) -> None:
    pid = worker_pid(server)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            run_id = await create_sleep(http, 60)
            # An open event stream must not keep the orphan alive.
            replayed = asyncio.Event()
            stream = asyncio.create_task(read_stream(server.url, run_id, replayed))
            await asyncio.wait_for(replayed.wait(), 5.0)  # the stream is open and served
            assert (await http.get(f"/v1/runs/{run_id}")).json()["status"] == "running"

            os.kill(server.process.pid, signal.SIGKILL)  # Granian's main process only
            server.process.wait()
            assert is_running(pid)
            await asyncio.to_thread(wait_gone, pid, EXIT_WITHIN_SECONDS)
            result = await asyncio.wait_for(stream, 5.0)
    finally:
        if is_running(pid):  # the fixture only stops a main process that still runs
            os.kill(pid, signal.SIGKILL)
    assert "event: run_started" in result.text

    record, history = await terminal_history(redis_store, run_id)
    assert record.status == "failed", record
    assert record.error is not None
    assert record.error.reason == "shutdown"
    assert history == ["run_started", "run_failed"]
    events = server.log_events()
    names = [e.get("event") for e in events]
    assert "granian_main_process_gone" in names, server.log()
    triggers = [e["trigger"] for e in events if e.get("event") == "drain_triggered"]
    assert triggers == ["parent_exited"]
    # It stopped through Granian's own path, not the last-resort exit.
    assert "orphan_exit_forced" not in names
    assert "stopped" in names
