"""Server-Sent Events for one run: replay from a cursor, then tail live, then end.

Each event is sent as ``id:`` (the cursor), ``event:`` (its type) and ``data:`` (the
event as JSON), so a reconnecting EventSource resumes with ``Last-Event-ID``. A
comment line goes out at least every ``KEEPALIVE_SECONDS`` so proxies keep the
connection open. The stream ends after the terminal event; it also ends, with a
``retry:`` hint, when this replica starts draining (the client reconnects and is
routed to a ready replica), when a read of the store fails or the store's
notifications are lost (the reconnect then gets the ordinary 503 while the store is
down), or when the run is no longer in the store (the reconnect gets 404) — never
silently, and never by waiting for the next keep-alive to notice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Final

import structlog

from service.errors import StoreUnavailable
from service.schemas import Event, event_type, is_terminal_event, json_encoder
from service.store import RunStore

log = structlog.get_logger(__name__)

KEEPALIVE_SECONDS: Final = 15.0
#: Sent when the stream ends early: reconnect after this many milliseconds.
RECONNECT_MS: Final = 1000
PAGE_SIZE: Final = 200

_OPENED: Final = b": stream opened\n\n"
_KEEPALIVE: Final = b": keep-alive\n\n"
_STORE_UNAVAILABLE: Final = "the store is unavailable; reconnect to continue"


def encode_event(event: Event) -> bytes:
    return (
        b"id: " + event.id.encode()
        + b"\nevent: " + event_type(event).encode()
        + b"\ndata: " + json_encoder.encode(event)
        + b"\n\n"
    )  # fmt: skip


def _goodbye(reason: str) -> bytes:
    return f"retry: {RECONNECT_MS}\n: {reason}\n\n".encode()


async def event_stream(
    store: RunStore,
    run_id: str,
    *,
    after: str | None,
    draining: asyncio.Event,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[bytes]:
    """Yield the SSE byte chunks for one run (see the module docstring)."""
    ended = False  # the record was seen terminal after an empty read
    async with store.watch(run_id) as watch:
        yield _OPENED
        while True:
            if draining.is_set():
                yield _goodbye("this replica is draining; reconnect to continue")
                return
            try:
                events = await store.events(run_id, after=after, limit=PAGE_SIZE)
            except StoreUnavailable:
                yield _goodbye(_STORE_UNAVAILABLE)
                return
            if events is None:  # expired, or the store lost it (an empty restart)
                yield _goodbye("the run is no longer in the store")
                return
            for event in events:
                yield encode_event(event)
                after = event.id
                if is_terminal_event(event):
                    return
            if len(events) == PAGE_SIZE:
                continue
            if not events:
                if ended:
                    # Terminal, and nothing after the cursor: the stream was resumed
                    # after the terminal event. Nothing can follow it.
                    return
                try:
                    record = await store.get(run_id)
                except StoreUnavailable:
                    yield _goodbye(_STORE_UNAVAILABLE)
                    return
                if record is None or record.is_terminal:
                    # It may have ended just after the read above: read once more,
                    # so its terminal event is sent (status and event are written
                    # together, so the next read sees it).
                    ended = True
                    continue
            try:
                woken = await _first_of(watch.wait(), draining.wait(), within=keepalive_seconds)
            except StoreUnavailable:  # the store's notifications were lost
                yield _goodbye(_STORE_UNAVAILABLE)
                return
            if not woken:
                yield _KEEPALIVE


async def _first_of(*awaitables: Awaitable[object], within: float) -> bool:
    """Wait for the first to complete; False if none did within the timeout.

    An exception of the first to complete is raised here.
    """
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    for task in done:
        task.result()
    return bool(done)
