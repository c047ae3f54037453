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

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    ReadOnlyError,
    ResponseError,
)

from service.store.redis_commands import UNAVAILABLE_ERRORS, LuaScript

#: XRANGE with an exclusive start (``(<id>``), how event pages are read, is 6.2's.
MIN_REDIS_VERSION: Final = (6, 2)
PROBE_PREFIX: Final = "quiesce:check:"
PROBE_TTL_MS: Final = 60_000


class CheckFailed(Exception):
    """The server cannot serve the store; the message is one line saying why."""


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


async def self_check(redis: Redis, scripts: Iterable[LuaScript], probe_key: str) -> ServerReport:
    """Prove the store can work on this server; raise CheckFailed with the reason."""
    try:
        await redis.ping()
        report = await inspect(redis)
        if report.version is not None and version_tuple(report.version) < MIN_REDIS_VERSION:
            minimum = ".".join(map(str, MIN_REDIS_VERSION))
            raise CheckFailed(f"version {report.version} is too old: {minimum} or later is needed")
        await _probe(redis, probe_key)
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
    except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
        raise CheckFailed(f"authentication failed: {exc}") from exc
    except UNAVAILABLE_ERRORS as exc:
        raise CheckFailed(f"unreachable: {exc or type(exc).__name__}") from exc
    except ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS")):
            raise CheckFailed(f"authentication failed: {exc}") from exc
        raise CheckFailed(f"the server refused a command: {exc}") from exc
    return report


def probe_key() -> str:
    return PROBE_PREFIX + secrets.token_hex(8)


async def _probe(redis: Redis, key: str) -> None:
    value = secrets.token_hex(8)
    try:
        await redis.set(key, value, px=PROBE_TTL_MS)
    except ReadOnlyError as exc:
        raise CheckFailed(f"the server refused a write (a read-only replica?): {exc}") from exc
    except NoPermissionError as exc:
        raise CheckFailed(f"writing a probe key was refused: {exc}") from exc
    read = await redis.get(key)
    await redis.delete(key)
    if (read.decode() if isinstance(read, bytes) else read) != value:
        raise CheckFailed(f"the probe key {key} read back {read!r}, not what was written")


def _read_only_script(scripts: Iterable[LuaScript]) -> LuaScript:
    return next(script for script in scripts if script.name == "expired")


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
