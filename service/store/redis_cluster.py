"""Redis Cluster: telling the topology at start, the cluster client, sharded Pub/Sub.

The same ``redis://host:port`` names one server or any node of a cluster. At start
the store asks that node (``INFO cluster``): ``cluster_enabled:1`` selects the
cluster client, which learns every node and slot from there, follows ``MOVED`` and
``ASK`` and refreshes its slot map after a failover. ``QUIESCE_REDIS_MODE`` forces a
mode; a forced mode the server contradicts stops start-up with one line
(:class:`RedisModeMismatch`), because the other client would fail on every call.

redis-py's asyncio cluster client has no Pub/Sub, so :class:`ShardedListener`
keeps one :class:`~service.store.redis_listener.NotificationListener` per primary
(``SSUBSCRIBE`` there for the channels whose slot it owns): connections stay bounded
by the number of primaries. When one of them loses its connection or a
subscription is refused (``MOVED``), the slot map is refreshed, listeners of nodes
that are no longer primaries are retired (their watchers are told, so open event
streams end with a ``retry:`` hint and reconnect to the new owner) and the cancel
channel moves with its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, Literal

import structlog
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from service.config import ConfigError, RedisMode
from service.errors import StoreUnavailable
from service.store.base import CancelListener, EventWatch
from service.store.redis_keys import KeyLayout
from service.store.redis_listener import NotificationListener

log = structlog.get_logger(__name__)

Topology = Literal["standalone", "cluster"]

#: How long start-up asks the URL's node for its mode before assuming one.
DETECT_TIMEOUT_SECONDS: Final = 3.0
#: Connections to each node for commands: the pipelines in flight plus direct calls.
NODE_MAX_CONNECTIONS: Final = 8
#: How long start() waits for the slot map before going on.
START_WAIT_SECONDS: Final = 3.0
#: Pause between slot-map refreshes while a listener cannot reach its node.
REFRESH_MIN_INTERVAL_SECONDS: Final = 0.2


#: Sharded Pub/Sub (SSUBSCRIBE, SPUBLISH) came with Redis 7.0.
CLUSTER_MIN_VERSION: Final = (7, 0)


class RedisModeMismatch(ConfigError):
    """QUIESCE_REDIS_MODE names a mode the server at the URL is not in, or the server
    is too old for the mode."""


async def detect_topology(url: str, *, connection_kwargs: Mapping[str, Any]) -> Topology:
    """Ask the URL's node whether it is a cluster node (raises RedisError, OSError);
    a cluster node older than Redis 7.0 raises RedisModeMismatch."""
    client = Redis.from_url(
        url,
        socket_connect_timeout=DETECT_TIMEOUT_SECONDS / 2,
        socket_timeout=DETECT_TIMEOUT_SECONDS / 2,
        retry=Retry(NoBackoff(), retries=0),
        **connection_kwargs,
    )
    try:
        info = await client.info("cluster")
        if str(info.get("cluster_enabled", 0)) != "1":
            return "standalone"
        version = str((await client.info("server")).get("redis_version", ""))
    finally:
        await client.aclose()
    if _version(version) < CLUSTER_MIN_VERSION:
        raise RedisModeMismatch(
            f"QUIESCE_REDIS_URL: a Redis Cluster needs Redis 7.0 or newer (sharded Pub/Sub), "
            f"the node at the URL runs {version or 'an unknown version'}"
        )
    return "cluster"


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        if not part.isdigit():
            return (0,)
        parts.append(int(part))
    return tuple(parts)


async def resolve_topology(
    url: str, mode: RedisMode, *, connection_kwargs: Mapping[str, Any]
) -> Topology:
    """The topology to use: detected (``auto``) or forced and confirmed.

    A server that cannot be reached now leaves a forced mode as it is and ``auto``
    as standalone (with a warning): start-up is not held up by a Redis that is
    away; the calls answer 503 until it is back.
    """
    wanted: Topology | None = "cluster" if mode == "cluster" else None
    if mode in ("standalone", "sentinel"):
        wanted = "standalone"
    try:
        found = await asyncio.wait_for(
            detect_topology(url, connection_kwargs=connection_kwargs), DETECT_TIMEOUT_SECONDS
        )
    except (TimeoutError, RedisError, OSError) as exc:
        assumed: Topology = wanted or "standalone"
        log.warning(
            "redis_mode_unchecked",
            error=str(exc) or type(exc).__name__,
            mode=assumed,
            detail="Redis did not answer at start; set QUIESCE_REDIS_MODE to choose the mode",
        )
        return assumed
    if wanted is not None and found != wanted:
        what = "a Redis Cluster node" if found == "cluster" else "not a Redis Cluster node"
        raise RedisModeMismatch(
            f"QUIESCE_REDIS_MODE: {mode!r}, but the server at the URL is {what} "
            f"(unset it to detect the mode)"
        )
    return found


def cluster_client(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    connection_kwargs: Mapping[str, Any],
) -> RedisCluster:
    """The cluster client for commands; it connects (and learns the slots) on first use."""
    return RedisCluster.from_url(
        url,
        max_connections=NODE_MAX_CONNECTIONS,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        # A failover takes seconds; the callers' own deadline bounds the wait, and
        # the command pipeline's undo covers a write that lands late.
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.25), retries=2),
        **connection_kwargs,
    )


class ShardedListener:
    """One sharded-Pub/Sub listener per primary in use (see the module docstring)."""

    def __init__(self, cluster: RedisCluster, layout: KeyLayout, *, socket_timeout: float) -> None:
        self._cluster = cluster
        self._layout = layout
        self._socket_timeout = socket_timeout
        self._listeners: dict[str, NotificationListener] = {}
        self._cancel: tuple[str, CancelListener] | None = None
        self._cancel_node: str | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._refresh_again = False
        self._retiring: set[asyncio.Task[None]] = set()
        self._closing = False

    def listen_for_cancels(self, worker_id: str, listener: CancelListener) -> None:
        self._cancel = (worker_id, listener)

    async def start(self) -> None:
        """Learn the slot map and subscribe on every primary (not waiting for long:
        a cluster that is away at start is retried in the background)."""
        self._topology_changed()
        if self._refresh is not None:
            await asyncio.wait({self._refresh}, timeout=START_WAIT_SECONDS)

    async def close(self) -> None:
        self._closing = True
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.wait({self._refresh})
        listeners = list(self._listeners.values())
        self._listeners.clear()
        await asyncio.gather(*(listener.close() for listener in listeners))
        if self._retiring:
            await asyncio.wait(set(self._retiring))

    def lose_all(self) -> None:
        """Tell every watcher on every node its watch is over (the store was reset)."""
        for listener in self._listeners.values():
            listener.lose_all()

    @contextlib.asynccontextmanager
    async def watch(self, run_id: str) -> AsyncIterator[EventWatch]:
        try:
            node = self._cluster.get_node_from_key(self._layout.events_channel(run_id))
        except (RedisClusterException, RedisError, AttributeError) as exc:
            self._topology_changed()
            raise StoreUnavailable(f"store unavailable: no node for the run yet ({exc})") from exc
        if node is None:
            raise StoreUnavailable("store unavailable: no node for the run yet")
        listener = self._listeners.get(node.name) or self._add(node, cancels=False)
        async with listener.watch(run_id) as watch:
            yield watch

    # --- internals ------------------------------------------------------------------

    def _add(self, node: ClusterNode, *, cancels: bool) -> NotificationListener:
        ready = None if cancels else self._ready_channel(node)
        listener = NotificationListener(
            _node_client(node, self._socket_timeout),
            cancel_channel=self._layout.cancel_channel,
            events_channel=self._layout.events_channel,
            sharded=True,
            ready_channel=ready,
            on_disconnect=self._topology_changed,
        )
        if cancels and self._cancel is not None:
            listener.listen_for_cancels(*self._cancel)
        self._listeners[node.name] = listener
        task = asyncio.ensure_future(listener.start())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return listener

    def _ready_channel(self, node: ClusterNode) -> str:
        """A channel in a slot the node owns: subscribed last, it confirms the rest."""
        slots = self._cluster.nodes_manager.slots_cache
        for n in itertools.count():
            channel = f"quiesce:ready:{{{n}}}"
            owners = slots.get(key_slot(channel.encode()))
            if (owners and owners[0].name == node.name) or n > 100_000:
                return channel
        raise AssertionError("unreachable")  # pragma: no cover

    def _topology_changed(self) -> None:
        if self._closing:
            return
        if self._refresh is not None and not self._refresh.done():
            self._refresh_again = True
            return
        self._refresh = asyncio.ensure_future(self._reroute())

    async def _reroute(self) -> None:
        while True:
            self._refresh_again = False
            try:
                await self._cluster.nodes_manager.initialize()
            except (RedisClusterException, RedisError, OSError) as exc:
                log.warning("redis_cluster_refresh_failed", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(REFRESH_MIN_INTERVAL_SECONDS * 5)
                continue
            primaries = {node.name for node in self._cluster.get_primaries()}
            for name in [name for name in self._listeners if name not in primaries]:
                self._retire(name)
            if self._cancel is not None:
                channel = self._layout.cancel_channel(self._cancel[0])
                try:
                    node = self._cluster.get_node_from_key(channel)
                except RedisClusterException:
                    node = None  # the slot has no owner yet (a failover under way)
                if node is None:
                    await asyncio.sleep(REFRESH_MIN_INTERVAL_SECONDS * 5)
                    continue
                if node.name != self._cancel_node:
                    if self._cancel_node is not None:
                        self._retire(self._cancel_node)
                    self._retire(node.name)  # a listener there without the cancel channel
                    self._add(node, cancels=True)
                    self._cancel_node = node.name
            # One listener on every primary from the start: a watch never waits for
            # (nor is woken by) a connection made for it.
            for primary in self._cluster.get_primaries():
                if primary.name not in self._listeners:
                    self._add(primary, cancels=False)
            if not self._refresh_again:
                return
            await asyncio.sleep(REFRESH_MIN_INTERVAL_SECONDS)

    def _retire(self, name: str) -> None:
        listener = self._listeners.pop(name, None)
        if listener is None:
            return
        if name == self._cancel_node:
            self._cancel_node = None
        log.info("redis_cluster_listener_moved", node=name)
        listener.lose_all()
        task = asyncio.ensure_future(listener.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def _node_client(node: ClusterNode, socket_timeout: float) -> Redis:
    """A plain client for one node's Pub/Sub connection (no hidden retries)."""
    kwargs: dict[str, Any] = dict(node.connection_kwargs)
    kwargs.update(
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), retries=0),
    )
    return Redis.from_pool(
        ConnectionPool(connection_class=node.connection_class, max_connections=2, **kwargs)
    )
