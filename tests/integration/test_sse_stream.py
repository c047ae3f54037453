"""The SSE generator itself (service.web.sse.event_stream) on both stores.

Driving the generator directly makes the timing deterministic: keep-alives with a
short interval, and a run that finishes exactly between two reads of the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from service.schemas import RunRecord
from service.store import RunStore
from service.web.sse import event_stream
from tests.integration.test_store_contract import created, progress, terminal

OPENED = b": stream opened\n\n"
KEEPALIVE = b": keep-alive\n\n"


class FinishesOnRead:
    """A store whose run is finalized just before the stream's next ``get``.

    That is the moment between the stream's read of the event log (nothing new) and
    its check of the run's status: the run ending right then must still reach the
    client as a terminal event.
    """

    def __init__(self, store: RunStore, terminal_record: RunRecord) -> None:
        self._store = store
        self._terminal: RunRecord | None = terminal_record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def get(self, run_id: str) -> RunRecord | None:
        if self._terminal is not None:
            record, self._terminal = self._terminal, None
            assert await self._store.finalize(record)
        return await self._store.get(run_id)


async def collect(stream: AsyncIterator[bytes], within: float = 3.0) -> list[bytes]:
    async def drain() -> list[bytes]:
        return [chunk async for chunk in stream]

    return await asyncio.wait_for(drain(), within)


async def first_cursor(store: RunStore, run_id: str) -> str:
    events = await store.events(run_id, after=None, limit=10)
    assert events
    return events[-1].id


async def test_a_stream_sends_keepalives_while_nothing_happens(store: RunStore) -> None:
    record = await created(store)
    stream = event_stream(
        store,
        record.run_id,
        after=await first_cursor(store, record.run_id),
        draining=asyncio.Event(),
        keepalive_seconds=0.05,
    )
    assert await anext(stream) == OPENED
    assert await asyncio.wait_for(anext(stream), 1) == KEEPALIVE
    assert await asyncio.wait_for(anext(stream), 1) == KEEPALIVE
    await store.append(record.run_id, progress(1))
    chunk = await asyncio.wait_for(anext(stream), 1)
    while chunk == KEEPALIVE:
        chunk = await asyncio.wait_for(anext(stream), 1)
    assert b"event: run_progress" in chunk
    await store.finalize(terminal(record, "succeeded"))
    rest = await collect(stream)
    assert b"event: run_succeeded" in rest[-1]


async def test_a_stream_resumed_after_the_terminal_event_ends(store: RunStore) -> None:
    record = await created(store)
    await store.finalize(terminal(record, "failed"))
    last = await first_cursor(store, record.run_id)
    chunks = await collect(event_stream(store, record.run_id, after=last, draining=asyncio.Event()))
    assert chunks == [OPENED]


async def test_a_run_ending_between_two_reads_still_sends_its_terminal_event(
    store: RunStore,
) -> None:
    record = await created(store)
    racing = FinishesOnRead(store, terminal(record, "succeeded"))
    chunks = await collect(
        event_stream(
            racing,  # type: ignore[arg-type]
            record.run_id,
            after=await first_cursor(store, record.run_id),
            draining=asyncio.Event(),
            keepalive_seconds=0.2,
        )
    )
    assert any(b"event: run_succeeded" in chunk for chunk in chunks), (
        "the stream ended without the terminal event"
    )


async def test_a_draining_replica_ends_streams_with_a_retry_hint(store: RunStore) -> None:
    record = await created(store)
    draining = asyncio.Event()
    stream = event_stream(store, record.run_id, after=None, draining=draining)
    assert await anext(stream) == OPENED
    assert b"event: run_started" in await anext(stream)
    draining.set()
    rest = await collect(stream)
    assert rest[-1].startswith(b"retry: 1000\n")
