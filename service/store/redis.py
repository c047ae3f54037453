"""The durable store: Redis, shared by every replica.

Keys of one run share the hash tag ``{run_id}`` so every script touches one slot and
also runs on Redis Cluster:

* ``quiesce:{<run_id>}:run`` — a hash: ``record`` (the run as JSON), ``status`` (what
  the scripts compare), ``worker`` (the owner), ``cancel`` (a pending cancel
  request), ``seq`` and ``seq_id`` (the last progress event's sequence number and
  id, which make a repeated append a no-op), and for runs created with an
  idempotency key ``fingerprint`` and ``initial`` (the record returned by the
  original create);
* ``quiesce:{<run_id>}:events`` — a stream capped at ``MAX_EVENTS_PER_RUN`` entries.

Leases (``service.reaper``): ``quiesce:workers`` is a sorted set of worker ids scored
by lease expiry (on the Redis server's clock; on a cluster it is split into a few
shards, see ``redis_keys``), and ``quiesce:{worker:<id>}:runs``
the set of a worker's unfinished runs. A run is added to that set ahead of its
create (in the same pipeline) and removed once its finalize has answered (in one
SREM with every run finalized at that moment). These are separate commands — the
set lives in another slot — so a crash in between leaves at most an id whose
finalize is a no-op for the reaper.

While a run is running its keys live for retention plus its timeout (so a long run
does not expire under its owner); the terminal write resets them to the retention.
Every state change is one Lua script (``lua/``) sent through the group-commit
pipeline; notifications travel on Pub/Sub channels (``redis_listener``; sharded
Pub/Sub on a cluster, ``redis_cluster``).

Topology: the URL names one server or any node of a Redis Cluster; ``connect()``
(called by ``start()``) tells which (``redis_cluster.resolve_topology``) and, on a
cluster, swaps in the cluster client and the sharded listener before first use.

Resets: ``quiesce:generation`` holds a random id, written once (no TTL) into an empty
store. Redis restarted empty, flushed or evicting loses it with the runs, so the
store reads it back with every lease renewal (in the same round trip), after every
reconnect of its Pub/Sub connection, and whenever a progress event or a terminal
write finds its run gone. When it vanished or changed, the store logs
``store_reset`` once, tells its owner (the ``quiesce_store_resets_total`` counter)
and writes the runs this process is executing back — record, ``run_started`` event
and worker list, as their create did — so they stay readable and their terminal
write succeeds. Their progress events from before the reset are lost, and so is
every other run.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any, Final

import msgspec
import structlog
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from service.config import RedisMode
from service.errors import (
    IdempotencyInProgress,
    IdempotencyMismatch,
    RunNotFound,
    StoreUnavailable,
)
from service.schemas import (
    Event,
    RunProgress,
    RunRecord,
    RunStarted,
    RunStartedData,
    event_decoder,
    json_encoder,
    record_decoder,
    terminal_event_for,
)
from service.store.base import (
    CLAIM_TTL_SECONDS,
    MAX_EVENTS_PER_RUN,
    CancelListener,
    CancelOutcome,
    EventWatch,
    parse_cursor,
)
from service.store.redis_cluster import (
    ShardedListener,
    cluster_client,
    resolve_topology,
)
from service.store.redis_commands import Command, CommandPipeline, LuaScript, Undo
from service.store.redis_connect import RedisConnector
from service.store.redis_keys import (
    CANCEL_CHANNEL_PREFIX,
    EVENTS_CHANNEL_PREFIX,
    GENERATION_KEY,
    WORKERS_KEY,
    KeyLayout,
    events_key,
    run_key,
    worker_runs_key,
)
from service.store.redis_listener import NotificationListener
from service.store.redis_queue import QUEUE_SCRIPTS, RedisQueue, RedisQueueMethods
from service.store.redis_server import (
    CheckFailed,
    Misconfigured,
    ServerReport,
    Topology,
    classify,
    inspect,
    probe_key,
    self_check,
)

log = structlog.get_logger(__name__)

__all__ = [
    "CANCEL_CHANNEL_PREFIX",
    "EVENTS_CHANNEL_PREFIX",
    "GENERATION_KEY",
    "WORKERS_KEY",
    "RedisRunStore",
    "events_key",
    "run_key",
    "worker_runs_key",
]

#: Pipelines on the wire at once; the pool holds exactly that many connections.
MAX_IN_FLIGHT: Final = 4
#: The most a caller waits for any store operation; past it the store counts as
#: unavailable (a 503 with Retry-After, never a hang).
CALL_TIMEOUT_SECONDS: Final = 2.0
#: Each socket read or write; a connection that blocks this long is dropped.
SOCKET_TIMEOUT_SECONDS: Final = 2.0
CONNECT_TIMEOUT_SECONDS: Final = 1.0
#: Slack added to a running run's key TTL beyond its own timeout.
RUNNING_TTL_MARGIN_SECONDS: Final = 300

_SCRIPTS: Final = {
    name: LuaScript.load(name)
    for name in (
        "claim", "release", "create", "append", "finalize", "cancel",
        "heartbeat", "expired", "forget", "discard", "generation",
    )
} | QUEUE_SCRIPTS  # fmt: skip
#: The most expired workers one reaper pass looks at.
EXPIRED_BATCH: Final = 100
#: After a refused write: how often its undo is tried.
UNDO_ATTEMPTS: Final = 5
UNDO_FIRST_RETRY_SECONDS: Final = 0.5
#: How often an idempotency claim's release is repeated while the store is away.
RELEASE_RETRY_SECONDS: Final = 0.2


class RedisRunStore(RedisQueueMethods):
    """A RunStore on Redis (see the module docstring for the key layout; the pending
    queue of retried runs is ``redis_queue``)."""

    def __init__(
        self,
        url: str,
        *,
        retention_seconds: int,
        max_events: int = MAX_EVENTS_PER_RUN,
        on_error: Callable[[str], None] | None = None,
        connector: RedisConnector | None = None,
        min_replicas: int = 0,
        wait_timeout_seconds: float = 0.5,
        mode: RedisMode = "auto",
    ) -> None:
        self._url = url
        self._mode = mode
        self._layout = KeyLayout()
        self._connected = False
        self._cancel_registration: tuple[str, CancelListener] | None = None
        self._retention = retention_seconds
        self._max_events = max_events
        self._on_error = on_error
        self._to_unlist: dict[str, list[str]] = {}
        self._unlisting: asyncio.Future[None] | None = None
        #: The generation this process has seen (None: not read yet).
        self._generation: str | None = None
        #: A reset was noticed and the running runs are not all written back yet.
        self._restore_pending = False
        self._generation_lock = asyncio.Lock()
        self._running: Callable[[], Collection[RunRecord]] = tuple
        self._on_reset: Callable[[], None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        #: Per run id: writes being taken back (a refused create, a claim to release),
        #: sent ahead of a new claim of that id (see claim_idempotency).
        self._to_take_back: dict[str, dict[str, list[Command]]] = {}
        #: When a call last failed as unavailable (loop time), and the lease length
        #: this process renews with: reaping waits one lease after an outage.
        self._last_outage: float | None = None
        self._lease_ttl = 0.0
        # Standalone or Sentinel-managed, TLS or not (redis_connect); on a cluster
        # (found by connect()) these clients are replaced by the cluster's.
        self._connector = connector or RedisConnector.from_url(url)
        #: Extra client options (TLS) given to every connection of every topology.
        self._connection_kwargs: Mapping[str, Any] = self._connector.ssl
        self._min_replicas = min_replicas
        self._wait_timeout = wait_timeout_seconds
        # Commands: a short retry absorbs a dropped connection; the scripts are safe
        # to repeat after a lost reply (see lua/). The pipelines' connections have no
        # read timeout of their own: the group commit bounds each whole pipeline
        # (SOCKET_TIMEOUT_SECONDS) instead of every reply in it, which would cost a
        # timer per command. Server inspection keeps its per-read timeout (_redis).
        retry = Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=0.25),
            retries=1,
            supported_errors=(RedisConnectionError,),
        )
        pool: dict[str, Any] = {
            "blocking": True,
            "max_connections": MAX_IN_FLIGHT,
            "timeout": SOCKET_TIMEOUT_SECONDS,
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            # Retry a dropped connection once; a timeout is already an outage.
            "retry": retry,
            "health_check_interval": 30,
        }
        self._pipelines = self._connector.client(**pool, socket_timeout=None)
        self._redis = self._connector.client(**pool, socket_timeout=SOCKET_TIMEOUT_SECONDS)
        self._commands = CommandPipeline(
            self._pipelines,
            scripts=_SCRIPTS.values(),
            timeout=CALL_TIMEOUT_SECONDS,
            pipeline_timeout=SOCKET_TIMEOUT_SECONDS,
            max_in_flight=MAX_IN_FLIGHT,
            min_replicas=min_replicas,
            wait_timeout=wait_timeout_seconds,
        )
        # Pub/Sub: its own connection, no hidden retries, so the listener sees every
        # disconnect and can resync after it (and, under Sentinel, reconnects to
        # whichever server is the master then).
        self._listener: NotificationListener | ShardedListener = NotificationListener(
            self._connector.client(
                blocking=False,
                max_connections=2,
                socket_timeout=SOCKET_TIMEOUT_SECONDS,
                socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                retry=Retry(NoBackoff(), retries=0),
            ),
            cancel_channel=self._layout.cancel_channel,
            events_channel=self._layout.events_channel,
        )
        self._queue = RedisQueue(
            # Its own connection for the "queued" notices; under a cluster, any node
            # passes classic Pub/Sub to all of them.
            self._connector.client(
                blocking=False,
                max_connections=1,
                socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                retry=Retry(NoBackoff(), retries=0),
            ),
            call=self._call,
            unlist=self._unlist_soon,
            run_key=run_key,
            events_key=events_key,
            worker_runs_key=worker_runs_key,
            events_channel=lambda run_id: self._layout.events_channel(run_id),
            publish=lambda: self._layout.publish,
            ttl=self._running_ttl,
            retention_seconds=retention_seconds,
            max_events=max_events,
        )

    @property
    def cluster(self) -> bool:
        """Whether the store runs on Redis Cluster (known once connected)."""
        return self._layout.cluster

    async def connect(self) -> None:
        """Tell the topology and set the clients up for it (once; start() calls it).

        Raises RedisModeMismatch (a ConfigError) when QUIESCE_REDIS_MODE names a
        mode the server contradicts.
        """
        if self._connected:
            return
        self._connected = True
        if self._connector.topology == "sentinel":
            log.info("redis_topology", mode="sentinel", configured=self._mode)
            return  # the sentinels name the master (redis_connect)
        topology = await resolve_topology(
            self._url, self._mode, connection_kwargs=self._connection_kwargs
        )
        log.info("redis_topology", mode=topology, configured=self._mode)
        if topology == "cluster":
            await self._use_cluster()

    async def _use_cluster(self) -> None:
        """Replace the (unused) single-server clients by the cluster's."""
        await self._commands.close()
        await self._pipelines.aclose()
        await self._redis.aclose()
        self._layout = KeyLayout(cluster=True)
        cluster = cluster_client(
            self._url,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            connection_kwargs=self._connection_kwargs,
        )
        self._redis = cluster  # type: ignore[assignment]
        self._pipelines = cluster  # type: ignore[assignment]
        self._commands = CommandPipeline(
            cluster,
            scripts=_SCRIPTS.values(),
            timeout=CALL_TIMEOUT_SECONDS,
            max_in_flight=MAX_IN_FLIGHT,
            # Confirmed per node: a WAIT to every node a confirmed write went to.
            min_replicas=self._min_replicas,
            wait_timeout=self._wait_timeout,
        )
        standalone_listener = self._listener
        self._listener = ShardedListener(
            cluster, self._layout, socket_timeout=SOCKET_TIMEOUT_SECONDS
        )
        if self._cancel_registration is not None:
            self._listener.listen_for_cancels(*self._cancel_registration)
        await standalone_listener.close()

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        await self.connect()
        await self._listener.start()
        await self._queue.start()
        # Not awaited: a Redis that is away at start must not delay it (the first
        # lease renewal reads the generation then).
        self._spawn(self._check_generation())
        self._spawn(self._warn_about_server())

    async def close(self) -> None:
        self._closing = True
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(self._background)
        if self._unlisting is not None:
            await asyncio.wait([self._unlisting])
        await self._commands.close()
        await self._listener.close()
        await self._queue.close()
        if self._pipelines is not self._redis:
            await self._pipelines.aclose()
        await self._redis.aclose()
        await self._connector.aclose()

    async def ping(self) -> None:
        await self._call("ping", [("PING",)])

    def listen_for_cancels(self, worker_id: str, listener: CancelListener) -> None:
        # Every (re)connect of the Pub/Sub connection resyncs the listener: the
        # moment a restarted Redis is back, so the generation is read then too.
        wrapped = _AlsoOnResync(listener, lambda: self._spawn(self._check_generation()))
        self._cancel_registration = (worker_id, wrapped)
        self._listener.listen_for_cancels(worker_id, wrapped)

    def on_reset(
        self, running: Callable[[], Collection[RunRecord]], reset: Callable[[], None]
    ) -> None:
        self._running = running
        self._on_reset = reset

    # --- creation -----------------------------------------------------------------

    async def claim_idempotency(
        self, run_id: str, fingerprint: str, token: str
    ) -> RunRecord | None:
        # Writes still to be taken back for this run id (a create refused, its claim
        # not yet released — typically because the store was away) go first, in the
        # same pipeline: the key's retry must find the key free, not "pending" (409)
        # or the refused create (a replay of a run that was never started).
        taken_back = self._to_take_back.get(run_id, {})
        prefix = [command for commands in taken_back.values() for command in commands]
        *_, reply = await self._call(
            "claim",
            [
                *prefix,
                _script("claim", [run_key(run_id)], [fingerprint, CLAIM_TTL_SECONDS, token]),
            ],
            undo=partial(self._undo, "claim", partial(self._release_once, run_id, token)),
        )
        for name in list(taken_back):
            self._taken_back(run_id, name)
        outcome = reply[0].decode()
        if outcome == "claimed":
            return None
        if outcome == "mismatch":
            raise IdempotencyMismatch("the idempotency key was used with a different request body")
        if outcome == "pending":
            raise IdempotencyInProgress("a request with this idempotency key is being admitted")
        return record_decoder.decode(reply[1])

    async def release_idempotency(self, run_id: str, token: str) -> None:
        """Release a claim whose create failed; repeated while the store is away.

        A claim left behind answers the key's retries with 409 until it expires
        (CLAIM_TTL_SECONDS). A failover is exactly when the first release fails; until
        it lands, a retry of the key on this process sends it first (see
        claim_idempotency).
        """
        self._take_back(run_id, "release", [_script("release", [run_key(run_id)], [token])])
        deadline = asyncio.get_running_loop().time() + CLAIM_TTL_SECONDS
        while run_id in self._to_take_back:
            try:
                await self._release_once(run_id, token)
                return
            except StoreUnavailable:
                if self._closing or asyncio.get_running_loop().time() > deadline:
                    self._taken_back(run_id, "release")
                    raise
            await asyncio.sleep(RELEASE_RETRY_SECONDS)

    async def _release_once(self, run_id: str, token: str) -> None:
        await self._call("release", [_script("release", [run_key(run_id)], [token])])
        self._taken_back(run_id, "release")

    def _take_back(self, run_id: str, name: str, commands: list[Command]) -> None:
        self._to_take_back.setdefault(run_id, {})[name] = commands

    def _taken_back(self, run_id: str, name: str) -> None:
        pending = self._to_take_back.get(run_id)
        if pending is not None:
            pending.pop(name, None)
            if not pending:
                del self._to_take_back[run_id]

    async def create(
        self, record: RunRecord, started: RunStarted, *, input: dict[str, Any] | None = None
    ) -> None:
        # Listed under its worker first, so a running run can always be found by the
        # reaper; both in one pipeline, in this order.
        kept: list[Command] = []
        if input is not None:  # a run that may be retried: its input, for an adopter
            kept.append(("HSET", run_key(record.run_id), "input", json_encoder.encode(input)))
        await self._call(
            "create",
            [
                ("SADD", worker_runs_key(record.worker_id), record.run_id),
                *kept,
                self._create_command(record, started),
            ],
            undo=partial(self._undo, "create", partial(self._discard, record)),
            confirm=True,
        )

    def _running_ttl(self, record: RunRecord) -> int:
        return int(self._retention + record.timeout_seconds) + RUNNING_TTL_MARGIN_SECONDS

    def _create_command(self, record: RunRecord, started: RunStarted) -> Command:
        run_id = record.run_id
        ttl = self._running_ttl(record)
        args = [
            json_encoder.encode(record),
            record.worker_id,
            json_encoder.encode(started),
            ttl,
            self._max_events,
            self._layout.events_channel(run_id),
            self._layout.publish,
        ]
        return _script("create", [run_key(run_id), events_key(run_id)], args)

    # --- reads --------------------------------------------------------------------

    async def get(self, run_id: str) -> RunRecord | None:
        (raw,) = await self._call("get", [("HGET", run_key(run_id), "record")])
        return None if raw is None else record_decoder.decode(raw)

    async def events(self, run_id: str, *, after: str | None, limit: int) -> list[Event] | None:
        start = "-" if after is None else f"({'-'.join(map(str, parse_cursor(after)))}"
        exists, entries = await self._call(
            "events",
            [
                ("HEXISTS", run_key(run_id), "record"),
                ("XRANGE", events_key(run_id), start, "+", "COUNT", limit),
            ],
        )
        if not exists:
            return None
        return [_decode_entry(entry_id, fields) for entry_id, fields in entries]

    def watch(self, run_id: str) -> AbstractAsyncContextManager[EventWatch]:
        return self._listener.watch(run_id)

    async def cancel_requested(self, run_ids: Collection[str]) -> set[str]:
        ids = list(run_ids)
        if not ids:
            return set()
        flags = await self._call("cancel_requested", [("HGET", run_key(i), "cancel") for i in ids])
        return {run_id for run_id, flag in zip(ids, flags, strict=True) if flag}

    # --- writes -------------------------------------------------------------------

    async def append(
        self, run_id: str, event: RunProgress, *, seq: int | None = None
    ) -> str | None:
        return await self.append_many(run_id, (event,), first_seq=seq)

    async def append_many(
        self, run_id: str, events: Sequence[RunProgress], *, first_seq: int | None = None
    ) -> str | None:
        # One script call for the whole batch (see lua/append.lua).
        encode = json_encoder.encode
        command = _script(
            "append",
            [run_key(run_id), events_key(run_id)],
            [
                self._max_events,
                self._layout.events_channel(run_id),
                first_seq or 0,
                self._layout.publish,
                *[encode(event) for event in events],
            ],
        )
        (reply,) = await self._call("append", [command])
        if reply == -1:
            # The run is gone: if the store was reset, it is written back; then again.
            await self._check_generation()
            await self._reassert(run_id)
            (reply,) = await self._call("append", [command])
        return None if reply is None or reply == -1 else reply.decode()

    async def finalize(self, record: RunRecord) -> bool:
        run_id = record.run_id
        args = [
            json_encoder.encode(record),
            record.status,
            json_encoder.encode(terminal_event_for(record)),
            self._retention,
            self._max_events,
            self._layout.events_channel(run_id),
            self._layout.publish,
            record.worker_id,  # (only that worker's attempt is ended: see finalize.lua)
        ]
        command = _script("finalize", [run_key(run_id), events_key(run_id)], args)
        (won,) = await self._call("finalize", [command], confirm=True)
        if won == -1:
            # The run is gone: if the store was reset, it is written back; then again.
            await self._check_generation()
            await self._reassert(run_id)
            (won,) = await self._call("finalize", [command], confirm=True)
        # Unlisted only once terminal (a crash in between leaves the reaper a no-op).
        self._unlist_soon(record.worker_id, run_id)
        return bool(won == 1)

    async def request_cancel(self, run_id: str) -> CancelOutcome:
        # On a cluster the owner's channel is in the owner's slot, which the script
        # may not touch: it answers the owner and the notice is sent separately.
        prefix = "" if self._layout.cluster else CANCEL_CHANNEL_PREFIX
        (reply,) = await self._call(
            "cancel", [_script("cancel", [run_key(run_id)], [run_id, prefix])]
        )
        outcome, _, owner = reply.decode().partition(":")
        if owner:
            await self._call("cancel", [("SPUBLISH", self._layout.cancel_channel(owner), run_id)])
        if outcome == "missing":
            raise RunNotFound(f"run {run_id} not found")
        return CancelOutcome(outcome)

    # --- worker leases --------------------------------------------------------------

    async def heartbeat(self, worker_id: str, ttl_seconds: float) -> None:
        """Renew the lease, read the generation, and re-assert the runs executed here.

        A failover can drop the last writes a master acknowledged (replication is
        asynchronous), and on a cluster that can be one node's share alone, with the
        generation marker intact elsewhere. So each renewal also re-lists this
        process's running runs under their worker (one SADD per worker) and asks
        whether each record is still there (one HEXISTS each, in the same
        pipelined round trip); a run that is gone is written back as its create
        did — a run a worker executes never disappears for longer than one renewal.
        """
        self._lease_ttl = ttl_seconds
        running = [record for record in self._running() if not record.is_terminal]
        by_worker: dict[str, list[str]] = {}
        for record in running:
            by_worker.setdefault(record.worker_id, []).append(record.run_id)
        commands: list[Command] = [
            _script(
                "heartbeat",
                [self._layout.lease_key(worker_id)],
                [worker_id, int(ttl_seconds * 1000)],
            ),
            self._generation_command(),
            *(("SADD", worker_runs_key(owner), *ids) for owner, ids in by_worker.items()),
            *(("HEXISTS", run_key(record.run_id), "record") for record in running),
        ]
        replies = await self._call("heartbeat", commands)
        await self._settle_generation(replies[1].decode())
        present = replies[2 + len(by_worker) :]
        missing = [record for record, there in zip(running, present, strict=True) if not there]
        if missing and not self._restore_pending:
            log.warning(
                "store_runs_missing",
                runs=len(missing),
                detail="runs executing here were missing from the store (a failover lost "
                "writes?); written back",
            )
            await self._restore(missing)

    async def retire(self, worker_id: str) -> None:
        await self._call("retire", [("ZREM", self._layout.lease_key(worker_id), worker_id)])

    async def expired_workers(self) -> list[str]:
        """Workers whose lease expired — none within one lease period of an outage.

        While Redis (or, on a cluster, the master holding a lease shard) is away, no
        worker can renew; once it is back every live worker renews within a third
        of its lease. Reaping before that would end runs that are still executing,
        so a store that has just failed a call defers reaping for one lease period.
        """
        if self._last_outage is not None:
            since = asyncio.get_running_loop().time() - self._last_outage
            if since < self._lease_ttl:
                log.info("reaping_deferred", seconds_since_outage=round(since, 2))
                return []
        # Every shard of the lease index in one pipelined pass (one on one server).
        replies = await self._call(
            "expired",
            [_script("expired", [key], [EXPIRED_BATCH]) for key in self._layout.lease_keys()],
        )
        return [worker_id.decode() for reply in replies for worker_id in reply][:EXPIRED_BATCH]

    async def runs_of(self, worker_id: str) -> list[str]:
        if self._unlisting is not None:
            await asyncio.wait([self._unlisting])  # read what this process already wrote
        (members,) = await self._call("runs_of", [("SMEMBERS", worker_runs_key(worker_id))])
        return sorted(member.decode() for member in members)

    async def orphans(self, worker_id: str) -> list[str]:
        executing = {record.run_id for record in self._running()}
        return [run_id for run_id in await self.runs_of(worker_id) if run_id not in executing]

    async def forget(self, worker_id: str, run_ids: Collection[str]) -> None:
        commands: list[Command] = []
        if run_ids:
            commands.append(("SREM", worker_runs_key(worker_id), *run_ids))
        commands.append(_script("forget", [self._layout.lease_key(worker_id)], [worker_id]))
        await self._call("forget", commands)

    # --- the server and its generation -------------------------------------------

    async def server_report(self) -> ServerReport:
        """Version, eviction policy and persistence, as far as the server tells."""
        await self.connect()
        return await inspect(self._redis)

    async def self_check(self) -> ServerReport:
        """The deep check behind ``quiesce check`` (see redis_server); raises CheckFailed."""
        await self.connect()
        try:
            return await self_check(
                self._redis,
                _SCRIPTS.values(),
                probe_key(),
                describe=self._describe_cluster if self.cluster else self._connector.describe,
                min_replicas=self._commands.min_replicas,
                wait_timeout_ms=self._commands.wait_timeout_ms,
            )
        except Misconfigured:
            raise
        except CheckFailed as exc:
            # "No master found" keeps only each sentinel's error type: ask them again
            # for the real reason (a certificate that does not verify, ...).
            if not isinstance(exc.__cause__, MasterNotFoundError):
                raise
            reason = await self._connector.sentinel_error()
            if reason is None:
                raise
            raise classify(reason) from exc

    async def _describe_cluster(self, redis: Any) -> Topology:
        """The cluster's nodes and roles (CLUSTER NODES), for ``quiesce check``."""
        nodes = await redis.cluster_nodes()
        found = tuple(
            sorted(
                (address.split("@")[0], "master" if "master" in info["flags"] else "replica")
                for address, info in nodes.items()
            )
        )
        return Topology(mode="cluster", tls=self._connector.tls, nodes=found)

    def _generation_command(self) -> Command:
        return _script("generation", [GENERATION_KEY], [secrets.token_hex(8)])

    async def _check_generation(self) -> None:
        """Read the generation marker (writing it into an empty store) and act on it."""
        with contextlib.suppress(StoreUnavailable):
            (generation,) = await self._call("generation", [self._generation_command()])
            await self._settle_generation(generation.decode())

    async def _settle_generation(self, generation: str) -> None:
        """Compare with the generation seen before; after a reset, restore the runs.

        Serialized, so concurrent checks (a lease renewal, a reconnect, a terminal
        write) report one reset once; a restore that fails is retried by the next.
        """
        async with self._generation_lock:
            previous = self._generation
            if previous is not None and generation != previous:
                runs = list(self._running())
                log.warning(
                    "store_reset",
                    old_generation=previous,
                    generation=generation,
                    running_runs=len(runs),
                    detail="the store lost its data (empty restart, FLUSHALL or eviction); "
                    "runs executing here are written back, every other run is gone",
                )
                if self._on_reset is not None:
                    self._on_reset()
                # A flush publishes nothing: open streams would wait for a keep-alive
                # to find their run gone. They end now with a retry hint instead.
                self._listener.lose_all()
                self._restore_pending = True
            self._generation = generation
            if self._restore_pending:
                try:
                    await self._restore(list(self._running()))
                except StoreUnavailable as exc:
                    log.warning("store_restore_failed", error=str(exc))  # the next check retries
                else:
                    self._restore_pending = False

    async def _reassert(self, run_id: str) -> None:
        """Write back one run this process still executes, should it have been lost."""
        records = [r for r in self._running() if r.run_id == run_id and not r.is_terminal]
        if records:
            with contextlib.suppress(StoreUnavailable):
                await self._restore(records)

    async def _restore(self, records: list[RunRecord]) -> None:
        """Write running runs back as their create did (a run still there is kept).

        ``running()`` lists what the scheduler still holds. A run whose terminal write
        won just before the reset, and that the scheduler has not let go of yet (one
        loop turn), would come back as running; its lease list entry then lets the
        reaper end it as worker_lost once this worker is gone.
        """
        commands: list[Command] = []
        for record in records:
            if record.is_terminal:
                continue
            started = RunStarted(
                created_at=record.created_at, data=RunStartedData(worker_id=record.worker_id)
            )
            commands.append(("SADD", worker_runs_key(record.worker_id), record.run_id))
            commands.append(self._create_command(record, started))
        if commands:
            await self._call("restore", commands)
        log.info("store_runs_restored", runs=len(commands) // 2)

    async def _warn_about_server(self) -> None:
        """Start-up warnings for a server that may lose runs (see redis_server)."""
        try:
            report = await asyncio.wait_for(self.server_report(), CALL_TIMEOUT_SECONDS * 2)
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("redis_settings_unchecked", error=str(exc) or type(exc).__name__)
            return
        for setting, detail in report.warnings():
            log.warning("redis_setting_warning", setting=setting, detail=f"{setting} {detail}")

    # --- internals ----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        # Background checks retry at their next occasion: an error is logged, never
        # left as "Task exception was never retrieved".
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("store_background_failed", exc_info=exc)

    async def _call(
        self,
        operation: str,
        commands: list[Command],
        *,
        undo: Undo | None = None,
        confirm: bool = False,
    ) -> list[Any]:
        try:
            return await self._commands.run(commands, undo=undo, confirm=confirm)
        except StoreUnavailable:
            self._last_outage = asyncio.get_running_loop().time()
            if self._on_error is not None:
                self._on_error(operation)
            raise

    def _unlist_soon(self, worker_id: str, run_id: str) -> None:
        """Remove a finalized run from its worker's list, together with every other run
        finalized in the same moment: a drain of thousands of runs sends a few SREMs,
        not thousands."""
        self._to_unlist.setdefault(worker_runs_key(worker_id), []).append(run_id)
        if self._unlisting is None or self._unlisting.done():
            self._unlisting = asyncio.ensure_future(self._unlist())

    async def _unlist(self) -> None:
        await asyncio.sleep(0)  # let the writes answered in this loop turn join in
        while self._to_unlist:
            batch, self._to_unlist = self._to_unlist, {}
            try:
                await self._call("unlist", [("SREM", key, *ids) for key, ids in batch.items()])
            except StoreUnavailable:
                # Still listed, already terminal: the reaper's finalize is a no-op for them.
                log.warning("unlist_failed", runs=sum(map(len, batch.values())))

    async def _undo(self, operation: str, reverse: Undo) -> None:
        """Reverse a write its caller was told failed (see redis_commands); retried,
        because it runs right after a failure, when Redis may still be away."""
        for attempt in range(UNDO_ATTEMPTS):
            try:
                await reverse()
                return
            except StoreUnavailable:
                await asyncio.sleep(UNDO_FIRST_RETRY_SECONDS * 2**attempt)
        log.warning("store_undo_failed", operation=operation)

    async def _discard(self, record: RunRecord) -> None:
        """Remove a create whose caller was refused, should it have landed after all."""
        run_id = record.run_id
        keys = [run_key(run_id), events_key(run_id)]
        commands: list[Command] = [
            _script("discard", keys, [json_encoder.encode(record)]),
            ("SREM", worker_runs_key(record.worker_id), run_id),
        ]
        self._take_back(run_id, "discard", commands)
        removed, _ = await self._call("discard", commands)
        self._taken_back(run_id, "discard")
        if removed:
            log.warning("late_create_discarded", run_id=run_id)


class _AlsoOnResync:
    """A CancelListener that also runs ``hook`` on every resync (each reconnect)."""

    def __init__(self, inner: CancelListener, hook: Callable[[], None]) -> None:
        self._inner = inner
        self._hook = hook

    def cancel_requested(self, run_id: str) -> None:
        self._inner.cancel_requested(run_id)

    def resync(self) -> None:
        self._inner.resync()
        self._hook()


def _script(name: str, keys: list[str], args: list[Any]) -> Command:
    return _SCRIPTS[name].call(keys, args)


def _decode_entry(entry_id: bytes, fields: dict[bytes, bytes] | list[bytes]) -> Event:
    payload = fields[b"event"] if isinstance(fields, dict) else fields[1]
    event: Event = event_decoder.decode(payload)
    return msgspec.structs.replace(event, id=entry_id.decode())
