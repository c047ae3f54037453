"""An EventSource's view of store trouble, against the real server.

While a stream is open Redis is stopped (then restarted empty) or frozen. The
stream must end with a ``retry:`` hint — not hang until a keep-alive, not close
without a word — and the client's reconnect (with ``Last-Event-ID``) must get the
ordinary answers: 503 + ``Retry-After`` while the store is down, 404 once it is
back without the run, the stream again once it is back with it (a run the replica
still executes is written back when it notices the store was reset).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest

from tests.conftest import RedisServer
from tests.e2e.conftest import Server

#: Failure conditions only (the service aims at about 2 s).
GENEROUS_SECONDS = 20.0
#: Below the stream's 15 s keep-alive, whose store read would end it anyway.
STREAM_ENDS_WITHIN_SECONDS = 10.0

pytestmark = pytest.mark.slow


@pytest.fixture
def thawed_after(redis_server: RedisServer) -> Iterator[RedisServer]:
    yield redis_server
    if redis_server.process is not None:
        os.kill(redis_server.process.pid, signal.SIGCONT)


async def follow_until_store_trouble(
    client: httpx.AsyncClient, run_id: str, trouble: asyncio.Event
) -> tuple[str, list[str]]:
    """Read a stream; set ``trouble`` once it has sent the run's first event.

    Returns the last event id seen and every line after the trouble started.
    """
    last_id = ""
    after: list[str] = []
    async with client.stream("GET", f"/v1/runs/{run_id}/events/stream") as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                last_id = line.removeprefix("id: ")
            if trouble.is_set():
                after.append(line)
            elif line == "event: run_started":
                trouble.set()
    return last_id, after


async def open_then(
    client: httpx.AsyncClient, cause_trouble: Callable[[], object]
) -> tuple[str, str]:
    """Create a long run, follow its stream, cause the trouble; the stream must end.

    Returns the run's id and the last event id the stream sent.
    """
    created = await client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 120}})
    assert created.status_code == 202, created.text
    run_id = created.json()["run_id"]
    trouble = asyncio.Event()
    reading = asyncio.create_task(follow_until_store_trouble(client, run_id, trouble))
    await asyncio.wait_for(trouble.wait(), GENEROUS_SECONDS)
    cause_trouble()
    last_id, lines = await asyncio.wait_for(reading, STREAM_ENDS_WITHIN_SECONDS)
    assert "retry: 1000" in lines, lines
    assert any("store is unavailable" in line for line in lines), lines
    return run_id, last_id


async def resume(client: httpx.AsyncClient, run_id: str, last_id: str) -> httpx.Response:
    """The EventSource's reconnect: the same URL with Last-Event-ID."""
    request = client.build_request(
        "GET", f"/v1/runs/{run_id}/events/stream", headers={"Last-Event-ID": last_id}
    )
    response = await client.send(request, stream=True)
    await response.aclose()
    return response


async def wait_ready(client: httpx.AsyncClient) -> None:
    deadline = asyncio.get_running_loop().time() + GENEROUS_SECONDS
    while (await client.get("/readyz")).status_code != 200:
        assert asyncio.get_running_loop().time() < deadline, "never ready again"
        await asyncio.sleep(0.05)


async def test_redis_stopped_then_back_empty(server: Server, redis_server: RedisServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=GENEROUS_SECONDS) as client:
        finished = await client.post("/v1/runs", json={"task": "sleep", "input": {"seconds": 0}})
        finished_id = finished.json()["run_id"]
        await wait_for(lambda: status_of(client, finished_id), "succeeded")
        run_id, last_id = await open_then(client, redis_server.stop)
        down = await resume(client, run_id, last_id)
        assert down.status_code == 503
        assert int(down.headers["retry-after"]) >= 1

        redis_server.start()  # empty: every run is gone
        await wait_ready(client)
        # A finished run went with the data: the reconnect is told so.
        gone = await resume(client, finished_id, last_id)
        assert gone.status_code == 404
        # The run this replica still executes is written back once the reset is
        # noticed, and its stream is served again.
        await wait_for(lambda: status_of(client, run_id), "running")
        back = await resume(client, run_id, last_id)
        assert back.status_code == 200


async def status_of(client: httpx.AsyncClient, run_id: str) -> str | None:
    response = await client.get(f"/v1/runs/{run_id}")
    return response.json()["status"] if response.status_code == 200 else None


async def wait_for(read: Callable[[], Awaitable[object]], expected: object) -> None:
    deadline = asyncio.get_running_loop().time() + GENEROUS_SECONDS
    while await read() != expected:
        assert asyncio.get_running_loop().time() < deadline, f"never {expected}"
        await asyncio.sleep(0.05)


async def test_redis_frozen_then_thawed(server: Server, thawed_after: RedisServer) -> None:
    process = thawed_after.process
    assert process is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=GENEROUS_SECONDS) as client:
        run_id, last_id = await open_then(client, lambda: os.kill(process.pid, signal.SIGSTOP))
        down = await resume(client, run_id, last_id)
        assert down.status_code == 503
        assert int(down.headers["retry-after"]) >= 1

        os.kill(process.pid, signal.SIGCONT)
        await wait_ready(client)
        back = await resume(client, run_id, last_id)
        assert back.status_code == 200
        assert back.headers["content-type"].startswith("text/event-stream")
