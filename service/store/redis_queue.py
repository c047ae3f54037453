"""The pending queue of runs waiting for another attempt, on Redis — cluster-safe.

A run's own keys share the hash tag ``{run_id}``; the queue holds many runs, so it
cannot live in their slots. It is ``QUEUE_SHARDS`` lists, ``quiesce:{queue:<n>}:pending``
(each its own slot), and every step below touches one slot only — never a script or
multi-key command across two hash tags:

* **requeue** (the run's owner, or a reaper for a lost owner): (1) ``requeue.lua`` on
  the run: ``running`` (that attempt, that worker) → ``queued`` with its
  ``run_requeued`` event; (2) ``LPUSH`` of the entry ``<run_id>:<attempt>`` onto the
  run's shard, then a ``PUBLISH`` on ``quiesce:queued`` (adopters wake at once); (3) the
  run leaves its old worker's list. A crash between (1) and (2) leaves a ``queued``
  run in no shard — but still in the old worker's list, so once that worker's lease
  expires the reaper finds it there (it reads only that list: no scan) and enqueues
  it again.
* **adopt** (a replica with spare slots): read the oldest entries of a shard
  (``LRANGE``, nothing removed), read each run, and for each that is still ``queued``
  at that attempt: ``SADD`` to the adopter's worker list, then ``adopt.lua`` on the
  run: ``queued`` → ``running`` for this worker, with ``run_started``. Only one
  replica's compare-and-set wins. Then the entry is removed (``LREM``) by whoever saw
  it: an entry names its attempt, so a stale entry (adopted, cancelled, expired, or
  queued twice) never removes a later one. A crash between the claim and the removal
  leaves an entry that the next reader finds stale and removes.

An entry sent twice (a retried ``LPUSH``) is claimed once. A claim whose answer was
lost is looked at again at the next adoption: if the run is ours, it is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.errors import StoreUnavailable
from service.schemas import (
    RunRecord,
    RunRequeued,
    json_encoder,
    record_decoder,
    terminal_event_for,
)
from service.store.base import Adopted, Claim
from service.store.redis_commands import Command, LuaScript
from service.store.redis_listener import stop_pubsub_reader

log = structlog.get_logger(__name__)
#: Its own generator: jitter must not touch the global one (tests seed and watch it).
_random = random.Random()  # noqa: S311 - jitter, not security

#: Shards of the queue: enough to spread it over a cluster's nodes, few enough that
#: an adopter reads them all in one pass.
QUEUE_SHARDS: Final = 8
QUEUED_CHANNEL: Final = "quiesce:queued"
REPORTER_KEY: Final = "quiesce:queue:reporter"
QUEUE_SCRIPT_NAMES: Final = ("requeue", "adopt", "finalize_queued", "reporter")
QUEUE_SCRIPTS: Final = {name: LuaScript.load(name) for name in QUEUE_SCRIPT_NAMES}
LISTENER_BACKOFF_MAX_SECONDS: Final = 2.0
#: How long the "queued" notice may take; a late one only delays adoption to a poll.
PUBLISH_TIMEOUT: Final = 1.0

Call = Callable[[str, list[Command]], Awaitable[list[Any]]]


def shard_key(shard: int) -> str:
    return f"quiesce:{{queue:{shard}}}:pending"


def shard_of(run_id: str) -> int:
    return zlib.crc32(run_id.encode()) % QUEUE_SHARDS


def entry_of(run_id: str, attempt: int) -> str:
    return f"{run_id}:{attempt}"


def _script(name: str, keys: list[str], args: list[Any]) -> Command:
    return QUEUE_SCRIPTS[name].call(keys, args)


class RedisQueue:
    def __init__(
        self,
        client: Redis,
        *,
        call: Call,
        unlist: Callable[[str, str], None],
        run_key: Callable[[str], str],
        events_key: Callable[[str], str],
        worker_runs_key: Callable[[str], str],
        events_channel: Callable[[str], str],
        publish: Callable[[], str],
        ttl: Callable[[RunRecord], int],
        retention_seconds: int,
        max_events: int,
    ) -> None:
        self._call = call
        self._unlist = unlist
        self._run_key = run_key
        self._events_key = events_key
        self._worker_runs_key = worker_runs_key
        self._events_channel = events_channel
        #: PUBLISH, or SPUBLISH on a cluster (known once the store has connected).
        self._publish = publish
        self._ttl = ttl
        self._retention = retention_seconds
        self._max_events = max_events
        #: Claims whose answer was lost: (record written, input), by run id.
        self._uncertain: dict[str, tuple[RunRecord, dict[str, Any]]] = {}
        self._notified = asyncio.Event()
        #: Its own connection for the "queued" notifications (no hidden retries).
        self._client = client
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._closing = False

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="quiesce-queue-listener")

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            await stop_pubsub_reader(self._listener, lambda: self._pubsub)
        await self._client.aclose()

    # --- requeue --------------------------------------------------------------------

    async def requeue(self, queued: RunRecord, event: RunRequeued) -> bool:
        run_id = queued.run_id
        args = [
            json_encoder.encode(queued),
            queued.attempt,
            queued.worker_id,
            json_encoder.encode(event),
            self._ttl(queued),
            self._max_events,
            self._events_channel(run_id),
            self._publish(),
        ]
        keys = [self._run_key(run_id), self._events_key(run_id)]
        (won,) = await self._call("requeue", [_script("requeue", keys, args)])
        if won != 1:
            return False
        await self.enqueue(queued)
        # Listed under its old worker until it is in a shard (see the module docstring).
        self._unlist(queued.worker_id, run_id)
        return True

    async def enqueue(self, queued: RunRecord) -> None:
        entry = entry_of(queued.run_id, queued.attempt)
        await self._call("enqueue", [("LPUSH", shard_key(shard_of(queued.run_id)), entry)])
        # Then wake the adopters, on the notification connection: a cluster's pipeline
        # refuses PUBLISH (it names no slot), while a node that is given one passes it
        # to every node. At most once, like all Pub/Sub: adopters also poll.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._client.publish(QUEUED_CHANNEL, entry), PUBLISH_TIMEOUT)

    # --- adopt ----------------------------------------------------------------------

    async def adopt(self, worker_id: str, limit: int, claim: Claim) -> list[Adopted]:
        adopted = await self._settle_uncertain(worker_id)
        shards = list(range(QUEUE_SHARDS))
        _random.shuffle(shards)  # replicas start at different shards
        for shard in shards:
            if len(adopted) >= limit:
                break
            adopted += await self._adopt_from(shard, worker_id, limit - len(adopted), claim)
        return adopted

    async def _adopt_from(
        self, shard: int, worker_id: str, limit: int, claim: Claim
    ) -> list[Adopted]:
        key = shard_key(shard)
        (raw_entries,) = await self._call("adopt", [("LRANGE", key, -limit, -1)])
        if not raw_entries:
            return []
        # Oldest first, each once: an entry queued twice is one claim (a second claim of
        # the same record by this worker would look like a repeat of the first, and win).
        entries = list(dict.fromkeys(raw.decode() for raw in reversed(raw_entries)))
        run_ids = [entry.rpartition(":")[0] for entry in entries]
        reads = await self._call(
            "adopt", [("HMGET", self._run_key(run_id), "record", "input") for run_id in run_ids]
        )
        candidates: list[tuple[str, RunRecord, dict[str, Any]]] = []
        stale: list[str] = []
        for entry, (raw, raw_input) in zip(entries, reads, strict=True):
            record = None if raw is None else record_decoder.decode(raw)
            if (
                record is None
                or record.status != "queued"
                or entry != entry_of(record.run_id, record.attempt)
            ):
                stale.append(entry)
                continue
            candidates.append((entry, record, {} if raw_input is None else _decode(raw_input)))
        adopted: list[Adopted] = []
        if candidates:
            commands: list[Command] = []
            claimed: list[tuple[str, RunRecord, dict[str, Any]]] = []
            for entry, record, params in candidates:
                running, started = claim(record)
                run_id = record.run_id
                args = [
                    json_encoder.encode(running),
                    record.attempt,
                    worker_id,
                    json_encoder.encode(started),
                    self._ttl(running),
                    self._max_events,
                    self._events_channel(run_id),
                    self._publish(),
                ]
                keys = [self._run_key(run_id), self._events_key(run_id)]
                # Listed under this worker first, so a crash leaves it to the reaper.
                commands.append(("SADD", self._worker_runs_key(worker_id), run_id))
                commands.append(_script("adopt", keys, args))
                claimed.append((entry, running, params))
            try:
                replies = await self._call("adopt", commands)
            except StoreUnavailable:
                for _, running, params in claimed:
                    self._uncertain[running.run_id] = (running, params)
                raise
            lost: list[str] = []
            for index, (_, running, params) in enumerate(claimed):
                if replies[2 * index + 1] == 1:
                    adopted.append(Adopted(record=running, input=params))
                else:
                    lost.append(running.run_id)
            if lost:
                self._unlist_from(worker_id, lost)
            stale += [entry for entry, _, _ in claimed]
        await self._call("adopt", [("LREM", key, 0, entry) for entry in stale])
        return adopted

    async def _settle_uncertain(self, worker_id: str) -> list[Adopted]:
        """Claims whose answer was lost: the ones that did land are this worker's."""
        if not self._uncertain:
            return []
        uncertain, self._uncertain = self._uncertain, {}
        ids = list(uncertain)
        raws = await self._call("adopt", [("HGET", self._run_key(i), "record") for i in ids])
        adopted: list[Adopted] = []
        for run_id, raw in zip(ids, raws, strict=True):
            running, params = uncertain[run_id]
            if raw is not None and raw == json_encoder.encode(running):
                adopted.append(Adopted(record=running, input=params))
            else:
                self._unlist_from(worker_id, [run_id])
        return adopted

    def _unlist_from(self, worker_id: str, run_ids: list[str]) -> None:
        for run_id in run_ids:
            self._unlist(worker_id, run_id)

    # --- cancel, length, notifications, reporter ---------------------------------------

    async def finalize_queued(self, record: RunRecord, terminal_event: bytes) -> bool:
        run_id = record.run_id
        args = [
            json_encoder.encode(record),
            record.status,
            terminal_event,
            self._retention,
            self._max_events,
            self._events_channel(run_id),
            self._publish(),
        ]
        keys = [self._run_key(run_id), self._events_key(run_id)]
        (won,) = await self._call("finalize_queued", [_script("finalize_queued", keys, args)])
        return bool(won == 1)

    async def queued_count(self) -> int:
        lengths = await self._call(
            "queued_count", [("LLEN", shard_key(shard)) for shard in range(QUEUE_SHARDS)]
        )
        return int(sum(lengths))

    async def wait_for_queued(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._notified.wait(), within)
        self._notified.clear()

    async def hold_reporter(self, worker_id: str, ttl_seconds: float) -> bool:
        (held,) = await self._call(
            "reporter",
            [_script("reporter", [REPORTER_KEY], [worker_id, max(int(ttl_seconds * 1000), 1)])],
        )
        return bool(held == 1)

    async def _listen(self) -> None:
        """Wake adopters on ``quiesce:queued``; Pub/Sub is at-most-once, so adopters
        also poll (slowly) and a lost connection only delays adoption to that poll."""
        backoff = 0.1
        while not self._closing:
            pubsub = self._pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(QUEUED_CHANNEL)
                backoff = 0.1
                self._notified.set()  # something may have been queued while away
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                    if message is not None:
                        self._notified.set()
            except (RedisError, OSError) as exc:
                log.info("queue_listener_reconnecting", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LISTENER_BACKOFF_MAX_SECONDS)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py


def _decode(raw: bytes) -> dict[str, Any]:
    value = msgspec.json.decode(raw)
    return value if isinstance(value, dict) else {}


class RedisQueueMethods:
    """The RunStore methods of the pending queue, for RedisRunStore (kept here, apart
    from the store's other commands)."""

    _queue: RedisQueue

    async def requeue(self, queued: RunRecord, event: RunRequeued) -> bool:
        return await self._queue.requeue(queued, event)

    async def adopt(self, worker_id: str, limit: int, claim: Claim) -> list[Adopted]:
        return await self._queue.adopt(worker_id, limit, claim)

    async def enqueue(self, queued: RunRecord) -> None:
        await self._queue.enqueue(queued)

    async def finalize_queued(self, record: RunRecord) -> bool:
        return await self._queue.finalize_queued(
            record, json_encoder.encode(terminal_event_for(record))
        )

    async def queued_count(self) -> int:
        return await self._queue.queued_count()

    async def wait_for_queued(self, within: float) -> None:
        await self._queue.wait_for_queued(within)

    async def hold_reporter(self, worker_id: str, ttl_seconds: float) -> bool:
        return await self._queue.hold_reporter(worker_id, ttl_seconds)
