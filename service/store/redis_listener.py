"""One Pub/Sub connection per process for cancel requests and event wake-ups.

Event streams are tailed without blocking reads: a watcher of a run subscribes to
that run's channel (the Lua scripts publish the new event id there after each
append, followed by the event itself unless it is large), waits to be woken, and
then takes the events the notices carried — or, when one came without its event,
reads the stream with an ordinary XRANGE.
Every watcher of every run in the process shares this one connection, so a
thousand open SSE streams cost one Redis connection, not a thousand.

Pub/Sub is at-most-once: messages sent while the connection is down are lost.
When the connection drops (or stops answering PINGs) every current watcher is told
its watch is lost — an open event stream then ends with a ``retry:`` hint instead of
waiting, unaware, for a wake-up that may never come. After every (re)connect the
listener wakes every watcher (they re-read their stream) and asks the cancel
listener to re-check its flags.

On Redis Cluster the same class serves one node with sharded Pub/Sub
(``SSUBSCRIBE``; ``redis_cluster.ShardedListener`` routes each channel to the node
that owns its slot). There a refused subscription (``MOVED`` after a failover or a
resharding) counts as a disconnect, and a channel the server drops on its own
(``sunsubscribe`` when its slot moves away) loses that channel's watchers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import msgspec
import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.schemas import Event, event_decoder
from service.store.base import CancelListener, EventWatch, Watch
from service.store.redis_commands import UNAVAILABLE_ERRORS

log = structlog.get_logger(__name__)

#: A silent connection is pinged after this long and given up after twice this long,
#: so open streams learn of a frozen Redis within about two seconds (one PING a
#: second on an idle connection is all it costs).
PING_INTERVAL_SECONDS: Final = 1.0
#: How long a new watcher waits for Redis to confirm its subscription.
SUBSCRIBE_TIMEOUT_SECONDS: Final = 2.0
RECONNECT_BACKOFF_MAX_SECONDS: Final = 2.0
CLOSE_TIMEOUT_SECONDS: Final = 0.5


class NotificationListener:
    """Subscribes to this worker's cancel channel and to the channels of watched runs."""

    def __init__(
        self,
        client: Redis,
        *,
        cancel_channel: Callable[[str], str],
        events_channel: Callable[[str], str],
        sharded: bool = False,
        ready_channel: str | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._cancel_channel_for = cancel_channel
        self._events_channel_for = events_channel
        self._sharded = sharded
        self._on_disconnect = on_disconnect
        #: Subscribed last on every connect: its confirmation means every channel is
        #: live. The cancel channel once listen_for_cancels() named the worker.
        self._cancel_channel = ready_channel or cancel_channel("-")
        self._cancel_listener: CancelListener | None = None
        self._watches: dict[str, set[Watch]] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._pubsub: PubSub | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def listen_for_cancels(self, worker_id: str, listener: CancelListener) -> None:
        if self._task is not None:
            raise RuntimeError("listen_for_cancels() must be called before start()")
        self._cancel_channel = self._cancel_channel_for(worker_id)
        self._cancel_listener = listener

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="quiesce-redis-listener")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            await stop_pubsub_reader(self._task, lambda: self._pubsub)
        await self._client.aclose()

    @contextlib.asynccontextmanager
    async def watch(self, run_id: str) -> AsyncIterator[EventWatch]:
        channel = self._events_channel_for(run_id)
        watch = Watch()
        watches: set[Watch] | None = None
        try:
            async with self._lock:
                watches = self._watches.setdefault(channel, set())
                watches.add(watch)
                confirmation = self._confirmations.get(channel)
                if confirmation is None and self._pubsub is not None:
                    confirmation = await self._subscribe(self._pubsub, channel)
            if confirmation is not None:
                # Once Redis confirms, nothing published to the channel can be missed.
                # Without a confirmation the next reconnect wakes this watcher instead.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(confirmation), SUBSCRIBE_TIMEOUT_SECONDS)
                    watch.exact = True
            yield watch
        finally:
            # Also when cancelled while subscribing: no watcher is left behind.
            if watches is not None:
                async with self._lock:
                    watches.discard(watch)
                    if not watches and self._watches.get(channel) is watches:
                        del self._watches[channel]
                        self._confirmations.pop(channel, None)
                        if self._pubsub is not None:
                            with contextlib.suppress(*UNAVAILABLE_ERRORS):
                                if self._sharded:
                                    await self._pubsub.sunsubscribe(channel)
                                else:
                                    await self._pubsub.unsubscribe(channel)

    async def _subscribe(self, pubsub: PubSub, channel: str) -> asyncio.Future[None] | None:
        """Send SUBSCRIBE (under the lock, so sends stay in state order)."""
        confirmation: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Registered before sending: the reader may take Redis's answer before the
        # send returns here (seen with uvloop), and an answer with no confirmation
        # waiting for it would leave the watcher waiting out SUBSCRIBE_TIMEOUT_SECONDS.
        self._confirmations[channel] = confirmation
        try:
            await self._send_subscribe(pubsub, channel)
        except UNAVAILABLE_ERRORS:
            if self._confirmations.get(channel) is confirmation:
                del self._confirmations[channel]
            return None
        return confirmation

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closing:
            pubsub = self._client.pubsub()
            try:
                async with self._lock:
                    for channel in self._watches:
                        await self._subscribe(pubsub, channel)
                    # Subscribed last: Redis answers in order, so its confirmation
                    # means every channel above is live, and the resync that it
                    # triggers cannot miss an event.
                    await self._send_subscribe(pubsub, self._cancel_channel)
                    self._pubsub = pubsub
                await self._read(pubsub, on_ready=self._resync)
            except (*UNAVAILABLE_ERRORS, ResponseError) as exc:
                # A ResponseError here is a refused subscription (MOVED, CLUSTERDOWN):
                # the channel's node changed, so this connection is as good as lost.
                if self._closing:
                    return
                log.warning("store_listener_disconnected", error=str(exc), retry_in=backoff)
                self._lose_watches()
                if self._on_disconnect is not None:
                    self._on_disconnect()
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX_SECONDS)

    async def _send_subscribe(self, pubsub: PubSub, channel: str) -> None:
        if self._sharded:
            await pubsub.ssubscribe(channel)
        else:
            await pubsub.subscribe(channel)

    async def _read(self, pubsub: PubSub, *, on_ready: Any) -> None:
        pinged = False
        while not self._closing:
            message = await pubsub.get_message(timeout=PING_INTERVAL_SECONDS)
            if message is None:
                if pinged:
                    raise TimeoutError("no answer to PING on the Pub/Sub connection")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            kind = message["type"]
            channel = message["channel"]
            if isinstance(channel, bytes):
                channel = channel.decode()
            if kind in ("message", "smessage"):
                self._dispatch(channel, message["data"])
            elif kind == "sunsubscribe" and channel == self._cancel_channel:
                # The cancel (or ready) channel's slot moved: connect again, where
                # the refreshed slot map says.
                raise RedisConnectionError(f"the server dropped {channel} (its slot moved)")
            elif kind == "sunsubscribe" and channel in self._confirmations:
                # Not asked for (a watched channel is dropped from the confirmations
                # before its SUNSUBSCRIBE): the slot moved to another node.
                self._lose_channel(channel)
            elif kind in ("subscribe", "ssubscribe"):
                if channel == self._cancel_channel:
                    on_ready()
                confirmation = self._confirmations.get(channel)
                if confirmation is not None and not confirmation.done():
                    confirmation.set_result(None)

    def _dispatch(self, channel: str, data: bytes | str) -> None:
        if channel == self._cancel_channel:
            if self._cancel_listener is not None:
                run_id = data.decode() if isinstance(data, bytes) else data
                self._cancel_listener.cancel_requested(run_id)
            return
        watches = self._watches.get(channel)
        if watches:
            event = carried_event(data)
            for watch in watches:
                watch.notify(event)

    def _lose_channel(self, channel: str) -> None:
        self._confirmations.pop(channel, None)
        for watch in self._watches.get(channel, ()):
            watch.lose()
        if self._on_disconnect is not None:
            self._on_disconnect()

    def lose_all(self) -> None:
        """Tell every watcher its watch is over (this listener is being retired, or
        the store was reset and the runs watched may be gone)."""
        self._lose_watches()

    def _lose_watches(self) -> None:
        """Disconnected: events may pass unseen, so every watcher is told to stop."""
        for watches in self._watches.values():
            for watch in watches:
                watch.lose()

    def _resync(self) -> None:
        """Connected again: whatever was published meanwhile is lost, so look again."""
        for watches in self._watches.values():
            for watch in watches:
                watch.notify()
        if self._cancel_listener is not None:
            self._cancel_listener.resync()


async def stop_pubsub_reader(task: asyncio.Task[None], pubsub: Callable[[], Any]) -> None:
    """Stop a task reading Pub/Sub (its loop checks a closing flag too).

    A cancellation that lands inside redis-py's timed read can be lost (seen on
    Python 3.11: a close then waited forever); closing the socket under the read,
    ``pubsub()`` being the reader's current PubSub, ends it.
    """
    task.cancel()
    _, pending = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_SECONDS)
    if pending:
        current = pubsub()
        if current is not None and current.connection is not None:
            await current.connection.disconnect(nowait=True)
        task.cancel()
        await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_SECONDS)


def carried_event(data: bytes | str) -> Event | None:
    """The event a notice ``<id> <event json>`` carries (None for ``<id>`` alone, or
    anything else: the watcher reads the stream instead)."""
    raw = data.encode() if isinstance(data, str) else data
    entry_id, _, payload = raw.partition(b" ")
    if not payload:
        return None
    try:
        event: Event = event_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return msgspec.structs.replace(event, id=entry_id.decode())
