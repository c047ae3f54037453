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

Every stream of a run in this process follows that run's one feed
(``service.web.fanout``): the store is read, and each event encoded, once per run,
not once per stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

from service.errors import StoreUnavailable
from service.store import RunStore
from service.web.fanout import STORE_UNAVAILABLE, EventFeeds, encode_event

__all__ = ["KEEPALIVE_SECONDS", "RECONNECT_MS", "encode_event", "event_stream"]

KEEPALIVE_SECONDS: Final = 15.0
#: Sent when the stream ends early: reconnect after this many milliseconds.
RECONNECT_MS: Final = 1000

_OPENED: Final = b": stream opened\n\n"
_KEEPALIVE: Final = b": keep-alive\n\n"
_DRAINING: Final = "this replica is draining; reconnect to continue"


def _goodbye(reason: str) -> bytes:
    return f"retry: {RECONNECT_MS}\n: {reason}\n\n".encode()


async def event_stream(
    store: RunStore,
    run_id: str,
    *,
    after: str | None,
    draining: asyncio.Event,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
    feeds: EventFeeds | None = None,
) -> AsyncIterator[bytes]:
    """Yield the SSE byte chunks for one run (see the module docstring).

    ``feeds`` is the process's (one per app); without it the stream has a feed of
    its own.
    """
    if feeds is None:
        feeds = EventFeeds(store)
    async with feeds.follow(run_id, after, keepalive_seconds=keepalive_seconds) as follower:
        on_drain = asyncio.ensure_future(draining.wait())
        on_drain.add_done_callback(lambda _: follower.wake())
        try:
            yield _OPENED
            while True:
                if draining.is_set():
                    yield _goodbye(_DRAINING)
                    return
                try:
                    chunk = await follower.take()
                except StoreUnavailable:
                    yield _goodbye(STORE_UNAVAILABLE)
                    return
                if chunk:
                    yield chunk
                if follower.finished:
                    return
                if chunk:
                    continue
                if follower.failure is not None:
                    yield _goodbye(follower.failure)
                    return
                if draining.is_set():
                    continue
                if not await follower.wait():
                    yield _KEEPALIVE
        finally:
            on_drain.cancel()
