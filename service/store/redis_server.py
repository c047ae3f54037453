"""What the Redis server behind the store is, and whether it can keep the store's data.

Runs live only in Redis, so a Redis that may drop keys loses them: one that evicts
under memory pressure (any ``maxmemory-policy`` but ``noeviction``) or that keeps
nothing across a restart (neither RDB snapshots nor the append-only file). The
service still works on such a server, so these are warnings, logged at start-up and
printed by ``quiesce check``. Managed Redis often refuses ``CONFIG``; the INFO
sections then answer what they can, and the rest is reported as not checked.

``self_check`` is the deeper test behind ``quiesce check``: a write, read and delete
of a probe key, every Lua script loaded and one called, so a read-only replica, an
ACL without the needed commands or a server too old fails here, with a one-line
reason, rather than on the first run.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from service.store.redis_commands import UNAVAILABLE_ERRORS, LuaScript

#: XRANGE with an exclusive start (``(<id>``), how event pages are read, is 6.2's.
MIN_REDIS_VERSION: Final = (6, 2)
PROBE_PREFIX: Final = "quiesce:check:"
PROBE_TTL_MS: Final = 60_000


class CheckFailed(Exception):
    """The server cannot serve the store; the message is one line saying why."""


class Misconfigured(CheckFailed):
    """A failure no retry or restart fixes — wrong mode, refused credentials, a TLS
    certificate that does not verify, a server too old — so start-up stops on it,
    where an unreachable server is only a warning (it may come back)."""


@dataclass(frozen=True)
class Topology:
    """What ``quiesce check`` found: the mode, TLS, and each node with its role."""

    mode: str
    tls: bool
    #: (address, role): "master", "replica", "sentinel", or a cluster node's flags.
    nodes: tuple[tuple[str, str], ...]
    #: Replicas the master reports connected (None when it could not be read).
    connected_replicas: int | None = None

    def describe(self) -> str:
        nodes = ", ".join(f"{address} ({role})" for address, role in self.nodes) or "unknown"
        return f"mode {self.mode}; TLS {'on' if self.tls else 'off'}; nodes {nodes}"


@dataclass(frozen=True)
class ServerReport:
    """The server's version and the settings that decide whether it keeps data.

    ``None`` means the value could not be read (refused by an ACL or a managed
    service).
    """

    version: str | None
    eviction_policy: str | None
    rdb_save: str | None
    aof_enabled: bool | None
    #: Filled by ``quiesce check`` (self_check), not by the start-up inspection.
    topology: Topology | None = None

    def persistence(self) -> str:
        rdb = "off" if self.rdb_save == "" else f'"{self.rdb_save}"'
        if self.rdb_save is None:
            rdb = "unknown"
        aof = "unknown" if self.aof_enabled is None else ("on" if self.aof_enabled else "off")
        return f"rdb save {rdb}, aof {aof}"

    def warnings(self) -> list[tuple[str, str]]:
        """(setting, what to do) for each setting that may lose runs (or a server too old)."""
        found: list[tuple[str, str]] = []
        if self.version is not None and version_tuple(self.version) < MIN_REDIS_VERSION:
            minimum = ".".join(map(str, MIN_REDIS_VERSION))
            found.append(("version", f"{self.version} is too old: use Redis {minimum} or later"))
        if self.eviction_policy is None:
            found.append(
                (
                    "maxmemory-policy",
                    "could not be checked (CONFIG GET and INFO memory refused); "
                    "it must be noeviction, or Redis may drop runs under memory pressure",
                )
            )
        elif self.eviction_policy != "noeviction":
            found.append(
                (
                    "maxmemory-policy",
                    f"is {self.eviction_policy}: set maxmemory-policy noeviction, or Redis "
                    "drops runs under memory pressure",
                )
            )
        if self.aof_enabled or self.rdb_save:
            return found  # one of them is on: data survives a restart
        if self.aof_enabled is None or self.rdb_save is None:
            found.append(
                (
                    "persistence",
                    "could not be checked (CONFIG GET refused): enable appendonly yes "
                    "or RDB snapshots (save), or a restart of Redis loses every run",
                )
            )
        else:
            found.append(
                (
                    "persistence",
                    'is off (save "" and appendonly no): set appendonly yes or a save '
                    "schedule, or a restart of Redis loses every run",
                )
            )
        return found


async def inspect(redis: Redis) -> ServerReport:
    """Read the server's version, eviction policy and persistence, as far as allowed."""
    server = await _info(redis, "server")
    memory = await _info(redis, "memory")
    persistence = await _info(redis, "persistence")
    policy = await _config(redis, "maxmemory-policy")
    if policy is None and "maxmemory_policy" in memory:
        policy = str(memory["maxmemory_policy"])
    appendonly = await _config(redis, "appendonly")
    aof: bool | None = None
    if appendonly is not None:
        aof = appendonly == "yes"
    elif "aof_enabled" in persistence:
        aof = bool(int(persistence["aof_enabled"]))
    version = server.get("redis_version")
    return ServerReport(
        version=None if version is None else str(version),
        eviction_policy=policy,
        rdb_save=await _config(redis, "save"),
        aof_enabled=aof,
    )


async def self_check(
    redis: Redis,
    scripts: Iterable[LuaScript],
    probe_key: str,
    *,
    describe: Callable[[Redis], Awaitable[Topology]] | None = None,
    min_replicas: int = 0,
    wait_timeout_ms: int = 500,
) -> ServerReport:
    """Prove the store can work on this server; raise CheckFailed with the reason.

    ``describe`` finds the topology (see redis_connect); with ``min_replicas`` the
    probe write must also be confirmed by that many replicas (WAIT), as creates are.
    """
    try:
        await redis.ping()
        report = await inspect(redis)
        if report.version is not None and version_tuple(report.version) < MIN_REDIS_VERSION:
            minimum = ".".join(map(str, MIN_REDIS_VERSION))
            raise Misconfigured(
                f"version {report.version} is too old: {minimum} or later is needed"
            )
        if describe is not None:
            report = replace(report, topology=await describe(redis))
        await _probe(redis, probe_key, min_replicas=min_replicas, wait_timeout_ms=wait_timeout_ms)
        for script in scripts:
            try:
                await redis.script_load(script.source)
            except ResponseError as exc:
                raise CheckFailed(f"loading the {script.name} script was refused: {exc}") from exc
        try:
            # A read-only script: the store calls every script this way (EVALSHA).
            await redis.evalsha(_read_only_script(scripts).sha, 1, "quiesce:workers", 0)
        except ResponseError as exc:
            raise CheckFailed(f"calling a script (EVALSHA) was refused: {exc}") from exc
    except CheckFailed:
        raise
    except Exception as exc:
        raise classify(exc) from exc
    return report


def classify(exc: BaseException) -> CheckFailed:
    """One line for a failure, as Misconfigured when no retry can fix it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    lowered = text.lower()
    if lowered.startswith("no master found"):
        text = _sentinel_summary(text)
    if "certificate verify failed" in lowered or "certificate_verify_failed" in lowered:
        return Misconfigured(
            "TLS verification failed (is QUIESCE_REDIS_CA_FILE the CA that signed the "
            f"server's certificate, and the host name in it?): {text}"
        )
    if "tlsv1 alert" in lowered or ("ssl" in lowered and "handshake" in lowered):
        return Misconfigured(f"the TLS handshake failed (a client certificate needed?): {text}")
    if "unknown command 'sentinel'" in lowered or "unknown command `sentinel`" in lowered:
        return Misconfigured(
            "the hosts of the redis+sentinel:// URL are not sentinels (they do not know "
            f"SENTINEL): use redis:// for a server: {text}"
        )
    if any(
        word in lowered
        for word in ("wrongpass", "invalid username-password", "noauth", "authenticationerror")
    ):
        if "no master found" in lowered:
            return Misconfigured(
                "authentication failed: the sentinels refused the credentials "
                f"(QUIESCE_REDIS_SENTINEL_PASSWORD?): {text}"
            )
        return Misconfigured(f"authentication failed: {text}")
    if isinstance(exc, AuthenticationError | AuthenticationWrongNumberOfArgsError):
        return Misconfigured(f"authentication failed: {text}")
    if "no master found" in lowered:
        return CheckFailed(f"no sentinel names a master that is up: {text}")
    if isinstance(exc, (*UNAVAILABLE_ERRORS, RedisConnectionError)):
        return CheckFailed(f"unreachable: {text}")
    if isinstance(exc, ResponseError):
        return CheckFailed(f"the server refused a command: {text}")
    return CheckFailed(f"check failed: {type(exc).__name__}: {text}")


def _sentinel_summary(text: str) -> str:
    """redis-py's "No master found" lists each sentinel's client repr; keep the gist:
    the master's name and each sentinel's error (type and message)."""
    head = text.split(" : ", 1)[0]
    errors = re.findall(r"> - (?:\w+:)?(\w+(?:Error|Exception))(?:\('([^']*)'\))?", text)
    if not errors:
        return head
    gist = "; ".join(
        sorted({f"{kind}: {message}" if message else kind for kind, message in errors})
    )
    return f"{head} ({len(errors)} sentinels answered: {gist})"


def probe_key() -> str:
    return PROBE_PREFIX + secrets.token_hex(8)


async def _probe(redis: Redis, key: str, *, min_replicas: int, wait_timeout_ms: int) -> None:
    value = secrets.token_hex(8)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(key, value, px=PROBE_TTL_MS)
            if min_replicas:
                # On a cluster, the replicas of the node that holds the probe key.
                where: dict[str, Any] = (
                    {"target_nodes": redis.get_node_from_key(key)}
                    if isinstance(redis, RedisCluster)
                    else {}
                )
                pipe.execute_command("WAIT", min_replicas, wait_timeout_ms, **where)
            replies = await pipe.execute()
    except ReadOnlyError as exc:
        raise CheckFailed(f"the server refused a write (a read-only replica?): {exc}") from exc
    except NoPermissionError as exc:
        raise CheckFailed(f"writing a probe key was refused: {exc}") from exc
    if min_replicas and replies[-1] < min_replicas:
        await redis.delete(key)
        raise CheckFailed(
            f"only {replies[-1]} replicas confirmed the probe write within {wait_timeout_ms} ms; "
            f"QUIESCE_REDIS_MIN_REPLICAS is {min_replicas}, so every create would get 503"
        )
    read = await redis.get(key)
    await redis.delete(key)
    if (read.decode() if isinstance(read, bytes) else read) != value:
        raise CheckFailed(f"the probe key {key} read back {read!r}, not what was written")


def _read_only_script(scripts: Iterable[LuaScript]) -> LuaScript:
    return next(script for script in scripts if script.name == "expired")


async def replication_nodes(
    redis: Redis, address: str
) -> tuple[str, tuple[tuple[str, str], ...], int | None]:
    """(mode, nodes, connected replicas) of the server ``redis`` is connected to, from
    INFO (``address`` names it). A cluster node reports the cluster's nodes
    (CLUSTER NODES) — the hook for the cluster topology."""
    server = await _info(redis, "server")
    if server.get("redis_mode") == "sentinel":
        raise Misconfigured(
            f"{address} is a sentinel, not a Redis server: use a redis+sentinel:// URL"
        )
    if server.get("redis_mode") == "cluster":
        return "cluster", await _cluster_nodes(redis), None
    replication = await _info(redis, "replication")
    role = "master" if replication.get("role", "master") == "master" else "replica"
    nodes = [(address, role)]
    for name, value in replication.items():
        if name.startswith("slave") and isinstance(value, dict) and "ip" in value:
            nodes.append((f"{value['ip']}:{value['port']}", f"replica, {value.get('state')}"))
    connected = replication.get("connected_slaves")
    return "standalone", tuple(nodes), None if connected is None else int(connected)


async def _cluster_nodes(redis: Redis) -> tuple[tuple[str, str], ...]:
    try:
        raw = await redis.execute_command("CLUSTER NODES")  # type: ignore[no-untyped-call]
    except ResponseError:
        return ()
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            nodes.append((fields[1].split("@")[0], fields[2].replace("myself,", "")))
    return tuple(nodes)


def version_tuple(text: str) -> tuple[int, ...]:
    """``"7.0.15"`` → ``(7, 0)``: the major and minor version, to compare."""
    parts = []
    for part in text.split(".")[:2]:
        parts.append(int(part) if part.isdigit() else 0)
    return tuple(parts)


async def _info(redis: Redis, section: str) -> dict[str, Any]:
    try:
        info: dict[str, Any] = await redis.info(section)
    except ResponseError:
        return {}
    return info


async def _config(redis: Redis, name: str) -> str | None:
    try:
        reply = await redis.config_get(name)
    except ResponseError:  # refused by an ACL, or renamed away by a managed service
        return None
    value = reply.get(name)
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
