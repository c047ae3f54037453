"""Group commit for Redis: one pipeline carries every command queued meanwhile.

Each create, append and finalize is a single Lua script call. Sending each in its
own round trip on its own pooled connection has two costs: throughput is bounded by
round trips, and a burst of concurrent requests asks the pool for more connections
than it has (``MaxConnectionsError`` from the default pool — a 500 for the client).
Here callers only queue a job (one or more commands) and await its replies; at most
``max_in_flight`` pipelines are on the wire at once, each carrying everything queued
while the previous ones were out. Connections in use are therefore bounded by
construction, and a burst is answered in a few round trips instead of one per request.
On Redis Cluster the pipeline is the cluster client's: it groups the commands by the
node that owns each key's slot, sends every node's share at once, and follows
``MOVED``/``ASK`` for the commands redirected; scripts missing on a node (a promoted
replica) are loaded on every primary and the commands sent again.

Replica confirmation (``min_replicas`` > 0): a job marked ``confirm`` (a create, a
terminal write) is answered only once ``WAIT min_replicas timeout`` — sent at the end
of the same pipeline, on the same connection — says that many replicas have every
write before it; a WAIT that counts fewer fails those jobs with StoreUnavailable (and
runs their undo), as a lost reply would. On a cluster, WAIT counts the replicas of the
one node it is sent to, so every node that received a confirmed write gets its own
WAIT, last in that node's share of the pipeline (``_run_cluster``); each job is judged
by its own node's count.

Every job also has a deadline: past it the caller gets StoreUnavailable (a 503, never
a hang) while the commands may still reach Redis. A job that fails — timed out, a
lost reply, or a caller that went away — runs its ``undo`` once its commands have
settled, so a write the caller was told did not happen does not appear later.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import StoreUnavailable

#: Errors that mean "Redis is not reachable now" rather than "this command is wrong".
UNAVAILABLE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException)
#: Replies by which Redis refuses a command because of its own state or of how the
#: operator set it up (an ACL without the command, a read-only replica during a
#: failover, maxmemory reached, a dataset still loading), not because the command is
#: wrong. The caller sees the store as unavailable — a 503 with Retry-After, a write
#: retried — and the reply's text says why; ``quiesce check`` names the cause.
REFUSAL_ERRORS = (
    NoPermissionError,
    AuthenticationError,
    ReadOnlyError,
    OutOfMemoryError,
    BusyLoadingError,
    TryAgainError,
    ClusterDownError,
    MasterDownError,
    # A redirection the cluster client could not settle (a slot still moving after
    # its retries), or one on a single-server client pointed at a cluster node.
    MovedError,
    AskError,
    # Redirections that did not settle within the cluster client's limit.
    ClusterError,
)
#: The same refusals as they come back from inside a Lua script, as plain errors.
_REFUSAL_TEXTS: Final = (
    "can't run this command", "NOPERM", "READONLY", "OOM", "BUSY", "MISCONF",
    "CLUSTERDOWN", "TRYAGAIN", "MOVED ", "ASK ", "MASTERDOWN",
)  # fmt: skip
#: How often a command that met a moving slot (TRYAGAIN) is sent again, and how far apart.
MOVING_RETRIES: Final = 8
MOVING_RETRY_SECONDS: Final = 0.05
#: How long close() waits for undos still running.
UNDO_WAIT_SECONDS: Final = 3.0
#: How often overdue jobs are looked for: a deadline may be passed by this much.
SWEEP_SECONDS: Final = 0.1

Command = tuple[Any, ...]
Undo = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class LuaScript:
    """A script from ``service/store/lua``; called by its SHA, loaded on demand."""

    name: str
    source: str = field(repr=False)
    sha: str = field(repr=False)

    @classmethod
    def load(cls, name: str) -> LuaScript:
        source = resources.files("service.store").joinpath(f"lua/{name}.lua").read_text()
        return cls(name=name, source=source, sha=hashlib.sha1(source.encode()).hexdigest())  # noqa: S324 - Redis names scripts by SHA-1

    def call(self, keys: list[str], args: list[Any]) -> Command:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


@dataclass(eq=False)
class _Job:
    future: asyncio.Future[list[Any]]
    results: list[Any]
    pending: int
    undo: Undo | None
    deadline: float
    expired: bool = False
    #: Answered only once WAIT confirms the replicas (see the module docstring).
    confirm: bool = False


class CommandPipeline:
    """Queue jobs; flush their commands in shared pipelines; bound connections and time."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        scripts: Iterable[LuaScript],
        timeout: float,
        pipeline_timeout: float | None = None,
        max_in_flight: int = 4,
        max_batch: int = 512,
        min_replicas: int = 0,
        wait_timeout: float = 0.5,
    ) -> None:
        self._redis = redis
        self.min_replicas = min_replicas
        self.wait_timeout_ms = max(round(wait_timeout * 1000), 1)
        self._scripts = {script.sha: script for script in scripts}
        self._timeout = timeout
        #: The most one pipeline may take on the wire (a single server's); past it
        #: its connection is dropped and every command in it fails as unavailable.
        self._pipeline_timeout = pipeline_timeout
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._queue: list[tuple[Command, _Job, int]] = []
        self._flushers: set[asyncio.Task[None]] = set()
        self._undos: set[asyncio.Task[None]] = set()
        #: Jobs in the order they were queued, hence of their deadlines (all the same
        #: timeout): one periodic sweep expires them, instead of a timer per job.
        self._waiting: deque[_Job] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def run(
        self, commands: list[Command], *, undo: Undo | None = None, confirm: bool = False
    ) -> list[Any]:
        """Run the commands, in order, in the next pipeline; return their replies.

        ``confirm``: with ``min_replicas`` set, answer only once WAIT has confirmed
        the writes reached that many replicas (else StoreUnavailable).

        Raises StoreUnavailable when Redis cannot be reached or does not answer in
        time, and a command's own error (e.g. a ResponseError) otherwise.
        """
        if self._closed:
            raise StoreUnavailable("the store is closed")
        loop = asyncio.get_running_loop()
        job = _Job(
            future=loop.create_future(),
            results=[None] * len(commands),
            pending=len(commands),
            undo=undo,
            deadline=loop.time() + self._timeout,
            confirm=confirm and self.min_replicas > 0,
        )
        self._waiting.append(job)
        if self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)
        self._queue.extend((command, job, index) for index, command in enumerate(commands))
        if len(self._flushers) < self._max_in_flight:
            flusher = asyncio.create_task(self._flush())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        return await job.future

    async def close(self) -> None:
        """Refuse new jobs; wait for the queued ones and (a while) for running undos."""
        self._closed = True
        while self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._undos:
            await asyncio.wait(set(self._undos), timeout=UNDO_WAIT_SECONDS)

    # --- internals ------------------------------------------------------------------

    def _sweep(self) -> None:
        """Expire the jobs past their deadline (at most SWEEP_SECONDS late)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = self._waiting
        while waiting and (waiting[0].pending == 0 or waiting[0].deadline <= now):
            job = waiting.popleft()
            if job.pending and not job.future.done():
                job.expired = True
                job.future.set_exception(
                    StoreUnavailable(f"the store did not answer within {self._timeout:g}s")
                )
        self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep) if waiting else None

    async def _flush(self) -> None:
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            await self._send(batch)

    async def _send(self, batch: list[tuple[Command, _Job, int]]) -> None:
        confirm = [job.confirm for _, job, _ in batch]
        try:
            results, acked = await self._run_merged([command for command, _, _ in batch], confirm)
            missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if missing:
                # Redis restarted (or flushed its script cache): load and run those again.
                await self._load_scripts()
                retried, acked_retry = await self._run(
                    [batch[i][0] for i in missing], [confirm[i] for i in missing]
                )
                for i, result, count in zip(missing, retried, acked_retry, strict=True):
                    results[i] = result
                    acked[i] = count
            await self._retry_moving(batch, results, acked)
        except UNAVAILABLE_ERRORS as exc:
            results = [StoreUnavailable(f"store unavailable: {exc}")] * len(batch)
            acked = [self.min_replicas] * len(batch)
        except BaseException as exc:
            # Cancelled (the loop is closing) or a bug: every caller still gets an answer.
            failure = StoreUnavailable(f"store call abandoned: {exc!r}")
            for _, job, index in batch:
                self._settle(job, index, failure)
            raise
        for (_, job, index), result, count in zip(batch, results, acked, strict=True):
            if job.confirm and count < self.min_replicas and not isinstance(result, BaseException):
                result = StoreUnavailable(
                    f"only {count} of {self.min_replicas} replicas confirmed the write "
                    f"within {self.wait_timeout_ms} ms (WAIT)"
                )
            self._settle(job, index, _as_unavailable(result))

    async def _retry_moving(
        self, batch: list[tuple[Command, _Job, int]], results: list[Any], acked: list[int]
    ) -> None:
        """Send again what met a slot being moved, while its callers still wait.

        During a resharding a script whose keys are split between two nodes gets
        TRYAGAIN, and the cluster client gives up after a few quick redirections
        (``ClusterError``). Neither ran the command, so it is sent again (a few
        times, briefly apart) instead of being reported; only a caller whose
        deadline passes sees a 503.
        """
        for _ in range(MOVING_RETRIES):
            moving = [
                i
                for i, result in enumerate(results)
                if isinstance(result, (TryAgainError, ClusterError))
                and not batch[i][1].expired
                and not batch[i][1].future.done()
            ]
            if not moving:
                return
            await asyncio.sleep(MOVING_RETRY_SECONDS)
            retried, acked_retry = await self._run(
                [batch[i][0] for i in moving], [batch[i][1].confirm for i in moving]
            )
            for i, result, count in zip(moving, retried, acked_retry, strict=True):
                results[i] = result
                acked[i] = count

    async def _run_merged(
        self, commands: list[Command], confirm: list[bool]
    ) -> tuple[list[Any], list[int]]:
        """``_run``, with the SADDs to one key merged (see ``merge_sadds``)."""
        sent, positions = merge_sadds(commands)
        if len(sent) == len(commands):
            return await self._run(commands, confirm)
        sent_confirm = [False] * len(sent)
        for i, position in enumerate(positions):
            sent_confirm[position] |= confirm[i]
        replies, acked = await self._run(sent, sent_confirm)
        return [replies[p] for p in positions], [acked[p] for p in positions]

    def _settle(self, job: _Job, index: int, result: Any) -> None:
        job.results[index] = result
        job.pending -= 1
        if job.pending:
            return
        error = next((r for r in job.results if isinstance(r, BaseException)), None)
        if not job.future.done():
            if error is None:
                job.future.set_result(job.results)
            else:
                job.future.set_exception(error)
        failed = job.expired or job.future.cancelled() or isinstance(error, StoreUnavailable)
        if failed and job.undo is not None:
            undo = asyncio.create_task(job.undo())
            self._undos.add(undo)
            undo.add_done_callback(self._undos.discard)

    async def _run(
        self, commands: list[Command], confirm: list[bool]
    ) -> tuple[list[Any], list[int]]:
        """The replies, and for each command marked in ``confirm`` how many replicas
        WAIT counted for it (the others' counts mean nothing).

        A pipeline is one connection, so the WAIT at its end covers every write in it.
        """
        if isinstance(self._redis, RedisCluster):
            return await self._run_cluster(self._redis, commands, confirm)
        wait = any(confirm)
        try:
            async with asyncio.timeout(self._pipeline_timeout):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for args in commands:
                        pipe.execute_command(*args)
                    if wait:
                        pipe.execute_command("WAIT", self.min_replicas, self.wait_timeout_ms)
                    replies = list(await pipe.execute(raise_on_error=False))
        except TimeoutError:
            # (redis-py drops a connection whose read or write was interrupted)
            raise RedisTimeoutError(
                f"the store did not answer a pipeline within {self._pipeline_timeout:g}s"
            ) from None
        if not wait:
            return replies, [0] * len(commands)
        count = replies.pop()
        return replies, [count if isinstance(count, int) else 0] * len(commands)

    async def _run_cluster(
        self, cluster: RedisCluster, commands: list[Command], confirm: list[bool]
    ) -> tuple[list[Any], list[int]]:
        """The cluster pipeline with a WAIT for every node a confirmed command goes to.

        The cluster pipeline sends each node's commands, in order, on one connection
        of that node's; a WAIT given that node as its target is sent last in that
        group, so it covers the writes before it there, and counts that node's
        replicas. With WAITs in the pipeline the client does not follow ``MOVED`` /
        ``ASK`` itself (it would re-send a command alone, on another connection,
        where no WAIT covers it): ``_follow`` does, with a WAIT where it matters.
        """
        planned: dict[int, ClusterNode] = {}
        if any(confirm):
            await cluster.initialize()  # the slot map, before the first command
            for i, args in enumerate(commands):
                if confirm[i] and (node := _node_of(cluster, args)) is not None:
                    planned[i] = node
        nodes = {node.name: node for node in planned.values()}
        sends: list[tuple[Command, ClusterNode | None]] = [(args, None) for args in commands]
        sends += [(self._wait_command, node) for node in nodes.values()]
        replies = await _cluster_pipeline(cluster, sends, follow=not nodes)
        counts = _counts(nodes, replies[len(commands) :])
        del replies[len(commands) :]
        acked = [0] * len(commands)
        for i, node in planned.items():
            acked[i] = counts[node.name]
        if nodes:
            await self._follow(cluster, commands, confirm, replies, acked)
        return replies, acked

    async def _follow(
        self,
        cluster: RedisCluster,
        commands: list[Command],
        confirm: list[bool],
        replies: list[Any],
        acked: list[int],
    ) -> None:
        """Send the redirected commands where Redis said (they did not run).

        An unconfirmed one goes through the cluster client, as it would have in the
        pipeline. A confirmed one goes to the node named by the redirection (after
        ``ASKING`` for an ``ASK``; the slot map updated for a ``MOVED``) with a WAIT
        behind it there. Redirected once more, it stays a refusal (a 503).
        """
        again: list[tuple[int, ClusterNode, bool]] = []
        for i, reply in enumerate(replies):
            if not isinstance(reply, (MovedError, AskError)):
                continue
            if not confirm[i]:
                try:
                    replies[i] = await cluster.execute_command(*commands[i])
                except Exception as exc:  # a reply, as the pipeline gives them
                    replies[i] = exc
                continue
            if isinstance(reply, MovedError):
                await cluster.nodes_manager.move_slot(reply)
            node = cluster.get_node(host=reply.host, port=reply.port)
            if node is not None:
                again.append((i, node, not isinstance(reply, MovedError)))
        if not again:
            return
        sends: list[tuple[Command, ClusterNode | None]] = []
        for i, node, asking in again:
            if asking:
                sends.append((("ASKING",), node))
            sends.append((commands[i], node))
        nodes = {node.name: node for _, node, _ in again}
        sends += [(self._wait_command, node) for node in nodes.values()]
        results = await _cluster_pipeline(cluster, sends, follow=False)
        counts = _counts(nodes, results[len(sends) - len(nodes) :])
        position = 0
        for i, node, asking in again:
            position += asking
            replies[i] = results[position]
            acked[i] = counts[node.name]
            position += 1

    @property
    def _wait_command(self) -> Command:
        return ("WAIT", self.min_replicas, self.wait_timeout_ms)

    async def _load_scripts(self) -> None:
        if isinstance(self._redis, RedisCluster):
            # SCRIPT LOAD goes to every primary (a replica promoted by a failover
            # starts with an empty script cache).
            for script in self._scripts.values():
                await self._redis.script_load(script.source)
            return
        try:
            async with asyncio.timeout(self._pipeline_timeout):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for script in self._scripts.values():
                        pipe.script_load(script.source)
                    await pipe.execute()
        except TimeoutError:
            raise RedisTimeoutError(
                f"the store did not answer within {self._pipeline_timeout:g}s"
            ) from None


def merge_sadds(commands: list[Command]) -> tuple[list[Command], list[int]]:
    """The commands to send, with every ``SADD`` to a key merged into the first one to
    that key, and for each command the position of the one that carries it.

    Each create lists its run under its worker (an ``SADD`` ahead of its script), so a
    pipeline of creates holds as many one-member SADDs to one key: one SADD with every
    member does the same, ahead of every script it preceded. Every command that
    shared it gets its reply (a count nobody reads) or its error. Any other command
    naming the key first (``SREM``, ``SMEMBERS``) ends the merging: no SADD is moved
    ahead of it.
    """
    sent: list[Command] = []
    positions: list[int] = []
    members: dict[int, list[Any]] = {}
    open_sadds: dict[Any, int] = {}
    for command in commands:
        key = command[1] if len(command) > 1 else None
        if command[0] == "SADD" and len(command) > 2:
            position = open_sadds.get(key)
            if position is not None:
                members[position].extend(command[2:])
                positions.append(position)
                continue
            open_sadds[key] = len(sent)
            members[len(sent)] = list(command[2:])
        elif key in open_sadds:
            del open_sadds[key]
        positions.append(len(sent))
        sent.append(command)
    for position, merged in members.items():
        if len(merged) > len(sent[position]) - 2:
            sent[position] = ("SADD", sent[position][1], *merged)
    return sent, positions


async def _cluster_pipeline(
    cluster: RedisCluster, sends: list[tuple[Command, ClusterNode | None]], *, follow: bool
) -> list[Any]:
    """Replies of one cluster pipeline; a command with a node goes to that node."""
    async with cluster.pipeline(transaction=False) as pipe:
        for args, node in sends:
            if node is None:
                pipe.execute_command(*args)
            else:
                pipe.execute_command(*args, target_nodes=node)
        return list(await pipe.execute(raise_on_error=False, allow_redirections=follow))


def _counts(nodes: dict[str, ClusterNode], replies: list[Any]) -> dict[str, int]:
    """Each node's WAIT reply as a count (an error counts no replica)."""
    return {
        name: count if isinstance(count, int) else 0
        for name, count in zip(nodes, replies, strict=True)
    }


def _node_of(cluster: RedisCluster, command: Command) -> ClusterNode | None:
    """The primary that owns the slot of the command's (first) key, as known now."""
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        if int(command[2]) == 0:
            return None
        key = command[3]
    elif len(command) > 1:
        key = command[1]
    else:
        return None
    try:
        return cluster.get_node_from_key(key)
    except RedisClusterException:
        return None  # the slot has no owner now (a failover under way)


def _as_unavailable(result: Any) -> Any:
    """A refusal (see REFUSAL_ERRORS) as StoreUnavailable; any other result as is.

    The cluster pipeline also hands back a lost connection as one command's result
    (a node that died between sending and answering) rather than raising it.
    """
    if isinstance(result, UNAVAILABLE_ERRORS):
        return StoreUnavailable(f"store unavailable: {result}")
    if isinstance(result, REFUSAL_ERRORS) or (
        isinstance(result, ResponseError)
        and not isinstance(result, NoScriptError)
        and any(text in str(result) for text in _REFUSAL_TEXTS)
    ):
        return StoreUnavailable(f"the store refused the command: {result}")
    return result
