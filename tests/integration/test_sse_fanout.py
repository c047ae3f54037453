"""Many streams of one run in one process: one reader, one subscription, own cursors.

The streams share the process's ``EventFeeds`` as the app's streams do; the store
is wrapped to count its reads, so a stream that read the store for itself would
show up as one read per stream instead of one per new event.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog.testing

from service.schemas import Event, RunProgress, utcnow
from service.store import RunStore
from service.store.redis import RedisRunStore
from service.web import fanout
from service.web.fanout import EventFeeds
from service.web.sse import event_stream
from tests.conftest import RedisServer
from tests.integration.test_store_contract import created, progress, terminal

OPENED = b": stream opened\n\n"
STREAMS = 25


class CountingStore:
    """The store, with its event reads counted."""

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def events(self, run_id: str, *, after: str | None, limit: int) -> list[Event] | None:
        self.reads += 1
        return await self._store.events(run_id, after=after, limit=limit)


def counted_streams(
    store: RunStore, run_id: str, count: int
) -> tuple[CountingStore, EventFeeds, list[AsyncIterator[bytes]]]:
    """``count`` streams of a run sharing one EventFeeds, over a store whose event
    reads are counted."""
    counting = CountingStore(store)
    feeds = EventFeeds(counting)  # type: ignore[arg-type]
    streams = [
        event_stream(
            counting,  # type: ignore[arg-type]
            run_id,
            after=None,
            draining=asyncio.Event(),
            feeds=feeds,
        )
        for _ in range(count)
    ]
    return counting, feeds, streams


def ids_in(chunks: list[bytes]) -> list[str]:
    return [
        line.removeprefix(b"id: ").decode()
        for chunk in chunks
        for line in chunk.split(b"\n")
        if line.startswith(b"id: ")
    ]


async def read_until_end(stream: AsyncIterator[bytes], within: float = 5.0) -> list[bytes]:
    async def drain() -> list[bytes]:
        return [chunk async for chunk in stream]

    return await asyncio.wait_for(drain(), within)


async def opened(streams: list[AsyncIterator[bytes]]) -> list[asyncio.Task[list[bytes]]]:
    """Open each stream, then read the rest of each in a task."""
    for stream in streams:
        assert await anext(stream) == OPENED
    return [asyncio.create_task(read_until_end(stream)) for stream in streams]


async def test_every_stream_of_a_run_gets_every_event_from_one_read_each(
    store: RunStore,
) -> None:
    record = await created(store)
    counting, feeds, streams = counted_streams(store, record.run_id, STREAMS)
    readers = await opened(streams)
    await asyncio.sleep(0.2)  # every stream has replayed and waits
    assert len(feeds) == 1
    reads_before = counting.reads
    for step in range(1, 4):
        await store.append(record.run_id, progress(step))
        await asyncio.sleep(0.1)
    await store.finalize(terminal(record, "succeeded"))
    results = await asyncio.gather(*readers)
    events = await store.events(record.run_id, after=None, limit=100)
    assert events is not None
    expected = [event.id for event in events]
    for chunks in results:
        assert ids_in(chunks) == expected
    # One read per new event (at most), however many streams: not one per stream.
    assert counting.reads - reads_before <= 4
    assert len(feeds) == 0  # the last stream gone, its feed stopped


async def test_each_stream_resumes_from_its_own_cursor(store: RunStore) -> None:
    record = await created(store)
    cursors = [await store.append(record.run_id, progress(step)) for step in range(1, 6)]
    feeds = EventFeeds(store)
    late = event_stream(
        store, record.run_id, after=cursors[3], draining=asyncio.Event(), feeds=feeds
    )
    early = event_stream(
        store, record.run_id, after=cursors[0], draining=asyncio.Event(), feeds=feeds
    )
    fresh = event_stream(store, record.run_id, after=None, draining=asyncio.Event(), feeds=feeds)
    readers = await opened([late, early, fresh])
    await asyncio.sleep(0.1)
    await store.finalize(terminal(record, "failed"))
    late_chunks, early_chunks, fresh_chunks = await asyncio.gather(*readers)
    events = await store.events(record.run_id, after=None, limit=100)
    assert events is not None
    every = [event.id for event in events]
    assert ids_in(late_chunks) == every[every.index(cursors[3]) + 1 :]
    assert ids_in(early_chunks) == every[every.index(cursors[0]) + 1 :]
    assert ids_in(fresh_chunks) == every


async def test_a_stream_behind_the_feeds_window_replays_from_the_store_in_order(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "WINDOW_FRAMES", 2)
    monkeypatch.setattr(fanout, "PAGE_SIZE", 3)
    record = await created(store)
    feeds = EventFeeds(store)
    first = event_stream(store, record.run_id, after=None, draining=asyncio.Event(), feeds=feeds)
    (first_reader,) = await opened([first])
    for step in range(1, 12):
        await store.append(record.run_id, progress(step))
    await asyncio.sleep(0.2)  # the feed has read them all and dropped the oldest
    joiner = event_stream(store, record.run_id, after=None, draining=asyncio.Event(), feeds=feeds)
    (joiner_reader,) = await opened([joiner])
    await store.append(record.run_id, progress(12))
    await store.finalize(terminal(record, "succeeded"))
    events = await store.events(record.run_id, after=None, limit=100)
    assert events is not None
    every = [event.id for event in events]
    assert ids_in(await first_reader) == every
    assert ids_in(await joiner_reader) == every


async def test_a_thousand_streams_of_a_run_hold_one_subscription(
    redis_store: RedisRunStore, redis_server: RedisServer
) -> None:
    record = await created(redis_store)
    feeds = EventFeeds(redis_store)
    draining = asyncio.Event()
    streams = [
        event_stream(redis_store, record.run_id, after=None, draining=draining, feeds=feeds)
        for _ in range(1000)
    ]
    readers = await opened(streams)
    await asyncio.sleep(0.3)
    channel = f"quiesce:events:{record.run_id}"
    with redis_server.client() as client:
        assert client.pubsub_numsub(channel) == [(channel.encode(), 1)]
    draining.set()
    for chunks in await asyncio.gather(*readers):
        assert chunks[-1].startswith(b"retry: 1000\n")
    with redis_server.client() as client:
        assert client.pubsub_numsub(channel) == [(channel.encode(), 0)]


async def test_events_carried_by_their_notices_are_sent_without_a_read(store: RunStore) -> None:
    record = await created(store)
    counting, _, streams = counted_streams(store, record.run_id, 1)
    (reader,) = await opened(streams)
    await asyncio.sleep(0.2)  # replayed, subscribed, waiting
    reads_before = counting.reads
    for step in range(1, 6):
        await store.append(record.run_id, progress(step))
        await asyncio.sleep(0.05)
    await store.finalize(terminal(record, "succeeded"))
    chunks = await reader
    events = await store.events(record.run_id, after=None, limit=100)
    assert events is not None
    assert ids_in(chunks) == [event.id for event in events]
    assert b"event: run_succeeded" in chunks[-1]
    assert counting.reads == reads_before


async def test_an_event_too_large_for_its_notice_is_read_from_the_store(
    redis_store: RedisRunStore,
) -> None:
    record = await created(redis_store)
    stream = event_stream(redis_store, record.run_id, after=None, draining=asyncio.Event())
    (reader,) = await opened([stream])
    await asyncio.sleep(0.2)
    await redis_store.append(record.run_id, progress(1))
    large = RunProgress(created_at=utcnow(), data={"blob": "x" * 10_000})
    await redis_store.append(record.run_id, large)
    await redis_store.append(record.run_id, progress(3))
    await redis_store.finalize(terminal(record, "succeeded"))
    chunks = await reader
    events = await redis_store.events(record.run_id, after=None, limit=100)
    assert events is not None
    assert ids_in(chunks) == [event.id for event in events]
    assert b"x" * 10_000 in b"".join(chunks)


async def test_a_batch_of_events_is_announced_once_and_every_event_reaches_every_stream(
    store: RunStore,
) -> None:
    """A batch's one notice carries only its last id (Redis): the feed reads the batch
    once and every stream gets all of it, in order."""
    record = await created(store)
    _, _, streams = counted_streams(store, record.run_id, 3)
    readers = await opened(streams)
    await asyncio.sleep(0.2)  # replayed, subscribed, waiting
    await store.append_many(record.run_id, [progress(step) for step in range(1, 6)], first_seq=1)
    await asyncio.sleep(0.1)
    await store.finalize(terminal(record, "succeeded"))
    events = await store.events(record.run_id, after=None, limit=100)
    assert events is not None
    assert len(events) == 7  # started, 5 progress, succeeded
    for reader in readers:
        assert ids_in(await reader) == [event.id for event in events]


@pytest.mark.slow
async def test_a_watch_cancelled_while_subscribing_leaves_no_subscription(
    redis_store: RedisRunStore, redis_server: RedisServer
) -> None:
    """A stream closed while Redis has not confirmed its subscription yet (a client
    that leaves at once, a slow Redis): the run's channel is not left subscribed."""
    record = await created(redis_store)
    channel = f"quiesce:events:{record.run_id}"
    assert redis_server.process is not None
    pid = redis_server.process.pid

    async def watch_forever() -> None:
        async with redis_store.watch(record.run_id):
            await asyncio.sleep(3600)

    os.kill(pid, signal.SIGSTOP)  # the SUBSCRIBE is sent, its confirmation never comes
    try:
        task = asyncio.create_task(watch_forever())
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.wait({task})
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.sleep(3.5)  # also past a reconnect of the listener, which resubscribes
    with redis_server.client() as client:
        assert client.pubsub_numsub(channel) == [(channel.encode(), 0)]


class BrokenReads:
    """The store, with every read of events failing in an unforeseen way."""

    def __init__(self, store: RunStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def events(self, run_id: str, *, after: str | None, limit: int) -> list[Event] | None:
        raise RuntimeError("unforeseen")


async def test_a_feed_that_fails_unexpectedly_ends_its_streams_with_a_retry_hint(
    store: RunStore,
) -> None:
    record = await created(store)
    broken = BrokenReads(store)
    with structlog.testing.capture_logs() as logs:
        stream = event_stream(
            broken,  # type: ignore[arg-type]
            record.run_id,
            after=None,
            draining=asyncio.Event(),
            feeds=EventFeeds(broken),  # type: ignore[arg-type]
        )
        (reader,) = await opened([stream])
        chunks = await reader
    assert chunks[-1].startswith(b"retry: 1000\n")
    assert any(entry["event"] == "event_feed_failed" for entry in logs)
