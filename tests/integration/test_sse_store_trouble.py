"""An open event stream while Redis goes away, freezes or loses everything.

The stream must never wait, unaware, for a wake-up that cannot come: it ends with a
``retry:`` hint, so the client reconnects and then gets the ordinary 503 (store
down) or 404 (run gone). The keep-alive interval is set far beyond the tests'
timeouts, so only the store trouble itself can end these streams in time.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest

from service.store.redis import RedisRunStore
from service.web.sse import event_stream
from tests.conftest import RedisServer
from tests.integration.test_store_contract import created

OPENED = b": stream opened\n\n"
#: Longer than any test waits: a stream ended by a keep-alive read fails the test.
NEVER_SECONDS = 600.0
#: A failure condition only (the service aims at about 2 s).
ENDS_WITHIN_SECONDS = 15.0


@pytest.fixture
def thawed_after(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The test's Redis; whatever the test did to it, running and thawed afterwards."""
    yield redis_server
    if redis_server.process is not None:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    redis_server.start()


async def open_stream(store: RedisRunStore) -> tuple[str, AsyncIterator[bytes]]:
    """A run, and a stream on it that has replayed everything and now waits."""
    record = await created(store)
    stream = event_stream(
        store,
        record.run_id,
        after=None,
        draining=asyncio.Event(),
        keepalive_seconds=NEVER_SECONDS,
    )
    assert await anext(stream) == OPENED
    assert b"event: run_started" in await anext(stream)
    return record.run_id, stream


async def rest_of(stream: AsyncIterator[bytes]) -> list[bytes]:
    async def drain() -> list[bytes]:
        return [chunk async for chunk in stream]

    return await asyncio.wait_for(drain(), ENDS_WITHIN_SECONDS)


async def waiting(stream: AsyncIterator[bytes]) -> asyncio.Task[list[bytes]]:
    """Start reading the rest of the stream; return once it waits for a wake-up."""
    task = asyncio.create_task(rest_of(stream))
    await asyncio.sleep(0.3)
    assert not task.done(), task
    return task


def ended_with_retry(chunks: list[bytes]) -> bool:
    return bool(chunks) and chunks[-1].startswith(b"retry: 1000\n")


async def test_a_stream_ends_with_retry_when_redis_stops(
    redis_store: RedisRunStore, thawed_after: RedisServer
) -> None:
    _, stream = await open_stream(redis_store)
    task = await waiting(stream)
    thawed_after.stop()
    chunks = await task
    assert ended_with_retry(chunks), chunks
    assert b"store is unavailable" in chunks[-1]


async def test_a_stream_ends_with_retry_when_redis_freezes(
    redis_store: RedisRunStore, thawed_after: RedisServer
) -> None:
    """A frozen Redis (SIGSTOP) keeps the connection open but answers nothing."""
    _, stream = await open_stream(redis_store)
    task = await waiting(stream)
    assert thawed_after.process is not None
    os.kill(thawed_after.process.pid, signal.SIGSTOP)
    chunks = await task
    assert ended_with_retry(chunks), chunks


async def test_a_stream_whose_run_vanished_ends_with_retry(
    redis_store: RedisRunStore, redis_server: RedisServer
) -> None:
    """FLUSHALL (or eviction) takes the run away while its stream is open: the
    stream's next read finds no run and ends with a hint instead of silently."""
    run_id, stream = await open_stream(redis_store)
    task = await waiting(stream)
    redis_server.flush()
    # The flush itself notifies nobody; the run's next notification does.
    with redis_server.client() as client:
        client.publish(f"quiesce:events:{run_id}", "0-1")
    chunks = await task
    assert ended_with_retry(chunks), chunks
    assert b"no longer in the store" in chunks[-1]


async def test_a_noticed_reset_ends_open_streams_at_once(
    redis_store: RedisRunStore, redis_server: RedisServer
) -> None:
    """No publish after the flush: the store's own generation check ends the stream."""
    _, stream = await open_stream(redis_store)
    await redis_store.heartbeat("stream-worker", 15.0)  # the generation is known
    task = await waiting(stream)
    redis_server.flush()
    await redis_store.heartbeat("stream-worker", 15.0)  # notices the reset
    chunks = await task
    assert ended_with_retry(chunks), chunks
