"""One reader per watched run per process, however many streams watch it.

A thousand streams of one run used to mean a thousand reads of the store and a
thousand encodings of every event. Here the first stream of a run starts that run's
:class:`Feed`: one task that holds the run's store watch (one subscription), reads
each new page of events once when notified — or, once its watch is live, takes the
events the notices themselves carry, with no read at all — encodes every event once
into its SSE frame (bytes) and wakes the streams. Each stream — a :class:`Follower`
— keeps its own cursor and takes the frames after it from the feed. When the last
stream of a run leaves, its feed stops (and unsubscribes).

A feed holds the frames after its *base*: the cursor of the stream that started it,
moved forward when the feed drops its oldest frames (past twice ``WINDOW_FRAMES``
it keeps the newest ``WINDOW_FRAMES``). A stream whose cursor is older — a replay
from the start, or a client too slow to keep up — reads those events from the store
itself, page by page, until it reaches the feed's frames; from then on it costs no
store call at all.

A feed ends in one of three ways, and its streams with it: the run's terminal event
(or the run found terminal with nothing after the base: a resume after the end);
the run gone from the store; or the store unreachable or its notifications lost.
The last two are *failures*: a failed feed is dropped at once (a new stream starts
a new one), and its streams send the frames they have not sent yet, then end with
a ``retry:`` hint.
"""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_right
from collections.abc import AsyncIterator
from typing import Final

import structlog

from service.errors import StoreUnavailable
from service.schemas import Event, event_type, is_terminal_event, json_encoder
from service.store import RunStore
from service.store.base import parse_cursor

log = structlog.get_logger(__name__)

#: Events read from the store at once.
PAGE_SIZE: Final = 200
#: Frames a feed keeps for streams that join late or lag behind; it drops the oldest
#: half when it holds twice as many.
WINDOW_FRAMES: Final = 100

STORE_UNAVAILABLE: Final = "the store is unavailable; reconnect to continue"
RUN_GONE: Final = "the run is no longer in the store"

#: The key of "before every event" (a stream with no cursor).
_START: Final = (0, 0)


def encode_event(event: Event) -> bytes:
    """The SSE frame of one event: ``id:`` (the cursor), ``event:`` (its type), ``data:``."""
    return (
        b"id: " + event.id.encode()
        + b"\nevent: " + event_type(event).encode()
        + b"\ndata: " + json_encoder.encode(event)
        + b"\n\n"
    )  # fmt: skip


def _key(cursor: str | None) -> tuple[int, int]:
    return _START if cursor is None else parse_cursor(cursor)


def _cursor(key: tuple[int, int]) -> str | None:
    return None if key == _START else f"{key[0]}-{key[1]}"


class Feed:
    """The encoded events of one run after its base, read once for every stream."""

    def __init__(self, store: RunStore, run_id: str, after: str | None) -> None:
        self.run_id = run_id
        self.store = store
        #: Every event after this key, up to the last of ``keys``, is in ``frames``.
        self.base = _key(after)
        self.keys: list[tuple[int, int]] = []
        self.frames: list[bytes] = []
        #: Nothing can follow the last frame (the terminal event is there, or the run
        #: ended at or before the base).
        self.done = False
        #: Why the feed stopped reading, when the store failed it.
        self.failure: str | None = None
        #: Bumped on every read: a stream reading the store itself looks again then.
        self.version = 0
        self.followers = 0
        self._waiters: set[asyncio.Future[bool]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read(), name=f"quiesce-feed-{self.run_id}")

    async def stop(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    def wait(self, future: asyncio.Future[bool]) -> None:
        self._waiters.add(future)

    def unwait(self, future: asyncio.Future[bool]) -> None:
        self._waiters.discard(future)

    async def _read(self) -> None:
        ended = False  # the record was seen terminal after an empty read
        store, run_id = self.store, self.run_id
        try:
            async with store.watch(run_id) as watch:
                read = True
                while True:
                    if read:
                        watch.carried()  # what the notices carried so far, the read has
                        head = self.keys[-1] if self.keys else self.base
                        events = await store.events(run_id, after=_cursor(head), limit=PAGE_SIZE)
                        if events is None:  # expired, or the store lost it (an empty restart)
                            self._fail(RUN_GONE)
                            return
                        if events:
                            self._add(events)
                            if self.done:
                                return
                            if len(events) == PAGE_SIZE:
                                continue
                        elif ended:
                            # Terminal, and nothing after the base: nothing can follow.
                            self.done = True
                            self._wake()
                            return
                        else:
                            self._wake()
                            record = await store.get(run_id)
                            if record is None or record.is_terminal:
                                # It may have ended just after the read above: read
                                # once more, so its terminal event is sent (status and
                                # event are written together, so the next read sees it).
                                ended = True
                                continue
                    await watch.wait()
                    # The notices since the read carried their events: no read needed.
                    read = not (watch.exact and self._carry(watch.carried()))
                    if self.done:
                        return
        except StoreUnavailable:  # a read failed, or the store's notifications were lost
            self._fail(STORE_UNAVAILABLE)
        except Exception:
            # Its streams must not wait for a reader that is gone: they end with a
            # retry hint (and the reconnect starts a new feed).
            log.exception("event_feed_failed", run_id=run_id)
            self._fail(STORE_UNAVAILABLE)

    def _carry(self, carried: list[Event] | None) -> bool:
        """Add the events the notices carried; False when they cannot replace a read."""
        if not carried:  # a notice without its event, or a wake-up with none (a resync)
            return False
        head = self.keys[-1] if self.keys else self.base
        new = [event for event in carried if parse_cursor(event.id) > head]
        if new:
            self._add(new)
        return True

    def _add(self, events: list[Event]) -> None:
        for event in events:
            self.keys.append(parse_cursor(event.id))
            self.frames.append(encode_event(event))
            if is_terminal_event(event):
                self.done = True
                break
        if len(self.frames) > 2 * WINDOW_FRAMES:
            cut = len(self.frames) - WINDOW_FRAMES
            self.base = self.keys[cut - 1]
            del self.keys[:cut], self.frames[:cut]
        self._wake()

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self._wake()

    def _wake(self) -> None:
        self.version += 1
        waiters, self._waiters = self._waiters, set()
        for future in waiters:
            if not future.done():
                future.set_result(True)


class Follower:
    """One stream's place in a feed: its own cursor, its own wake-ups.

    Its keep-alive timer is armed once and re-armed only when it fires (to the
    deadline that sends have moved meanwhile), not for every wait: with a thousand
    streams of a busy run, a timer per event and stream costs more than the send.
    """

    def __init__(self, feed: Feed, after: str | None, keepalive_seconds: float) -> None:
        self._feed = feed
        self._key = _key(after)
        self._future: asyncio.Future[bool] | None = None
        #: The feed's version when this stream last read the store itself.
        self._seen = -1
        #: The last frame was sent and nothing can follow it.
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._keepalive = keepalive_seconds
        #: When a keep-alive is due unless something is sent before (loop time).
        self._due = self._loop.time() + keepalive_seconds
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def failure(self) -> str | None:
        """Why the stream must end with a retry hint once ``take`` returns nothing."""
        return self._feed.failure

    async def take(self) -> bytes:
        """The frames after this stream's cursor (b"" for none yet), as one chunk.

        From the feed when the cursor is within it, else one page from the store
        (raises StoreUnavailable; a run gone sets ``failure``).
        """
        feed = self._feed
        if self._key >= feed.base:
            keys = feed.keys
            start = bisect_right(keys, self._key)
            if start < len(keys):
                self._key = keys[-1]
                self._due = self._loop.time() + self._keepalive
                frames = feed.frames[start:]
            else:
                frames = []
            self.finished = feed.done
            if len(frames) == 1:
                return frames[0]
            return b"".join(frames)
        # Behind the feed's frames: replay from the store.
        self._seen = feed.version
        events = await feed.store.events(feed.run_id, after=_cursor(self._key), limit=PAGE_SIZE)
        if events is None:
            feed.failure = feed.failure or RUN_GONE
            return b""
        chunks = []
        for event in events:
            chunks.append(encode_event(event))
            self._key = parse_cursor(event.id)
            if is_terminal_event(event):
                self.finished = True
                break
        if chunks:
            self._due = self._loop.time() + self._keepalive
        if not events and feed.done and self._key < feed.base:
            # The store has nothing between this cursor and the feed's frames (trimmed).
            self._key = feed.base
        return b"".join(chunks)

    async def wait(self) -> bool:
        """Until the feed has news or ``wake()`` is called; False when a keep-alive is
        due (nothing sent for ``keepalive_seconds``)."""
        feed = self._feed
        if self._seen >= 0 and self._key < feed.base and self._seen != feed.version:
            return True  # the feed read again while this stream read the store
        if feed.failure is not None:
            return True
        if self._loop.time() >= self._due:
            self._due = self._loop.time() + self._keepalive
            return False
        if self._timer is None:
            self._timer = self._loop.call_at(self._due, self._keepalive_timer)
        future: asyncio.Future[bool] = self._loop.create_future()
        self._future = future
        feed.wait(future)
        try:
            return await future
        finally:
            feed.unwait(future)
            self._future = None

    def _keepalive_timer(self) -> None:
        self._timer = None
        if self._loop.time() < self._due:  # something was sent since it was armed
            self._timer = self._loop.call_at(self._due, self._keepalive_timer)
        elif self._future is not None:
            self._due = self._loop.time() + self._keepalive
            _resolve(self._future, False)

    def wake(self) -> None:
        """End the current wait now (the replica is draining)."""
        if self._future is not None:
            _resolve(self._future, True)


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class EventFeeds:
    """The feeds of one process (one per app), by run id."""

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self._feeds: dict[str, Feed] = {}

    def __len__(self) -> int:
        return len(self._feeds)

    @contextlib.asynccontextmanager
    async def follow(
        self, run_id: str, after: str | None, *, keepalive_seconds: float
    ) -> AsyncIterator[Follower]:
        """Follow a run from ``after``: its feed, started if this is its first stream."""
        feed = self._feeds.get(run_id)
        if feed is None or feed.failure is not None:
            feed = self._feeds[run_id] = Feed(self._store, run_id, after)
            feed.start()
        feed.followers += 1
        follower = Follower(feed, after, keepalive_seconds)
        try:
            yield follower
        finally:
            follower.close()
            feed.followers -= 1
            if feed.followers == 0:
                if self._feeds.get(run_id) is feed:
                    del self._feeds[run_id]
                await feed.stop()
