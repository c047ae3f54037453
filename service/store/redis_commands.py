"""Group commit for Redis: one pipeline carries every command queued meanwhile.

Each create, append and finalize is a single Lua script call. Sending each in its
own round trip on its own pooled connection has two costs: throughput is bounded by
round trips, and a burst of concurrent requests asks the pool for more connections
than it has (``MaxConnectionsError`` from the default pool — a 500 for the client).
Here callers only queue a command and await its reply; at most ``max_in_flight``
pipelines are on the wire at once, each carrying everything queued while the
previous ones were out. Connections in use are therefore bounded by construction,
and a burst is answered in a few round trips instead of one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import StoreUnavailable

#: Errors that mean "Redis is not reachable now" rather than "this command is wrong".
UNAVAILABLE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


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


class CommandPipeline:
    """Queue commands; flush them in shared pipelines; bound the connections used."""

    def __init__(self, redis: Redis, *, max_in_flight: int = 4, max_batch: int = 512) -> None:
        self._redis = redis
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushers: set[asyncio.Task[None]] = set()
        self._scripts: dict[str, LuaScript] = {}
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        """Run one command in the next pipeline and return its reply."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        if len(self._flushers) < self._max_in_flight:
            flusher = asyncio.create_task(self._flush())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        return await future

    async def script(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        self._scripts[script.sha] = script
        return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def close(self) -> None:
        """Refuse new commands, and wait until every queued one has been answered."""
        self._closed = True
        while self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)

    async def _flush(self) -> None:
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            await self._send(batch)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._run([args for args, _ in batch])
            missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if missing:
                # Redis restarted (or flushed its script cache): load and run those again.
                await self._load_scripts()
                retried = await self._run([batch[i][0] for i in missing])
                for i, result in zip(missing, retried, strict=True):
                    results[i] = result
        except UNAVAILABLE_ERRORS as exc:
            error = StoreUnavailable(f"store unavailable: {exc}")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException:
            # Cancelled (the store is closing) or a bug: nobody may wait forever.
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller went away (e.g. a cancelled request)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for args in commands:
                pipe.execute_command(*args)
            return list(await pipe.execute(raise_on_error=False))

    async def _load_scripts(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for script in self._scripts.values():
                pipe.script_load(script.source)
            await pipe.execute()
